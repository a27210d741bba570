"""`python -m model evaluate --checkpoint DIR --csv LABELS.csv --out OUTDIR`

Scores a checkpoint on any labelled set (a `path,dx` CSV, an ISIC metadata CSV/folder, class folders,
or a run's split file with --split val) and writes metrics.json, report.md, PNG plots and
predictions.csv (one row per image: its label and class probabilities, for error analysis).
"""
import csv
import dataclasses
import os
from pathlib import Path

import numpy as np

from . import checkpoint, metrics, report
from .calibration import subgroups
from .classes import malignant_indices
from .errors import UserError
from .images import UnreadableImages, build_cache, default_cache_dir
from .predict import probability_columns, probability_row
from .predictor import Predictor
from .data import load_labelled


@dataclasses.dataclass
class Split:
    images: np.ndarray          # uint8 (N, S, S, 3), usually a read-only memmap
    labels: np.ndarray          # int32 (N,), indices into `classes`
    records: list
    classes: tuple | None = None   # None: the predictor's; ("benign", "malignant") when scored by malignancy
    skipped: list = dataclasses.field(default_factory=list)


def malignancy_probabilities(predictor: Predictor, probs: np.ndarray) -> np.ndarray:
    """(benign, malignant) columns from a multi-class model's probabilities."""
    malignant = predictor.malignant_probability(probs)
    return np.stack([1.0 - malignant, malignant], axis=1)


def evaluate_split(predictor: Predictor, split: Split, n_bootstrap=200, tta=None) -> tuple[dict, np.ndarray]:
    """Metrics of the predictor on a cached split, and the probabilities they were computed from
    (fused, prior-corrected, temperature-scaled; benign/malignant when the split is scored by malignancy)."""
    logits = predictor.decision_logits(predictor.logits_from_arrays(split.images, tta), split.records)
    probs = predictor.probabilities(logits)
    if split.classes is not None:   # a malignant-vs-benign set scored by a multi-class model
        probs = malignancy_probabilities(predictor, probs)
    return metrics.classification_metrics(probs, split.labels, list(split.classes or predictor.classes),
                                          n_bootstrap=n_bootstrap,
                                          operating_threshold=predictor.operating_threshold), probs


def _load_for(predictor: Predictor, spec: str, by_malignancy: bool):
    """The labelled set under the predictor's task; a malignant-vs-benign set under 'binary' when the
    predictor has several classes and `by_malignancy` lets it score that set by its malignant probability."""
    task = predictor.metadata["task"]
    try:
        return load_labelled(spec, task), False
    except UserError as not_this_task:
        if not by_malignancy or task == "binary":
            raise
        try:
            return load_labelled(spec, "binary"), True
        except UserError:
            raise not_this_task from None


def _cached(predictor: Predictor, records, labels, skip_unreadable: bool):
    """(images, records, labels, notes): the cache of the records; with `skip_unreadable`, of the readable ones,
    and a note naming the others. Only a set with unreadable files is decoded a second time."""
    size, resize = predictor.image_size, predictor.resize
    try:
        return build_cache([r.path for r in records], size, resize, default_cache_dir()), records, labels, []
    except UnreadableImages as e:
        if not skip_unreadable:
            raise
        bad = {os.path.abspath(path) for path, _ in e.failures}
        keep = [i for i, r in enumerate(records) if os.path.abspath(r.path) not in bad]
        if not keep:
            raise
        reasons = "; ".join(reason for _, reason in e.failures[:3])
        note = f"{len(bad)} images could not be read and were skipped ({reasons}{'; ...' if len(bad) > 3 else ''})"
        records, labels = [records[i] for i in keep], labels[keep]
        return build_cache([r.path for r in records], size, resize, default_cache_dir()), records, labels, [note]


def labelled_split(predictor: Predictor, source: str, split: str | None = None, *,
                   by_malignancy: bool = False, skip_unreadable: bool = False) -> Split:
    """A labelled set as the predictor sees it: cached images, labels in its class order, what was skipped.

    `source` may name its splits itself ("labels.csv:train,val"), or `split` picks one. With `by_malignancy`
    a multi-class model may score a malignant-vs-benign set by its malignant probability; with
    `skip_unreadable` images that cannot be decoded are skipped and named instead of stopping the run.
    """
    spec = f"{source}:{split}" if split else str(source)
    data, collapsed = _load_for(predictor, spec, by_malignancy)
    if len(data.records) == 0:
        raise UserError(f"{source}: no labelled images for the task {predictor.metadata['task']!r}.")
    classes = data.classes if collapsed else predictor.classes
    labels = np.array([classes.index(c) for c in data.classes])[data.labels]
    images, records, labels, unreadable = _cached(predictor, list(data.records), labels, skip_unreadable)
    return Split(images, labels, records, tuple(classes) if collapsed else None, data.skipped + unreadable)


def evaluate(checkpoint: str, source: str, out: str, *, split: str | None = None, tta: bool | None = None,
             n_bootstrap: int = 1000, strict: bool = False) -> dict:
    """Scores a checkpoint on a labelled set; what its readers skipped is reported (or, `strict`, refused)."""
    predictor = Predictor.load(checkpoint)
    data = labelled_split(predictor, source, split, by_malignancy=True, skip_unreadable=True)
    if strict and data.skipped:
        raise UserError(f"{source}: --strict, and reading it skipped or changed images:\n"
                        + "\n".join(f"  {note}" for note in data.skipped))
    classes = list(data.classes or predictor.classes)
    result, probs = evaluate_split(predictor, data, n_bootstrap=n_bootstrap, tta=tta)
    result["subgroups"] = metrics.subgroup_metrics(probs, data.labels, classes, subgroups(data.records))
    result["temperature"] = predictor.metadata.get("temperature", 1.0)
    result["clinical_fusion"] = predictor.uses_clinical
    result["checkpoint"] = predictor.checkpoint_id
    result["source"] = str(source) + (f" (split {split})" if split else "")
    result["skipped"] = data.skipped
    if data.classes is not None:
        malignant = ", ".join(predictor.classes[i] for i in malignant_indices(predictor.classes))
        result["scored_by"] = (f"a {len(predictor.classes)}-class model on a malignant-vs-benign set, scored by "
                               f"its malignant probability (the sum of {malignant})")
    report.write_report(Path(out), result, probs, data.labels, classes,
                        title=f"{predictor.checkpoint_id} on {Path(source).name}")
    write_predictions(Path(out) / "predictions.csv", classes, data.records, data.labels, probs)
    return result


def external_summary(m: dict) -> dict:
    """The headline of an evaluation on another source, small enough for checkpoint metadata."""
    keys = ("n", "balanced_accuracy", "macro_auc", "malignant_auc", "malignant_auc_ci", "recall", "operating_point")
    return metrics.to_jsonable({k: m[k] for k in keys if k in m})


def record_external(predictor: Predictor, specs) -> dict:
    """Evaluate on other sources ("CSV:split,..." specs) and store their headlines in the checkpoint:
    the model card shows how the model transfers. Returns the full metrics per spec."""
    results = {spec: evaluate_split(predictor, labelled_split(predictor, spec))[0]
               for spec in specs}
    if results:
        predictor.metadata.setdefault("metrics", {})["external"] = {s: external_summary(m) for s, m in results.items()}
        checkpoint.update_metadata(predictor.metadata["checkpoint_path"], predictor.metadata)
    return results


def write_predictions(path: Path, classes, records, labels, probs) -> None:
    """One row per image: its path, label, predicted class, malignant probability and class probabilities."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *probability_columns(classes)])
        for record, label, p in zip(records, labels, probs):
            writer.writerow([os.path.normpath(record.path), classes[label], *probability_row(classes, p)])


def read_predictions(path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(image paths, class probabilities, classes, labels as class indices) of a `write_predictions` file."""
    with open(path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    first, label = header.index("malignant_probability") + 1, header.index("label")
    classes = header[first:]
    probs = np.array([[float(v) for v in row[first:]] for row in rows], np.float64).reshape(len(rows), len(classes))
    labels = np.array([classes.index(row[label]) for row in rows], int)
    return [row[0] for row in rows], probs, classes, labels
