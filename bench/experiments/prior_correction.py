"""Post-hoc prior correction (logit adjustment) measured on saved predictions, no retraining.

    python -m model evaluate --checkpoint runs/NAME/best --csv data/splits/ham10000_val15_seed0.csv \
        --split val --out eval/NAME
    python bench/experiments/prior_correction.py data/splits/ham10000_val15_seed0.csv eval/NAME/predictions.csv [...]

For each predictions.csv (written by `evaluate`), prints the balanced accuracy of the arg-max of
log p(class | image) - tau * log prior(class), for a few tau, with the prior taken from the split
file's training rows. tau = 1 is the Bayes rule for balanced accuracy on a model trained without
class weights; a model trained with weights w_c ~ prior^-k has already moved by k, so the
principled tau is 1 - k (0.5 for sqrt weights, 0 for inverse weights). The other columns are for
reading only: choosing tau by the validation number and reporting that number would be optimistic.
A checkpoint decides with a correction once `python -m model calibrate --prior_tau TAU` has stored it.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model.evaluate import read_predictions  # noqa: E402
from model.metrics import balanced_accuracy  # noqa: E402

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)


def prior_corrected_balanced_accuracy(probs, labels, prior, tau: float) -> float:
    """Balanced accuracy of argmax(log probs - tau * log prior)."""
    log_probs = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, None))
    return balanced_accuracy(log_probs - tau * np.log(prior), labels)


def main(split_file: str, prediction_files: list[str]):
    split = pd.read_csv(split_file)
    train_dx = split.loc[split["split"] == "train", "dx"]
    for path in prediction_files:
        _, probs, classes, labels = read_predictions(path)
        prior = np.array([(train_dx == c).mean() for c in classes])
        scores = "  ".join(f"tau {tau}: {prior_corrected_balanced_accuracy(probs, labels, prior, tau):.4f}"
                           for tau in TAUS)
        print(f"{path}\n  balanced accuracy  {scores}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
