"""`python -m model predict --checkpoint DIR --out preds.csv IMAGE_OR_FOLDER...`

One CSV row per image: path, predicted class, malignant probability, one probability column per class,
and an `error` column; files that cannot be read get their reason there, the rest are still predicted.
"""
import csv
from pathlib import Path

import numpy as np

from .classes import malignant_indices
from .images import IMAGE_SUFFIXES, load_squares
from .errors import UserError
from .predictor import Predictor

BATCH = 64


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


def predict_files(checkpoint: str, inputs, out: str, *, tta: bool | None = None) -> int:
    """Returns the number of files that could not be read."""
    predictor = Predictor.load(checkpoint)
    paths = expand_inputs(inputs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *probability_columns(predictor.classes), "error"])
        for start in range(0, len(paths), BATCH):
            chunk = paths[start:start + BATCH]
            images, errors = load_squares(chunk, predictor.image_size, predictor.resize)
            probs = predictor.predict(images, tta) if len(images) else np.zeros((0, len(predictor.classes)))
            rows = iter(probs)
            for path in chunk:
                if path in errors:
                    failures += 1
                    writer.writerow([path, *[""] * len(probability_columns(predictor.classes)), errors[path]])
                else:
                    writer.writerow([path, *probability_row(predictor.classes, next(rows)), ""])
    return failures
