"""Training-time augmentation, on device inside the jitted train step (no Python in the loop).

Random resized crop, flips, 90-degree rotations, colour jitter and (optionally) the artefacts that
differ between clinics: hairs drawn across the lesion, the dark circular vignette of contact
dermatoscopes and the blur of low-resolution images. All on float images in [0, 1].
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
    hair: float = 0.0                   # probability of drawing 1-8 dark hairs over the image
    vignette: float = 0.0               # probability of a dark circular dermatoscope border
    low_res: float = 0.0                # probability of shrinking to LOW_RES_SIDE px and back


HAIR_POINTS_PER_PIXEL = 2  # samples along each curve per pixel of image side: unbroken lines
MAX_HAIRS = 8
# BCN_20000 comes as 84 px thumbnails: a model that never sees a blurry image from another source
# learns "blurry = Barcelona = more often malignant" (`python -m model audit`, its 84 px round trip).
LOW_RES_SIDE = 84


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


def pixel_grid(size: int):
    """(S, S, 2) pixel centres in [0, 1] coordinates, (y, x)."""
    axis = (jnp.arange(size) + 0.5) / size
    return jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), axis=-1)


def hair_mask(key, size: int):
    """(S, S) coverage in {0, 1} of 1-MAX_HAIRS random hairs: quadratic Bezier curves, 1 or 3 px wide.

    Points sampled densely along each curve are scattered into the mask (then optionally widened
    by a 3x3 max): a few thousand writes per image, where measuring every pixel's distance to
    every hair cost 30x the rest of the augmentation.
    """
    k_n, k_ends, k_bend, k_width = jax.random.split(key, 4)
    n = jax.random.randint(k_n, (), 1, MAX_HAIRS + 1)
    ends = jax.random.uniform(k_ends, (MAX_HAIRS, 2, 2), minval=-0.1, maxval=1.1)   # start, end (y, x)
    bend = (ends[:, 0] + ends[:, 1]) / 2 + jax.random.normal(k_bend, (MAX_HAIRS, 2)) * 0.25
    t = jnp.linspace(0.0, 1.0, HAIR_POINTS_PER_PIXEL * size)[None, :, None]
    curves = (1 - t) ** 2 * ends[:, :1] + 2 * (1 - t) * t * bend[:, None] + t ** 2 * ends[:, 1:]
    pixels = jnp.floor(curves * size).astype(jnp.int32)                              # (hairs, points, 2)
    drawn = (jnp.arange(MAX_HAIRS) < n)[:, None] & jnp.all((pixels >= 0) & (pixels < size), axis=-1)
    pixels = jnp.where(drawn[..., None], pixels, size)  # undrawn points go out of range and are dropped
    mask = jnp.zeros((size, size)).at[pixels[..., 0], pixels[..., 1]].set(1.0, mode="drop")
    thick = jax.lax.reduce_window(mask, 0.0, jax.lax.max, (3, 3), (1, 1), "SAME")
    return jnp.where(jax.random.bernoulli(k_width, 0.3), thick, mask)


def add_hair(key, image):
    k_mask, k_shade = jax.random.split(key)
    # Hairs are dark brown to black: a fraction of the local colour, not a fixed RGB value.
    shade = jax.random.uniform(k_shade, minval=0.05, maxval=0.35)
    coverage = hair_mask(k_mask, image.shape[0])[..., None]
    return image * (1 - coverage) + image * shade * coverage


def add_vignette(key, image):
    """Darken outside a circle centred near the middle, radius 0.45-0.7 of the side, with a soft edge."""
    k_radius, k_centre, k_edge = jax.random.split(key, 3)
    radius = jax.random.uniform(k_radius, minval=0.45, maxval=0.7)
    centre = 0.5 + jax.random.uniform(k_centre, (2,), minval=-0.05, maxval=0.05)
    edge = jax.random.uniform(k_edge, minval=0.01, maxval=0.1)
    r = jnp.linalg.norm(pixel_grid(image.shape[0]) - centre, axis=-1)
    keep = jnp.clip((radius - r) / edge + 0.5, 0.0, 1.0)[..., None]
    return image * (0.03 + 0.97 * keep)


def low_resolution(key, image):
    """The image as an 84 px thumbnail enlarged again: antialiased down, linear up, like the predictor."""
    del key  # deterministic; the key only decides whether it happens
    small = jax.image.resize(image, (LOW_RES_SIDE, LOW_RES_SIDE, image.shape[-1]), "linear", antialias=True)
    return jax.image.resize(small, image.shape, "linear")


def maybe(key, probability: float, transform, image):
    if probability <= 0:  # a Python-level switch: runs without the artefact compile none of it
        return image
    k_apply, k_transform = jax.random.split(key)
    return jnp.where(jax.random.bernoulli(k_apply, probability), transform(k_transform, image), image)


def augment_one(key, image, cfg: AugmentConfig):
    k_crop, k_dihedral, k_color, k_hair, k_vignette = jax.random.split(key, 5)
    image = random_resized_crop(k_crop, image, cfg.crop_scale, cfg.crop_ratio)
    # A key of its own, folded in: runs without the blur keep exactly the draws they had before it.
    image = maybe(jax.random.fold_in(key, LOW_RES_SIDE), cfg.low_res, low_resolution, image)
    image = dihedral(k_dihedral, image, cfg)
    image = color_jitter(k_color, image, cfg)
    image = maybe(k_hair, cfg.hair, add_hair, image)
    return maybe(k_vignette, cfg.vignette, add_vignette, image)


def augment(key, images, cfg: AugmentConfig):
    """A batch (B, S, S, C) of floats in [0, 1] -> augmented batch, independent per image."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(augment_one, in_axes=(0, 0, None))(keys, images, cfg)
