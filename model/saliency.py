"""Saliency maps in JAX for any model that follows the `model.networks` contract.

  from model import saliency
  model.eval()
  maps = saliency.explain(model, x, class_index, method="gradcam")   # np.float32 (B, H, W) in [0, 1]

`x` is float32 NHWC, already normalised (the predictor preprocesses); `class_index` is an int,
one int per image, or None for each image's predicted class. Every method is one `nnx.jit`
function that takes the model as an argument: one compilation per input shape, whatever the
class indices. The raw functions return unnormalised maps; `explain` upsamples them to the input
size and scales each to [0, 1].

Methods, and what each one is good for:
- gradcam: Grad-CAM (Selvaraju et al. 2017) on the last conv feature map; coarse, class-specific.
- hirescam: HiResCAM (Draelos & Carin 2020): gradient x activation per position on the last map.
- gradcampp: Grad-CAM++ (Chattopadhay et al. 2018): Grad-CAM whose channel weights count each
  position's positive gradient, so several separate parts of the evidence all show.
- gradcam_fused / layercam: Grad-CAM or LayerCAM (Jiang et al. 2021) on the last three resolution
  stages (5x5, 10x10 and 20x20 for EfficientNet-Lite0 at 160 px), fused in one forward and one
  backward pass: the coarse map says which region, the finer ones where inside it.
- gradients: |d logit / d x| (Simonyan et al. 2014); sharp but noisy.
- smoothgrad: gradients averaged over noisy copies (Smilkov et al. 2017).
- integrated_gradients: Sundararajan et al. 2017, blurred baseline by default (see below).
- occlusion: drop in class probability when a patch is covered (Zeiler & Fergus 2014); needs
  no gradients, so it is the model-agnostic check on the others.

The class-activation maps also come for the prediction averaged over the 8 dihedral views
(`tta=True`, what the predictor serves with test-time augmentation): each view's map turned back
to the image and the maps averaged.
"""
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .views import TTA_VIEWS, all_views, mean_over_views, to_image_orientation

# IG and occlusion baselines. Inputs are normalised, so zeros are the dataset-mean colour (the
# grey patch of occlusion studies). IG defaults to a blurred copy of the image instead: a black
# or flat baseline puts (x - baseline) near zero on dark pigment, which silences the lesion
# itself, while blurring keeps the colours and removes what the model should look at (borders,
# pigment network, dots, globules) (Sturmfels et al. 2020, "Visualizing the Impact of Feature
# Attribution Baselines").
BLUR_SIGMA = 1 / 16  # of the image side: 14 px at 224, wider than pigment-network detail


# ---------------------------------------------------------------------------------------------
# helpers

def _require_eval(model: nnx.Module) -> None:
    for _, module in nnx.iter_modules(model):
        if (isinstance(module, nnx.BatchNorm) and not module.use_running_average) or (
                isinstance(module, nnx.Dropout) and not module.deterministic):
            raise ValueError("saliency needs the model in eval mode: call model.eval() first (in train "
                             "mode BatchNorm mixes the batch into every map and updates its statistics)")


@nnx.jit
def _predicted_class(model, x):
    return jnp.argmax(model(x), axis=-1).astype(jnp.int32)


def _prepare(model, x, class_index):
    """Checks the mode, makes x a float32 batch and class_index one int32 per image."""
    _require_eval(model)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images (B, H, W, C), got shape {x.shape}")
    if class_index is None:
        return x, _predicted_class(model, x)
    ci = jnp.asarray(class_index, jnp.int32)
    if ci.ndim == 0:
        ci = jnp.full((x.shape[0],), ci)
    if ci.shape != (x.shape[0],):
        raise ValueError(f"class_index must be an int or one per image ({x.shape[0]}), got shape {ci.shape}")
    return x, ci


def _class_logit_sum(model, x, ci):
    # Summing over the batch is exact in eval mode: no image influences another's logit.
    logits = model(x)
    return jnp.take_along_axis(logits, ci[:, None], axis=1).sum()


def _input_grad(model, x, ci):
    return jax.grad(lambda z: _class_logit_sum(model, z, ci))(x)


def _stacked(fn, xs, n: int, chunk: int | None):
    """fn over a stack of n items (leading axis of every leaf of xs), `chunk` items per call.

    chunk=None runs all n in one call: fastest, since XLA:CPU runs loop bodies several times
    slower than the same ops unrolled. A chunk bounds memory on large inputs (a lax.map loop).
    """
    if chunk is None or chunk >= n:
        return fn(xs)
    groups = -(-n // chunk)
    pad = groups * chunk - n
    xs = jax.tree.map(lambda a: jnp.concatenate([a, a[:pad]]).reshape(groups, chunk, *a.shape[1:]), xs)
    out = jax.lax.map(fn, xs)
    return jax.tree.map(lambda a: a.reshape(groups * chunk, *a.shape[2:])[:n], out)


def _input_grads_stacked(model, xs, ci):
    """Input gradients of a stack of batches (k, B, H, W, C), as one (k * B) batch."""
    k, b = xs.shape[:2]
    grads = _input_grad(model, xs.reshape(k * b, *xs.shape[2:]), jnp.tile(ci, k))
    return grads.reshape(xs.shape)


def _gaussian_matrix(n: int, sigma: float) -> jnp.ndarray:
    # Rows renormalised to sum to one: the image border is handled without padding.
    d = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]
    k = jnp.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


@jax.jit
def gaussian_blur(x: jnp.ndarray, sigma_frac: float = BLUR_SIGMA) -> jnp.ndarray:
    """Separable Gaussian blur of NHWC images; sigma is a fraction of each image side."""
    _, h, w, _ = x.shape
    gh, gw = _gaussian_matrix(h, sigma_frac * h), _gaussian_matrix(w, sigma_frac * w)
    return jnp.einsum("ih,bhwc,jw->bijc", gh, x, gw)


def _baseline(x, baseline):
    """None or "blur": gaussian_blur(x); "zeros": the dataset-mean colour; else an array."""
    if baseline is None or isinstance(baseline, str):
        kind = baseline or "blur"
        if kind not in ("blur", "zeros"):
            raise ValueError(f"baseline must be 'blur', 'zeros' or an array, got {baseline!r}")
        return gaussian_blur(x) if kind == "blur" else jnp.zeros_like(x)
    return jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), x.shape)


# ---------------------------------------------------------------------------------------------
# input gradients

@nnx.jit
def _input_gradients(model, x, ci):
    return jnp.abs(_input_grad(model, x, ci)).max(axis=-1)


def input_gradients(model, x, class_index) -> jax.Array:
    """|d logit / d x|, max over colour channels -> (B, H, W)."""
    x, ci = _prepare(model, x, class_index)
    return _input_gradients(model, x, ci)


@nnx.jit(static_argnames=("n", "chunk"))
def _smoothgrad(model, x, ci, key, sigma, n, chunk):
    span = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)

    def grads(keys):  # (k,) keys -> (k, B, H, W, C)
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape, x.dtype))(keys)
        return _input_grads_stacked(model, x[None] + sigma * span * noise, ci)

    mean_grad = _stacked(grads, jax.random.split(key, n), n, chunk).mean(axis=0)
    return jnp.abs(mean_grad).max(axis=-1)


def smoothgrad(model, x, class_index, *, n: int = 16, sigma: float = 0.15, key=None,
               chunk: int | None = None) -> jax.Array:
    """Mean input gradient over `n` noisy copies, |.| max over channels -> (B, H, W).

    sigma is a fraction of each image's value range (0.1-0.2 is Smilkov et al.'s sweet spot);
    key defaults to a fixed seed so the same image always gets the same map; `chunk` noisy
    copies go through the model at once (None: all n).
    """
    x, ci = _prepare(model, x, class_index)
    key = jax.random.key(0) if key is None else key
    return _smoothgrad(model, x, ci, key, jnp.float32(sigma), n=n, chunk=chunk)


# ---------------------------------------------------------------------------------------------
# Integrated Gradients

class IGResult(NamedTuple):
    attributions: jax.Array  # (B, H, W, C), signed
    logit: jax.Array  # (B,) class logit at x
    baseline_logit: jax.Array  # (B,) class logit at the baseline


@nnx.jit(static_argnames=("steps", "chunk"))
def _integrated_gradients(model, x, baseline, ci, steps, chunk):
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    # Trapezoid rule on [0, 1]: end points weigh half.
    weights = jnp.ones(steps + 1).at[0].set(0.5).at[-1].set(0.5) / steps

    def grads(a):  # (k,) alphas -> (k, B, H, W, C)
        a = a[:, None, None, None, None]
        return _input_grads_stacked(model, baseline[None] + a * (x - baseline)[None], ci)

    grads = _stacked(grads, alphas, steps + 1, chunk)
    attributions = (x - baseline) * jnp.tensordot(weights, grads, axes=1)

    def class_logit(z):
        return jnp.take_along_axis(model(z), ci[:, None], axis=1)[:, 0]

    return IGResult(attributions, class_logit(x), class_logit(baseline))


def integrated_gradients_raw(model, x, class_index, *, steps: int = 32, baseline=None,
                             chunk: int | None = None) -> IGResult:
    """Signed IG attributions; completeness: attributions.sum((1, 2, 3)) ~ logit - baseline_logit.

    baseline: None or "blur" (default, see BLUR_SIGMA), "zeros" (dataset-mean colour) or an
    array broadcastable to x (e.g. black: (0 - mean) / std). `chunk` interpolation points go
    through the model at once (None: all steps + 1).
    """
    x, ci = _prepare(model, x, class_index)
    return _integrated_gradients(model, x, _baseline(x, baseline), ci, steps=steps, chunk=chunk)


def integrated_gradients(model, x, class_index, *, steps: int = 32, baseline=None,
                         chunk: int | None = None) -> jax.Array:
    """Integrated Gradients summed |.| over channels -> (B, H, W)."""
    result = integrated_gradients_raw(model, x, class_index, steps=steps, baseline=baseline, chunk=chunk)
    return jnp.abs(result.attributions).sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# occlusion

def _starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:  # the last patch sits flush with the border: every pixel is covered
        starts.append(size - patch)
    return starts


@nnx.jit(static_argnames=("patch", "stride", "chunk"))
def _occlusion(model, x, baseline, ci, patch, stride, chunk):
    _, h, w, _ = x.shape
    grid = [(top, left) for top in _starts(h, patch, stride) for left in _starts(w, patch, stride)]
    y0, x0 = (jnp.asarray(v) for v in zip(*grid))
    rows = (jnp.arange(h) >= y0[:, None]) & (jnp.arange(h) < y0[:, None] + patch)  # (P, H)
    cols = (jnp.arange(w) >= x0[:, None]) & (jnp.arange(w) < x0[:, None] + patch)  # (P, W)
    rows, cols = rows.astype(x.dtype), cols.astype(x.dtype)

    def class_prob(z, c):
        return jnp.take_along_axis(jax.nn.softmax(model(z)), c[:, None], axis=1)[:, 0]

    def occluded_probs(rc):  # (k, H), (k, W) -> (k, B)
        m = (rc[0][:, :, None] * rc[1][:, None, :])[:, None, :, :, None]  # (k, 1, H, W, 1)
        xs = x[None] * (1 - m) + baseline[None] * m
        k, b = xs.shape[:2]
        return class_prob(xs.reshape(k * b, *x.shape[1:]), jnp.tile(ci, k)).reshape(k, b)

    drops = class_prob(x, ci)[None] - _stacked(occluded_probs, (rows, cols), len(grid), chunk)  # (P, B)
    covered = jnp.einsum("ph,pw->hw", rows, cols)
    return jnp.einsum("pb,ph,pw->bhw", drops, rows, cols) / covered


def occlusion(model, x, class_index, *, patch: int | None = None, stride: int | None = None,
              baseline="zeros", chunk: int | None = 64) -> jax.Array:
    """Mean drop in class probability over the patches covering each pixel -> (B, H, W), signed.

    patch defaults to 1/8 of the image side (28 px at 224: about a dermoscopic structure),
    stride to half the patch (225 positions); `chunk` occluded copies of the batch go through the
    model at once (None: all positions; forward passes only, so this is lighter than it looks).
    The default baseline is zeros (the dataset-mean colour): "what if this patch were plain skin".
    """
    x, ci = _prepare(model, x, class_index)
    patch = patch or max(1, round(min(x.shape[1:3]) / 8))
    stride = stride or max(1, patch // 2)
    return _occlusion(model, x, _baseline(x, baseline), ci, patch=patch, stride=stride, chunk=chunk)


# ---------------------------------------------------------------------------------------------
# Class-activation maps on several stages: one forward and one backward pass for all of them

# The last three resolution stages: for EfficientNet-Lite0 at 160 px the 5x5 head, 10x10 and 20x20.
CAM_STAGES = 3


# method -> (rule, number of stages, from the last); one forward and one backward pass for any of them
CAM_METHODS = {
    "gradcam": ("gradcam", 1),
    "hirescam": ("hirescam", 1),
    "gradcampp": ("gradcampp", 1),
    "gradcam_fused": ("gradcam", CAM_STAGES),
    "layercam": ("layercam", CAM_STAGES),
}


def _stage_maps_and_grads(model, x, ci, n_stages: int):
    """The last `n_stages` feature maps, the class logit's gradient w.r.t. each (zero taps), and the
    forward pass's logits, pooled features and classes. `ci`: one class per image, or a function
    of the logits (no gradient flows through it) that picks them."""
    shapes = jax.eval_shape(lambda: model.feature_stages(x))
    stages = list(range(max(0, len(shapes) - n_stages), len(shapes)))   # all of them, if fewer
    taps = {k: jnp.zeros(shapes[k].shape, shapes[k].dtype) for k in stages}

    def class_logit(taps):
        maps = model.feature_stages(x, taps)
        logits = model.head(maps[-1])
        c = ci(jax.lax.stop_gradient(logits)) if callable(ci) else ci
        pooled = maps[-1].mean(axis=(1, 2)).astype(jnp.float32)
        return jnp.take_along_axis(logits, c[:, None], axis=1).sum(), ([maps[k] for k in stages], logits, pooled, c)

    grads, (maps, logits, pooled, c) = jax.grad(class_logit, has_aux=True)(taps)
    return maps, [grads[k] for k in stages], logits, pooled, c


def _stage_cam(a, g, rule: str):
    """One stage's map (B, h, w) from activations `a` and gradients `g` (B, h, w, C)."""
    a, g = a.astype(jnp.float32), g.astype(jnp.float32)
    if rule == "gradcam":      # Selvaraju et al. 2017: channel weights = spatially averaged gradients
        return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))))
    if rule == "hirescam":     # Draelos & Carin 2020: gradient times activation, per position
        return jax.nn.relu((a * g).sum(-1))
    if rule == "gradcampp":    # Chattopadhay et al. 2018, closed form for an exponentiated class score
        g2 = g * g
        denominator = 2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g2 * g
        alpha = jnp.where(denominator != 0, g2 / jnp.where(denominator != 0, denominator, 1.0), 0.0)
        return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", a, (alpha * jax.nn.relu(g)).sum(axis=(1, 2))))
    if rule == "layercam":     # Jiang et al. 2021: positive gradients weight each position
        return jax.nn.relu((jax.nn.relu(g) * a).sum(-1))
    raise ValueError(f"unknown CAM rule {rule!r}")


def _fuse(cams: list):
    """Maps of several stages, each scaled to its own maximum, upsampled to the finest and averaged:
    the coarse stage says which region, the finer ones where inside it (LayerCAM's fusion)."""
    b, h, w = max((c.shape for c in cams), key=lambda s: s[1] * s[2])
    scaled = [c / jnp.maximum(c.max(axis=(1, 2), keepdims=True), 1e-12) for c in cams]
    return jnp.mean(jnp.stack([jax.image.resize(c, (b, h, w), method="linear") for c in scaled]), 0)


def cam_and_logits(model, x, class_index, method: str, tta: bool = False):
    """For use inside a jitted function: the unnormalised CAM map (B, h, w) of `method` (a key of
    CAM_METHODS), with the logits, pooled features and classes of the same forward pass.
    `class_index`: one class per image, or a function of the logits that picks them (the
    predictor explains the top class of the prediction this very pass makes).

    tta: the prediction the predictor serves with test-time augmentation, the mean over the 8
    dihedral views: each view's map is turned back to the image's orientation and the maps averaged,
    the logits and pooled features averaged as the predictor averages them."""
    if not tta:
        return _single_view_cam(model, x, class_index, method)
    n = x.shape[0]

    def same_class_in_every_view(logits):
        ci = class_index(mean_over_views(logits)) if callable(class_index) else jnp.broadcast_to(class_index, (n,))
        return jnp.tile(ci, TTA_VIEWS)

    cam, logits, pooled, ci = _single_view_cam(model, all_views(x), same_class_in_every_view, method)
    cams = cam.reshape(TTA_VIEWS, n, *cam.shape[1:])
    aligned = jnp.stack([to_image_orientation(cams[k], k) for k in range(TTA_VIEWS)])
    return aligned.mean(0), mean_over_views(logits), mean_over_views(pooled), ci[:n]


def _single_view_cam(model, x, class_index, method: str):
    rule, n_stages = CAM_METHODS[method]
    maps, grads, logits, pooled, ci = _stage_maps_and_grads(model, x, class_index, n_stages)
    cams = [_stage_cam(a, g, rule) for a, g in zip(maps, grads)]
    return (cams[0] if len(cams) == 1 else _fuse(cams)), logits, pooled, ci


@nnx.jit(static_argnames=("method", "tta"))
def _cam(model, x, ci, method, tta):
    return cam_and_logits(model, x, ci, method, tta)[0]


def class_activation_map(model, x, class_index, method: str = "gradcam", tta: bool = False) -> jax.Array:
    """The CAM_METHODS map `method` -> (B, h, w) at its stage's resolution (the finest, fused);
    tta: of the prediction averaged over the 8 dihedral views (`cam_and_logits`)."""
    x, ci = _prepare(model, x, class_index)
    return _cam(model, x, ci, method, tta)


# Grad-CAM (Selvaraju et al. 2017), HiResCAM (Draelos & Carin 2020) and Grad-CAM++ (Chattopadhay et
# al. 2018) on the last feature map; Grad-CAM and LayerCAM (Jiang et al. 2021) on the last CAM_STAGES
# stages, fused.
grad_cam = partial(class_activation_map, method="gradcam")
hires_cam = partial(class_activation_map, method="hirescam")
grad_cam_pp = partial(class_activation_map, method="gradcampp")
grad_cam_fused = partial(class_activation_map, method="gradcam_fused")
layer_cam = partial(class_activation_map, method="layercam")


# ---------------------------------------------------------------------------------------------
# one entry point

METHODS = {
    "gradcam": grad_cam,
    "hirescam": hires_cam,
    "gradcampp": grad_cam_pp,
    "gradcam_fused": grad_cam_fused,
    "layercam": layer_cam,
    "gradients": input_gradients,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
}


@partial(jax.jit, static_argnames=("size",))
def unit_maps(maps, size):
    """Maps (B, h, w) upsampled to `size` (H, W) and scaled to [0, 1] (least salient pixel 0, the 99th
    percentile and above 1), as `explain` returns them."""
    maps = jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], *size), method="linear")
    maps = jnp.maximum(maps, 0.0)  # occlusion: a patch whose removal raises the class is no evidence for it
    # A map's offset carries no information (every score but energy-in-mask is rank-based): the least
    # salient pixel is 0, as in Score-CAM's and pytorch-grad-cam's scaling (docs/notebook/experiment-record.md).
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    # Robust scale: the 99th percentile, so a few extreme pixels do not wash out the rest; the
    # max when the map is sparser than 1 %; all-zero (and flat) maps come out zero.
    peak = maps.max(axis=(1, 2))
    top = jnp.percentile(maps, 99.0, axis=(1, 2))
    top = jnp.where(top > 0, top, peak)
    scale = jnp.where(top > 0, top, 1.0)[:, None, None]
    # Exactly 1 at and above the scale: XLA may divide via a reciprocal, one ulp short of 1.
    return jnp.where(maps >= scale, 1.0, jnp.clip(maps / scale, 0.0, 1.0))


def explain(model, x, class_index=None, method: str = "gradcam", **kw) -> np.ndarray:
    """Saliency of `method` at the input size, each map scaled to [0, 1] -> np.float32 (B, H, W)."""
    if method not in METHODS:
        from .errors import UserError
        raise UserError(f"unknown saliency method {method!r}; choose one of: {', '.join(METHODS)}")
    x = jnp.asarray(x, jnp.float32)
    maps = METHODS[method](model, x, class_index, **kw)
    return np.asarray(unit_maps(maps, size=tuple(x.shape[1:3])), dtype=np.float32)
