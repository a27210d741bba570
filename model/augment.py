"""Training-time augmentation, on device inside the jitted train step (no Python in the loop).

Random resized crop, flips, 90-degree rotations and colour jitter on float images in [0, 1].
All randomness comes from one PRNG key per batch, so a run is reproducible from its seed.
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple = (0.5, 1.0)      # area fraction kept by the random resized crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect range of the crop box
    flips: bool = True                  # dermoscopy has no canonical orientation
    rot90: bool = True
    brightness: float = 0.2             # multiplicative, +-
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03                   # small: colour carries diagnostic signal (blue-white veil)


def random_resized_crop(key, image, scale, ratio):
    """One image (S, S, C): crop a random box of the given area/aspect range and resize it back to S."""
    size = image.shape[0]
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(k_ratio, minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    h = jnp.clip(jnp.sqrt(area / aspect), 0.1, 1.0) * size
    w = jnp.clip(jnp.sqrt(area * aspect), 0.1, 1.0) * size
    y0 = jax.random.uniform(k_y) * (size - h)
    x0 = jax.random.uniform(k_x) * (size - w)
    scale_yx = jnp.stack([size / h, size / w])
    return jax.image.scale_and_translate(
        image, image.shape, (0, 1), scale_yx, -jnp.stack([y0, x0]) * scale_yx, method="linear", antialias=False)


def dihedral(key, image, cfg: AugmentConfig):
    k_flip, k_vflip, k_rot = jax.random.split(key, 3)
    if cfg.flips:
        image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
        image = jnp.where(jax.random.bernoulli(k_vflip), image[::-1], image)
    if cfg.rot90:
        # With both flips, one random transpose completes the 8-element dihedral group.
        image = jnp.where(jax.random.bernoulli(k_rot), jnp.swapaxes(image, 0, 1), image)
    return image


def rgb_to_gray(image):
    return image @ jnp.array([0.299, 0.587, 0.114], image.dtype)


def color_jitter(key, image, cfg: AugmentConfig):
    k_b, k_c, k_s, k_h = jax.random.split(key, 4)
    u = lambda k, a: jax.random.uniform(k, minval=1 - a, maxval=1 + a)
    image = image * u(k_b, cfg.brightness)
    mean = jnp.mean(rgb_to_gray(image))
    image = (image - mean) * u(k_c, cfg.contrast) + mean
    gray = rgb_to_gray(image)[..., None]
    image = (image - gray) * u(k_s, cfg.saturation) + gray
    # Hue: rotate chroma around the grey axis (a cheap, exact rotation in RGB space).
    theta = jax.random.uniform(k_h, minval=-cfg.hue, maxval=cfg.hue) * 2 * jnp.pi
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    axis = jnp.ones(3, image.dtype) / jnp.sqrt(3.0)
    cross = jnp.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], image.dtype)
    rotation = cos * jnp.eye(3) + sin * cross + (1 - cos) * jnp.outer(axis, axis)
    image = image @ rotation.T
    return jnp.clip(image, 0.0, 1.0)


def augment_one(key, image, cfg: AugmentConfig):
    k_crop, k_dihedral, k_color = jax.random.split(key, 3)
    image = random_resized_crop(k_crop, image, cfg.crop_scale, cfg.crop_ratio)
    image = dihedral(k_dihedral, image, cfg)
    return color_jitter(k_color, image, cfg)


def augment(key, images, cfg: AugmentConfig):
    """A batch (B, S, S, C) of floats in [0, 1] -> augmented batch, independent per image."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(augment_one, in_axes=(0, 0, None))(keys, images, cfg)
