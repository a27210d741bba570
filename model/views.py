"""The 8 dihedral views of test-time augmentation, and the way back for maps made on them.

Dermoscopy has no canonical orientation, so the predictor averages a prediction over the four
rotations of an image and their mirror images; a map made on a view is turned back into the
image's own orientation before maps are averaged.
"""
import jax.numpy as jnp

TTA_VIEWS = 8


def dihedral_views(x):
    """The 8 flips/rotations of square images (B, S, S, C), view k = (rotation k // 2, mirrored if k is odd)."""
    views = []
    for k in range(4):
        r = jnp.rot90(x, k, axes=(1, 2))
        views += [r, r[:, :, ::-1]]
    return views


def to_image_orientation(maps, view: int):
    """Maps (B, h, w) made on dihedral view `view` -> the same maps in the original image's orientation."""
    rotation, mirrored = divmod(view, 2)
    if mirrored:
        maps = maps[:, :, ::-1]
    return jnp.rot90(maps, -rotation, axes=(1, 2))


def all_views(x):
    """The 8 views of a batch as one batch (8 * B, S, S, C), view after view."""
    return jnp.concatenate(dihedral_views(x))


def mean_over_views(outputs):
    """Per-image outputs of `all_views(x)` (8 * B, ...) -> their mean over the 8 views (B, ...)."""
    return outputs.reshape(TTA_VIEWS, -1, *outputs.shape[1:]).mean(0)
