"""A uniform weight soup (Wortsman et al. 2022): one checkpoint whose weights are the mean of several.

    python bench/experiments/weight_soup.py runs/ms_fov_160 runs/ms_fov_160_lowres --out runs/soup_FG
    python -m model calibrate --checkpoint runs/soup_FG --csv ...      # before any measurement

Members fine-tuned from the same start (pretrained weights, recipe, data order) may sit in one basin,
where the mean of their parameters and batch-norm statistics is one network of a member's size and
cost that does as well as their ensemble. The members must share architecture, classes and
preprocessing. What described a member's own weights (calibration, measurements) is left out of the
soup's metadata: calibrate it on validation data, then benchmark it. Last result (docs/RESULTS.md, levers):
every soup of the bundled recipe with its other seeds and recipes was worse than its best member.
"""
import argparse
import sys
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import checkpoint  # noqa: E402
from model.errors import UserError  # noqa: E402
from model.networks import WEIGHTS  # noqa: E402

# What a soup must share with its members for the mean of their weights to be one network with one input.
MUST_MATCH = ("arch", "arch_config", "classes", "task", "image_size", "resize", "normalisation", "tta")
# What described one member's weights and is wrong for their mean until refitted (`python -m model
# calibrate`: the first three) or re-measured (`benchmark --record`, the saliency bench).
STALE = ("temperature", "operating_point", "ood", "metrics", "saliency", "clinical_fusion", "prior_correction")


def soup(paths, out) -> dict:
    """Write the mean of the checkpoints at `paths` to `out`; return its metadata."""
    if len(paths) < 2:
        raise UserError("a soup needs at least two checkpoints")
    members = [checkpoint.load_model(path) for path in paths]
    first = members[0][1]
    for path, (_, metadata) in zip(paths[1:], members[1:]):
        differ = [key for key in MUST_MATCH if metadata.get(key) != first.get(key)]
        if differ:
            raise UserError(f"{path}: differs from {paths[0]} in {', '.join(differ)}; only checkpoints of one "
                            f"architecture, classes and preprocessing can be averaged")
    model = members[0][0]
    weights = [nnx.state(member, WEIGHTS) for member, _ in members]
    nnx.update(model, jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *weights))
    metadata = {key: value for key, value in first.items() if key not in (*STALE, "checkpoint_id", "checkpoint_path")}
    metadata["soup"] = {"members": [m["checkpoint_id"] for _, m in members],
                        "rule": "uniform mean of parameters and batch-norm statistics"}
    checkpoint.save(out, 0, model, metadata)
    return checkpoint.read_metadata(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="the members (checkpoint folders or training workdirs)")
    parser.add_argument("--out", required=True, help="folder for the averaged checkpoint")
    args = parser.parse_args(argv)
    try:
        metadata = soup(args.checkpoints, args.out)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: the mean of {', '.join(metadata['soup']['members'])}. It is uncalibrated: run "
          f"`python -m model calibrate --checkpoint {args.out} --csv VALIDATION_SET` before using it.")


if __name__ == "__main__":
    main()
