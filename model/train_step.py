"""The update step: loss, optimiser, and data-parallel placement. Pure and jitted; no I/O here."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from .augment import AugmentConfig, augment
from .networks import WEIGHTS
from .preprocess import Normalisation, normalise, shades_of_gray, to_unit

# Parameters under these attribute names form the new classification head.
HEAD_NAMES = frozenset({"classifier"})


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_steps: int):
    return optax.warmup_cosine_decay_schedule(
        init_value=peak_lr * 0.01, peak_value=peak_lr, warmup_steps=max(warmup_steps, 1),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * 1e-3)


def is_head(path) -> bool:
    return any(getattr(k, "key", None) in HEAD_NAMES for k in path)


def make_optimizer(model, *, lr, weight_decay, total_steps, warmup_steps, body_lr_mult=1.0) -> nnx.Optimizer:
    """AdamW on a warmup + cosine schedule; optionally a slower learning rate for the pretrained body."""
    schedule = learning_rate_schedule(lr, total_steps, warmup_steps)
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    if body_lr_mult != 1.0:
        body = optax.adamw(lambda step: schedule(step) * body_lr_mult, weight_decay=weight_decay)
        labels = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if is_head(path) else "body", params)
        tx = optax.multi_transform({"head": tx, "body": body}, labels)
    return nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(5.0), tx), wrt=nnx.Param)


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights, mean 1 over the training examples' classes."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(np.float64)
    power = {"none": 0.0, "sqrt": 0.5, "inverse": 1.0}[mode]
    w = (counts.sum() / counts) ** power
    return (w / (w[labels].mean())).astype(np.float32)


def weighted_cross_entropy(logits, targets, weights):
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(per_example * weights) / jnp.sum(weights)


def cutmix_mask(key, lam, height: int, width: int):
    """A (height, width) mask, 1 inside one random box of about (1 - lam) of the area (clipped at the edges)."""
    k_y, k_x = jax.random.split(key)
    ratio = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(k_y) * height
    cx = jax.random.uniform(k_x) * width
    rows = jnp.arange(height)[:, None] + 0.5
    cols = jnp.arange(width)[None, :] + 0.5
    inside = ((jnp.abs(rows - cy) < ratio * height / 2) & (jnp.abs(cols - cx) < ratio * width / 2))
    return inside.astype(jnp.float32)


def mix_batch(key, x, targets, weights, *, mixup: float = 0.0, cutmix: float = 0.0):
    """Mixup or CutMix of each example with the batch reversed (no gather, so it shards cleanly).

    With both on, each batch uses one of the two, chosen by a fair coin (as timm's Mixup does). Targets
    and loss weights are mixed in the proportion of the pixels each image contributes.
    """
    height, width = x.shape[1:3]

    def cutmix_keep(k):
        k_lam, k_box = jax.random.split(k)
        box = cutmix_mask(k_box, jax.random.beta(k_lam, cutmix, cutmix), height, width)
        return (1.0 - box)[None, :, :, None]

    if mixup > 0 and cutmix > 0:
        k_coin, k_mix = jax.random.split(key)
        keep = jnp.where(jax.random.bernoulli(k_coin), cutmix_keep(k_mix), jax.random.beta(k_mix, mixup, mixup))
    elif cutmix > 0:
        keep = cutmix_keep(key)
    elif mixup > 0:
        keep = jax.random.beta(key, mixup, mixup)
    else:
        return x, targets, weights
    lam = jnp.mean(jnp.broadcast_to(keep, (1, height, width, 1)))  # the share of each image that stays its own
    keep = keep.astype(x.dtype)
    mixed = keep * x + (1 - keep) * x[::-1]
    return mixed, lam * targets + (1 - lam) * targets[::-1], lam * weights + (1 - lam) * weights[::-1]


def make_train_step(*, aug: AugmentConfig, norm: Normalisation, num_classes: int,
                    label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, dtype=jnp.float32):
    """Returns train_step(model, optimizer, images_u8, labels, class_weights, key) -> (loss, predictions)."""

    @nnx.jit
    def train_step(model, optimizer, images_u8, labels, weights_per_class, key):
        k_aug, k_mix = jax.random.split(key)
        x = to_unit(images_u8)
        if norm.color_constancy:
            x = shades_of_gray(x)
        x = normalise(augment(k_aug, x, aug), norm).astype(dtype)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        x, targets, weights = mix_batch(k_mix, x, targets, weights_per_class[labels], mixup=mixup, cutmix=cutmix)

        def loss_fn(model):
            logits = model(x)
            return weighted_cross_entropy(logits, targets, weights), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, jnp.argmax(logits, -1)

    return train_step


def make_ema_update(decay: float):
    """Returns update_ema(ema_model, model, step): ema <- d * ema + (1 - d) * weights, in place.

    d = min(decay, (1 + step) / (10 + step)) warms the average up, as TensorFlow's ExponentialMovingAverage
    does with num_updates: a short run would otherwise be dominated by its starting weights and untrained head.
    """

    @nnx.jit
    def update_ema(ema_model, model, step):
        d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
        average = lambda e, w: (d * e + (1.0 - d) * w).astype(e.dtype)
        nnx.update(ema_model, jax.tree.map(average, nnx.state(ema_model, WEIGHTS), nnx.state(model, WEIGHTS)))

    return update_ema


# --- data parallelism: one mesh axis over every device of every process; params replicated, batch sharded ---

def data_mesh():
    # Auto axes: the compiler propagates shardings (GSPMD), so model code stays sharding-agnostic.
    # jax.devices() spans all processes (model/distributed.py); on one machine it is the local devices.
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(modules, mesh):
    """Place every array of `modules` (a module or tuple of them) on all devices. Each process holds
    the same values (same seed, or the same checkpoint), so its own copy becomes the global one."""
    state = nnx.state(modules)
    nnx.update(modules, multihost_utils.host_local_array_to_global_array(state, mesh, P()))


def process_rows(mesh, batch: int) -> slice:
    """The rows of each global batch of `batch` examples that this process reads and feeds: those its
    devices hold under the batch sharding (all of them on one process)."""
    indices = NamedSharding(mesh, P("data")).addressable_devices_indices_map((batch,)).values()
    spans = sorted(index[0].indices(batch)[:2] for index in indices)
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:   # make_mesh orders devices by process; guard anyway
        raise ValueError(f"this process's devices hold scattered rows of the batch: {spans}")
    return slice(start, stop)


def shard_batch(mesh, *arrays):
    """Global arrays split along the batch axis over the mesh, from this process's rows of them
    (`process_rows`; on one process, the whole batch). The batch must divide by the device count."""
    sharding = NamedSharding(mesh, P("data"))
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in arrays)
