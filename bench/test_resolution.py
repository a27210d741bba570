"""Test-time resolution ("FixRes", Touvron et al. 2019): a trained checkpoint evaluated at other input sizes.

    python bench/test_resolution.py --checkpoint checkpoints/default --sizes 160 192 \
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import metrics  # noqa: E402
from model.evaluate import labelled_split  # noqa: E402
from model.predictor import Predictor  # noqa: E402


def scores_at_size(checkpoint: str, size: int, evals: list[str]) -> dict:
    predictor = Predictor.load(checkpoint)
    predictor.image_size = size
    result = {"checkpoint": checkpoint, "size": size}
    for spec in evals:
        data = labelled_split(predictor, spec)
        probs = predictor.probabilities(predictor.logits_from_arrays(data.images))
        result[spec] = {"balanced_accuracy": round(metrics.balanced_accuracy(probs, data.labels), 4),
                        "macro_auc": round(metrics.macro_auc(probs, data.labels), 4),
                        "malignant_auc": round(metrics.malignant_auc_fn(predictor.classes)(probs, data.labels), 4),
                        # the temperature was fitted at the training size: does calibration hold at this one?
                        "ece": round(metrics.expected_calibration_error(probs, data.labels), 4)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--eval", action="append", required=True, metavar="CSV:SPLIT")
    args = parser.parse_args()
    for checkpoint in args.checkpoint:
        for size in args.sizes:
            print(json.dumps(scores_at_size(checkpoint, size, args.eval)), flush=True)


if __name__ == "__main__":
    main()
