"""Model registry: every network is chosen by name and built from its config alone.

Every model takes float NHWC images (already normalised) and exposes
  features(x) -> last conv feature map (B, h, w, C)   (Grad-CAM reads this)
  head(feats) -> logits (B, num_classes), float32
  __call__(x) = head(features(x))
BatchNorm/Dropout follow NNX modes: model.train() / model.eval().
"""
from flax import nnx

from .simple_cnn import SimpleCNN

ARCHITECTURES = {
    "simple_cnn": SimpleCNN,
}


def build(arch: str, num_classes: int, *, seed: int = 0, **config) -> nnx.Module:
    """Build `arch` with random weights; `config` is stored in checkpoint metadata verbatim."""
    if arch not in ARCHITECTURES:
        from ..errors import UserError
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](num_classes, rngs=nnx.Rngs(seed), **config)
