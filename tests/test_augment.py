"""Training augmentation on real HAM-like images: artefacts darken, never brighten, and only where drawn."""
import jax
import numpy as np
import pytest

from model.augment import AugmentConfig, add_vignette, augment, hair_mask
from model.images import load_image, to_square

SIZE = 64


@pytest.fixture(scope="module")
def images(synthetic_data_shared):
    paths = sorted(synthetic_data_shared.ham_images.glob("*.jpg"))[:6]
    return np.stack([to_square(load_image(p), SIZE, "squash") for p in paths]).astype(np.float32) / 255


@pytest.mark.slow
def test_hair_mask_draws_thin_curves():
    masks = np.stack([np.asarray(hair_mask(jax.random.key(i), 160)) for i in range(20)])
    assert set(np.unique(masks)) == {0.0, 1.0}
    covered = (masks > 0.5).mean(axis=(1, 2))
    # Hairs, not blobs: nearly every mask draws something in frame, none covers a fifth of the image.
    assert (covered > 0).mean() >= 0.9 and covered.max() < 0.2
    np.testing.assert_array_equal(masks[3], np.asarray(hair_mask(jax.random.key(3), 160)))


@pytest.mark.slow
def test_vignette_darkens_corners_and_keeps_the_centre(images):
    outs = np.stack([np.asarray(add_vignette(jax.random.key(i), images[0])) for i in range(20)])
    centre = slice(SIZE // 2 - 8, SIZE // 2 + 8)
    np.testing.assert_allclose(outs[:, centre, centre], np.broadcast_to(images[0][centre, centre], outs[:, centre, centre].shape), rtol=0.02)
    corner_kept = outs[:, :3, :3].mean(axis=(1, 2, 3)) / images[0][:3, :3].mean()
    assert (corner_kept <= 1.0 + 1e-6).all() and np.median(corner_kept) < 0.1 and corner_kept.mean() < 0.3


@pytest.mark.slow
def test_artefacts_only_darken_the_same_augmented_view(images):
    key = jax.random.key(1)
    plain = np.asarray(augment(key, images, AugmentConfig()))
    with_artefacts = np.asarray(augment(key, images, AugmentConfig(hair=1.0, vignette=1.0)))
    assert (with_artefacts <= plain + 1e-6).all()
    darkened = (with_artefacts < plain - 0.05).mean(axis=(1, 2, 3))
    assert (darkened > 0.01).all()  # every image got hairs and a border
    never = np.asarray(augment(key, images, AugmentConfig(hair=0.0, vignette=0.0)))
    np.testing.assert_array_equal(never, plain)


@pytest.mark.slow
def test_low_resolution_blurs_like_a_thumbnail_and_leaves_other_draws_alone(synthetic_data_shared):
    paths = sorted(synthetic_data_shared.ham_images.glob("*.jpg"))[:4]
    images = np.stack([to_square(load_image(p), 160, "squash") for p in paths]).astype(np.float32) / 255
    key = jax.random.key(2)
    plain = np.asarray(augment(key, images, AugmentConfig()))
    blurred = np.asarray(augment(key, images, AugmentConfig(low_res=1.0)))
    np.testing.assert_array_equal(np.asarray(augment(key, images, AugmentConfig(low_res=0.0))), plain)
    # Same crop, flips and colours, less fine detail: the mean stays, pixel-to-pixel change drops.
    np.testing.assert_allclose(blurred.mean(axis=(1, 2, 3)), plain.mean(axis=(1, 2, 3)), atol=0.02)
    detail = lambda x: np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
    assert (detail(blurred) < 0.9 * detail(plain)).all()
