"""Dataset readers: ISIC/HAM metadata CSVs, folder-per-class trees and generic `path,dx` CSVs.

Every reader returns a `Dataset` of `Record`s with absolute image paths and canonical `dx`
codes (see `classes.canonical_label`), plus human-readable `notes` saying what was skipped.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .classes import TASKS, canonical_label, task_label
from .errors import UserError
from .images import IMAGE_SUFFIXES

MISSING = frozenset({"", "unknown", "nan", "none", "null", "na", "n/a", "?", "-"})
# Derived files that sit next to the images in ISIC downloads; never images of their own.
DERIVED_SUFFIXES = ("_segmentation", "_mask", "_superpixels")
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
    notes: list[str] = field(default_factory=list)

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
    return stem.endswith(DERIVED_SUFFIXES) or path.parent.name.lower() in DERIVED_DIRS


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


def _read_notes(records: list[Record], missing: Counter, problems: list[tuple]) -> list[str]:
    """A reader's notes: each (count or list, message) whose count is non-zero, then missing metadata and odd labels."""
    return [message for count, message in problems if count] + _missing_notes(missing, len(records)) + _label_notes(records)


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
    image_dir = Path(image_dir).expanduser().absolute() if image_dir else csv_path.parent
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: image folder not found; pass the folder holding the images for {csv_path.name}.")
    cols, rows = _read_csv(csv_path)
    _require(csv_path, cols, {"image_id": ("image_id",), "dx": ("dx",)},
             "An ISIC/HAM10000 metadata CSV has one row per image with its image_id and diagnosis (dx).")

    by_stem: dict[str, Path] = {}
    duplicate_files, derived = 0, 0
    for p in _walk_images(image_dir):
        if _is_derived(p):
            derived += 1
            continue
        if p.stem in by_stem:
            duplicate_files += 1
        else:
            by_stem[p.stem] = p

    records, seen = [], set()
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
        records.append(Record(str(path), canonical_label(dx), **_metadata_fields(row, cols, missing)))

    orphans = sorted(set(by_stem) - seen)
    notes = _read_notes(records, missing, [
        (no_image, f"{len(no_image)} rows have no image file under {image_dir} (e.g. {_examples(no_image)})"),
        (orphans, f"{len(orphans)} images under {image_dir} have no row in {csv_path.name} (e.g. {_examples(orphans)})"),
        (no_label, f"{no_label} rows have an empty image_id or dx and were skipped"),
        (repeated, f"{repeated} rows repeat an image_id already read and were skipped"),
        (duplicate_files, f"{duplicate_files} image files share a name with another under {image_dir}; "
                          "the first (sorted) was used"),
        (derived, f"ignored {derived} segmentation/mask files")])
    if not records:
        raise UserError(f"{csv_path}: no row matched an image file under {image_dir} "
                        f"({len(rows)} rows, {len(by_stem)} images found). Pass the folder holding "
                        "the <image_id>.jpg files as the image folder.")
    return Dataset(records, str(csv_path), notes)


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
    notes = []
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
                notes.append(f"read all split folders ({', '.join(d.name for d in chosen)}); pass split= to pick one")
        class_dirs = sorted(c for d in chosen for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    else:
        if split is not None:
            raise UserError(f"{root}: has no train/val/test folders, so split={split!r} cannot be applied; "
                            "leave the split out and make one with model.splits.make_split.")
        class_dirs = subdirs

    records, empty = [], []
    for d in class_dirs:
        dx = canonical_label(d.name)
        images = [p for p in _walk_images(d) if not _is_derived(p)]
        if not images:
            empty.append(d.name)
        records += [Record(str(p), dx) for p in images]
    loose = [f for f in root.iterdir() if f.is_file() and _is_image(f.name)]
    if not records:
        what = (f"found {len(loose)} images directly in it but no class folders" if loose
                else f"found no .jpg/.jpeg/.png images in its sub-folders ({_examples(d.name for d in class_dirs) or 'none'})")
        raise UserError(f"{root}: {what}. Expected one sub-folder per class holding that class's images, "
                        "e.g. benign/ and malignant/, Cancer/ and Non_Cancer/, or mel/, nv/, bkl/ ...")
    if empty:
        notes.append(f"class folders with no images: {', '.join(empty)}")
    if loose:
        notes.append(f"ignored {len(loose)} images lying directly in {root} (not in a class folder)")
    notes += _label_notes(records)
    return Dataset(records, str(root), notes)


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
    records, no_file, no_label = [], [], 0
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
        records.append(Record(str(path), canonical_label(dx), **_metadata_fields(row, cols, missing)))
    notes = _read_notes(records, missing, [
        (no_file, f"{len(no_file)} rows point at missing files (e.g. {_examples(no_file)})"),
        (no_label, f"{no_label} rows have an empty path or label and were skipped")])
    if not records:
        raise UserError(f"{csv_path}: none of the {len(rows)} rows points at an existing image file "
                        f"(paths are relative to {base}; e.g. {_examples(no_file)}).")
    source = str(csv_path) + (f" [split={split}]" if split else "")
    return Dataset(records, source, notes)


def _csv_kind(path: Path) -> str | None:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = [h.strip().lower() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if "dx" in header or "label" in header or "diagnosis" in header:
        if any(h in header for h in ("path", "filepath", "file", "filename")):
            return "labelled"
        if "image_id" in header:
            return "isic"
    return None


def load_dataset(source, split=None) -> Dataset:
    """Read any supported layout:

    - a folder holding a `*metadata*.csv` with image_id,dx (HAM10000/ISIC download) -> ISIC reader,
    - a folder holding one CSV with path,dx (e.g. ISIC 2017 `labels.csv`) -> labelled-CSV reader,
    - a folder of class folders -> folder reader,
    - a `.csv` file: labelled CSV when it has a `path` column, else ISIC metadata (image_id,dx).
    """
    path = Path(source).expanduser().absolute()
    expected = ("Expected a metadata CSV (image_id,dx), a labelled CSV (path,dx), "
                "or a folder with one sub-folder of images per class.")
    if not path.exists():
        raise UserError(f"{path}: no such file or folder. {expected}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"{path}: not a CSV file. {expected}")
        kind = _csv_kind(path)
        if kind == "labelled":
            return read_labelled_csv(path, split)
        if split is not None:
            raise UserError(f"{path}: a metadata CSV has no split column, so split={split!r} cannot be applied; "
                            "leave it out and make a split with model.splits.make_split.")
        return read_isic_metadata(path)  # also raises the missing-columns error for other CSVs
    csvs = sorted(path.glob("*.csv"))
    meta = [p for p in csvs if "metadata" in p.name.lower() and _csv_kind(p) == "isic"]
    labelled = [p for p in csvs if _csv_kind(p) == "labelled"]
    if len(meta) > 1 or (not meta and len(labelled) > 1):
        raise UserError(f"{path}: several label CSVs ({', '.join(p.name for p in meta or labelled)}); "
                        "pass the one to use instead of the folder.")
    if meta:
        return load_dataset(meta[0], split)
    if labelled:
        return read_labelled_csv(labelled[0], split)
    return read_class_folders(path, split)


def select_task(dataset: Dataset, task: str) -> tuple[list[Record], np.ndarray, tuple[str, ...]]:
    """Records whose dx has a class under `task`, their int32 labels, and the task's classes.

    Dropped records are counted in a note appended to `dataset.notes`.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    classes = TASKS[task]
    index = {c: i for i, c in enumerate(classes)}
    kept, labels, dropped = [], [], Counter()
    for r in dataset.records:
        label = task_label(r.dx, task)
        if label is None:
            dropped[r.dx] += 1
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
        note = f"task {task!r}: dropped {sum(dropped.values())} images with labels outside the task: {listed}"
        if note not in dataset.notes:
            dataset.notes.append(note)
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
