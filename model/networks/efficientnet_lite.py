"""EfficientNet-Lite0/2 (the 2020 edge variants of Tan & Le's EfficientNet), layer for layer the PyTorch
package `efficientnet_lite_pytorch`, so its ImageNet weights load unchanged (see imagenet.py).

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-and-excitation, and the
stem (32) and head (1280) widths and the first/last stage depths are not scaled.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from .base import Classifier, tapped

# One row per stage, from efficientnet/lite/efficientnet_lite_builder.py:
# (repeats, kernel, stride, expand_ratio, in_filters, out_filters)
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# variant: (width multiplier, depth multiplier, native resolution); all use drop-connect 0.2.
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite2": (1.1, 1.2, 260)}
# The original's dropout before the classifier: lite0 0.2, lite2 0.3.
DEFAULT_DROPOUT = {"lite0": 0.2, "lite2": 0.3}

STEM_FILTERS, HEAD_FILTERS = 32, 1280
# TF's batch-norm settings; PyTorch's momentum 0.01 is the same as Flax's 0.99.
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3

# TF/Keras initialise convolutions with He-normal on fan-out; the depthwise kernel (k, k, 1, C)
# has fan-out C*k*k in Flax's convention but k*k in TF's, hence fan-in (= k*k) for it.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by `width`, rounded to a multiple of 8 but never down by over 10%."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_specs(variant: str):
    """(kernel, stride, expand_ratio, cin, cout) for every MBConv block of `variant`, in order."""
    width, depth, _ = VARIANTS[variant]
    specs = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(BASE_STAGES):
        head_or_stem = i in (0, len(BASE_STAGES) - 1)  # Lite keeps these stages' depth fixed
        repeats = repeats if head_or_stem else int(math.ceil(depth * repeats))
        cin = STEM_FILTERS if i == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        specs.append((kernel, stride, expand, cin, cout))
        specs.extend((kernel, 1, expand, cout, cout) for _ in range(repeats - 1))
    return specs


# ---------------------------------------------------------------- depthwise convolution
# XLA:CPU runs a grouped convolution, and above all its gradients, as slow generic loops (up to
# 8x PyTorch's time on the high-resolution layers). A depthwise conv is only k*k shifted
# multiply-adds per channel, which XLA fuses into one pass over memory; the gradients below are
# written the same way, because autodiff of the strided slices emits one full-size pad per tap.

def depthwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   preferred_element_type=None, out_sharding=None):
    """Drop-in for lax.conv_general_dilated (nnx.Conv's `conv_general_dilated`), NHWC depthwise only.

    Same products as the convolution, summed in another order: results differ by float rounding.
    Elementwise ops need no precision setting, and their sharding follows the input's. Other
    backends get XLA's own convolution.
    """
    if jax.default_backend() != "cpu":  # GPUs and TPUs have fast native kernels (cuDNN and the like)
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision,
                                            preferred_element_type=preferred_element_type)
    kh, kw, one, channels = rhs.shape
    if one != 1 or feature_group_count != channels or lhs.shape[-1] != channels:
        raise ValueError(f"depthwise_conv needs a (k, k, 1, C) kernel on C channels, got {rhs.shape} on {lhs.shape}")
    if any(d not in (None, 1) and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        raise ValueError("depthwise_conv does not dilate")
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    return _depthwise(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


def _windows(x, kh: int, kw: int, strides, out_hw):
    """(i, j, view): what tap (i, j) of a kh x kw window reads at every output position."""
    (sh, sw), (oh, ow) = strides, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i: i + (oh - 1) * sh + 1: sh, j: j + (ow - 1) * sw + 1: sw, :]


def _correlate(x, w, strides, out_hw):
    """Unpadded depthwise cross-correlation; sums in float32 even for bfloat16 inputs."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    out = None
    for i, j, view in _windows(x, w.shape[0], w.shape[1], strides, out_hw):
        term = view.astype(acc) * w[i, j, 0].astype(acc)
        out = term if out is None else out + term
    return out.astype(x.dtype)


def _correlate_input_grad(g, w, strides, in_hw):
    """Gradient of _correlate with respect to its input, without multiplying any zeros.

    Input row s*a + r only meets the taps i = r, r + s, ...: each of the s*s phases (r, t) is a
    stride-1 correlation of g with those taps, flipped; the phases are then interleaved.
    """
    (sh, sw), (kh, kw) = strides, w.shape[:2]
    (oh, ow), (ih, iw) = g.shape[1:3], in_hw
    nh, nw = -(-ih // sh), -(-iw // sw)  # rows and columns per phase
    rows = []
    for r in range(sh):
        cols = []
        for t in range(sw):
            taps = w[r::sh, t::sw][::-1, ::-1]
            mh, mw = taps.shape[:2]
            if mh == 0 or mw == 0:  # stride larger than the kernel: this phase is never read
                cols.append(jnp.zeros((g.shape[0], nh, nw, g.shape[3]), g.dtype))
                continue
            gp = jnp.pad(g, ((0, 0), (mh - 1, max(0, nh - oh)), (mw - 1, max(0, nw - ow)), (0, 0)))
            cols.append(_correlate(gp, taps, (1, 1), (nh, nw)))
        rows.append(jnp.stack(cols, axis=3))
    phases = jnp.stack(rows, axis=2)  # (B, nh, sh, nw, sw, C)
    return phases.reshape(g.shape[0], nh * sh, nw * sw, g.shape[3])[:, :ih, :iw]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, w, strides, padding):
    return _depthwise_fwd(x, w, strides, padding)[0]


def _depthwise_fwd(x, w, strides, padding):
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_hw = tuple((xp.shape[1 + a] - w.shape[a]) // strides[a] + 1 for a in (0, 1))
    return _correlate(xp, w, strides, out_hw), (x, w)


def _correlate_kernel_grad(x, g, kernel_hw, strides):
    """Gradient of _correlate with respect to its (kh, kw, 1, C) kernel.

    Tap (i, j) needs sum(view_ij * g) over batch and pixels. One multi-output reduction over
    rows computes all k*k partial sums in a single pass over x and g; k*k separate reductions
    would each first write their strided view out in full (2-5x slower here).
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    products = tuple(view.astype(acc) * g.astype(acc) for _, _, view in _windows(x, *kernel_hw, strides, g.shape[1:3]))
    row_sums = jax.lax.reduce(products, tuple(jnp.zeros((), acc) for _ in products),
                              lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
    return jnp.stack(row_sums).sum((1, 2)).reshape(*kernel_hw, 1, x.shape[3])


def _depthwise_bwd(strides, padding, residuals, g):
    x, w = residuals
    (pt, _), (pl, _) = padding
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    dw = _correlate_kernel_grad(xp, g, w.shape[:2], strides)
    dxp = _correlate_input_grad(g, w, strides, xp.shape[1:3])
    dx = dxp[:, pt: pt + x.shape[1], pl: pl + x.shape[2]]
    return dx, dw.astype(w.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


# ---------------------------------------------------------------- pointwise convolution
# A 1x1 convolution is a matmul over channels. Its kernel gradient contracts over every pixel
# of the batch (x^T g with up to ~10^5 rows into a small cin x cout result), which XLA:CPU runs
# as one poorly parallel dot; summing per-chunk products keeps both cores busy and halves the
# time of the high-resolution layers.

def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   preferred_element_type=None, out_sharding=None):
    """Drop-in for lax.conv_general_dilated (nnx.Conv's `conv_general_dilated`), 1x1 stride-1 NHWC only.

    On CPU a matmul whose kernel gradient is summed over row chunks; other backends get XLA's own.
    """
    if jax.default_backend() != "cpu":  # the chunked kernel gradient only pays off on CPU
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision,
                                            preferred_element_type=preferred_element_type)
    if rhs.shape[:2] != (1, 1) or tuple(window_strides) != (1, 1) or feature_group_count != 1:
        raise ValueError(f"pointwise_conv needs a 1x1, stride-1, ungrouped kernel, got {rhs.shape}")
    return _pointwise(lhs, rhs)


def _matmul(spec, a, b):
    """einsum that accumulates in float32 even for bfloat16 operands."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=acc).astype(a.dtype)


def _row_chunks(rows: int, cin: int, cout: int) -> int:
    """Chunks for the kernel-gradient contraction: as many as 16, while summing their (cin, cout)
    partial products costs at most an eighth of reading the rows (low-resolution layers get 1)."""
    for chunks in (16, 8, 4, 2):
        if rows % chunks == 0 and chunks * cin * cout * 8 <= rows * (cin + cout):
            return chunks
    return 1


@jax.custom_vjp
def _pointwise(x, w):
    return _matmul("bhwc,cd->bhwd", x, w[0, 0])


def _pointwise_fwd(x, w):
    return _pointwise(x, w), (x, w)


def _pointwise_bwd(residuals, g):
    x, w = residuals
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    chunks = _row_chunks(rows, x.shape[3], g.shape[3])
    xs = x.reshape(chunks, rows // chunks, x.shape[3])
    gs = g.reshape(chunks, rows // chunks, g.shape[3])
    dw = _matmul("pnc,pnd->pcd", xs, gs).sum(0)
    dx = _matmul("bhwd,cd->bhwc", g, w[0, 0])
    return dx, dw[None, None].astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


# ---------------------------------------------------------------- the network

class ConvBN(nnx.Module):
    """Bias-free convolution, batch norm, then ReLU6 unless `act` is False."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, depthwise: bool = False,
                 act: bool = True, dtype, rngs: nnx.Rngs):
        # 'SAME' here is TF's rule (pad total//2 before, the rest after), which is what the
        # original's Conv2dStaticSamePadding does at its native resolution.
        if depthwise:
            extra = dict(feature_group_count=cin, conv_general_dilated=depthwise_conv, kernel_init=depthwise_init)
        elif kernel == 1 and stride == 1:
            extra = dict(conv_general_dilated=pointwise_conv, kernel_init=conv_init)
        else:
            extra = dict(kernel_init=conv_init)
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding="SAME", use_bias=False,
                             dtype=dtype, rngs=rngs, **extra)
        self.bn = nnx.BatchNorm(cout, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x):
        x = self.bn(self.conv(x))
        return jax.nn.relu6(x) if self.act else x


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection, identity skip."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, *,
                 drop_rate: float, dtype, rngs: nnx.Rngs):
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, dtype=dtype, rngs=rngs) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, depthwise=True, dtype=dtype, rngs=rngs)
        self.project = ConvBN(mid, cout, 1, act=False, dtype=dtype, rngs=rngs)
        self.skip = stride == 1 and cin == cout
        # Stochastic depth: drop the whole residual branch per sample (train mode only).
        self.drop_path = nnx.Dropout(drop_rate, broadcast_dims=(1, 2, 3), rngs=rngs) if self.skip else None

    def __call__(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + self.drop_path(y) if self.skip else y


class EfficientNetLite(Classifier):
    """Stem conv, 16 (lite0) or 21 (lite2) MBConv blocks, 1x1 head conv to 1280, pool, linear."""

    def __init__(self, num_classes: int, *, variant: str = "lite0", dropout: float = 0.2,
                 drop_connect: float = 0.2, dtype=jnp.float32, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        self.stem = ConvBN(3, STEM_FILTERS, 3, 2, dtype=dtype, rngs=rngs)
        specs = block_specs(variant)
        # The drop rate grows linearly with depth, block i of n dropping drop_connect * i / n.
        self.blocks = nnx.List([
            MBConv(*spec, drop_rate=drop_connect * i / len(specs), dtype=dtype, rngs=rngs)
            for i, spec in enumerate(specs)
        ])
        self.head_conv = ConvBN(specs[-1][-1], HEAD_FILTERS, 1, dtype=dtype, rngs=rngs)
        # A resolution stage ends where the next block halves the resolution.
        self.stage_ends = tuple(i for i in range(len(specs) - 1) if specs[i + 1][1] == 2)
        self.init_head(HEAD_FILTERS, num_classes, dropout=dropout, dtype=dtype, rngs=rngs)

    def feature_stages(self, x, taps=None):
        """The last block's output at each resolution, then the head conv output (B, h, w, 1280)
        after ReLU6: what Grad-CAM looks at (5x5 at 160 px; the stages before it are 10x10, 20x20 ...)."""
        outputs = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                x = tapped(outputs, x, taps)
        tapped(outputs, self.head_conv(x), taps)
        return outputs


def efficientnet_lite0(num_classes: int, *, dropout: float = DEFAULT_DROPOUT["lite0"], **config):
    return EfficientNetLite(num_classes, variant="lite0", dropout=dropout, **config)


def efficientnet_lite2(num_classes: int, *, dropout: float = DEFAULT_DROPOUT["lite2"], **config):
    return EfficientNetLite(num_classes, variant="lite2", dropout=dropout, **config)
