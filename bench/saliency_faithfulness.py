"""Do the saliency maps point at the lesion, and do they depend on what the model learned?

  python bench/saliency_faithfulness.py checkpoints/default --n 200 --out runs/saliency_faithfulness.json
  python bench/saliency_faithfulness.py runs/exp1 --split runs/exp1/split.csv --methods gradcam occlusion

On N HAM10000 images with lesion segmentations (the validation rows of --split, else a seeded
random sample) and for each saliency method:
- energy in mask: the share of the map's total inside the lesion mask,
- pointing game: is the map's maximum inside the mask (Zhang et al. 2016),
both against a centred Gaussian map (lesions are usually photographed centred, so this is a strong
baseline; its sigma is set so that half its energy lies in a centred disc of the median lesion
area) and against chance (the mask's area fraction: what a uniform map or a random point scores);
- randomisation: Spearman rank correlation between the maps of the trained model and of the same
architecture with re-initialised weights (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").
Near 0 is what a faithful method gives; near 1 means the map shows the image, not the model;
- deletion and insertion AUCs (Petsiuk et al. 2018): the class probability as the most salient
  pixels are replaced by a blurred copy (deletion: should fall fast, low AUC) or put back into it
  (insertion: should rise fast, high AUC), against a random pixel order and the centred Gaussian.
  These measure faithfulness to the model; the mask scores only plausibility.

The mask scores are taken in each image's own frame: every map (and both Gaussians, drawn in the
model's square view) is placed on the image's pixels through the crop and resize the preprocessing
made, as `Predictor.explain(image, frame="image")` and the app's overlays do; deletion, insertion
and randomisation work in the model's view, where the model sees the pixels. Maps and probabilities are
the ones the predictor serves: for a checkpoint with test-time augmentation, class-activation maps of the
8-view prediction and that prediction's probability (gradient methods explain the plain view).
Prints a Markdown table; --out writes JSON.
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from model import saliency  # noqa: E402
from model.images import load_image, square_box, to_square  # noqa: E402
from model.networks import build  # noqa: E402
from model.preprocess import preprocess  # noqa: E402
from model.views import all_views, mean_over_views  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"  # ../shared/data beside the project
RANDOM_SEED = 123  # the re-initialised model; any seed other than the training one
# Per-method settings for batched runs: chunks bound memory at batch x steps copies per pass.
METHOD_KW = {"smoothgrad": {"chunk": 8}, "integrated_gradients": {"chunk": 8}}


# --- metrics (pure numpy, usable on any maps) -------------------------------------------------

def energy_in_mask(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's total inside its mask; NaN for a blank map. (B, H, W) -> (B,)."""
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's maximal pixels that fall in the mask (1/0 for a unique maximum).

    `explain` clips the top 1 % of a map to 1.0, so its "maximum" is that plateau; scoring the
    share of the plateau inside the mask avoids np.argmax's bias towards the top-left pixel.
    """
    peak = maps >= maps.max(axis=(1, 2), keepdims=True)
    hits = (peak & masks).sum(axis=(1, 2)) / peak.sum(axis=(1, 2))
    return np.where(maps.max(axis=(1, 2)) > 0, hits, np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (SciPy); NaN when either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic)


LESION_REFERENCE = "lesion mask (reference)"
DELETION_STEPS = 16  # fractions 0, 1/16, ..., 1 of the pixels removed (or inserted)


def pixel_order(maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixels of each map, most salient first; ties (the clipped top 1 %, flat regions) in random order."""
    flat = maps.reshape(len(maps), -1)
    jitter = rng.random(flat.shape) * 1e-6
    return np.argsort(-(flat + jitter), axis=1, kind="stable")


def deletion_insertion(probability, x: np.ndarray, baseline: np.ndarray, order: np.ndarray,
                       steps: int = DELETION_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Area under the deletion and insertion curves (Petsiuk et al. 2018, RISE) for each image.

    Deletion replaces the most salient pixels first by `baseline` (a blurred copy: a black or grey
    fill pushes the image out of the training distribution, which ROAD (Rong et al. 2022) shows
    confounds the score) and tracks the class probability: a faithful map makes it fall fast (low
    AUC). Insertion starts from the baseline and puts the most salient pixels back first: it
    should rise fast (high AUC). `probability(images) -> (n,)` scores one image's variants.
    """
    n, h, w, _ = x.shape
    fractions = np.linspace(0, 1, steps + 1)
    deletion, insertion = np.empty(n), np.empty(n)
    for i in range(n):
        rank = np.empty(h * w, int)
        rank[order[i]] = np.arange(h * w)
        masks = (rank[None, :] < (fractions[:, None] * h * w)).reshape(steps + 1, h, w, 1)
        deleted = np.where(masks, baseline[i], x[i])
        inserted = np.where(masks, x[i], baseline[i])
        probs = probability(np.concatenate([deleted, inserted]), i)
        deletion[i] = np.trapezoid(probs[:steps + 1], fractions)
        insertion[i] = np.trapezoid(probs[steps + 1:], fractions)
    return deletion, insertion


def lesion_at_grid(mask_views: np.ndarray, grid: int) -> np.ndarray:
    """The lesion masks (B, S, S) averaged over a `grid` x `grid` raster, then upsampled and scaled as
    `explain` does: a map that knows exactly where the lesion is but is only `grid` cells wide. What a
    class-activation map from a stage of that size scores if it marks the lesion and nothing else
    (a map peaked on the lesion's core, not spread over its area, can score higher)."""
    b, size = mask_views.shape[0], mask_views.shape[1]
    cells = np.asarray(jax.image.resize(jnp.asarray(mask_views, jnp.float32), (b, grid, grid), "linear",
                                        antialias=True))
    return np.asarray(saliency.unit_maps(jnp.asarray(cells), size=(size, size)))


def centred_gaussian(size: int, area_fraction: float) -> np.ndarray:
    """Centred isotropic Gaussian whose half-mass disc has `area_fraction` of the frame."""
    # Half the mass of a 2-D Gaussian lies within r = sigma * sqrt(2 ln 2) = 1.1774 sigma.
    sigma = size * np.sqrt(area_fraction / np.pi) / np.sqrt(2 * np.log(2))
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    g = np.exp(-(yy ** 2 + xx ** 2) / (2 * sigma ** 2))
    return (g / g.max()).astype(np.float32)


def centred_gaussian_sigma(size: int, sigma_frac: float = 0.15) -> np.ndarray:
    """Centred isotropic Gaussian with sigma = `sigma_frac` of the side (issue 15's fixed baseline)."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return np.exp(-(yy ** 2 + xx ** 2) / (2 * (sigma_frac * size) ** 2)).astype(np.float32)


def summarise(values) -> dict:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "ci95": None, "n": 0}
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": float(half), "n": int(len(v))}


# --- data -------------------------------------------------------------------------------------

def pick_images(data: Path, split: Path | None, split_name: str, n: int, seed: int) -> list[str]:
    """Image ids that have a segmentation mask: the `split_name` rows of a split CSV, else a random sample."""
    have_mask = {p.name.removesuffix("_segmentation.png") for p in (data / "masks").glob("*_segmentation.png")}
    if split is not None:
        with open(split, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.DictReader(f) if r.get("split") == split_name]
        if not rows:
            sys.exit(f"{split}: no rows with split == {split_name!r} (expected columns path, split, dx, group).")
        ids = sorted({Path(r["path"]).stem for r in rows} & have_mask)
    else:
        ids = sorted(have_mask)
    rng = np.random.default_rng(seed)
    return [ids[i] for i in sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))]


def load_masks(data: Path, ids: list[str]) -> list[np.ndarray]:
    """Each lesion mask at its image's own size (H, W), bool: the frame the maps are scored in."""
    return [np.asarray(Image.open(data / "masks" / f"{i}_segmentation.png").convert("L")) >= 128 for i in ids]


def masks_in_model_view(data: Path, ids: list[str], size: int, resize: str) -> np.ndarray:
    """Each mask cut exactly as its image was for the model (a field-of-view crop is found on the
    image, not the mask) -> bool (B, S, S): the lesion as a map, for the deletion reference row."""
    return np.stack([to_square(data / "masks" / f"{i}_segmentation.png", size,
                               box=square_box(load_image(data / "images" / f"{i}.jpg"), resize))[..., 0] >= 128
                     for i in ids])


def in_image_frame(p, maps: np.ndarray, originals: list) -> list[np.ndarray]:
    """Model-view maps (B, S, S) on their images' own pixels (`originals`: the loaded images), as
    `Predictor.explain(frame="image")` and the app's overlays place them (through the crop and
    resize the preprocessing made)."""
    return [p.to_image_frame(m, image) for m, image in zip(maps, originals)]


def per_image(score, maps: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """A (B, H, W) metric applied image by image: frames may differ in size between images."""
    return np.array([score(m[None], k[None])[0] for m, k in zip(maps, masks)])


# --- the run ----------------------------------------------------------------------------------

def class_indices(p, images_u8: np.ndarray, ids: list[str], target: str, data: Path) -> np.ndarray:
    if target == "pred":
        return p.logits_from_arrays(images_u8).argmax(axis=1)
    with open(data / "HAM10000_metadata.csv", newline="") as f:
        dx = {r["image_id"]: r["dx"] for r in csv.DictReader(f)}
    return np.array([p.classes.index(dx[i]) for i in ids])


def explain_all(model, x_all, ci_all, method: str, batch: int, tta: bool) -> tuple[np.ndarray, float]:
    """Maps as the predictor serves them: class-activation maps of the 8-view prediction with `tta`."""
    kw = {**METHOD_KW.get(method, {}), **({"tta": tta} if method in saliency.CAM_METHODS else {})}
    maps, start = [], time.perf_counter()
    for s in range(0, len(x_all), batch):
        maps.append(saliency.explain(model, x_all[s:s + batch], jnp.asarray(ci_all[s:s + batch]),
                                     method=method, **kw))
    return np.concatenate(maps), (time.perf_counter() - start) / len(x_all)


def single_map_ms(p, path: Path, method: str, class_index: int, calls: int = 7) -> float:
    """Median wall time of `Predictor.explain(path, method)` for one image, as the app's follow-ups
    call it (image read and prepared included), after two warm-up calls (compilation)."""
    times = []
    for _ in range(calls + 2):
        start = time.perf_counter()
        p.explain(path, method=method, class_index=class_index)
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]) * 1000)


@nnx.jit(static_argnames="tta")
def _logits(model, x, tta):
    return mean_over_views(model(all_views(x))) if tta else model(x)


def faithfulness_rows(p, x: np.ndarray, ci: np.ndarray, maps_by_name: dict, seed: int) -> dict:
    """Deletion and insertion AUCs for each map, and for a random pixel order (the chance baseline),
    on the prediction as the predictor serves it (the 8 views' mean with TTA)."""
    temperature = float(p.metadata.get("temperature", 1.0))
    baseline = np.asarray(saliency.gaussian_blur(jnp.asarray(x)))

    def probability(images, i):
        logits = np.asarray(_logits(p.model, jnp.asarray(images), p.tta)) / temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True))[:, ci[i]]

    rng = np.random.default_rng(seed)
    orders = {name: pixel_order(maps, rng) for name, maps in maps_by_name.items()}
    orders["random order"] = np.stack([rng.permutation(x.shape[1] * x.shape[2]) for _ in range(len(x))])
    rows = {}
    for name, order in orders.items():
        deletion, insertion = deletion_insertion(probability, x, baseline, order)
        rows[name] = {"deletion_auc": summarise(deletion), "insertion_auc": summarise(insertion),
                      "insertion_minus_deletion": summarise(insertion - deletion)}
    return rows


def run(args) -> dict:
    from model.predictor import Predictor  # noqa: PLC0415 (after the data check: fail fast)

    p = Predictor.load(args.checkpoint)
    size, resize = p.image_size, p.metadata.get("resize", "squash")
    ids = pick_images(args.data, args.split, args.split_name, args.n, args.seed)
    paths = [args.data / "images" / f"{i}.jpg" for i in ids]
    originals = [load_image(path) for path in paths]   # read once: prepared, and the frame of every map
    images = p.prepare(originals)
    masks = load_masks(args.data, ids)
    ci = class_indices(p, images, ids, args.target, args.data)
    x = np.asarray(preprocess(jnp.asarray(images), p.norm))

    # Mask scores in each image's own frame; both Gaussians are drawn in the model's square view
    # (what "sigma 0.15 of the side" means there) and placed in the frame like every map.
    area = np.array([m.mean() for m in masks])
    gauss = np.broadcast_to(centred_gaussian(size, float(np.median(area))), (len(ids), size, size))
    gauss15 = np.broadcast_to(centred_gaussian_sigma(size, 0.15), (len(ids), size, size))
    rows = {"chance (mask area)": {"energy_in_mask": summarise(area), "pointing": summarise(area)}}
    lesion_views = masks_in_model_view(args.data, ids, size, resize).astype(np.float32)
    # The grids of the stages the class-activation maps come from, Grad-CAM's (the last) first.
    stages = jax.eval_shape(p.model.feature_stages, jnp.zeros((1, size, size, 3), jnp.float32))
    coarse_lesions = {f"lesion mask at {s.shape[1]}x{s.shape[2]} (reference)": lesion_at_grid(lesion_views, s.shape[1])
                      for s in stages[::-1][:saliency.CAM_STAGES]}
    for name, g in (("centred Gaussian", gauss), ("centred Gaussian (sigma 0.15)", gauss15), *coarse_lesions.items()):
        framed = in_image_frame(p, g, originals)
        rows[name] = {"energy_in_mask": summarise(per_image(energy_in_mask, framed, masks)),
                      "pointing": summarise(per_image(pointing_game, framed, masks))}
    random_model = None
    if not args.no_randomisation:
        md = p.metadata
        random_model = build(md["arch"], len(md["classes"]), seed=RANDOM_SEED, **md.get("arch_config", {}))
        random_model.eval()

    maps_by_name = {"centred Gaussian": np.asarray(gauss), "centred Gaussian (sigma 0.15)": np.asarray(gauss15)}
    for method in args.methods:
        maps, sec = explain_all(p.model, x, ci, method, args.batch, p.tta)
        maps_by_name[method] = maps
        framed = in_image_frame(p, maps, originals)
        # The batched path must be what the app sees: p.explain(frame="image") on the first image.
        same = np.abs(p.explain(paths[0], method=method, class_index=int(ci[0]), frame="image") - framed[0]).max()
        row = {"energy_in_mask": summarise(per_image(energy_in_mask, framed, masks)),
               "pointing": summarise(per_image(pointing_game, framed, masks)),
               "seconds_per_image": sec, "max_abs_diff_vs_predictor_explain": float(same),
               "single_map_ms": single_map_ms(p, paths[0], method, int(ci[0])),
               "blank_maps": int((maps.max(axis=(1, 2)) == 0).sum())}
        if random_model is not None:
            rand_maps, _ = explain_all(random_model, x, ci, method, args.batch, p.tta)
            row["randomisation_spearman"] = summarise([spearman(a, b) for a, b in zip(maps, rand_maps)])
        rows[method] = row
        print(f"  {method}: {sec:.2f} s/image", file=sys.stderr)

    # The lesion itself as a map (faithfulness only; its mask scores are 1 by construction): if
    # deleting the lesion first moves the prediction less than a method's order does, the model's
    # evidence is not only in the lesion, and no faithful map can sit wholly inside it.
    maps_by_name[LESION_REFERENCE] = lesion_views
    p.model.eval()
    faithful = faithfulness_rows(p, x[:args.n_faithfulness], ci[:args.n_faithfulness],
                                 {k: v[:args.n_faithfulness] for k, v in maps_by_name.items()}, args.seed)
    for name, row in faithful.items():
        rows.setdefault(name, {}).update(row)
    return {"checkpoint": str(args.checkpoint), "checkpoint_id": p.checkpoint_id, "arch": p.metadata["arch"],
            "image_size": size, "resize": resize, "tta": p.tta, "n_images": len(ids), "target": args.target,
            "split": str(args.split) if args.split else None, "seed": args.seed,
            "gaussian_area_fraction": float(np.median(area)), "random_model_seed": RANDOM_SEED,
            "deletion_steps": DELETION_STEPS, "n_faithfulness": min(args.n_faithfulness, len(ids)),
            "rows": rows, "image_ids": ids}


RANDOMISATION_LIMIT = 0.5  # mean Spearman with the random-weights map must stay below this


def choose_default(rows: dict) -> tuple[str, str]:
    """(method, why) by the rule in docs/notebook/experiment-record.md: passes the randomisation check, beats the
    centred Gaussian on both mask scores, best insertion - deletion; within the leader's 95 %
    half-width counts as tied, and ties go to the cheaper method. Grad-CAM when none qualifies."""
    gauss = rows["centred Gaussian"]
    mean = lambda row, key: (row.get(key) or {}).get("mean")  # noqa: E731
    qualified = [name for name, row in rows.items() if row.get("seconds_per_image") is not None
                 and mean(row, "randomisation_spearman") is not None
                 and mean(row, "randomisation_spearman") < RANDOMISATION_LIMIT
                 and mean(row, "energy_in_mask") > mean(gauss, "energy_in_mask")
                 and mean(row, "pointing") > mean(gauss, "pointing")
                 and mean(row, "insertion_minus_deletion") is not None]
    if not qualified:
        return "gradcam", "no method passed the randomisation check and beat the centred Gaussian on both mask scores"
    leader = max(qualified, key=lambda m: mean(rows[m], "insertion_minus_deletion"))
    best = rows[leader]["insertion_minus_deletion"]
    tied = [m for m in qualified if mean(rows[m], "insertion_minus_deletion") >= best["mean"] - best["ci95"]]
    chosen = min(tied, key=lambda m: rows[m]["seconds_per_image"])
    if len(qualified) == 1:
        return chosen, (f"{chosen} is the only method that passed the randomisation check and beat the centred "
                        "Gaussian on both mask scores")
    return chosen, (f"best insertion - deletion among the {len(qualified)} methods that qualify "
                    f"({', '.join(qualified)}); tied within the leader's ({leader}) 95% half-width: "
                    f"{', '.join(tied)}; the cheapest of those")


def markdown(result: dict) -> str:
    def cell(s):
        return "-" if not s or s["mean"] is None else f"{s['mean']:.3f} ± {s['ci95']:.3f}"

    def ms_cell(ms):
        return "-" if ms is None else f"{ms:.0f}"

    lines = [f"Saliency faithfulness: {result['checkpoint_id']} ({result['arch']}, {result['image_size']} px, "
             f"{result['resize']}), {result['n_images']} HAM10000 images, target = {result['target']} class, "
             f"{'8-view TTA' if result.get('tta') else 'plain view'} as served",
             "", "| map | energy in mask | pointing game | rank corr. with random-weights map | deletion AUC | "
                 "insertion AUC | insertion - deletion | s / image (batched) | ms / map (one image) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["rows"].items():
        sec = row.get("seconds_per_image")
        lines.append(f"| {name} | {cell(row.get('energy_in_mask'))} | {cell(row.get('pointing'))} | "
                     f"{cell(row.get('randomisation_spearman'))} | {cell(row.get('deletion_auc'))} | "
                     f"{cell(row.get('insertion_auc'))} | {cell(row.get('insertion_minus_deletion'))} | "
                     f"{'-' if sec is None else f'{sec:.2f}'} | {ms_cell(row.get('single_map_ms'))} |")
    lines.append("")
    lines.append("Means ± 95 % normal-approximation half-widths. Rank correlation: lower is better "
                 "(Adebayo et al. 2018); a method near 1 ignores the weights. Deletion / insertion "
                 f"(Petsiuk et al. 2018) on the first {result['n_faithfulness']} images, {result['deletion_steps']} "
                 "steps, pixels replaced by a blurred copy: deletion lower is better, insertion higher; "
                 "the baselines are the random pixel order and the centred Gaussian. The lesion mask "
                 "row deletes (or inserts) the lesion's pixels first: how much the model's evidence lies "
                 "in the lesion. The k x k lesion rows are the mask itself averaged onto a k x k grid: "
                 "what a map from a stage of that size scores when it marks the whole lesion and only it.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default="checkpoints/default")
    ap.add_argument("--data", type=Path, default=DATA, help="HAM10000 folder with images/ and masks/")
    ap.add_argument("--split", type=Path, help="split CSV (path,split,dx,group); default: a seeded random sample")
    ap.add_argument("--split-name", default="val")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(saliency.METHODS), choices=list(saliency.METHODS))
    ap.add_argument("--target", choices=("pred", "true"), default="pred", help="explain the predicted or the true class")
    ap.add_argument("--batch", type=int, default=4, help="images per saliency call")
    ap.add_argument("--n-faithfulness", type=int, default=100,
                    help="images scored by deletion / insertion (each costs 2 x 17 forward passes per map)")
    ap.add_argument("--no-randomisation", action="store_true", help="skip the random-weights sanity check")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--record", action="store_true",
                    help="store the chosen default method and its scores in the checkpoint's metadata "
                         "(the app and Predictor.explain use it; the model card shows it)")
    args = ap.parse_args(argv)

    if not (args.data / "images").is_dir() or not (args.data / "masks").is_dir():
        print(f"skipped: {args.data} has no images/ and masks/ folders (HAM10000 with segmentations).")
        return 0
    if not Path(args.checkpoint).exists():
        print(f"skipped: no checkpoint at {args.checkpoint}; train one first or pass its folder.")
        return 0
    result = run(args)
    result["default"], result["default_reason"] = choose_default(result["rows"])
    print(markdown(result))
    print(f"\ndefault method by the rule: {result['default']} ({result['default_reason']})")
    if args.record:
        from model import checkpoint  # noqa: PLC0415
        from model.predictor import Predictor  # noqa: PLC0415
        p = Predictor.load(args.checkpoint)
        keep = ("energy_in_mask", "pointing", "randomisation_spearman", "deletion_auc", "insertion_auc",
                "insertion_minus_deletion", "seconds_per_image", "single_map_ms")
        p.metadata["saliency"] = {
            "default": result["default"], "reason": result["default_reason"], "n_images": result["n_images"],
            "n_faithfulness": result["n_faithfulness"],
            "scores": {name: {k: row[k] for k in keep if k in row} for name, row in result["rows"].items()}}
        checkpoint.update_metadata(p.metadata["checkpoint_path"], p.metadata)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
