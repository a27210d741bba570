"""What every network in the registry shares: global-average-pool -> dropout -> linear head.

Subclasses define `features(x)` and call `init_head` in their constructor. The attribute names
`dropout` and `classifier` are part of the checkpoint format (and of train_step.HEAD_NAMES).
"""
import jax.numpy as jnp
from flax import nnx


class Classifier(nnx.Module):
    def init_head(self, in_features: int, num_classes: int, *, dropout: float, dtype, rngs: nnx.Rngs):
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Linear(in_features, num_classes, dtype=dtype, rngs=rngs)

    def feature_stages(self, x, taps=None) -> list:
        """The output of every resolution stage (B, h_k, w_k, C_k), coarsest last; the last is the
        feature map the head pools. `taps` ({stage index: array of that stage's shape}) are added to
        those outputs: zeros change nothing, and the gradient with respect to a tap is the gradient
        with respect to that stage, so class-activation maps of several stages take one backward pass."""
        raise NotImplementedError

    def features(self, x):
        """Last convolutional feature map (B, h, w, C): what Grad-CAM looks at."""
        return self.feature_stages(x)[-1]

    def head(self, feats):
        pooled = feats.mean(axis=(1, 2))
        return self.classifier(self.dropout(pooled)).astype(jnp.float32)

    def __call__(self, x):
        return self.head(self.features(x))


def tapped(outputs: list, y, taps):
    """Append stage output `y` (plus its tap, if any) to `outputs` and return it."""
    if taps is not None and len(outputs) in taps:
        y = y + taps[len(outputs)].astype(y.dtype)
    outputs.append(y)
    return y
