"""Can Grad-CAM's coarse map be made finer from shifted copies of the image (Augmented Grad-CAM)?

  python bench/experiments/saliency_superres.py checkpoints/default --split data/splits/ham10000_val15_seed0.csv --n 200

Grad-CAM comes from the last stage, 5x5 at 160 px: one cell per 32 pixels. Morbidelli et al. 2020
("Augmented Grad-CAM: heat-maps super resolution through augmentation") explain shifted copies of the
image: each copy's map samples the evidence on a grid moved by a fraction of a cell, and a regularised
least-squares solve recovers a map on a finer grid. Here the copies are shifted by multiples of
CELL pixels (edges replicated) and the solve uses a quadratic smoothness term instead of their total
variation, so it is one precomputed linear map; shift-and-add (each coarse map spread back over the
pixels it covers, averaged) is the unregularised reference. Prints energy in mask and pointing game
in each image's own frame, scored as `bench/saliency_faithfulness.py` scores them, for plain Grad-CAM,
each super-resolved map and the lesion mask averaged onto 5x5, 10x10 and 20x20 grids.
The plain view only (one class per image: the served prediction's top class).
"""
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench/, for its sibling
import saliency_faithfulness as sf  # noqa: E402

from model import saliency  # noqa: E402
from model.images import load_image  # noqa: E402
from model.preprocess import preprocess  # noqa: E402

CELL = 8   # px per cell of the fine grid: 20x20 at 160 px
SHIFTS = {"4 copies (+-8 px)": tuple((dy, dx) for dy in (-8, 8) for dx in (-8, 8)),
          "16 copies (-16..8 px)": tuple((dy, dx) for dy in (-16, -8, 0, 8) for dx in (-16, -8, 0, 8))}
SMOOTHNESS = (0.01, 0.1, 1.0)


def shift_images(x, dy: int, dx: int):
    """NHWC images whose content moves by (dy, dx) pixels; the border pixels fill what comes in."""
    pad = max(abs(dy), abs(dx))
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def observation_operator(size: int, stride: int, shifts) -> np.ndarray:
    """(copies x coarse cells, fine cells): each coarse cell of each shifted copy as the mean of the
    fine cells it covers in the unshifted image (those inside the frame)."""
    fine, coarse, span = size // CELL, size // stride, stride // CELL
    rows = []
    for dy, dx in shifts:
        for i in range(coarse):
            for j in range(coarse):
                cover = np.zeros((fine, fine))
                y0, x0 = (stride * i - dy) // CELL, (stride * j - dx) // CELL
                cover[max(0, y0):max(0, y0 + span), max(0, x0):max(0, x0 + span)] = 1
                rows.append(cover.ravel() / max(cover.sum(), 1))
    return np.array(rows)


def smoothness_operator(n: int) -> np.ndarray:
    """Differences between neighbouring cells of an n x n grid, one row per pair."""
    index = np.arange(n * n).reshape(n, n)
    pairs = [*zip(index[:-1].ravel(), index[1:].ravel()), *zip(index[:, :-1].ravel(), index[:, 1:].ravel())]
    d = np.zeros((len(pairs), n * n))
    for row, (a, b) in enumerate(pairs):
        d[row, a], d[row, b] = -1, 1
    return d


def solve_matrix(a: np.ndarray, smoothness: float) -> np.ndarray:
    """M with fine = M @ coarse: argmin |A h - g|^2 + smoothness |D h|^2."""
    d = smoothness_operator(int(np.sqrt(a.shape[1])))
    return np.linalg.solve(a.T @ a + smoothness * d.T @ d + 1e-6 * np.eye(a.shape[1]), a.T)


def shift_and_add_matrix(a: np.ndarray) -> np.ndarray:
    """Each coarse value spread back over the fine cells it covers, averaged per fine cell."""
    spread = a.T * (a > 0).sum(axis=1)   # undo the mean: each covered fine cell gets the coarse value
    return spread / np.maximum(spread.sum(axis=1, keepdims=True), 1e-9)


@nnx.jit(static_argnames="shifts")
def shifted_gradcams(model, x, ci, shifts):
    """Grad-CAM of each shifted copy -> (copies, B, coarse cells), one pass for all copies."""
    copies = jnp.concatenate([shift_images(x, dy, dx) for dy, dx in shifts])
    cam = saliency.cam_and_logits(model, copies, jnp.tile(ci, len(shifts)), "gradcam")[0]
    return cam.reshape(len(shifts), x.shape[0], -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default="checkpoints/default")
    ap.add_argument("--data", type=Path, default=sf.DATA, help="HAM10000 folder with images/ and masks/")
    ap.add_argument("--split", type=Path, help="split CSV (path,split,dx,group); default: a seeded random sample")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    if not (args.data / "images").is_dir() or not (args.data / "masks").is_dir():
        print(f"skipped: {args.data} has no images/ and masks/ folders (HAM10000 with segmentations).")
        return 0
    from model.predictor import Predictor  # noqa: PLC0415

    p = Predictor.load(args.checkpoint)
    size, model = p.image_size, p.model
    ids = sf.pick_images(args.data, args.split, "val", args.n, 0)
    originals = [load_image(args.data / "images" / f"{i}.jpg") for i in ids]
    images = p.prepare(originals)
    masks = sf.load_masks(args.data, ids)
    x = jnp.asarray(preprocess(jnp.asarray(images), p.norm))
    ci = jnp.asarray(p.logits_from_arrays(images).argmax(axis=1).astype(np.int32))
    n = len(ids)

    def scores(maps) -> str:
        framed = sf.in_image_frame(p, np.asarray(saliency.unit_maps(jnp.asarray(maps), size=(size, size))), originals)
        energy = sf.summarise(sf.per_image(sf.energy_in_mask, framed, masks))
        pointing = sf.summarise(sf.per_image(sf.pointing_game, framed, masks))
        return f"{energy['mean']:.3f} ± {energy['ci95']:.3f} | {pointing['mean']:.3f} ± {pointing['ci95']:.3f}"

    stride = size // jax.eval_shape(model.feature_stages, x[:1])[-1].shape[1]
    print(f"{n} HAM10000 images, {size} px, Grad-CAM cells of {stride} px, fine cells of {CELL} px\n")
    print("| map | energy in mask | pointing game |\n| --- | --- | --- |")
    lesions = sf.masks_in_model_view(args.data, ids, size, p.metadata.get("resize", "squash")).astype(np.float32)
    for grid in (size // stride, 2 * size // stride, size // CELL):
        print(f"| lesion mask at {grid}x{grid} (reference) | {scores(sf.lesion_at_grid(lesions, grid))} |")
    plain = np.concatenate([saliency.grad_cam(model, x[s:s + args.batch], ci[s:s + args.batch])
                            for s in range(0, n, args.batch)])
    print(f"| Grad-CAM, plain view | {scores(plain)} |")
    fine = size // CELL
    for name, shifts in SHIFTS.items():
        cams = np.concatenate([shifted_gradcams(model, x[s:s + args.batch], ci[s:s + args.batch], shifts)
                               for s in range(0, n, args.batch)], axis=1)
        coarse = cams.transpose(1, 0, 2).reshape(n, -1)
        a = observation_operator(size, stride, shifts)
        solvers = {"shift-and-add": shift_and_add_matrix(a),
                   **{f"solve, smoothness {lam:g}": solve_matrix(a, lam) for lam in SMOOTHNESS}}
        for label, matrix in solvers.items():
            maps = np.maximum(coarse @ matrix.T, 0).reshape(n, fine, fine)
            print(f"| {name}, {label} | {scores(maps)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
