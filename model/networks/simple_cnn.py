"""The compact CNN this tool started from: four conv + batch-norm stages, trained from scratch."""
import jax.numpy as jnp
from flax import nnx

from .base import Classifier, tapped


class ConvBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class SimpleCNN(Classifier):
    """conv-bn-relu x2 per stage, max-pool between stages, global average pool, dropout, linear."""

    def __init__(self, num_classes: int, *, widths=(32, 64, 128, 256), dropout: float = 0.3,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        chans = (3, *widths)
        self.stages = nnx.List([
            nnx.List([ConvBlock(cin, cout, dtype=dtype, rngs=rngs), ConvBlock(cout, cout, dtype=dtype, rngs=rngs)])
            for cin, cout in zip(chans[:-1], chans[1:])
        ])
        self.init_head(widths[-1], num_classes, dropout=dropout, dtype=dtype, rngs=rngs)

    def feature_stages(self, x, taps=None):
        """Each stage's output (after its two conv blocks), the last being what Grad-CAM looks at."""
        outputs = []
        for i, stage in enumerate(self.stages):
            if i:
                x = nnx.max_pool(x, (2, 2), (2, 2))
            for block in stage:
                x = block(x)
            x = tapped(outputs, x, taps)
        return outputs
