"""Lesion-grouped, class-stratified, seeded train/val/test splits, stored as CSV.

HAM10000 has several photos of most lesions (7,470 lesions for 10,015 images) and a few
byte-identical files; a split that puts photos of one lesion on both sides leaks and inflates
every metric. Splits here are made over groups: images sharing a `lesion_id` or identical file
bytes form one group and always land in the same split.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .errors import UserError

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "split", "dx", "group")         # required when reading a split back
CLINICAL_COLUMNS = ("age", "sex", "localization")  # written too; read by data.read_labelled_csv


def file_hash(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_groups(records, *, dedupe: bool = True) -> list[str]:
    """One group key per record: its `lesion_id`, or `sha1:<file hash>` when it has none.

    With `dedupe` (default) byte-identical files are also merged into one group even when their
    lesion ids differ (a leak when datasets are combined), keyed by the smallest lesion id.
    Records sharing a key must stay in one split.
    """
    n = len(records)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    hashes: list[str | None] = [None] * n
    failed = []
    for i, r in enumerate(records):
        if dedupe or not r.lesion_id:
            try:
                hashes[i] = file_hash(r.path)
            except OSError as e:
                failed.append(f"{r.path}: {e.strerror or e}")
    if failed:
        more = f"\n  ... and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise UserError(f"{len(failed)} images could not be read to group duplicates:\n  "
                        + "\n  ".join(failed[:5]) + more + "\nRemove them from the dataset or fix them, then run again.")
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        for key in ((f"lesion:{r.lesion_id}" if r.lesion_id else None), hashes[i] and f"sha1:{hashes[i]}"):
            if key is None:
                continue
            if key in first:
                union(i, first[key])
            else:
                first[key] = i
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    keys = [""] * n
    for idx in members.values():
        lesions = sorted(records[i].lesion_id for i in idx if records[i].lesion_id)
        key = lesions[0] if lesions else "sha1:" + min(hashes[i] for i in idx)
        for i in idx:
            keys[i] = key
    return keys


def lesion_sample(records, fraction: float, seed: int = 0) -> np.ndarray:
    """Mask of the records of a random `fraction` of the lesions: a smaller training set that
    keeps every image of a chosen lesion, so it never splits what `make_split` keeps together."""
    if fraction >= 1:
        return np.ones(len(records), bool)
    groups = np.array(split_groups(records, dedupe=False))
    lesions = np.unique(groups)
    keep = np.random.default_rng(seed).choice(lesions, size=max(1, _round(fraction * len(lesions))), replace=False)
    return np.isin(groups, keep)


def not_in(records, held_out) -> np.ndarray:
    """Mask of `records` whose file content matches no `held_out` image (e.g. extra training data
    that would leak an exact copy of a validation or external-test image)."""
    seen = {file_hash(r.path) for r in held_out}
    return np.array([file_hash(r.path) not in seen for r in records], bool)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_split(records, labels, *, val_frac: float = 0.15, test_frac: float = 0.0, seed: int = 0,
               groups=None) -> np.ndarray:
    """Assign each record to "train" / "val" / "test", group-wise and stratified by class.

    Each group (see `split_groups`; pass `groups` to reuse them) takes its majority label; within
    each class, `val_frac` and `test_frac` of the groups (lesions) go to val and test. Classes
    with 2+ groups get at least one val (and test) group as long as one group stays in train.
    The result depends only on the groups, labels and `seed`, not on record order.
    """
    labels = np.asarray(labels)
    if len(labels) != len(records):
        raise ValueError(f"{len(records)} records but {len(labels)} labels")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise UserError(f"val_frac={val_frac} and test_frac={test_frac}: each must be in [0, 1) and "
                        "together below 1, leaving images to train on.")
    if groups is None:
        groups = split_groups(records)
    if len(groups) != len(records):
        raise ValueError(f"{len(records)} records but {len(groups)} groups")

    votes: dict[str, Counter] = defaultdict(Counter)
    for g, y in zip(groups, labels.tolist()):
        votes[g][y] += 1
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(votes):
        # majority label; ties go to the smallest label index
        y = min(votes[g].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        by_class[y].append(g)

    rng = np.random.default_rng(seed)
    where: dict[str, str] = {}
    for y in sorted(by_class):
        gs = by_class[y]
        n = len(gs)
        n_test = _round(n * test_frac)
        if test_frac > 0 and n_test == 0 and n >= 2:
            n_test = 1
        n_val = _round(n * val_frac)
        if val_frac > 0 and n_val == 0 and n - n_test >= 2:
            n_val = 1
        n_val = min(n_val, max(n - n_test - 1, 0))
        order = rng.permutation(n)
        for rank, k in enumerate(order):
            where[gs[k]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return np.array([where[g] for g in groups], dtype="<U5")


def write_split(path, records, assignment, groups=None, *, relative: bool = False) -> Path:
    """Write `path,split,dx,group,age,sex,localization` rows (one per record) to a CSV, atomically.

    `relative` writes image paths relative to the CSV's folder, so a split committed beside the
    project still finds `../shared/data` on another machine.

    The clinical columns let `evaluate` report subgroups and `fuse` fit on a run's own split.
    """
    if len(assignment) != len(records):
        raise ValueError(f"{len(records)} records but {len(assignment)} split values")
    bad = sorted(set(map(str, assignment)) - set(SPLITS))
    if bad:
        raise ValueError(f"unknown split values {bad}; expected {SPLITS}")
    if groups is None:
        groups = split_groups(records)
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + CLINICAL_COLUMNS)
        for r, s, g in zip(records, assignment, groups):
            w.writerow([os.path.relpath(r.path, path.parent) if relative else r.path, str(s), r.dx, g, "" if r.age is None else r.age, r.sex or "", r.site or ""])
    os.replace(tmp, path)
    return path


def read_split(path, records) -> np.ndarray:
    """The split of each record, read from a `write_split` CSV.

    Rows are matched by path, or by file name when the dataset folder has moved. Raises a
    `UserError` when a record is missing from the file, a label changed, or a group crosses splits.
    Extra rows in the file (images removed since) are ignored.
    """
    path = Path(path).expanduser().absolute()
    redo = f"Delete {path} to make a new split, or point at the data it was made for."
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            reader.fieldnames = cols
            rows = list(reader)
    except FileNotFoundError:
        raise UserError(f"{path}: no such split file.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable split CSV ({e}). {redo}") from None
    missing_cols = [c for c in COLUMNS if c not in cols]
    if missing_cols:
        raise UserError(f"{path}: missing column(s) {', '.join(missing_cols)}. Found: {', '.join(cols) or '(none)'}. "
                        f"Expected: {', '.join(COLUMNS)}. {redo}")
    bad = Counter(r["split"] for r in rows if r["split"] not in SPLITS)
    if bad:
        raise UserError(f"{path}: unknown split values {dict(bad)}; expected train, val or test. {redo}")

    by_path = {r["path"]: r for r in rows}
    found = [by_path.get(rec.path) for rec in records]
    if any(f is None for f in found):
        # dataset moved? match by file name when names are unique on both sides
        names = Counter(os.path.basename(r["path"]) for r in rows)
        rec_names = Counter(os.path.basename(rec.path) for rec in records)
        if max(names.values(), default=0) <= 1 and max(rec_names.values(), default=0) <= 1:
            by_name = {os.path.basename(r["path"]): r for r in rows}
            found = [by_name.get(os.path.basename(rec.path)) for rec in records]
    absent = [rec.path for rec, f in zip(records, found) if f is None]
    if absent:
        raise UserError(f"{path}: {len(absent)} of {len(records)} images are not in this split file "
                        f"(e.g. {', '.join(absent[:3])}); it was made for other data. {redo}")
    changed = [rec.path for rec, f in zip(records, found) if f["dx"] != rec.dx]
    if changed:
        raise UserError(f"{path}: {len(changed)} images have a different label than when the split was made "
                        f"(e.g. {', '.join(changed[:3])}). {redo}")
    seen: dict[str, str] = {}
    for r in rows:
        if seen.setdefault(r["group"], r["split"]) != r["split"]:
            raise UserError(f"{path}: group {r['group']} appears in more than one split, so the split leaks. {redo}")
    return np.array([f["split"] for f in found], dtype="<U5")
