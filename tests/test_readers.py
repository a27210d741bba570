"""The layouts users download: ISIC 2018/2019 challenge, the ISIC archive (isic-cli), PH2, Derm7pt;
and the dermatoscope field-of-view crop. Fixtures are real files written from each layout's schema."""
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from model.data import load_dataset, select_task
from model.errors import UserError
from model.images import field_of_view_box, square_box, to_square


def _write_csv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# --------------------------------------------------------------------------- ISIC challenge

def test_real_isic2019_bcn_challenge_layout(shared_data):
    root = shared_data / "isic2019_bcn"
    if not (root / "ISIC_2019_Training_GroundTruth.csv").is_file():
        pytest.skip(f"BCN_20000 (ISIC 2019 layout) not found at {root}")
    ds = load_dataset(root)
    # ../shared/data/README.md: NV 4206, MEL 2857, BCC 2809, BKL 1138, AK 705 + SCC 431 -> akiec, DF 124, VASC 111
    assert ds.counts() == {"nv": 4206, "mel": 2857, "bcc": 2809, "bkl": 1138, "akiec": 1136, "df": 124, "vasc": 111}
    assert len({r.lesion_id for r in ds.records}) == 3574
    assert all(r.lesion_id.startswith("BCN_") for r in ds.records)
    assert sum(r.age is not None for r in ds.records) == len(ds) - 74  # metadata joined by image id
    assert any("age missing" in n for n in ds.notes)


def test_isic2018_challenge_zip_layout(tmp_path, write_image):
    # As the 2018 task 3 zips extract: the ground truth in its own sub-folder, images in another.
    top = tmp_path / "download"
    images = top / "ISIC2018_Task3_Training_Input"
    for k, dx in enumerate(("mel", "nv", "akiec", "bkl")):
        write_image(images / f"ISIC_{k:07d}.jpg", dx, k)
    write_image(images / "ISIC_0000009.jpg", "nv", 9)  # an image without a row
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    _write_csv(top / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", header, [
        ["ISIC_0000000", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
        ["ISIC_0000001", "0.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
        ["ISIC_0000002", "0.0", "0.0", "0.0", "1.0", "0.0", "0.0", "0.0"],
        ["ISIC_0000003", "0.0", "0.0", "0.0", "0.0", "1.0", "0.0", "1.0"],   # two diagnoses: skipped
        ["ISIC_0000004", "0.0", "0.0", "0.0", "0.0", "0.0", "1.0", "0.0"],   # no image file
    ])
    ds = load_dataset(top)
    assert sorted((Path(r.path).stem, r.dx) for r in ds.records) == [
        ("ISIC_0000000", "mel"), ("ISIC_0000001", "nv"), ("ISIC_0000002", "akiec")]
    notes = " | ".join(ds.notes)
    assert "1 rows do not have exactly one diagnosis" in notes
    assert "1 rows have no image file" in notes and "ISIC_0000004" in notes
    assert "have no row in" in notes and "ISIC_0000009" in notes


def test_isic2019_scc_unk_and_metadata_join(tmp_path, write_image):
    for k in range(4):
        write_image(tmp_path / "ISIC_2019_Training_Input" / f"ISIC_{k:07d}.jpg", "nv", k)
    header = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    one_hot = lambda i: ["1.0" if j == i else "0.0" for j in range(9)]  # noqa: E731
    _write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", header,
               [["ISIC_0000000", *one_hot(7)], ["ISIC_0000001", *one_hot(3)], ["ISIC_0000002", *one_hot(8)],
                ["ISIC_0000003", *one_hot(0)]])
    _write_csv(tmp_path / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general",
                                                              "lesion_id", "sex"],
               [["ISIC_0000000", "55", "anterior torso", "BCN_1", "male"], ["ISIC_0000001", "", "", "BCN_2", ""],
                ["ISIC_0000003", "70", "head/neck", "", "female"]])
    ds = load_dataset(tmp_path / "ISIC_2019_Training_GroundTruth.csv")  # the CSV itself works too
    by_id = {Path(r.path).stem: r for r in ds.records}
    assert {k: r.dx for k, r in by_id.items()} == {"ISIC_0000000": "akiec", "ISIC_0000001": "akiec",
                                                   "ISIC_0000003": "mel"}  # SCC and AK -> akiec; UNK skipped
    assert by_id["ISIC_0000000"].age == 55 and by_id["ISIC_0000000"].lesion_id == "BCN_1"
    assert by_id["ISIC_0000000"].site == "anterior torso" and by_id["ISIC_0000003"].sex == "female"
    assert by_id["ISIC_0000001"].age is None
    assert any("UNK" in n for n in ds.notes)


# --------------------------------------------------------------------------- ISIC archive (isic-cli)

ARCHIVE_HEADER = ["isic_id", "attribution", "copyright_license", "age_approx", "anatom_site_general",
                  "diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5", "lesion_id", "sex"]


def test_isic_cli_download_hierarchical_diagnoses(tmp_path, write_image):
    out = tmp_path / "isic_download"
    rows = [
        ["ISIC_0000001", "Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma in situ", "", ""],
        ["ISIC_0000002", "Benign", "Benign melanocytic proliferations", "Nevus", "Nevus, Spitz", ""],
        ["ISIC_0000003", "Malignant", "Malignant adnexal epithelial proliferations - Follicular",
         "Basal cell carcinoma", "", ""],
        ["ISIC_0000004", "Benign", "Benign epidermal proliferations", "Seborrheic keratosis", "", ""],
        ["ISIC_0000005", "Malignant", "Malignant epidermal proliferations", "Squamous cell carcinoma, Invasive", "", ""],
        ["ISIC_0000006", "Benign", "Benign soft tissue proliferations - Vascular", "Hemangioma", "", ""],
        ["ISIC_0000007", "Benign", "Benign - Other", "", "", ""],              # no HAM class covers it
        ["ISIC_0000008", "", "", "", "", ""],                                   # no diagnosis
    ]
    for k, row in enumerate(rows):
        write_image(out / f"{row[0]}.jpg", "nv", k)
    _write_csv(out / "metadata.csv", ARCHIVE_HEADER,
               [[r[0], "Anonymous", "CC-BY", "45", "back", *r[1:], f"IL_{k:07d}", "female"] for k, r in enumerate(rows)])
    ds = load_dataset(out)
    dx = {Path(r.path).stem: r.dx for r in ds.records}
    assert dx == {"ISIC_0000001": "mel", "ISIC_0000002": "nv", "ISIC_0000003": "bcc", "ISIC_0000004": "bkl",
                  "ISIC_0000005": "akiec", "ISIC_0000006": "vasc", "ISIC_0000007": "benign"}
    notes = " | ".join(ds.notes)
    assert "Benign:Benign - Other (1)" in notes and "1 rows have no diagnosis" in notes
    records, _, _ = select_task(ds, "ham7")   # the unmapped benign image is dropped for 7 classes ...
    assert len(records) == 6
    records, labels, classes = select_task(ds, "binary")  # ... and kept for malignant vs benign
    assert len(records) == 7 and sum(classes[y] == "malignant" for y in labels) == 3
    assert all(r.lesion_id.startswith("IL_") and r.age == 45 and r.site == "back" for r in ds.records)


def test_isic_archive_legacy_export(tmp_path, write_image):
    rows = [["ISIC_0000001", "melanoma", "malignant"], ["ISIC_0000002", "nevus", "benign"],
            ["ISIC_0000003", "lentigo NOS", "benign"], ["ISIC_0000004", "pigmented benign keratosis", "benign"]]
    for k, row in enumerate(rows):
        write_image(tmp_path / f"{row[0]}.jpg", "nv", k)
    _write_csv(tmp_path / "metadata.csv", ["isic_id", "diagnosis", "benign_malignant"], rows)
    ds = load_dataset(tmp_path / "metadata.csv")
    assert {Path(r.path).stem: r.dx for r in ds.records} == {
        "ISIC_0000001": "mel", "ISIC_0000002": "nv", "ISIC_0000003": "benign", "ISIC_0000004": "bkl"}
    assert any("lentigo NOS (1)" in n for n in ds.notes)


def test_every_mapped_branch_exists_in_isic_metadata():
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
    from model.isic_archive import HAM_BRANCHES, ham_class
    known = {m.value for m in DiagnosisEnum}
    assert all(b in known for branches in HAM_BRANCHES.values() for b in branches)
    melanomas = [m.value for m in DiagnosisEnum if DiagnosisEnum.is_melanoma(m.value) and "Collision" not in m.value]
    assert melanomas and all(ham_class(v) == "mel" for v in melanomas)


# --------------------------------------------------------------------------- PH2, Derm7pt

def test_ph2_as_downloaded(tmp_path, write_image):
    root = tmp_path / "PH2Dataset"
    for k, name in enumerate(("IMD002", "IMD003", "IMD058")):
        case = root / "PH2 Dataset images" / name
        write_image(case / f"{name}_Dermoscopic_Image" / f"{name}.bmp", "nv", k, size=(96, 72))
        (case / f"{name}_lesion").mkdir()  # the lesion mask beside the image is not an image of its own
        Image.new("L", (96, 72), 255).save(case / f"{name}_lesion" / f"{name}_lesion.bmp")
    (root / "PH2_dataset.txt").write_text(
        "|| Name   || Histological Diagnosis || Clinical Diagnosis || Asymmetry || Pigment Network ||\n"
        "|| IMD002 ||                        ||         1          ||     0     ||        T        ||\n"
        "|| IMD003 ||                        ||         0          ||     0     ||        T        ||\n"
        "|| IMD058 ||  Melanoma              ||         2          ||     2     ||        A        ||\n"
        "|| IMD999 ||                        ||         0          ||     0     ||        T        ||\n"
        "\nLegend: Clinical Diagnosis: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma\n")
    ds = load_dataset(tmp_path)  # the folder above the unzipped PH2Dataset/
    assert {Path(r.path).stem: r.dx for r in ds.records} == {"IMD002": "nv", "IMD003": "nv", "IMD058": "mel"}
    assert any("IMD999" in n for n in ds.notes)
    assert to_square(ds.records[0].path, 32).shape == (32, 32, 3)  # BMP decodes like any image


def test_derm7pt_as_downloaded_with_official_splits(tmp_path, write_image):
    root = tmp_path / "release_v0"
    cases = [("1", "melanoma (in situ)", "Aal/Aal002.jpg"), ("2", "clark nevus", "Aal/Aal003.jpg"),
             ("3", "basal cell carcinoma", "Abl/Abl001.jpg"), ("4", "melanosis", "Abl/Abl002.jpg"),
             ("5", "seborrheic keratosis", "Abl/Abl003.jpg")]
    for k, (_, _, rel) in enumerate(cases):
        write_image(root / "images" / rel, "nv", k)
    _write_csv(root / "meta" / "meta.csv", ["case_num", "diagnosis", "seven_point_score", "clinic", "derm",
                                            "location", "sex"],
               [[c, d, "3", rel.replace(".jpg", "_c.jpg"), rel, "back", "female"] for c, d, rel in cases])
    for name, idx in (("train_indexes.csv", [0, 1, 3]), ("valid_indexes.csv", [2]), ("test_indexes.csv", [4])):
        _write_csv(root / "meta" / name, ["indexes"], [[i] for i in idx])
    ds = load_dataset(tmp_path)
    assert {Path(r.path).stem: r.dx for r in ds.records} == {"Aal002": "mel", "Aal003": "nv", "Abl001": "bcc",
                                                             "Abl003": "bkl"}
    assert any("melanosis (1)" in n for n in ds.notes)
    assert [Path(r.path).stem for r in load_dataset(tmp_path, split="test").records] == ["Abl003"]
    assert [Path(r.path).stem for r in load_dataset(tmp_path, split="val").records] == ["Abl001"]
    with pytest.raises(UserError, match="train, val and test"):
        load_dataset(tmp_path, split="holdout")


# --------------------------------------------------------------------------- field of view

def _framed(size=(200, 150), disc=(30, 5, 170, 145), seed=0) -> Image.Image:
    """A skin-toned disc (the dermatoscope's view) in a black frame, with a dark lesion inside."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, (4, 4, 4))
    d = ImageDraw.Draw(img)
    d.ellipse(disc, fill=(215, 170, 150))
    cx, cy = (disc[0] + disc[2]) // 2, (disc[1] + disc[3]) // 2
    d.ellipse((cx - 20, cy - 15, cx + 20, cy + 15), fill=(70, 40, 30))
    noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-3, 4, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8))


def test_field_of_view_found_and_cropped():
    img = _framed()
    box = field_of_view_box(img)
    assert box is not None
    assert all(abs(a - b) <= 4 for a, b in zip(box, (30, 5, 170, 145))), box
    square = to_square(img, 64, "fov")
    assert square[32, 32].mean() < 100          # the lesion is still in the middle
    assert square[:, 32].min() < 100 and square[32, 2].mean() > 100  # the frame's sides are gone at mid-height
    assert to_square(img, 64, "squash")[32, 2].mean() < 20           # ... where squash keeps them


def test_no_frame_means_no_crop(write_image, tmp_path):
    path = write_image(tmp_path / "plain.jpg", "mel", 1, size=(120, 90))
    img = Image.open(path).convert("RGB")
    assert field_of_view_box(img) is None
    assert square_box(img, "fov") == (0, 0, 120, 90)
    np.testing.assert_array_equal(to_square(img, 32, "fov"), to_square(img, 32, "squash"))
    dark = Image.new("RGB", (80, 80), (10, 10, 10))  # an almost black photo is not a frame around a view
    assert field_of_view_box(dark) is None


@pytest.mark.slow
def test_explain_in_the_image_frame_follows_the_fov_crop(tmp_path):
    from model.predictor import Predictor
    from test_app import make_tiny_checkpoint
    predictor = Predictor.load(make_tiny_checkpoint(tmp_path / "ckpt", size=32, resize="fov"))
    img = _framed()
    square = predictor.explain(img, "gradcam", class_index=4)
    on_image = predictor.explain(img, "gradcam", class_index=4, frame="image")
    assert square.shape == (32, 32) and on_image.shape == (150, 200)
    left, top, right, bottom = field_of_view_box(img)
    assert on_image[:, :left - 1].max() == 0 and on_image[:, right + 1:].max() == 0  # the frame gets nothing
    np.testing.assert_allclose(on_image[top:bottom, left:right].max(), square.max(), atol=0.05)
    shown = predictor.to_image_frame(square, img, out_size=(100, 75))  # the app's display size
    assert shown.shape == (75, 100) and shown[:, : left // 2 - 1].max() == 0
