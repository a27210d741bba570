"""Model registry: every network is chosen by name and built from its config alone.

Every model (a networks.base.Classifier) takes float NHWC images (already normalised) and exposes
  features(x) -> last conv feature map (B, h, w, C)   (Grad-CAM reads this)
  head(feats) -> logits (B, num_classes), float32
  __call__(x) = head(features(x))
BatchNorm/Dropout follow NNX modes: model.train() / model.eval().
ImageNet weights: imagenet.load_imagenet(model, arch).
"""
from flax import nnx

from .efficientnet_lite import efficientnet_lite0, efficientnet_lite2
from .resnet import resnet18, resnet34, resnet50
from .simple_cnn import SimpleCNN

ARCHITECTURES = {
    "simple_cnn": SimpleCNN,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite2": efficientnet_lite2,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}

# The learned state of every network: what checkpoints store and weight averaging averages.
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def build(arch: str, num_classes: int, *, seed: int = 0, **config) -> nnx.Module:
    """Build `arch` with random weights; `config` is stored in checkpoint metadata verbatim."""
    if arch not in ARCHITECTURES:
        from ..errors import UserError
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](num_classes, rngs=nnx.Rngs(seed), **config)
