"""Does a model trained with BCN_20000's 84 px thumbnails read blur as a sign of Barcelona, and so of malignancy?

  python bench/thumbnail_cue.py checkpoints/default --out runs/thumbnail_cue

BCN_20000 comes as 84x84 thumbnails (squashed square) and is richer in melanoma than HAM10000, so a
model trained on both could learn "blurry = more often malignant" (../shared/data/README.md warns of
it). The check: the same HAM10000 validation images, once as they are and once squashed to 84x84 as
BCN's were (the predictor enlarges them back to its input size), through `python -m model benchmark`.
Printed per version: balanced accuracy, malignant AUC, the mean malignant probability and the share
of benign lesions flagged at the sensitive threshold. A cue-free model loses some accuracy to the lost
detail; a model using the cue also flags markedly more benign lesions when they are shrunk.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.benchmark import benchmark, table  # noqa: E402
from model.classes import MALIGNANT  # noqa: E402
from model.images import load_image  # noqa: E402


def shrink_copies(split: Path, split_name: str, size: int, out: Path) -> Path:
    """The `split_name` rows of a split CSV, each image squashed to size x size -> OUT/labels.csv (path, dx)."""
    with open(split, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split_name]
    if not rows:
        sys.exit(f"{split}: no rows with split == {split_name!r}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "dx"])
        for r in rows:
            source = (split.parent / r["path"]).resolve()
            name = f"images/{source.stem}.png"   # lossless: the blur is the only change
            load_image(source).resize((size, size), Image.BICUBIC).save(out / name)
            writer.writerow([name, r["dx"]])
    return out / "labels.csv"


def cue_rows(out: Path, names: list[str], threshold: float) -> list[str]:
    lines = ["| version | mean malignant probability | benign flagged at the sensitive threshold |", "| --- | --- | --- |"]
    for name in names:
        with open(out / f"predictions_{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        p = np.array([float(r["malignant_probability"]) for r in rows])
        benign = np.array([r["label"] not in MALIGNANT for r in rows])
        flagged = "-" if threshold is None else f"{(p[benign] >= threshold).mean():.3f}"   # none stored: "-"
        lines.append(f"| {name} | {p.mean():.3f} | {flagged} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", type=Path, default=ROOT / "data" / "splits" / "ham10000_val15_seed0.csv")
    ap.add_argument("--split-name", default="val")
    ap.add_argument("--size", type=int, default=84, help="thumbnail side (BCN_20000's: 84)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    with open(args.split, newline="", encoding="utf-8-sig") as f:
        first = next(csv.DictReader(f), None)
    if first is None or not (args.split.parent / first["path"]).exists():
        print(f"skipped: the images of {args.split} are not here (../shared/data beside the project).")
        return 0
    shrunk = shrink_copies(args.split, args.split_name, args.size, args.out / "shrunk")
    names = ["as_is", f"squashed_{args.size}px"]
    result = benchmark(args.checkpoint, [f"{names[0]}={args.split}:{args.split_name}", f"{names[1]}={shrunk}"],
                       str(args.out), n_bootstrap=0)
    print(table(result))
    print()
    print("\n".join(cue_rows(args.out, names, result["operating_threshold"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
