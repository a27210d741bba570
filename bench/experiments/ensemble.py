"""Score an ensemble from saved predictions: the mean of several models' probabilities, no retraining.

    for s in A B C; do python -m model evaluate --checkpoint runs/$s/best \
        --csv data/splits/ham10000_val15_seed0.csv --split val --out eval/$s/val; done
    python bench/experiments/ensemble.py eval/A/val/predictions.csv eval/B/val/predictions.csv eval/C/val/predictions.csv

Each predictions.csv (written by `evaluate`) holds one model's temperature-scaled, test-time
augmented probabilities; the files must list the same images in the same order. Prints each
member's and the ensemble's balanced accuracy, macro AUC and malignant AUC with 95% bootstrap CIs.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model.evaluate import read_predictions  # noqa: E402
from model.metrics import classification_metrics  # noqa: E402


def read_members(paths: list[str]) -> list[tuple]:
    """Every member's `read_predictions` table, read once; refuses files that disagree on images or classes."""
    tables = [read_predictions(path) for path in paths]
    images, _, classes, labels = tables[0]
    for path, (other_images, _, other_classes, other_labels) in zip(paths, tables):
        if other_classes != classes or other_images != images or not np.array_equal(other_labels, labels):
            raise SystemExit(f"{path}: not the same images and classes as {paths[0]}; evaluate every "
                             "member on the same set")
    return tables


def summary(probs, labels, classes) -> str:
    m = classification_metrics(probs, labels, classes, n_bootstrap=1000)
    ci = lambda key: "[{:.3f}, {:.3f}]".format(*m[f"{key}_ci"]) if m.get(f"{key}_ci") else ""
    return (f"balanced acc {m['balanced_accuracy']:.4f} {ci('balanced_accuracy')}  "
            f"macro AUC {m['macro_auc']:.4f}  malignant AUC {m['malignant_auc']:.4f} {ci('malignant_auc')}  "
            f"mel recall {m['recall'].get('mel', float('nan')):.3f}")


def main(paths: list[str]):
    tables = read_members(paths)
    for path, (_, probs, classes, labels) in zip(paths, tables):
        print(f"{path}\n  {summary(probs, labels, classes)}")
    _, _, classes, labels = tables[0]  # the same in every member (read_members checked)
    mean = np.mean([probs for _, probs, _, _ in tables], axis=0)
    print(f"ensemble of {len(paths)}\n  {summary(mean, labels, classes)}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
