"""Saliency (model/saliency.py) and heatmap rendering (model/render.py).

  python -m pytest tests/test_saliency.py

Two models: the real `simple_cnn` (random weights: enough for shapes, class specificity and
completeness, which hold for any weights), and a tiny contract-following model whose logits read
only the top-left quadrant, so every faithful method must point there.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import render, saliency
from model.errors import UserError
from model.networks import build

SIZE = 64


@pytest.fixture(scope="module")
def cnn():
    model = build("simple_cnn", 2)
    model.eval()
    return model


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))


class TopLeftModel(nnx.Module):
    """Logits from a non-linear function of the top-left quadrant only: the known answer."""

    def __init__(self):
        self.mix = nnx.Param(jnp.array([[1.0, -0.5, 0.3, 0.8], [0.2, 1.0, -0.7, 0.1], [-0.4, 0.6, 1.0, -0.9]]))
        self.out = nnx.Param(jnp.array([[1.0, -1.0], [0.5, 0.8], [-0.6, 0.4], [0.9, 0.2]]))

    def feature_stages(self, x, taps=None):
        feats = jax.nn.relu(x @ self.mix[...])
        return [feats + taps[0] if taps else feats]

    def features(self, x):
        return self.feature_stages(x)[-1]

    def head(self, feats):
        h, w = feats.shape[1] // 2, feats.shape[2] // 2
        return feats[:, :h, :w].mean(axis=(1, 2)) @ self.out[...]

    def __call__(self, x):
        return self.head(self.features(x))


def _top_left_share(maps):
    maps = np.asarray(maps)
    h, w = maps.shape[1] // 2, maps.shape[2] // 2
    return maps[:, :h, :w].sum(axis=(1, 2)) / maps.sum(axis=(1, 2))


# --- saliency ---------------------------------------------------------------------------------

# Lighter settings keep the file fast on two CPU cores; the code paths are the same.
FAST = {"occlusion": {"patch": 16, "stride": 8}, "smoothgrad": {"n": 8}, "integrated_gradients": {"steps": 16}}


@pytest.mark.parametrize("method", list(saliency.METHODS))
def test_every_method_any_class_gives_unit_maps(cnn, images, method):
    kw = FAST.get(method, {})
    top = np.asarray(cnn(images)).argmax(axis=1)
    for class_index in (1 - top, None):  # the runner-up class of each image, then the predicted one
        maps = saliency.explain(cnn, images, class_index, method=method, **kw)
        assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
        peaks = maps.max(axis=(1, 2))  # each map is scaled to reach 1, or blank (no positive evidence)
        assert np.all((np.abs(peaks - 1) < 1e-6) | (peaks == 0))
    raw = saliency.METHODS[method](cnn, images, 1 - top, **kw)
    # CAMs live on the feature maps: the last (8x8), or the finest of the last three stages (32x32)
    cam_shapes = {"gradcam": (2, 8, 8), "hirescam": (2, 8, 8), "gradcampp": (2, 8, 8), "gradcam_fused": (2, 32, 32), "layercam": (2, 32, 32)}
    assert raw.shape == cam_shapes.get(method, (2, SIZE, SIZE))


@pytest.mark.slow
def test_stage_taps_give_the_exact_gradients(cnn, images):
    # Grad-CAM through the zero taps equals Grad-CAM written out with jax.vjp of the head.
    ci = jnp.array([0, 1])
    feats = cnn.features(images)
    logits, head_vjp = jax.vjp(cnn.head, feats)
    (grads,) = head_vjp(jax.nn.one_hot(ci, logits.shape[-1]))
    reference = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feats, grads.mean(axis=(1, 2))))
    np.testing.assert_allclose(np.asarray(saliency.grad_cam(cnn, images, ci)), np.asarray(reference),
                               rtol=1e-5, atol=1e-7)
    maps, grads, cam_logits, pooled, classes = saliency._stage_maps_and_grads(cnn, images, ci, 3)
    assert [m.shape[1] for m in maps] == [32, 16, 8] and all(g.shape == m.shape for g, m in zip(grads, maps))
    # ... and the same pass gives the forward's logits and pooled features
    np.testing.assert_allclose(np.asarray(cam_logits), np.asarray(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(feats.mean(axis=(1, 2))), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(classes), [0, 1])


def test_cam_of_the_top_class_picked_in_the_same_pass(cnn, images):
    top = np.asarray(cnn(images)).argmax(-1)
    cam, _, _, picked = saliency.cam_and_logits(cnn, images, lambda logits: jnp.argmax(logits, -1), "layercam")
    np.testing.assert_array_equal(np.asarray(picked), top)
    np.testing.assert_allclose(np.asarray(cam), np.asarray(saliency.layer_cam(cnn, images, jnp.asarray(top))),
                               rtol=1e-5, atol=1e-7)


def test_gradcam_depends_on_the_class(cnn, images):
    cam0 = np.asarray(saliency.grad_cam(cnn, images, 0))
    cam1 = np.asarray(saliency.grad_cam(cnn, images, 1))
    mixed = np.asarray(saliency.grad_cam(cnn, images, jnp.array([0, 1])))
    assert not np.allclose(cam0, cam1, atol=1e-6)
    np.testing.assert_allclose(mixed, np.stack([cam0[0], cam1[1]]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("baseline", ["blur", "zeros"])
def test_integrated_gradients_completeness(cnn, images, baseline):
    result = saliency.integrated_gradients_raw(cnn, images, 1, baseline=baseline, **FAST["integrated_gradients"])
    total = np.asarray(result.attributions.sum(axis=(1, 2, 3)))
    diff = np.asarray(result.logit - result.baseline_logit)
    np.testing.assert_allclose(total, diff, rtol=0.05, atol=0.05 * np.abs(diff).max())


def test_smoothgrad_is_reproducible_and_key_dependent(cnn, images):
    kw = FAST["smoothgrad"]
    a = np.asarray(saliency.smoothgrad(cnn, images, 0, **kw))
    b = np.asarray(saliency.smoothgrad(cnn, images, 0, **kw))
    c = np.asarray(saliency.smoothgrad(cnn, images, 0, key=jax.random.key(7), **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_grad_cam_pp_weights_written_out():
    """Grad-CAM++'s channel weights (Chattopadhay et al. 2018, eq. 19 with exp(score)), written out in
    numpy loop by loop, against the vectorised rule, on activations and gradients of mixed sign."""
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(size=(2, 3, 3, 4))).astype(np.float32)
    g = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    g[0, 1, 1, 2] = 0.0                                   # a zero gradient: alpha is 0 there, not NaN
    expected = np.zeros((2, 3, 3), np.float32)
    for b in range(2):
        weights = np.zeros(4)
        for c in range(4):
            for i in range(3):
                for j in range(3):
                    gij = g[b, i, j, c]
                    denominator = 2 * gij ** 2 + a[b, :, :, c].sum() * gij ** 3
                    alpha = gij ** 2 / denominator if denominator != 0 else 0.0
                    weights[c] += alpha * max(gij, 0.0)
        expected[b] = np.maximum((a[b] * weights).sum(-1), 0.0)
    np.testing.assert_allclose(saliency._stage_cam(jnp.asarray(a), jnp.asarray(g), "gradcampp"), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradients", "smoothgrad", "integrated_gradients", "occlusion", "hirescam",
                                    "layercam"])
def test_maps_point_at_the_only_quadrant_that_matters(method):
    # (Grad-CAM is absent on purpose: averaging the gradients over positions spreads them everywhere.)
    model = TopLeftModel()
    x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1.0, maxval=2.0)
    # Occlusion patches aligned with the quadrant: a patch straddling its border would smear the
    # drop onto the outside half.
    kw = {"occlusion": {"patch": 4, "stride": 4}, "smoothgrad": {"n": 4}}.get(method, {})
    maps = saliency.METHODS[method](model, x, jnp.array([0, 1]), **kw)
    if method == "occlusion":  # signed: only the evidence for the class counts
        maps = jnp.maximum(maps, 0)
    assert _top_left_share(maps).min() > 0.999
    peak = np.asarray(maps).reshape(2, -1).argmax(axis=1)
    assert ((peak // 32 < 16) & (peak % 32 < 16)).all()


def test_unit_scaling_handles_blank_and_spiky_maps():
    maps = jnp.zeros((3, 8, 8)).at[1, 2, 3].set(5.0).at[2].set(jnp.arange(64.0).reshape(8, 8))
    unit = np.asarray(saliency.unit_maps(maps, size=(16, 16)))
    assert unit.shape == (3, 16, 16)
    assert (unit[0] == 0).all()  # blank stays blank, no NaN
    assert unit[1].max() == pytest.approx(1.0) and (unit[1] >= 0).all()
    assert (unit[2] == 1).mean() == pytest.approx(0.01, abs=0.01)  # only the top ~1 % saturates


def test_unit_scaling_takes_the_floor_off_and_keeps_every_pixels_order():
    """A map plus a constant is the same map: the least salient pixel scales to 0, and the order of the
    pixels (all that pointing game, randomisation and deletion/insertion read) is the raw map's."""
    raw = jax.random.uniform(jax.random.key(5), (2, 8, 8))
    lifted = np.asarray(saliency.unit_maps(raw + 3.0, size=(8, 8)))
    np.testing.assert_allclose(lifted, np.asarray(saliency.unit_maps(raw, size=(8, 8))), atol=1e-5)
    assert np.allclose(lifted.min(axis=(1, 2)), 0.0)
    flat = np.asarray(raw).reshape(2, -1)
    unsaturated = lifted.reshape(2, -1) < 1
    for r, u, keep in zip(flat, lifted.reshape(2, -1), unsaturated):
        assert (np.diff(u[keep][np.argsort(r[keep])]) >= 0).all()   # same order below the saturated top
    assert (np.asarray(saliency.unit_maps(jnp.full((1, 4, 4), 2.0), size=(4, 4))) == 0).all()   # flat: no evidence


def test_refuses_train_mode_and_unknown_methods(images):
    model = build("simple_cnn", 2)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        saliency.grad_cam(model, images, 0)
    model.eval()
    with pytest.raises(UserError, match="gradcam"):
        saliency.explain(model, images, 0, method="lime")
    with pytest.raises(ValueError, match="one per image"):
        saliency.grad_cam(model, images, [0, 1, 1])


# --- render -----------------------------------------------------------------------------------

def test_colour_map_runs_dark_to_blue_green_red():
    lut = render.TURBO
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[0].sum() < 100  # dark, cold end
    assert np.argmax(lut[64]) == 2 and np.argmax(lut[128]) == 1 and np.argmax(lut[255]) == 0
    np.testing.assert_array_equal(render.colorize(np.array([[0.0, 1.0, 7.0]])), lut[[0, 255, 255]][None])


def test_overlay_shapes_and_alpha():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    heat = rng.random((6, 8)).astype(np.float32)  # a coarse map is resized to the image
    out = render.overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    for weighted in (True, False):
        np.testing.assert_array_equal(render.overlay(image, heat, alpha=0.0, heat_weighted=weighted), image)
    full = render.overlay(image, heat, alpha=1.0, heat_weighted=False)
    np.testing.assert_array_equal(full, render.colorize(render.resize_heatmap(heat, (48, 64))))
    cold = render.overlay(image, np.zeros((6, 8)), alpha=0.9)  # heat-weighted: no heat, no tint
    np.testing.assert_array_equal(cold, image)


def test_contour_of_a_known_blob():
    heat = np.zeros((40, 40), np.float32)
    heat[10:20, 15:25] = 1.0  # 6 % of the frame: the whole blob is in the top 20 %
    ring = np.zeros_like(heat, bool)
    ring[10:20, 15:25] = True
    ring[11:19, 16:24] = False
    np.testing.assert_array_equal(render.top_region_contour(heat, 20), ring)
    assert not render.top_region_contour(np.zeros((8, 8)), 20).any()

    yy, xx = np.mgrid[:60, :60]
    bump = np.exp(-((yy - 30.0) ** 2 + (xx - 30.0) ** 2) / 200)
    edge = render.top_region_contour(bump, 20)
    radius = np.hypot(yy[edge] - 30, xx[edge] - 30)
    expected = np.sqrt(0.2 * 60 * 60 / np.pi)  # the disc holding 20 % of the pixels
    assert np.abs(radius - expected).max() < 1.5

    image = np.zeros((40, 40, 3), np.uint8)
    drawn = render.overlay(image, heat, contour_percent=20)
    assert (drawn[ring] == 255).all() and (drawn[~ring] < 255).all()


def test_side_by_side_layout():
    a, b = np.zeros((30, 20, 3), np.uint8), np.zeros((25, 10, 3), np.uint8)
    row = render.side_by_side([a, b], gap=4)
    assert row.shape == (30, 34, 3) and row.dtype == np.uint8
    assert (row[:, 20:24] == 255).all() and (row[25:, 24:] == 255).all()
    labelled = render.side_by_side([a, b], labels=["Grad-CAM", "IG"], gap=4)
    assert labelled.shape[0] > 30 and labelled.shape[1] == 34
    strip = labelled[: labelled.shape[0] - 30]
    assert (strip < 128).any()  # the labels were drawn


# --- faithfulness metrics (bench/saliency_faithfulness.py) on synthetic maps -------------------

def _bench(name: str = "saliency_faithfulness", sub: str = ""):
    import importlib.util
    import sys
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / "bench"
    if str(folder) not in sys.path:   # bench scripts import each other, as when run from bench/
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / sub / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_faithfulness_metrics_on_known_maps():
    bench = _bench()
    masks = np.zeros((3, 20, 20), bool)
    masks[:, 5:15, 5:15] = True
    maps = np.stack([masks[0].astype(np.float32), 1 - masks[1].astype(np.float32), np.zeros((20, 20))])
    np.testing.assert_allclose(bench.energy_in_mask(maps, masks)[:2], [1.0, 0.0])
    np.testing.assert_allclose(bench.pointing_game(maps, masks)[:2], [1.0, 0.0])
    assert np.isnan(bench.energy_in_mask(maps, masks)[2]) and np.isnan(bench.pointing_game(maps, masks)[2])

    a = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    assert bench.spearman(a, a ** 3) == pytest.approx(1.0)
    assert bench.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(bench.spearman(a, np.ones(5)))

    # Deletion / insertion: the "class probability" is the share of the lesion still showing.
    lesion = np.zeros((1, 16, 16, 1), np.float32)
    lesion[:, 4:12, 4:12] = 1.0                       # a quarter of the frame
    x, baseline = np.repeat(lesion, 3, axis=-1), np.zeros((1, 16, 16, 3), np.float32)
    probability = lambda images, i: images[:, 4:12, 4:12, 0].mean(axis=(1, 2))  # noqa: E731
    rng = np.random.default_rng(0)
    right = bench.pixel_order(lesion[..., 0], rng)
    wrong = bench.pixel_order(1 - lesion[..., 0], rng)
    deletion, insertion = bench.deletion_insertion(probability, x, baseline, right)
    assert deletion[0] == pytest.approx(0.125, abs=0.01) and insertion[0] == pytest.approx(0.875, abs=0.01)
    deletion, insertion = bench.deletion_insertion(probability, x, baseline, wrong)
    assert deletion[0] == pytest.approx(0.875, abs=0.01) and insertion[0] == pytest.approx(0.125, abs=0.01)

    # The lesion known exactly but on a coarse grid: all of it inside at the full size, less as the
    # grid coarsens, and never more than a map from a finer grid.
    lesions = np.zeros((1, 32, 32), np.float32)
    lesions[:, 8:20, 10:26] = 1.0
    energy = [bench.energy_in_mask(bench.lesion_at_grid(lesions, g), lesions.astype(bool))[0] for g in (2, 4, 8, 32)]
    assert energy[-1] == pytest.approx(1.0) and energy[0] < 0.6 and np.all(np.diff(energy) > 0)

    g = bench.centred_gaussian(101, 0.2)  # half its energy in the centred disc of 20 % of the frame
    yy, xx = np.mgrid[:101, :101] - 50
    disc = np.hypot(yy, xx) <= np.sqrt(0.2 * 101 * 101 / np.pi)
    assert g[disc].sum() / g.sum() == pytest.approx(0.5, abs=0.02)


def test_default_method_rule():
    bench = _bench()
    s = lambda mean, ci=0.01: {"mean": mean, "ci95": ci}  # noqa: E731
    gauss = {"energy_in_mask": s(0.60), "pointing": s(0.90)}

    def row(energy, pointing, spearman, gain, ci, sec):
        return {"energy_in_mask": s(energy), "pointing": s(pointing), "randomisation_spearman": s(spearman),
                "insertion_minus_deletion": s(gain, ci), "seconds_per_image": sec}

    rows = {"centred Gaussian": gauss,
            "gradcam": row(0.55, 0.95, 0.1, 0.30, 0.02, 0.01),          # loses to the Gaussian on energy
            "layercam": row(0.65, 0.97, 0.2, 0.40, 0.05, 0.05),         # the leader
            "hirescam": row(0.64, 0.96, 0.2, 0.37, 0.02, 0.02),         # tied with it, and cheaper
            "gradients": row(0.70, 0.99, 0.8, 0.50, 0.02, 0.01),        # fails the randomisation check
            "occlusion": row(0.66, 0.97, 0.1, 0.20, 0.02, 1.00)}
    assert bench.choose_default(rows)[0] == "hirescam"
    rows["hirescam"]["insertion_minus_deletion"] = s(0.30)              # no longer tied
    assert bench.choose_default(rows)[0] == "layercam"
    assert bench.choose_default({"centred Gaussian": gauss, "gradients": rows["gradients"]})[0] == "gradcam"


@pytest.mark.slow
def test_predictor_explains_with_the_checkpoint_default(tmp_path, images):
    from test_app import make_tiny_checkpoint
    from model import checkpoint
    from model.predictor import Predictor
    path = make_tiny_checkpoint(tmp_path / "ckpt", size=SIZE)
    p = Predictor.load(path)
    assert p.default_method == "gradcam"
    p.metadata["saliency"] = {"default": "layercam"}
    checkpoint.update_metadata(p.metadata["checkpoint_path"], p.metadata)
    p = Predictor.load(path)
    image = np.asarray((images[0] - images[0].min()) / (images[0].max() - images[0].min()) * 255, np.uint8)
    np.testing.assert_array_equal(p.explain(image, class_index=1), p.explain(image, "layercam", class_index=1))
    assert not np.array_equal(p.explain(image, class_index=1), p.explain(image, "gradcam", class_index=1))


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_one_pass_prediction_and_map_equal_the_two_separate_calls(tmp_path, tta):
    """`analyse_and_explain` (the app's one jitted pass, batches padded to a power of two) gives what
    `analyse` and `explain` give apart, for each image's top class, with and without TTA."""
    from test_app import make_tiny_checkpoint
    from model import checkpoint
    from model.predictor import Predictor
    path = make_tiny_checkpoint(tmp_path / "ckpt", size=SIZE)
    metadata = checkpoint.read_metadata(path)
    checkpoint.update_metadata(path, {**metadata, "tta": tta, "saliency": {"default": "layercam"}})
    p = Predictor.load(path)
    batch = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)   # padded to 4
    both = p.analyse_and_explain(batch)
    apart = p.analyse(batch)
    for key in ("probs", "malignant", "ood_score", "entropy"):
        np.testing.assert_allclose(both[key], apart[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both["unusual"], apart["unusual"])
    top = apart["probs"].argmax(axis=1)
    assert both["heat"].shape == (3, SIZE, SIZE)
    for image, c, heat in zip(batch, top, both["heat"]):
        np.testing.assert_allclose(heat, p.explain(image, class_index=int(c)), atol=1e-5)
        np.testing.assert_allclose(heat, p.explain(image), atol=1e-5)   # the top class found in the same pass


@pytest.mark.slow
@pytest.mark.parametrize("resize", ["squash", "center"])
def test_faithfulness_bench_scores_masks_in_the_images_own_frame(tmp_path, resize):
    """The whole bench on a HAM10000-shaped folder of wide images: masks are read at the image's own
    size and every map placed there as the app does. Known answers: a mask of the left half holds half
    of any centred, mirror-symmetric map (both Gaussians; 0 outside a centre crop on both sides), and
    the batched maps equal `Predictor.explain(frame="image")` (both of the 8-view prediction)."""
    import json
    from PIL import Image
    from test_app import make_tiny_checkpoint
    from model import checkpoint
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", size=SIZE, resize=resize)
    checkpoint.update_metadata(ckpt, {**checkpoint.read_metadata(ckpt), "tta": True})   # served as bundled
    data = tmp_path / "ham"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    ids = [f"ISIC_00000{i}" for i in range(3)]
    mask = np.zeros((36, 48), np.uint8)
    mask[:, :24] = 255
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(data / "images" / f"{i}.jpg")
        Image.fromarray(mask).save(data / "masks" / f"{i}_segmentation.png")
    (data / "HAM10000_metadata.csv").write_text("image_id,dx\n" + "".join(f"{i},nv\n" for i in ids))
    out = tmp_path / "result.json"
    assert _bench().main([str(ckpt), "--data", str(data), "--n", "3", "--n-faithfulness", "2",
                          "--methods", "gradcam", "layercam", "--no-randomisation", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows["chance (mask area)"]["energy_in_mask"]["mean"] == pytest.approx(0.5)
    for gaussian in ("centred Gaussian", "centred Gaussian (sigma 0.15)"):
        assert rows[gaussian]["energy_in_mask"]["mean"] == pytest.approx(0.5, abs=1e-3)
    for method in ("gradcam", "layercam"):
        assert rows[method]["max_abs_diff_vs_predictor_explain"] < 1e-5
        assert 0.0 <= rows[method]["energy_in_mask"]["mean"] <= 1.0
        assert rows[method]["deletion_auc"]["mean"] is not None
    grids = {int(name.split()[3].split("x")[0]): row["energy_in_mask"]["mean"] for name, row in rows.items()
             if name.startswith("lesion mask at ")}           # one per CAM stage of the network, e.g. "8x8"
    assert len(grids) == min(saliency.CAM_STAGES, len(build("simple_cnn", 7, widths=(8, 16, 16, 16)).feature_stages(
        jnp.zeros((1, SIZE, SIZE, 3)))))
    energies = [grids[g] for g in sorted(grids)]
    assert 0.5 <= energies[0] <= energies[-1] <= 1.0            # the left-half mask: finer grids hold more of it
    reference = rows["lesion mask (reference)"]          # faithfulness only: never a candidate default
    assert reference["deletion_auc"]["mean"] is not None and "energy_in_mask" not in reference


def test_super_resolution_recovers_a_fine_map_from_shifted_coarse_ones():
    """bench/experiments/saliency_superres.py: a 20x20 map seen only through 5x5 grids of 16 shifted copies comes
    back from the solve far closer than any one coarse map gets; shifting moves content as stated."""
    bench = _bench("saliency_superres", "experiments")
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    moved = np.asarray(bench.shift_images(x, 1, -1))[0, ..., 0]
    np.testing.assert_array_equal(moved[1:, :3], np.asarray(x)[0, :3, 1:, 0])   # content moved down, left
    np.testing.assert_array_equal(moved[0], moved[1])                            # the border fills the gap

    size, stride = 160, 32
    yy, xx = np.mgrid[:20, :20]
    fine = np.exp(-((yy - 6.5) ** 2 + (xx - 12.5) ** 2) / 8.0)                  # an off-centre blob
    a = bench.observation_operator(size, stride, bench.SHIFTS["16 copies (-16..8 px)"])
    coarse = a @ fine.ravel()
    recovered = (bench.solve_matrix(a, 0.01) @ coarse).reshape(20, 20)
    one_copy = np.kron(coarse[:25].reshape(5, 5), np.ones((4, 4)))              # the unshifted 5x5 map
    error = lambda m: np.abs(m - fine).mean()  # noqa: E731
    assert error(recovered) < 0.25 * error(one_copy)
    assert np.unravel_index(recovered.argmax(), recovered.shape) in {(6, 12), (6, 13), (7, 12), (7, 13)}
    spread = (bench.shift_and_add_matrix(a) @ coarse).reshape(20, 20)
    assert error(spread) < error(one_copy)


def test_a_map_made_on_a_view_turns_back_to_the_image():
    from model.views import TTA_VIEWS, dihedral_views, to_image_orientation
    maps = jax.random.normal(jax.random.key(4), (2, 5, 5))
    views = dihedral_views(maps[..., None])
    assert len(views) == TTA_VIEWS and len({np.asarray(v).tobytes() for v in views}) == TTA_VIEWS
    for k, view in enumerate(views):
        np.testing.assert_array_equal(to_image_orientation(view[..., 0], k), maps)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_map_of_the_averaged_views_turns_with_the_image(cnn, images, method):
    """The TTA map explains a prediction that is the same for every flip or rotation of the image,
    so the map of a turned image is the turned map (exactly, whatever the weights); the plain-view
    map of a CNN is not."""
    from model.views import dihedral_views
    turned = dihedral_views(images)[3]    # rotated a quarter turn and mirrored
    for tta in (True, False):
        of_turned = np.asarray(saliency.explain(cnn, turned, 1, method=method, tta=tta))
        turned_map = np.asarray(dihedral_views(jnp.asarray(
            saliency.explain(cnn, images, 1, method=method, tta=tta))[..., None])[3][..., 0])
        if tta:
            np.testing.assert_allclose(of_turned, turned_map, atol=1e-4)
        else:
            assert np.abs(of_turned - turned_map).max() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("method", list(saliency.CAM_METHODS) + ["gradients"])
def test_predictor_explain_equals_the_saliency_module(tmp_path, images, method, tta):
    """`Predictor.explain` (plain jax.jit on the split model for the CAMs) gives saliency.explain's map:
    for a checkpoint served with TTA, the CAMs of the averaged views; gradients on the plain view."""
    from test_app import make_tiny_checkpoint
    from model import checkpoint
    from model.predictor import Predictor
    from model.preprocess import preprocess
    path = make_tiny_checkpoint(tmp_path / "ckpt", size=SIZE)
    checkpoint.update_metadata(path, {**checkpoint.read_metadata(path), "tta": tta})
    p = Predictor.load(path)
    image = np.asarray((images[0] - images[0].min()) / (images[0].max() - images[0].min()) * 255, np.uint8)
    x = preprocess(jnp.asarray(p.prepare([image])), p.norm)
    kw = {"tta": tta} if method in saliency.CAM_METHODS else {}
    for c in (2, 4):
        expected = saliency.explain(p.model, x, jnp.asarray([c]), method=method, **kw)[0]
        np.testing.assert_allclose(p.explain(image, method, class_index=c), expected, atol=1e-5)
