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

    def features(self, x):
        """Last convolutional feature map (B, h, w, C): what Grad-CAM looks at."""
        raise NotImplementedError

    def head(self, feats):
        pooled = feats.mean(axis=(1, 2))
        return self.classifier(self.dropout(pooled)).astype(jnp.float32)

    def __call__(self, x):
        return self.head(self.features(x))
