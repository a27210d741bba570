"""Image loading, the memmap cache, dataset readers and lesion-grouped splits (real files on disk)."""
from __future__ import annotations

import csv
import io
import os
import shutil
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from model import data, images, splits
from model.data import Record, load_dataset, organize, read_class_folders, read_isic_metadata, \
    read_labelled_csv, select_task
from model.errors import UserError
from model.images import build_cache, load_image, to_square


def _rgb(w=64, h=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


# --------------------------------------------------------------------------- load_image: bad files

def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    with pytest.raises(UserError, match="corrupt.jpg: not a readable image"):
        load_image(p)


def test_non_image_renamed_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("patient notes, not a picture\n")
    with pytest.raises(UserError, match=r"notes.jpg: not a readable image.*JPEG or PNG"):
        load_image(p)


def test_empty_and_missing_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty.png: not a readable image"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(UserError, match="nope.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")


def test_truncated_jpeg(tmp_path):
    full = _jpeg_bytes(_rgb(120, 90))
    p = tmp_path / "truncated.jpg"
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match=r"truncated.jpg: not a readable image \(OSError: image file is truncated"):
        load_image(p)


def test_tiny_image(tmp_path):
    p = tmp_path / "tiny.png"
    _rgb(40, 10).save(p)
    with pytest.raises(UserError, match=r"tiny.png: image is only 40x10 pixels; need at least 16"):
        load_image(p)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [64, 40])  # above 2x the limit (Pillow error) / between 1x and 2x (warning)
def test_decompression_bomb(tmp_path, monkeypatch, side):
    p = tmp_path / "bomb.png"
    _rgb(side, side).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match="bomb.png: image is too large.*decompression bomb"):
        load_image(p)
    with pytest.raises(UserError, match="uploaded image: image is too large"):
        load_image(io.BytesIO(p.read_bytes()))


# --------------------------------------------------------------------------- load_image: modes

def test_16bit_png_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    p = tmp_path / "deep.png"
    Image.fromarray(ramp).save(p)
    a = np.asarray(load_image(p))
    assert a.shape == (32, 64, 3) and a.dtype == np.uint8
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    assert 120 <= a[0, 32, 0] <= 135  # mid-grey, not clipped to 255
    assert (a[..., 0] == a[..., 1]).all()


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p)  # pure red
    img = load_image(p)
    assert img.mode == "RGB"
    r, g, b = img.getpixel((16, 16))
    assert r > 230 and g < 25 and b < 25


def test_palette_png_with_transparency(tmp_path):
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)
    img = load_image(p)
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 0, 0)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 2] = 255  # blue
    a[:, 16:, 3] = 255  # right half opaque, left half transparent
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    img = load_image(p)
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255) and img.getpixel((30, 2)) == (0, 0, 255)


def test_greyscale_and_la(tmp_path):
    Image.new("L", (32, 32), 77).save(tmp_path / "grey.jpg")
    assert load_image(tmp_path / "grey.jpg").getpixel((3, 3)) == (77, 77, 77)
    Image.new("LA", (32, 32), (10, 255)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((3, 3)) == (10, 10, 10)


def test_exif_rotation_applied(tmp_path):
    img = _rgb(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif.tobytes())
    assert Image.open(p).size == (60, 40)
    assert load_image(p).size == (40, 60)


def test_accepts_file_bytes_pil_and_array(tmp_path):
    img = _rgb(40, 30)
    p = tmp_path / "x.png"
    img.save(p)
    ref = np.asarray(img)
    with open(p, "rb") as f:
        assert np.array_equal(np.asarray(load_image(f)), ref)
    assert np.array_equal(np.asarray(load_image(p.read_bytes())), ref)
    assert np.array_equal(np.asarray(load_image(str(p))), ref)
    out = load_image(img)
    assert out is not img and np.array_equal(np.asarray(out), ref)
    assert np.array_equal(np.asarray(load_image(ref)), ref)
    assert np.asarray(load_image(ref[..., 0])).shape == (30, 40, 3)


def test_to_square_modes():
    # left third red, middle green, right third blue (90 x 30)
    a = np.zeros((30, 90, 3), np.uint8)
    a[:, :30, 0] = a[:, 30:60, 1] = a[:, 60:, 2] = 255
    img = Image.fromarray(a)
    sq = to_square(img, 24, "squash")
    ce = to_square(img, 24, "center")
    assert sq.shape == ce.shape == (24, 24, 3) and sq.dtype == np.uint8
    assert sq[12, 2, 0] == 255 and sq[12, 21, 2] == 255  # squash keeps the whole width
    assert (ce[:, 2:-2, 1] == 255).all() and ce[:, 2:-2, 0].max() == 0  # centre crop is the green third
    with pytest.raises(UserError, match="unknown resize mode"):
        to_square(img, 24, "stretch")


# --------------------------------------------------------------------------- build_cache

def test_build_cache_then_reuse_without_decoding(synthetic_data, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in synthetic_data.ham_images.iterdir())
    cache_dir = tmp_path / "cache"
    arr = build_cache(paths, 32, "center", cache_dir, progress=False)
    assert isinstance(arr, np.memmap) and arr.shape == (len(paths), 32, 32, 3) and arr.dtype == np.uint8
    assert not arr.flags.writeable
    for i in (0, len(paths) - 1):
        assert np.array_equal(arr[i], to_square(load_image(paths[i]), 32, "center"))
    files = sorted(cache_dir.glob("*.npy"))
    assert len(files) == 1 and not list(cache_dir.glob("*.tmp-*"))

    def boom(*a, **k):
        raise AssertionError("second call decoded an image")
    monkeypatch.setattr(images, "load_image", boom)
    monkeypatch.setattr(images, "to_square", boom)
    again = build_cache(paths, 32, "center", cache_dir, progress=False)
    assert np.array_equal(np.asarray(again), np.asarray(arr))
    assert sorted(cache_dir.glob("*.npy")) == files
    monkeypatch.undo()

    build_cache(paths, 24, "center", cache_dir, progress=False)  # another size -> another file
    os.utime(paths[0], ns=(1, 1))  # a changed file -> another key
    build_cache(paths, 24, "center", cache_dir, progress=False)
    assert len(list(cache_dir.glob("*.npy"))) == 3


def test_build_cache_lists_unreadable_files(synthetic_data, tmp_path):
    paths = sorted(str(p) for p in synthetic_data.ham_images.iterdir())
    for i in range(7):
        bad = tmp_path / f"bad{i}.jpg"
        bad.write_text("not an image")
        paths.append(str(bad))
    cache_dir = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        build_cache(paths, 16, "squash", cache_dir, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"7 of {len(paths)} images could not be read")
    assert "bad0.jpg" in msg and "and 2 more" in msg and "Remove or fix" in msg
    assert not list(cache_dir.glob("*.npy")) and not list(cache_dir.glob("*.tmp-*"))


def test_interrupted_build_leaves_nothing(synthetic_data, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in synthetic_data.ham_images.iterdir())
    calls = []

    def flaky(img, size, mode):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        if len(calls) > 5:
            time.sleep(0.1)  # slow enough that the main thread sees the interrupt first
        return np.zeros((size, size, 3), np.uint8)
    monkeypatch.setattr(images, "to_square", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(paths, 16, "squash", tmp_path / "cache", progress=False)
    assert len(calls) < len(paths) // 2  # queued work was dropped, not finished
    assert not [f for f in (tmp_path / "cache").iterdir() if f.suffix != ".json"]


# --------------------------------------------------------------------------- readers

def test_synthetic_ham_layout(synthetic_data):
    ds = load_dataset(synthetic_data.ham_dir)
    assert len(ds) == synthetic_data.n_ham and ds.counts() == synthetic_data.counts
    assert all(os.path.isabs(r.path) and os.path.exists(r.path) for r in ds.records)
    assert any(r.path.endswith(".png") for r in ds.records)
    assert ds.notes == ["ignored 1 segmentation/mask files"]
    recs, y, classes = select_task(ds, "ham7")
    assert classes == data.TASKS["ham7"] and y.dtype == np.int32 and len(recs) == len(y) == len(ds)


def test_metadata_csv_missing_values(tmp_path, write_image):
    img_dir = tmp_path / "imgs"
    write_image(img_dir / "a" / "ISIC_1.jpg")
    write_image(img_dir / "b" / "ISIC_2.JPG")
    write_image(img_dir / "ISIC_3.png")
    write_image(img_dir / "ISIC_4.jpeg")
    write_image(img_dir / "ISIC_orphan.jpg")
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text(
        "lesion_id,image_id,dx,age,sex,localization\n"
        "HAM_1,ISIC_1,mel,55.0,male,back\n"
        ",ISIC_2,NV,,unknown,unknown\n"
        "nan,ISIC_3.png,bkl,nan,Female,\n"
        "HAM_4,ISIC_4,mystery,abc,female,face\n"
        "HAM_5,ISIC_gone,nv,40,male,back\n"
        "HAM_6,ISIC_1,mel,55,male,back\n"
    )
    ds = read_isic_metadata(csv_path, img_dir)
    by_id = {os.path.splitext(os.path.basename(r.path))[0]: r for r in ds.records}
    assert sorted(by_id) == ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"]
    assert by_id["ISIC_1"] == Record(by_id["ISIC_1"].path, "mel", "HAM_1", 55.0, "male", "back")
    assert by_id["ISIC_2"].dx == "nv" and by_id["ISIC_2"].lesion_id is None
    assert by_id["ISIC_2"].age is by_id["ISIC_2"].sex is by_id["ISIC_2"].site is None
    assert by_id["ISIC_3"].sex == "female" and by_id["ISIC_3"].age is None and by_id["ISIC_3"].lesion_id is None
    assert by_id["ISIC_4"].age is None
    notes = "\n".join(ds.notes)
    assert "1 rows have no image file" in notes and "ISIC_gone" in notes
    assert "1 images under" in notes and "ISIC_orphan" in notes
    assert "1 rows repeat an image id" in notes
    assert "age missing or 'unknown' for 3 of 4" in notes
    assert "mystery (1)" in notes
    recs, y, _ = select_task(ds, "ham7")
    assert len(recs) == 3 and any("dropped 1 images" in n and "mystery (1)" in n for n in ds.notes)
    recs, y, classes = select_task(ds, "binary")
    assert classes == ("benign", "malignant") and len(recs) == 3 and y.tolist().count(1) == 1


def test_csv_missing_columns_named(tmp_path):
    p = tmp_path / "wrong.csv"
    p.write_text("image,diagnosis_text\nISIC_1,mel\n")
    with pytest.raises(UserError) as e:
        read_isic_metadata(p)
    msg = str(e.value)
    assert "wrong.csv" in msg and "missing column(s) image_id, dx" in msg
    assert "Found columns: image, diagnosis_text" in msg and "Expected: image_id, dx" in msg
    with pytest.raises(UserError, match=r"wrong.csv: missing column\(s\) image_id, dx"):
        load_dataset(p)
    with pytest.raises(UserError, match=r"missing column\(s\) path, dx.*Found columns: image, diagnosis_text"):
        read_labelled_csv(p)


def test_folder_per_class_cancer_non_cancer(synthetic_data):
    for root in (synthetic_data.folders, synthetic_data.root / "wrapper"):
        if root.name == "wrapper":  # a download folder wrapping Skin_Data/ is descended into
            (root).mkdir()
            shutil.move(str(synthetic_data.folders), root / "Skin_Data")
        ds = load_dataset(root)
        assert ds.counts() == {"malignant": 6, "benign": 6}
        recs, y, classes = select_task(ds, "binary")
        assert classes == ("benign", "malignant") and sorted(Counter(y.tolist()).items()) == [(0, 6), (1, 6)]
        with pytest.raises(UserError, match="no image has a label of task 'ham7'.*fit task 'binary'"):
            select_task(ds, "ham7")


def test_folder_with_split_subfolders(tmp_path, write_image):
    for split, n in (("train", 3), ("test", 2)):
        for k in range(n):
            write_image(tmp_path / "d" / split / "mel" / f"{split}{k}.jpg", "mel", k)
            write_image(tmp_path / "d" / split / "nv" / f"{split}{k}.jpg", "nv", 10 + k)
    assert len(read_class_folders(tmp_path / "d")) == 10
    assert read_class_folders(tmp_path / "d", split="test").counts() == {"mel": 2, "nv": 2}
    with pytest.raises(UserError, match="no 'val' folder"):
        read_class_folders(tmp_path / "d", split="val")


def test_empty_folders(tmp_path, write_image):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: found no .jpg/.jpeg/.png images.*one sub-folder per class"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "classes" / "benign").mkdir(parents=True)
    (tmp_path / "classes" / "malignant").mkdir()
    (tmp_path / "classes" / "malignant" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="found no .jpg/.jpeg/.png images in its sub-folders"):
        load_dataset(tmp_path / "classes")
    write_image(tmp_path / "loose" / "a.jpg")
    with pytest.raises(UserError, match="images directly in it but no class folders"):
        load_dataset(tmp_path / "loose")


def test_load_dataset_dispatch_and_errors(tmp_path, synthetic_data, write_image):
    with pytest.raises(UserError, match="nowhere: no such file or folder. Expected"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="x.txt: not a CSV file"):
        load_dataset(tmp_path / "x.txt")
    assert load_dataset(synthetic_data.ham_csv).counts() == synthetic_data.counts
    with pytest.raises(UserError, match="has no split column"):
        load_dataset(synthetic_data.ham_csv, split="test")

    lab = tmp_path / "lab"
    for i, (dx, split) in enumerate([("mel", "train"), ("nv", "train"), ("bkl", "test"), ("nv", "test")]):
        write_image(lab / "imgs" / f"{i}.jpg", dx, i)
    (lab / "labels.csv").write_text("path,split,image_id,dx\nimgs/0.jpg,train,0,mel\nimgs/1.jpg,train,1,nv\n"
                                    "imgs/2.jpg,test,2,bkl\nimgs/3.jpg,test,3,nv\nimgs/9.jpg,test,9,nv\n")
    full = load_dataset(lab)  # a folder with one path,dx CSV
    assert len(full) == 4 and any("1 rows point at missing files" in n for n in full.notes)
    test = load_dataset(lab / "labels.csv", split="test")
    assert test.counts() == {"bkl": 1, "nv": 1} and all(os.path.isabs(r.path) for r in test.records)
    with pytest.raises(UserError, match=r"no rows with split 'val'; splits present: train \(2\), test \(3\)"):
        read_labelled_csv(lab / "labels.csv", split="val")


def test_organize_copy_and_link(synthetic_data, tmp_path):
    counts = organize(synthetic_data.ham_csv, synthetic_data.ham_images, tmp_path / "copy")
    assert counts == synthetic_data.counts
    copied = list((tmp_path / "copy" / "mel").iterdir())
    assert len(copied) == 4 and all(f.is_file() and not f.is_symlink() for f in copied)
    assert organize(synthetic_data.ham_csv, None, tmp_path / "copy") == counts  # re-run is safe

    counts = organize(synthetic_data.ham_csv, synthetic_data.ham_images, tmp_path / "link", mode="link")
    assert counts == synthetic_data.counts
    linked = sorted((tmp_path / "link" / "nv").iterdir())
    assert all(f.is_symlink() and f.resolve().parent == synthetic_data.ham_images for f in linked)
    assert organize(synthetic_data.ham_csv, None, tmp_path / "link", mode="link") == counts
    assert load_dataset(tmp_path / "link").counts() == synthetic_data.counts  # readable as class folders
    with pytest.raises(UserError, match="unknown organize mode"):
        organize(synthetic_data.ham_csv, None, tmp_path / "x", mode="move")


# --------------------------------------------------------------------------- splits (synthetic)

def test_split_groups_duplicates_and_roundtrip(synthetic_data, tmp_path):
    ds = load_dataset(synthetic_data.ham_dir)
    # an exact copy of one image under another lesion id must join that lesion's group
    src = ds.records[0]
    dup = tmp_path / "dup.jpg"
    shutil.copy(src.path, dup)
    records = ds.records + [Record(str(dup), src.dx, "HAM_other")]
    groups = splits.split_groups(records)
    assert groups[-1] == groups[0]
    no_ids = [Record(r.path, r.dx) for r in records]
    g2 = splits.split_groups(no_ids)
    assert g2[-1] == g2[0] and g2[0].startswith("sha1:") and len(set(g2)) == len(records) - 1

    recs, y, _ = select_task(data.Dataset(records, "t"), "ham7")
    a = splits.make_split(recs, y, val_frac=0.34, test_frac=0.34, seed=3, groups=groups)
    assert set(a) == {"train", "val", "test"} and a[0] == a[-1]
    assert np.array_equal(a, splits.make_split(recs, y, val_frac=0.34, test_frac=0.34, seed=3))
    for cls in range(7):  # each class (3 lesions) keeps one lesion in each split
        assert set(a[y == cls]) == {"train", "val", "test"}

    out = splits.write_split(tmp_path / "split.csv", recs, a, groups)
    assert np.array_equal(splits.read_split(out, recs), a)
    assert np.array_equal(splits.read_split(out, list(reversed(recs))), a[::-1])
    with pytest.raises(UserError, match="1 of .* images are not in this split file"):
        splits.read_split(out, recs + [Record(str(tmp_path / "new.jpg"), "nv")])
    relabelled = [Record(r.path, "nv" if r.dx == "mel" else r.dx, r.lesion_id) for r in recs]
    with pytest.raises(UserError, match="have a different label"):
        splits.read_split(out, relabelled)
    rows = list(csv.reader(open(out)))
    rows[1][1] = "val" if rows[1][1] != "val" else "train"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(UserError, match="appears in more than one split"):
        splits.read_split(out, recs)
    with pytest.raises(UserError, match="val_frac=0.6 and test_frac=0.5"):
        splits.make_split(recs, y, val_frac=0.6, test_frac=0.5)


# --------------------------------------------------------------------------- splits (real HAM10000)

DUPLICATE_PAIRS = [("ISIC_0024366", "ISIC_0029861"), ("ISIC_0024777", "ISIC_0029938")]


@pytest.fixture(scope="module")
def ham_split(ham10000):
    ds = load_dataset(ham10000)
    recs, y, classes = select_task(ds, "ham7")
    groups = splits.split_groups(recs)
    a = splits.make_split(recs, y, seed=0, groups=groups)
    return recs, y, groups, a


def test_ham_no_lesion_crosses_splits(ham_split):
    recs, y, groups, a = ham_split
    where: dict[str, set] = {}
    for r, s in zip(recs, a):
        where.setdefault(r.lesion_id, set()).add(s)
    assert len(where) == 7470
    assert all(len(s) == 1 for s in where.values())


def test_ham_duplicate_pairs_together(ham_split):
    recs, y, groups, a = ham_split
    idx = {os.path.splitext(os.path.basename(r.path))[0]: i for i, r in enumerate(recs)}
    for x, z in DUPLICATE_PAIRS:
        assert splits.file_hash(recs[idx[x]].path) == splits.file_hash(recs[idx[z]].path)
        assert groups[idx[x]] == groups[idx[z]] and a[idx[x]] == a[idx[z]]


def test_ham_val_fraction_and_class_balance(ham_split):
    recs, y, groups, a = ham_split
    val_lesions = {g for g, s in zip(groups, a) if s == "val"}
    assert abs(len(val_lesions) / len(set(groups)) - 0.15) < 0.005
    assert abs((a == "val").mean() - 0.15) < 0.02
    overall = np.bincount(y, minlength=7) / len(y)
    in_val = np.bincount(y[a == "val"], minlength=7) / (a == "val").sum()
    assert np.abs(in_val - overall).max() < 0.03, (in_val, overall)


def test_ham_split_deterministic(ham_split):
    recs, y, groups, a = ham_split
    assert np.array_equal(splits.make_split(recs, y, seed=0, groups=groups), a)
    other = splits.make_split(recs, y, seed=1, groups=groups)
    assert (other != a).any()
    # independent of record order
    perm = np.random.default_rng(0).permutation(len(recs))
    shuffled = splits.make_split([recs[i] for i in perm], y[perm], seed=0, groups=[groups[i] for i in perm])
    assert np.array_equal(shuffled, a[perm])


def test_isic2017_duplicates_grouped_by_content(isic2017):
    ds = load_dataset(isic2017)
    assert len(ds) == 2750 and ds.counts() == {"nv": 1843, "mel": 521, "bkl": 386}
    groups = splits.split_groups(ds.records)
    assert sum(1 for n in Counter(groups).values() if n == 2) == 6
    assert load_dataset(isic2017, split="test").counts() == {"nv": 393, "mel": 117, "bkl": 90}
