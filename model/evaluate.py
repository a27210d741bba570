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
from .errors import UserError
from .images import build_cache, default_cache_dir
from .predict import probability_columns, probability_row
from .predictor import Predictor
from .data import load_labelled


@dataclasses.dataclass
class Split:
    images: np.ndarray          # uint8 (N, S, S, 3), usually a read-only memmap
    labels: np.ndarray          # int32 (N,)
    records: list


def evaluate_split(predictor: Predictor, split: Split, classes, n_bootstrap=200, tta=None) -> tuple[dict, np.ndarray]:
    """Metrics of the predictor on a cached split, and its decision logits (fused, prior-corrected)."""
    logits = predictor.decision_logits(predictor.logits_from_arrays(split.images, tta), split.records)
    probs = predictor.probabilities(logits)  # with the temperature once calibrated
    return metrics.classification_metrics(probs, split.labels, list(classes), n_bootstrap=n_bootstrap,
                                          operating_threshold=predictor.operating_threshold), logits


def labelled_split(predictor: Predictor, source: str, split: str | None = None) -> Split:
    """A labelled set as the predictor sees it: cached images, labels in its class order.

    `source` may name its splits itself ("labels.csv:train,val"), or `split` picks one.
    """
    spec = f"{source}:{split}" if split else str(source)
    records, labels, data_classes, _ = load_labelled(spec, predictor.metadata["task"])
    if len(records) == 0:
        raise UserError(f"{source}: no labelled images for the task {predictor.metadata['task']!r}.")
    labels = np.array([predictor.classes.index(c) for c in data_classes])[labels]
    images = build_cache([r.path for r in records], predictor.image_size, predictor.resize, default_cache_dir())
    return Split(images, labels, list(records))


def evaluate(checkpoint: str, source: str, out: str, *, split: str | None = None, tta: bool | None = None,
             n_bootstrap: int = 1000) -> dict:
    predictor = Predictor.load(checkpoint)
    data = labelled_split(predictor, source, split)
    labels, records = data.labels, data.records
    result, logits = evaluate_split(predictor, data, predictor.classes, n_bootstrap=n_bootstrap, tta=tta)
    probs = predictor.probabilities(logits)
    result["subgroups"] = metrics.subgroup_metrics(probs, labels, predictor.classes, subgroups(records))
    result["temperature"] = predictor.metadata.get("temperature", 1.0)
    result["clinical_fusion"] = predictor.uses_clinical
    result["checkpoint"] = predictor.checkpoint_id
    result["source"] = str(source) + (f" (split {split})" if split else "")
    report.write_report(Path(out), result, probs, labels, predictor.classes,
                        title=f"{predictor.checkpoint_id} on {Path(source).name}")
    write_predictions(Path(out) / "predictions.csv", predictor, records, labels, probs)
    return result


def external_summary(m: dict) -> dict:
    """The headline of an evaluation on another source, small enough for checkpoint metadata."""
    keys = ("n", "balanced_accuracy", "macro_auc", "malignant_auc", "malignant_auc_ci", "recall", "operating_point")
    return metrics.to_jsonable({k: m[k] for k in keys if k in m})


def record_external(predictor: Predictor, specs) -> dict:
    """Evaluate on other sources ("CSV:split,..." specs) and store their headlines in the checkpoint:
    the model card shows how the model transfers. Returns the full metrics per spec."""
    results = {spec: evaluate_split(predictor, labelled_split(predictor, spec), predictor.classes)[0]
               for spec in specs}
    if results:
        predictor.metadata.setdefault("metrics", {})["external"] = {s: external_summary(m) for s, m in results.items()}
        checkpoint.update_metadata(predictor.metadata["checkpoint_path"], predictor.metadata)
    return results


def write_predictions(path: Path, predictor: Predictor, records, labels, probs) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *probability_columns(predictor)])
        for record, label, p in zip(records, labels, probs):
            writer.writerow([os.path.normpath(record.path), predictor.classes[label], *probability_row(predictor, p)])


def read_predictions(path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(image paths, class probabilities, classes, labels as class indices) of a `write_predictions` file."""
    with open(path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    first, label = header.index("malignant_probability") + 1, header.index("label")
    classes = header[first:]
    probs = np.array([[float(v) for v in row[first:]] for row in rows], np.float64).reshape(len(rows), len(classes))
    labels = np.array([classes.index(row[label]) for row in rows], int)
    return [row[0] for row in rows], probs, classes, labels
