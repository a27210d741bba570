"""ResNet-18/34/50 (He et al. 2016) laid out like torchvision's, so torchvision ImageNet .pth
files load unchanged (imagenet.py); torchvision itself is never imported.

ResNet-50 is torchvision's "v1.5": the stride-2 of a bottleneck sits on its 3x3 conv.
"""
import jax.numpy as jnp
from flax import nnx

from .base import Classifier, tapped

# PyTorch's BatchNorm2d defaults: its momentum 0.1 is Flax's 0.9.
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nnx.Module):
    """Bias-free convolution with PyTorch's symmetric padding (k // 2), then batch norm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, dtype, rngs: nnx.Rngs):
        # Explicit padding, not 'SAME': for stride 2 on even sizes 'SAME' pads (0, 1) where
        # PyTorch pads (1, 1), which shifts every feature map by a pixel.
        pad = kernel // 2
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                             use_bias=False, kernel_init=conv_init, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut: ResNet-18/34."""
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = ConvBN(cin, planes, 3, stride, dtype=dtype, rngs=rngs)
        self.conv2 = ConvBN(planes, planes, 3, dtype=dtype, rngs=rngs)
        self.downsample = (ConvBN(cin, planes, 1, stride, dtype=dtype, rngs=rngs)
                           if stride != 1 or cin != planes else None)

    def __call__(self, x):
        y = self.conv2(nnx.relu(self.conv1(x)))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to 4x: ResNet-50."""
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        cout = planes * self.expansion
        self.conv1 = ConvBN(cin, planes, 1, dtype=dtype, rngs=rngs)
        self.conv2 = ConvBN(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
        self.conv3 = ConvBN(planes, cout, 1, dtype=dtype, rngs=rngs)
        self.downsample = (ConvBN(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
                           if stride != 1 or cin != cout else None)

    def __call__(self, x):
        y = nnx.relu(self.conv1(x))
        y = self.conv3(nnx.relu(self.conv2(y)))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return nnx.relu(y + shortcut)


# depth: (block type, blocks per stage)
DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}
STAGE_PLANES = (64, 128, 256, 512)


class ResNet(Classifier):
    """7x7/2 stem, 3x3/2 max-pool, four stages (the first block of stages 2-4 strides 2), pool, linear."""

    def __init__(self, num_classes: int, *, depth: int = 50, dropout: float = 0.0, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if depth not in DEPTHS:
            raise ValueError(f"unknown ResNet depth {depth!r}; choose one of {sorted(DEPTHS)}")
        block, counts = DEPTHS[depth]
        self.stem = ConvBN(3, 64, 7, 2, dtype=dtype, rngs=rngs)
        cin, stages = 64, []
        for i, (planes, count) in enumerate(zip(STAGE_PLANES, counts)):
            stage = []
            for j in range(count):
                stage.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, dtype=dtype, rngs=rngs))
                cin = planes * block.expansion
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        self.init_head(cin, num_classes, dropout=dropout, dtype=dtype, rngs=rngs)

    def feature_stages(self, x, taps=None):
        """Each stage's output after ReLU; the last (512 or 2048 channels) is what Grad-CAM looks at."""
        x = nnx.relu(self.stem(x))
        # Max-pool pads with -inf, as PyTorch's MaxPool2d(3, 2, padding=1) does.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        outputs = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
            x = tapped(outputs, x, taps)
        return outputs


def resnet18(num_classes: int, **config):
    return ResNet(num_classes, depth=18, **config)


def resnet34(num_classes: int, **config):
    return ResNet(num_classes, depth=34, **config)


def resnet50(num_classes: int, **config):
    return ResNet(num_classes, depth=50, **config)
