"""The runtime: jitted forward passes over a split NNX model, and running them in padded batches.

    logits, pooled = in_calls(lambda u8: forward(graphdef, state, u8, norm, tta), images_per_call(tta), images)

`Predictor` (model/predictor.py) and the training loop's validation call these; nothing here knows about
calibration, the unusual-image gate or the app.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import saliency
from .preprocess import Normalisation, preprocess
from .views import TTA_VIEWS, all_views, mean_over_views

EVAL_BATCH = 64   # images through the network per call, test-time views included: bounds memory


# The model travels as nnx.split's (graphdef, state) into plain jax.jit functions: nnx.jit walks the
# whole module graph in Python on every call, 20-25 ms for EfficientNet-Lite0 on this CPU, more than
# a 128-px image's forward pass itself (bench/profile_step.py).

@partial(jax.jit, static_argnames=("norm", "tta"))
def forward(graphdef, state, images_u8, norm: Normalisation, tta: bool):
    """(logits, pooled features) for a uint8 batch; with tta, averaged over the 8 dihedral views."""
    model = nnx.merge(graphdef, state)
    x = preprocess(images_u8, norm)
    feats = model.features(all_views(x) if tta else x)
    logits, pooled = model.head(feats), feats.mean(axis=(1, 2)).astype(jnp.float32)
    return (mean_over_views(logits), mean_over_views(pooled)) if tta else (logits, pooled)


@partial(jax.jit, static_argnames=("norm", "tta", "method"))
def forward_and_explain(graphdef, state, images_u8, norm: Normalisation, tta: bool, logit_shift, method: str):
    """`forward`'s (logits, pooled) and, from the same pass, each image's `method` map (a class-activation
    map, saliency.CAM_METHODS) of its top class, scaled to [0, 1] at the input size.

    The top class is that of the averaged logits plus `logit_shift` (the clinical fusion's offset;
    the temperature never changes the order), and with tta the map is the mean of the 8 views' maps,
    so the map explains the very prediction returned."""
    model = nnx.merge(graphdef, state)
    x = preprocess(images_u8, norm)
    top_class = lambda logits: jnp.argmax(logits + logit_shift, axis=-1)  # noqa: E731
    cam, logits, pooled, _ = saliency.cam_and_logits(model, x, top_class, method, tta)
    return logits, pooled, saliency.unit_maps(cam, x.shape[1:3])


@partial(jax.jit, static_argnames=("norm", "method", "tta"))
def explain_cam(graphdef, state, images_u8, norm: Normalisation, class_index, method: str, tta: bool):
    """The `method` map (saliency.CAM_METHODS) of `class_index` (one per image) for a uint8 batch,
    scaled to [0, 1] at the input size: what saliency.explain gives, without nnx.jit's per-call walk."""
    model = nnx.merge(graphdef, state)
    x = preprocess(images_u8, norm)
    return saliency.unit_maps(saliency.cam_and_logits(model, x, class_index, method, tta)[0], x.shape[1:3])


def views(tta: bool) -> int:
    return TTA_VIEWS if tta else 1


def images_per_call(tta: bool) -> int:
    return EVAL_BATCH // views(tta)


def bucket(n: int, limit: int) -> int:
    """The batch size a batch of n <= limit is padded to: the next power of two, so that a few
    compiled programs serve every size at most twice the work."""
    return min(limit, 1 << max(0, n - 1).bit_length())


def padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` with zero rows (black images) appended up to `size` (their outputs are cut off)."""
    pad = size - len(rows)
    return np.concatenate([rows, np.zeros((pad, *rows.shape[1:]), rows.dtype)]) if pad else rows


def in_calls(call, per_call: int, *arrays) -> list[np.ndarray]:
    """`call(*chunks)` on `per_call` rows of `arrays` at a time, each chunk padded to its `bucket`;
    each output cut back to the real rows and concatenated."""
    outputs = []
    for start in range(0, len(arrays[0]), per_call):
        chunks = [np.asarray(a[start:start + per_call]) for a in arrays]
        n = len(chunks[0])
        outputs.append([np.asarray(o)[:n] for o in call(*(padded(c, bucket(n, per_call)) for c in chunks))])
    return [np.concatenate(parts) for parts in zip(*outputs)]
