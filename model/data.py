"""Dataset readers: ISIC/HAM metadata CSVs, folder-per-class trees and generic `path,dx` CSVs.

Every reader returns a `Dataset` of `Record`s with absolute image paths and canonical `dx`
codes (see `classes.canonical_label`), plus human-readable notes: `skipped` says what was left out
or counted under another class (and why), `info` the rest (missing metadata, ignored mask files).
"""
from __future__ import annotations

import csv
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .classes import LUMPED, TASKS, canonical_label, task_label
from .errors import UserError
from .images import IMAGE_SUFFIXES

MISSING = frozenset({"", "unknown", "nan", "none", "null", "na", "n/a", "?", "-"})
# Derived files that sit next to the images in ISIC downloads; never images of their own.
DERIVED_SUFFIXES = ("_segmentation", "_mask", "_superpixels", "_lesion")
DERIVED_DIRS = frozenset({"masks", "mask", "segmentations", "segmentation", "superpixels"})
KNOWN_LABELS = frozenset().union(*TASKS.values())
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val",
              "validation": "val", "test": "test", "testing": "test"}

# Accepted spellings for optional metadata columns (first match wins).
AGE_COLUMNS = ("age", "age_approximate", "age_approx")
SEX_COLUMNS = ("sex", "gender")
SITE_COLUMNS = ("localization", "anatom_site_general", "anatom_site_general_challenge", "site")


@dataclass(frozen=True)
class Record:
    path: str                 # absolute path of the image file
    dx: str                   # canonical diagnosis code ('mel', 'nv', 'benign', ...)
    lesion_id: str | None = None
    age: float | None = None
    sex: str | None = None
    site: str | None = None


@dataclass
class Dataset:
    records: list[Record]
    source: str
    skipped: list[str] = field(default_factory=list)   # rows or images left out, labels folded into another class
    info: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self.skipped + self.info

    def __len__(self) -> int:
        return len(self.records)

    def counts(self) -> dict[str, int]:
        """Images per dx code, most frequent first."""
        return dict(Counter(r.dx for r in self.records).most_common())

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        lines = [f"{self.source}: {len(self.records)} images ({counts})"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# --------------------------------------------------------------------------- helpers

def _clean(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return None if s.lower() in MISSING else s


def _age(value) -> float | None:
    s = _clean(value)
    if s is None:
        return None
    try:
        age = float(s)
    except ValueError:
        return None
    return age if math.isfinite(age) and 0 <= age <= 130 else None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _is_derived(path: Path) -> bool:
    stem = path.stem.lower()
    parent = path.parent.name.lower()
    return stem.endswith(DERIVED_SUFFIXES) or parent in DERIVED_DIRS or parent.endswith(("_lesion", "_roi"))


def _walk_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted; hidden and __MACOSX folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        found.extend(Path(dirpath) / f for f in filenames if _is_image(f))
    return sorted(found)


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Rows keyed by lower-cased, stripped column names."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{csv_path}: the CSV file is empty; expected a header row and one row per image.")
            cols = [h.strip().lower() for h in header]
            rows = [dict(zip(cols, row)) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError:
        raise UserError(f"{csv_path}: not a UTF-8 text CSV file; save it as CSV (UTF-8) and try again.") from None
    except csv.Error as e:
        raise UserError(f"{csv_path}: not a readable CSV file ({e}).") from None
    except IsADirectoryError:
        raise UserError(f"{csv_path}: is a folder; expected a CSV file.") from None
    except FileNotFoundError:
        raise UserError(f"{csv_path}: no such file.") from None
    return cols, rows


def _require(csv_path: Path, cols: list[str], required: dict[str, tuple[str, ...]], hint: str) -> dict[str, str]:
    """Map each required name to the first present alias, or raise naming what is missing."""
    chosen, missing = {}, []
    for name, aliases in required.items():
        hit = next((a for a in aliases if a in cols), None)
        if hit is None:
            missing.append(name)
        else:
            chosen[name] = hit
    if missing:
        found = ", ".join(c for c in cols if c) or "(none)"
        raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)}. Found columns: {found}. "
                        f"Expected: {', '.join(required)}. {hint}")
    return chosen


def _first(cols: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in cols), None)


def _metadata_fields(row: dict, cols: list[str], missing: Counter) -> dict:
    out = {}
    for key, names, parse in (("lesion_id", ("lesion_id",), _clean), ("age", AGE_COLUMNS, _age),
                              ("sex", SEX_COLUMNS, _clean), ("site", SITE_COLUMNS, _clean)):
        col = _first(cols, names)
        value = parse(row.get(col)) if col else None
        if col and value is None:
            missing[key] += 1
        if value is not None and key in ("sex", "site"):
            value = value.lower()
        out[key] = value
    return out


def _missing_notes(missing: Counter, total: int) -> list[str]:
    return [f"{key} missing or 'unknown' for {n} of {total} images" for key, n in sorted(missing.items())]


def _label_notes(records: list[Record]) -> list[str]:
    odd = Counter(r.dx for r in records if r.dx not in KNOWN_LABELS)
    if not odd:
        return []
    listed = ", ".join(f"{k} ({v})" for k, v in odd.most_common())
    return [f"{sum(odd.values())} images have labels no task uses: {listed}; select_task will drop them"]


def _lumped_notes(raw_labels) -> list[str]:
    lumped = Counter(key for key in (str(raw).strip().lower() for raw in raw_labels) if key in LUMPED)
    return [f"{n} images labelled {key} are counted as {LUMPED[key]} ({key} has no class of its own)"
            for key, n in sorted(lumped.items())]


def _read_notes(records: list[Record], missing: Counter, problems: list[tuple], raw_labels=()) -> tuple[list, list]:
    """A reader's (skipped, info): skipped holds each (count or list, message) whose count is non-zero and the
    lumped labels; info the labels no task uses (`select_task` drops and names them) and missing metadata."""
    skipped = [message for count, message in problems if count] + _lumped_notes(raw_labels)
    return skipped, _label_notes(records) + _missing_notes(missing, len(records))


def _examples(items, k: int = 3) -> str:
    items = list(items)
    more = f", ... (+{len(items) - k})" if len(items) > k else ""
    return ", ".join(str(i) for i in items[:k]) + more


# --------------------------------------------------------------------------- readers

def read_isic_metadata(csv_path, image_dir=None) -> Dataset:
    """ISIC/HAM metadata CSV (`image_id`, `dx`; optional `lesion_id`, `age`, `sex`, `localization`).

    Images are found anywhere under `image_dir` (default: the CSV's folder) as
    `<image_id>.jpg/.jpeg/.png` (any case). Rows without an image, images without a row and
    missing metadata are counted in `notes`; they never stop the read.
    """
    csv_path = Path(csv_path).expanduser().absolute()
    cols, rows = _read_csv(csv_path)
    _require(csv_path, cols, {"image_id": ("image_id",), "dx": ("dx",)},
             "An ISIC/HAM10000 metadata CSV has one row per image with its image_id and diagnosis (dx).")
    return _read_by_image_id(csv_path, image_dir, cols, rows)


def _image_index(image_dir: Path) -> tuple[dict[str, Path], int, int]:
    """Image files under `image_dir` by stem, with counts of repeated names and derived (mask) files."""
    by_stem: dict[str, Path] = {}
    duplicate_files, derived = 0, 0
    for p in _walk_images(image_dir):
        if _is_derived(p):
            derived += 1
        elif p.stem in by_stem:
            duplicate_files += 1
        else:
            by_stem[p.stem] = p
    return by_stem, duplicate_files, derived


def _read_by_image_id(csv_path: Path, image_dir, cols: list[str], rows: list[dict], problems=()) -> Dataset:
    """Records for rows keyed `image_id` and `dx` (plus optional metadata), images found by stem."""
    image_dir = Path(image_dir).expanduser().absolute() if image_dir else csv_path.parent
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: image folder not found; pass the folder holding the images for {csv_path.name}.")
    by_stem, duplicate_files, derived = _image_index(image_dir)
    records, seen, raw_labels = [], set(), []
    no_image, no_label, repeated = [], 0, 0
    missing = Counter()
    for row in rows:
        image_id = _clean(row.get("image_id"))
        if image_id is None:
            no_label += 1
            continue
        if image_id.lower().endswith(IMAGE_SUFFIXES):
            image_id = os.path.splitext(image_id)[0]
        if image_id in seen:
            repeated += 1
            continue
        dx = _clean(row.get("dx"))
        if dx is None:
            no_label += 1
            continue
        path = by_stem.get(image_id)
        if path is None:
            no_image.append(image_id)
            continue
        seen.add(image_id)
        raw_labels.append(dx)
        records.append(Record(str(path), canonical_label(dx), **_metadata_fields(row, cols, missing)))

    orphans = sorted(set(by_stem) - seen)
    skipped, info = _read_notes(records, missing, [*problems,
        (no_image, f"{len(no_image)} rows have no image file under {image_dir} (e.g. {_examples(no_image)})"),
        (orphans, f"{len(orphans)} images under {image_dir} have no row in {csv_path.name} (e.g. {_examples(orphans)})"),
        (no_label, f"{no_label} rows have an empty image id or diagnosis and were skipped"),
        (repeated, f"{repeated} rows repeat an image id already read and were skipped"),
        (duplicate_files, f"{duplicate_files} image files share a name with another under {image_dir}; "
                          "the first (sorted) was used")], raw_labels)
    info += [f"ignored {derived} segmentation/mask files"] if derived else []
    if not records:
        raise UserError(f"{csv_path}: no row matched an image file under {image_dir} "
                        f"({len(rows)} rows, {len(by_stem)} images found). Pass the folder holding "
                        "the <image id>.jpg files as the image folder.")
    return Dataset(records, str(csv_path), skipped, info)


# ISIC 2018 task 3 and ISIC 2019 one-hot ground truth: `image` then one column per diagnosis.
CHALLENGE_CLASS_COLUMNS = ("mel", "nv", "bcc", "ak", "akiec", "bkl", "df", "vasc", "scc", "unk")


def _is_one(value) -> bool | None:
    try:
        return float(value) >= 0.5
    except (TypeError, ValueError):
        return None


def read_isic_challenge(csv_path, image_dir=None, metadata_csv=None) -> Dataset:
    """ISIC 2018 task 3 / ISIC 2019 ground truth: `image, MEL, NV, BCC, AK(IEC), BKL, DF, VASC[, SCC, UNK]`
    one-hot (1.0 / 0.0), optionally joined by `image` with the challenge's metadata CSV
    (`image, age_approx, anatom_site_general, lesion_id, sex`).

    Images are found under `image_dir` (default: the CSV's folder, searched recursively, which
    covers `ISIC_2019_Training_Input/`). AK and SCC map to akiec (see `classes.ALIASES`); UNK rows
    and rows that are not exactly one-hot are counted in the notes and skipped.
    """
    csv_path = Path(csv_path).expanduser().absolute()
    cols, rows = _read_csv(csv_path)
    _require(csv_path, cols, {"image": ("image", "image_id")},
             "An ISIC challenge ground-truth CSV has one row per image: its id, then a 1.0/0.0 column per diagnosis.")
    image_col = _first(cols, ("image", "image_id"))
    class_cols = [c for c in cols if c in CHALLENGE_CLASS_COLUMNS]
    if len(class_cols) < 2:
        raise UserError(f"{csv_path}: expected one-hot diagnosis columns such as MEL, NV, BCC, AK, BKL, DF, VASC; "
                        f"found {', '.join(cols)}.")
    meta_rows, meta_cols = {}, []
    if metadata_csv is not None:
        meta_cols, rows_meta = _read_csv(Path(metadata_csv))
        meta_key = _first(meta_cols, ("image", "image_id", "isic_id"))
        if meta_key is None:
            raise UserError(f"{metadata_csv}: no `image` column to join the metadata to {csv_path.name} by.")
        meta_rows = {_clean(r.get(meta_key)): r for r in rows_meta}
    joined, not_one_hot, unknown, no_meta = [], 0, 0, 0
    for row in rows:
        hot = [c for c in class_cols if _is_one(row.get(c))]
        image_id = _clean(row.get(image_col))
        meta = meta_rows.get(image_id)
        if metadata_csv is not None and meta is None:
            no_meta += 1
        if len(hot) != 1:
            not_one_hot += 1
            continue
        if hot[0] == "unk":
            unknown += 1
            continue
        joined.append({**(meta or {}), "image_id": image_id, "dx": hot[0]})
    out_cols = ["image_id", "dx", *meta_cols]
    return _read_by_image_id(csv_path, image_dir, out_cols, joined, problems=[
        (not_one_hot, f"{not_one_hot} rows do not have exactly one diagnosis column set to 1 and were skipped"),
        (unknown, f"{unknown} rows are labelled UNK (unknown diagnosis) and were skipped"),
        (no_meta, f"{no_meta} images have no row in {Path(metadata_csv).name if metadata_csv else ''}")])


def _class_root(root: Path) -> Path:
    """Descend through single wrapper folders (e.g. `download/Skin_Data/`) to the class folders."""
    for _ in range(3):
        subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"]
        if len(subdirs) != 1 or any(_is_image(f.name) for f in root.iterdir() if f.is_file()):
            return root
        only = subdirs[0]
        inner = [d for d in only.iterdir() if d.is_dir()]
        if not inner or canonical_label(only.name) in KNOWN_LABELS:  # a single class folder: keep it
            return root
        root = only
    return root


def read_class_folders(root, split=None) -> Dataset:
    """One sub-folder per class (`Cancer/`, `Non_Cancer/`; `benign/`, `malignant/`; `mel/`, `nv/`, ...).

    Images anywhere inside a class folder get that folder's label. Split folders above the class
    folders (`train/`, `test/`, ...) are recognised; `split` picks one, otherwise all are read.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"{root}: no such folder.")
    root = _class_root(root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")
    info = []
    split_dirs = {d: SPLIT_DIRS[d.name.lower()] for d in subdirs if d.name.lower() in SPLIT_DIRS}
    if subdirs and len(split_dirs) == len(subdirs):
        if split is not None:
            chosen = [d for d, s in split_dirs.items() if s == split or d.name == split]
            if not chosen:
                raise UserError(f"{root}: no '{split}' folder; found split folders: "
                                f"{', '.join(d.name for d in subdirs)}.")
        else:
            chosen = list(split_dirs)
            if len(chosen) > 1:
                info.append(f"read all split folders ({', '.join(d.name for d in chosen)}); pass split= to pick one")
        class_dirs = sorted(c for d in chosen for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    else:
        if split is not None:
            raise UserError(f"{root}: has no train/val/test folders, so split={split!r} cannot be applied; "
                            "leave the split out and make one with model.splits.make_split.")
        class_dirs = subdirs

    records, raw_labels, empty = [], [], []
    for d in class_dirs:
        dx = canonical_label(d.name)
        images = [p for p in _walk_images(d) if not _is_derived(p)]
        if not images:
            empty.append(d.name)
        records += [Record(str(p), dx) for p in images]
        raw_labels += [d.name] * len(images)
    loose = [f for f in root.iterdir() if f.is_file() and _is_image(f.name)]
    if not records:
        what = (f"found {len(loose)} images directly in it but no class folders" if loose
                else f"found no .jpg/.jpeg/.png images in its sub-folders ({_examples(d.name for d in class_dirs) or 'none'})")
        raise UserError(f"{root}: {what}. Expected one sub-folder per class holding that class's images, "
                        "e.g. benign/ and malignant/, Cancer/ and Non_Cancer/, or mel/, nv/, bkl/ ...")
    skipped, labels_info = _read_notes(records, Counter(), [
        (loose, f"ignored {len(loose)} images lying directly in {root} (not in a class folder)")], raw_labels)
    info += labels_info + ([f"class folders with no images: {', '.join(empty)}"] if empty else [])
    return Dataset(records, str(root), skipped, info)


def read_labelled_csv(csv_path, split=None) -> Dataset:
    """CSV with `path` (relative to the CSV's folder, or absolute) and `dx`; optional `split`,
    `lesion_id`, `age`, `sex`, `localization`. `split` keeps only rows with that split value.
    """
    csv_path = Path(csv_path).expanduser().absolute()
    cols, rows = _read_csv(csv_path)
    c = _require(csv_path, cols, {"path": ("path", "filepath", "file", "filename"), "dx": ("dx", "label", "diagnosis")},
                 "A labelled CSV has one row per image: its path (relative to the CSV) and its diagnosis.")
    if split is not None:
        if "split" not in cols:
            raise UserError(f"{csv_path}: has no 'split' column, so split={split!r} cannot be applied. "
                            f"Found columns: {', '.join(cols)}.")
        available = Counter(_clean(r.get("split")) or "" for r in rows)
        rows = [r for r in rows if (_clean(r.get("split")) or "") == split]
        if not rows:
            raise UserError(f"{csv_path}: no rows with split {split!r}; splits present: "
                            f"{', '.join(f'{k} ({v})' for k, v in available.items() if k)}.")
    records, raw_labels, no_file, no_label = [], [], [], 0
    missing = Counter()
    base = csv_path.parent
    for row in rows:
        rel, dx = _clean(row.get(c["path"])), _clean(row.get(c["dx"]))
        if rel is None or dx is None:
            no_label += 1
            continue
        path = (base / rel).absolute() if not os.path.isabs(rel) else Path(rel)
        if not path.is_file():
            no_file.append(rel)
            continue
        raw_labels.append(dx)
        records.append(Record(str(path), canonical_label(dx), **_metadata_fields(row, cols, missing)))
    skipped, info = _read_notes(records, missing, [
        (no_file, f"{len(no_file)} rows point at missing files and were skipped (e.g. {_examples(no_file)})"),
        (no_label, f"{no_label} rows have an empty path or label and were skipped")], raw_labels)
    if not records:
        raise UserError(f"{csv_path}: none of the {len(rows)} rows points at an existing image file "
                        f"(paths are relative to {base}; e.g. {_examples(no_file)}).")
    source = str(csv_path) + (f" [split={split}]" if split else "")
    return Dataset(records, source, skipped, info)


def read_isic_archive(csv_path, image_dir=None) -> Dataset:
    """The ISIC archive as `isic image download OUTDIR` (isic-cli) writes it: `OUTDIR/<isic_id>.jpg`
    and `OUTDIR/metadata.csv` with `isic_id` and the hierarchical `diagnosis_1` .. `diagnosis_5`
    (older exports: `diagnosis` and `benign_malignant`), plus `lesion_id`, `age_approx`, `sex`,
    `anatom_site_general`. Diagnoses are mapped by `isic_archive.archive_label`; those no class
    covers are counted and named in the notes (binary-task labels are kept where the top level
    says benign or malignant).
    """
    from .isic_archive import archive_label  # noqa: PLC0415 (isic-metadata is only needed here)
    csv_path = Path(csv_path).expanduser().absolute()
    cols, rows = _read_csv(csv_path)
    _require(csv_path, cols, {"isic_id": ("isic_id",), "diagnosis": ("diagnosis_1", "diagnosis")},
             "An isic-cli metadata.csv has one row per image: isic_id and diagnosis_1..diagnosis_5 (or diagnosis).")
    labelled, unmapped, no_diagnosis = [], Counter(), 0
    for row in rows:
        label, text = archive_label(row)
        if text is None:
            no_diagnosis += 1
            continue
        if label is None or label in ("benign", "malignant"):
            unmapped[text] += 1
        if label is not None:
            labelled.append({**row, "image_id": row.get("isic_id"), "dx": label})
    listed = "; ".join(f"{k} ({v})" for k, v in unmapped.most_common(5))
    more = f"; ... (+{len(unmapped) - 5} more diagnoses)" if len(unmapped) > 5 else ""
    return _read_by_image_id(csv_path, image_dir, ["image_id", "dx", *cols], labelled, problems=[
        (no_diagnosis, f"{no_diagnosis} rows have no diagnosis and were skipped"),
        (unmapped, f"{sum(unmapped.values())} images have a diagnosis no HAM10000 class covers "
                   f"(kept as benign/malignant for the binary task where the hierarchy says which): {listed}{more}")])


# PH2 (Mendonca et al. 2013): clinical diagnosis 0 common nevus, 1 atypical nevus, 2 melanoma.
PH2_CLINICAL = {"0": "nv", "1": "nv", "2": "mel"}


def _find_named(root: Path, name: str, depth: int = 2) -> Path | None:
    """`root/name` or the first `*/name` (down to `depth` levels), as downloads extract."""
    for level in range(depth + 1):
        hits = sorted(root.glob("/".join(["*"] * level + [name])))
        if hits:
            return hits[0]
    return None


def read_ph2(root) -> Dataset:
    """PH2 as downloaded: `PH2_dataset.txt` (a `||`-separated table) beside `PH2 Dataset images/
    IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`. Common and atypical nevi map to nv, melanoma to mel
    (the clinical diagnosis column; the histological one is empty for most images)."""
    root = Path(root).expanduser().absolute()
    table = root if root.is_file() else _find_named(root, "PH2_dataset.txt")
    if table is None:
        hint = " (found PH2_dataset.xlsx: keep the .txt from the same download beside it)" \
            if _find_named(root, "PH2_dataset.xlsx") else ""
        raise UserError(f"{root}: no PH2_dataset.txt{hint}. Point at the PH2Dataset folder as unzipped.")
    images_dir = table.parent / "PH2 Dataset images"
    try:
        lines = table.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"{table}: cannot read ({e}).") from None
    header = next(([c.strip().lower() for c in line.split("||")] for line in lines if "clinical diagnosis" in line.lower()), None)
    if header is None:
        raise UserError(f"{table}: no header row with 'Name' and 'Clinical Diagnosis'; is this PH2_dataset.txt?")
    name_col, dx_col = header.index("name"), header.index("clinical diagnosis")
    records, no_image, no_label = [], [], 0
    for line in lines:
        cells = [c.strip() for c in line.split("||")]
        if len(cells) <= dx_col or not cells[name_col].upper().startswith("IMD"):
            continue
        name, dx = cells[name_col], PH2_CLINICAL.get(cells[dx_col])
        if dx is None:
            no_label += 1
            continue
        path = images_dir / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp"
        if not path.is_file():
            no_image.append(name)
            continue
        records.append(Record(str(path), dx, lesion_id=f"PH2_{name}"))
    skipped, info = _read_notes(records, Counter(), [
        (no_image, f"{len(no_image)} rows have no image at PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/"
                   f"IMDxxx.bmp (e.g. {_examples(no_image)})"),
        (no_label, f"{no_label} rows have no clinical diagnosis 0/1/2 and were skipped")])
    if not records:
        raise UserError(f"{table}: no row matched an image under {images_dir}.")
    return Dataset(records, str(table), skipped, info)


def derm7pt_class(diagnosis: str) -> str | None:
    """Derm7pt's diagnosis text -> a HAM10000 class (None for melanosis, miscellaneous and the like)."""
    d = diagnosis.strip().lower()
    if d.startswith("melanoma"):
        return "mel"
    for words, dx in ((("nevus",), "nv"), (("basal cell carcinoma",), "bcc"),
                      (("seborrheic keratosis", "lentigo"), "bkl"), (("dermatofibroma",), "df"),
                      (("vascular lesion",), "vasc")):
        if any(w in d for w in words):
            return dx
    return None


def read_derm7pt(root, split=None) -> Dataset:
    """Derm7pt (Kawahara et al. 2018) as downloaded: `release_v0/meta/meta.csv` (`case_num`, `diagnosis`,
    `derm` = dermoscopic image path under `images/`) and the official `train/valid/test_indexes.csv`
    (rows of meta.csv), which `split` ("train", "val", "test") picks from."""
    root = Path(root).expanduser().absolute()
    meta = root if root.is_file() else _find_named(root, "meta/meta.csv", depth=2)
    if meta is None:
        raise UserError(f"{root}: no meta/meta.csv; point at Derm7pt's release_v0 folder as unzipped.")
    cols, rows = _read_csv(meta)
    _require(meta, cols, {"diagnosis": ("diagnosis",), "derm": ("derm",)},
             "Derm7pt's meta.csv has one row per case with its diagnosis and dermoscopic image path (derm).")
    if split is not None:
        files = {"train": "train_indexes.csv", "val": "valid_indexes.csv", "test": "test_indexes.csv"}
        if split not in files:
            raise UserError(f"{meta}: unknown split {split!r}; Derm7pt has train, val and test.")
        _, index_rows = _read_csv(meta.parent / files[split])
        keep = {int(r["indexes"]) for r in index_rows if _clean(r.get("indexes"))}
        rows = [r for i, r in enumerate(rows) if i in keep]
    images = meta.parent.parent / "images"
    records, no_image, unmapped = [], [], Counter()
    for row in rows:
        diagnosis, rel = _clean(row.get("diagnosis")) or "", _clean(row.get("derm"))
        dx = derm7pt_class(diagnosis)
        if dx is None:
            unmapped[diagnosis or "(empty)"] += 1
            continue
        path = images / rel if rel else None
        if path is None or not path.is_file():
            no_image.append(rel)
            continue
        records.append(Record(str(path), dx, lesion_id=f"derm7pt_{_clean(row.get('case_num')) or rel}",
                              sex=(_clean(row.get("sex")) or "").lower() or None,
                              site=(_clean(row.get("location")) or "").lower() or None))
    listed = ", ".join(f"{k} ({v})" for k, v in unmapped.most_common())
    skipped, info = _read_notes(records, Counter(), [
        (no_image, f"{len(no_image)} rows have no dermoscopic image under {images} (e.g. {_examples(no_image)})"),
        (unmapped, f"{sum(unmapped.values())} images have a diagnosis no HAM10000 class covers: {listed}")])
    if not records:
        raise UserError(f"{meta}: no row with a known diagnosis matched an image under {images}.")
    return Dataset(records, str(meta) + (f" [split={split}]" if split else ""), skipped, info)


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip().lower() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _csv_kind(path: Path) -> str | None:
    """'archive' (isic-cli metadata.csv), 'labelled' (path,dx), 'isic' (image_id,dx), 'challenge' (image + one-hot diagnoses),
    'challenge_metadata' (image + age/site/lesion_id, no labels), or None."""
    header = _csv_header(path)
    if "isic_id" in header and ("diagnosis_1" in header or "diagnosis" in header):
        return "archive"
    if "dx" in header or "label" in header or "diagnosis" in header:
        if any(h in header for h in ("path", "filepath", "file", "filename")):
            return "labelled"
        if "image_id" in header:
            return "isic"
    if "image" in header or "image_id" in header:
        if sum(h in CHALLENGE_CLASS_COLUMNS for h in header) >= 2:
            return "challenge"
        if any(h in header for h in ("lesion_id", "age_approx", "anatom_site_general", "sex")):
            return "challenge_metadata"
    return None


def _label_csvs(folder: Path) -> list[Path]:
    """CSV files in `folder` and, as challenge zips extract, in its immediate sub-folders."""
    found = sorted(folder.glob("*.csv"))
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"):
        found += sorted(sub.glob("*.csv"))
    return found


def _read_challenge_folder(folder: Path, ground_truth: Path, csvs: list[Path]) -> Dataset:
    metadata = [p for p in csvs if _csv_kind(p) == "challenge_metadata"]
    if len(metadata) > 1:  # e.g. training and test metadata side by side: take the one named like the labels
        stem = ground_truth.stem.lower().replace("groundtruth", "")
        metadata = [p for p in metadata if p.stem.lower().replace("metadata", "") == stem] or metadata[:0]
    return read_isic_challenge(ground_truth, folder, metadata[0] if metadata else None)


def load_dataset(source, split=None) -> Dataset:
    """Read any supported layout:

    - a folder holding a `*metadata*.csv` with image_id,dx (HAM10000/ISIC download) -> ISIC reader,
    - a folder holding an ISIC 2018/2019 challenge ground-truth CSV (image + one-hot diagnoses),
      with the images and the optional metadata CSV anywhere beside it -> challenge reader,
    - a folder holding one CSV with path,dx (e.g. ISIC 2017 `labels.csv`) -> labelled-CSV reader,
    - an ISIC archive download (isic-cli: `metadata.csv` with isic_id, diagnosis_1..5) -> archive reader,
    - PH2 (`PH2_dataset.txt`) and Derm7pt (`meta/meta.csv`, splits train/val/test) as downloaded,
    - a folder of class folders -> folder reader,
    - a `.csv` file: labelled CSV when it has a `path` column, challenge CSV when it is one-hot,
      else ISIC metadata (image_id,dx).
    Label CSVs are looked for in the folder and in its immediate sub-folders.
    """
    path = Path(source).expanduser().absolute()
    expected = ("Expected a metadata CSV (image_id,dx), an ISIC challenge ground-truth CSV, a labelled CSV "
                "(path,dx), or a folder with one sub-folder of images per class.")
    if not path.exists():
        raise UserError(f"{path}: no such file or folder. {expected}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"{path}: not a CSV file. {expected}")
        kind = _csv_kind(path)
        if kind == "labelled":
            return read_labelled_csv(path, split)
        if split is not None:
            raise UserError(f"{path}: this CSV has no split column, so split={split!r} cannot be applied; "
                            "leave it out and make a split with model.splits.make_split.")
        if kind == "challenge":
            return _read_challenge_folder(path.parent, path, _label_csvs(path.parent))
        if kind == "archive":
            return read_isic_archive(path)
        return read_isic_metadata(path)  # also raises the missing-columns error for other CSVs
    if _find_named(path, "PH2_dataset.txt") or _find_named(path, "PH2_dataset.xlsx"):
        if split is not None:
            raise UserError(f"{path}: PH2 has no official split, so split={split!r} cannot be applied.")
        return read_ph2(path)
    if _find_named(path, "meta/meta.csv", depth=2):
        return read_derm7pt(path, split)
    csvs = _label_csvs(path)
    kinds = {p: _csv_kind(p) for p in csvs}
    meta = [p for p in csvs if "metadata" in p.name.lower() and kinds[p] == "isic"]
    challenge = [p for p in csvs if kinds[p] == "challenge"]
    labelled = [p for p in csvs if kinds[p] == "labelled"]
    archive = [p for p in csvs if kinds[p] == "archive"]
    for found in (meta, challenge, labelled, archive):
        if len(found) > 1:
            raise UserError(f"{path}: several label CSVs ({', '.join(str(p.relative_to(path)) for p in found)}); "
                            "pass the one to use instead of the folder.")
    if meta:
        return load_dataset(meta[0], split)
    if challenge:
        _refuse_split(path, split, "an ISIC challenge CSV")
        return _read_challenge_folder(path, challenge[0], csvs)
    if labelled:
        return read_labelled_csv(labelled[0], split)
    if archive:
        _refuse_split(path, split, "an ISIC archive download")
        return read_isic_archive(archive[0])
    return read_class_folders(path, split)


def _refuse_split(path: Path, split, layout: str) -> None:
    if split is not None:
        raise UserError(f"{path}: {layout} has no split column, so split={split!r} cannot be "
                        "applied; leave it out (training makes a lesion-grouped split).")


def parse_source(spec: str) -> tuple[str, str, list[str]]:
    """'NAME=labels.csv:train,val' -> ('NAME', 'labels.csv', ['train', 'val']).

    A bare path means every row; the name defaults to the data's folder name (`ham10000`,
    `isic2017`, `isic2019_bcn`), so results and metadata say which source they came from.
    """
    name, _, rest = spec.partition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
    path, _, splits = rest.rpartition(":") if ":" in rest and not os.path.exists(rest) else (rest, "", "")
    if not name:
        p = Path(path)
        name = (p.parent.name if p.suffix.lower() == ".csv" else p.name) or str(p)
    return name, path, [s for s in splits.split(",") if s]


class Labelled(NamedTuple):
    records: list[Record]
    labels: np.ndarray             # int32 class indices into `classes`
    classes: tuple[str, ...]       # the task's classes
    origin: list[str | None]       # the split each record was read from (None when the spec names none)
    skipped: list[str]             # what the readers and the task left out or counted under another class


def load_labelled(spec: str, task: str) -> Labelled:
    """Records of a source spec (see `parse_source`) under `task`, with what was skipped on the way."""
    _, path, splits = parse_source(spec)
    records, labels, origin, skipped = [], [], [], []
    classes = TASKS.get(task)
    for split in splits or [None]:
        dataset = load_dataset(path, split=split)
        recs, labs, classes = select_task(dataset, task)
        records += list(recs)
        labels += list(labs)
        origin += [split] * len(recs)
        skipped += [note for note in dataset.skipped if note not in skipped]
    return Labelled(records, np.asarray(labels, np.int32), classes, origin, skipped)


def select_task(dataset: Dataset, task: str) -> tuple[list[Record], np.ndarray, tuple[str, ...]]:
    """Records whose dx has a class under `task`, their int32 labels, and the task's classes.

    Dropped records are counted and named in a note appended to `dataset.skipped`.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    classes = TASKS[task]
    index = {c: i for i, c in enumerate(classes)}
    kept, labels, dropped, examples = [], [], Counter(), []
    for r in dataset.records:
        label = task_label(r.dx, task)
        if label is None:
            dropped[r.dx] += 1
            examples.append(os.path.basename(r.path))
        else:
            kept.append(r)
            labels.append(index[label])
    listed = ", ".join(f"{k} ({v})" for k, v in dropped.most_common())
    if not kept:
        fits = [t for t in TASKS if t != task and any(task_label(dx, t) for dx in dropped)]
        hint = f" These labels fit task {' / '.join(repr(t) for t in fits)}." if fits else ""
        raise UserError(f"{dataset.source}: no image has a label of task {task!r} "
                        f"(classes: {', '.join(classes)}); labels found: {listed}.{hint}")
    if dropped:
        note = (f"task {task!r}: dropped {sum(dropped.values())} images with labels outside the task: {listed} "
                f"(e.g. {_examples(examples)})")
        if note not in dataset.skipped:
            dataset.skipped.append(note)
    return kept, np.asarray(labels, dtype=np.int32), classes


def organize(csv_path, image_dir, out_dir, mode: str = "copy") -> dict[str, int]:
    """Copy (or symlink, mode="link") the images of a metadata CSV into `out_dir/<dx>/`.

    `image_dir` is where the images are (None: the CSV's folder); a labelled `path,dx` CSV works too.
    Returns images placed per class. Re-running is safe: files already in place are kept.
    """
    if mode not in ("copy", "link"):
        raise UserError(f"unknown organize mode {mode!r}; choose 'copy' or 'link'.")
    csv_path = Path(csv_path).expanduser().absolute()
    ds = read_labelled_csv(csv_path) if _csv_kind(csv_path) == "labelled" else read_isic_metadata(csv_path, image_dir)
    out = Path(out_dir).expanduser().absolute()
    counts: Counter = Counter()
    used: set[Path] = set()
    for r in ds.records:
        src = Path(r.path)
        dest = out / r.dx / src.name
        k = 1
        while dest in used:  # two source files with one name in the same class
            dest = out / r.dx / f"{src.stem}_{k}{src.suffix}"
            k += 1
        used.add(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if mode == "link":
                if dest.is_symlink() and os.readlink(dest) == str(src):
                    pass
                else:
                    if dest.exists() or dest.is_symlink():
                        dest.unlink()
                    os.symlink(src, dest)
            elif not (dest.is_file() and not dest.is_symlink() and dest.stat().st_size == src.stat().st_size):
                if dest.is_symlink():
                    dest.unlink()
                shutil.copy2(src, dest)
        except OSError as e:
            hint = " Use mode='copy' where symbolic links are not allowed." if mode == "link" else ""
            raise UserError(f"{dest}: could not {mode} {src} there ({e}).{hint}") from None
        counts[r.dx] += 1
    return dict(sorted(counts.items()))
