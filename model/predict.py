"""`python -m model predict --checkpoint DIR --out preds.csv IMAGE_OR_FOLDER...`

One CSV row per image: path, predicted class, malignant probability, one probability column per class,
whether the image is unlike the lesions the model knows (`unusual`, `unusual_because`: then the
probabilities mean little), whether its malignant probability reaches the checkpoint's sensitive threshold,
and an `error` column: files that cannot be read get their reason there, the rest are still predicted.
"""
import csv
from collections import Counter
from pathlib import Path

import numpy as np

from .classes import malignant_indices
from .images import IMAGE_SUFFIXES, load_squares
from .errors import UserError
from .predictor import Predictor

BATCH = 64
GATE_COLUMNS = ["unusual", "unusual_because", "above_sensitive_threshold"]


def expand_inputs(inputs) -> list[Path]:
    """Files as given; folders searched recursively for images."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{item}: folder has no .jpg/.jpeg/.png images.")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise UserError(f"{item}: no such file or folder.")
    return paths


def probability_columns(classes) -> list[str]:
    return ["prediction", "malignant_probability", *classes]


def probability_row(classes, probs: np.ndarray) -> list[str]:
    """The `probability_columns` of one image's class probabilities."""
    malignant = probs[malignant_indices(classes)].sum()
    return [classes[int(probs.argmax())], f"{malignant:.6f}", *[f"{v:.6f}" for v in probs]]


def gate_row(unusual: bool, because, malignant: float, threshold: float | None) -> list[str]:
    """The `GATE_COLUMNS` of one image; the threshold column is empty for an uncalibrated checkpoint."""
    above = "" if threshold is None else str(malignant >= threshold).lower()
    return [str(bool(unusual)).lower(), " ".join(because), above]


def predict_files(checkpoint: str, inputs, out: str, *, tta: bool | None = None) -> dict:
    """Writes the CSV; returns a summary: n read, failures, predictions per class, unusual, flagged."""
    predictor = Predictor.load(checkpoint)
    paths = expand_inputs(inputs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    threshold = predictor.operating_threshold
    columns = probability_columns(predictor.classes) + GATE_COLUMNS
    summary = {"n": 0, "failures": 0, "predicted": Counter(), "unusual": 0, "flagged": 0, "threshold": threshold}
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *columns, "error"])
        for start in range(0, len(paths), BATCH):
            chunk = paths[start:start + BATCH]
            images, errors = load_squares(chunk, predictor.image_size, predictor.resize)
            results = predictor.analyse(images, tta=tta) if len(images) else None
            row = 0
            for path in chunk:
                if path in errors:
                    summary["failures"] += 1
                    writer.writerow([path, *[""] * len(columns), errors[path]])
                    continue
                probs, malignant = results["probs"][row], float(results["malignant"][row])
                unusual = bool(results["unusual"][row])
                writer.writerow([path, *probability_row(predictor.classes, probs),
                                 *gate_row(unusual, results["unusual_because"][row], malignant, threshold), ""])
                summary["n"] += 1
                summary["predicted"][predictor.classes[int(probs.argmax())]] += 1
                summary["unusual"] += unusual
                summary["flagged"] += threshold is not None and malignant >= threshold and not unusual
                row += 1
    return summary
