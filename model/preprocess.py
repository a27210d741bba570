"""What every image goes through before the network, in training, evaluation and the app alike.

uint8 (B, S, S, 3) -> float [0, 1] -> optional Shades-of-Gray colour constancy -> (x - mean) / std.
The settings travel in checkpoint metadata, so a predictor reproduces them exactly.
"""
import dataclasses
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Normalisation:
    # EfficientNet-Lite was trained on [-1, 1] inputs (TF-Lite mean 127, std 128).
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    # Shades of Gray (Finlayson & Trezzi 2004) with p=6, as used by ISIC 2018/2019 winners:
    # removes the camera's colour cast so images from other clinics look alike.
    color_constancy: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), color_constancy=bool(d.get("color_constancy", False)))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "color_constancy": self.color_constancy}


def shades_of_gray(x, p: float = 6.0):
    """Divide out the illuminant estimated as the per-channel Minkowski p-mean; x in [0, 1]."""
    illuminant = jnp.mean(jnp.power(x + 1e-6, p), axis=(-3, -2), keepdims=True) ** (1.0 / p)
    gain = jnp.mean(illuminant, axis=-1, keepdims=True) / illuminant
    return jnp.clip(x * gain, 0.0, 1.0)


def to_unit(images_u8):
    x = images_u8.astype(jnp.float32) / 255.0
    return x


def normalise(x, norm: Normalisation):
    """x in [0, 1] (already colour-corrected if configured) -> network input."""
    return (x - jnp.asarray(norm.mean, x.dtype)) / jnp.asarray(norm.std, x.dtype)


def preprocess(images_u8, norm: Normalisation):
    """The evaluation view: no randomness."""
    x = to_unit(images_u8)
    if norm.color_constancy:
        x = shades_of_gray(x)
    return normalise(x, norm)
