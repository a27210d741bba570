"""Test-time resolution ("FixRes", Touvron et al. 2019): a trained checkpoint evaluated at other input sizes.

    python bench/experiments/test_resolution.py --checkpoint checkpoints/default --sizes 160 192 \
        --eval data/splits/ham10000_val15_seed0.csv:val --eval ../shared/data/isic2017/labels.csv:val

Random resized crops keep an area fraction s of the frame and resize it to the training size, so a
lesion looks larger in training than in the full frame shown at test time, by about 1 / E[sqrt(s)].
Feeding the full frame at a larger size undoes that. No retraining: the checkpoint's temperature is
kept. Prints one JSON line per (checkpoint, size): balanced accuracy, macro AUC, malignant AUC and ECE per set.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model.evaluate import labelled_split  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from model.evaluate import evaluate_split  # noqa: E402

# ECE: the temperature was fitted at the training size; does calibration hold at the other one?
REPORTED = ("balanced_accuracy", "macro_auc", "malignant_auc", "ece")


def scores_at_sizes(checkpoint: str, sizes: list[int], evals: list[str]):
    """One result per size: the checkpoint's own evaluation (as `evaluate`, no bootstrap) at that input size."""
    trained = Predictor.load(checkpoint)
    for size in sizes:
        # The same network, described as taking `size` px: images are prepared and cached at that size.
        predictor = Predictor(trained.model, {**trained.metadata, "image_size": size})
        result = {"checkpoint": checkpoint, "size": size}
        for spec in evals:
            scores, _ = evaluate_split(predictor, labelled_split(predictor, spec), n_bootstrap=0)
            result[spec] = {k: round(float(scores[k]), 4) for k in REPORTED}
        yield result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--eval", action="append", required=True, metavar="CSV:SPLIT")
    args = parser.parse_args()
    for checkpoint in args.checkpoint:
        for result in scores_at_sizes(checkpoint, args.sizes, args.eval):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
