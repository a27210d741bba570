"""Write the PyTorch peer's HAM10000 validation split as a lesionlens split file.

    python bench/experiments/make_peer_split.py ../shared/data/ham10000 data/splits/ham10000_val15_seed0.csv

The peer (../shared/bench/peer_torch.py) holds out 15% of lesions per class with seed 0. Training
lesionlens with `--split_file` on the same file makes the two validation sets identical, so the
comparison in the README is like for like.
"""
import csv
import os
import importlib.util
import sys
from pathlib import Path

PEER = Path(__file__).resolve().parents[3] / "shared" / "bench" / "peer_torch.py"


def main(ham: str, out: str, frac: float = 0.15, seed: int = 0):
    spec = importlib.util.spec_from_file_location("peer_torch", PEER)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)  # imports torch: run where the [weights] extra is installed
    meta = list(csv.DictReader(open(Path(ham) / "HAM10000_metadata.csv")))
    train, val = peer.lesion_split(meta, frac, seed)
    val_ids = {m["image_id"] for m in val}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        # age/sex/localization ride along so `evaluate` can report subgroups from this file alone.
        writer.writerow(["path", "split", "dx", "group", "age", "sex", "localization"])
        for m in meta:
            # Paths relative to the split file's folder: the labelled-CSV convention `evaluate` reads.
            image = os.path.relpath(Path(ham) / "images" / f"{m['image_id']}.jpg", Path(out).parent)
            writer.writerow([image, "val" if m["image_id"] in val_ids else "train",
                             m["dx"], m["lesion_id"], m["age"], m["sex"], m["localization"]])
    print(f"wrote {out}: {len(train)} train, {len(val)} val images")


if __name__ == "__main__":
    main(*sys.argv[1:3])
