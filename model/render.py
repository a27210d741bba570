"""Heatmap rendering in numpy (no matplotlib on the request path).

  from model import render
  rgb = render.overlay(image_uint8, saliency_map, alpha=0.45, contour_percent=20)
  strip = render.side_by_side([rgb_a, rgb_b], labels=["Grad-CAM", "occlusion"])
"""
import numpy as np
from PIL import Image, ImageDraw


def _turbo_lut() -> np.ndarray:
    # Turbo colour map, polynomial approximation: Google LLC 2019, Apache-2.0; colour map by Anton
    # Mikhailov, approximation by Ruofei Du (https://research.google/blog/turbo-an-improved-rainbow-
    # colormap-for-visualization/, https://www.shadertoy.com/view/3lBXR3). Rows: powers t^0..t^5.
    coeffs = np.array([
        [0.13572138, 0.09140261, 0.10667330],
        [4.61539260, 2.19418839, 12.64194608],
        [-42.66032258, 4.84296658, -60.58204836],
        [132.13108234, -14.18503333, 110.36276771],
        [-152.94239396, 4.27729857, -89.90310912],
        [59.28637943, 2.82956604, 27.34824973],
    ])
    t = np.linspace(0.0, 1.0, 256)
    rgb = (t[:, None] ** np.arange(6)[None, :]) @ coeffs
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


TURBO = _turbo_lut()  # (256, 3) uint8: dark blue (cold) -> green/yellow -> dark red (hot)


def colorize(heatmap: np.ndarray, lut: np.ndarray = TURBO) -> np.ndarray:
    """Heatmap (H, W) in [0, 1] -> uint8 (H, W, 3); values outside [0, 1] and NaN are clipped."""
    heat = np.nan_to_num(np.asarray(heatmap, np.float32), nan=0.0)
    return lut[np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)]


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (H, W), pixel-centre aligned like jax.image.resize."""
    heat = np.asarray(heatmap, np.float32)
    if heat.shape == tuple(size):
        return heat
    return np.asarray(Image.fromarray(heat).resize((size[1], size[0]), Image.BILINEAR))


def place_in_frame(heatmap: np.ndarray, box, image_size: tuple[int, int], out_size=None) -> np.ndarray:
    """A map of the model's square view placed back on the image it was cut from.

    `box` (left, top, right, bottom) is the region of the (W, H) = `image_size` image that was
    resized to the square (`images.square_box`); outside it the map is 0. `out_size` (W, H)
    renders the frame at another size (e.g. the display size) instead of the image's own.
    """
    w, h = image_size
    ow, oh = out_size or image_size
    sx, sy = ow / w, oh / h
    x0, y0 = int(round(box[0] * sx)), int(round(box[1] * sy))
    x1, y1 = max(x0 + 1, int(round(box[2] * sx))), max(y0 + 1, int(round(box[3] * sy)))
    out = np.zeros((oh, ow), np.float32)
    out[y0:y1, x0:x1] = resize_heatmap(heatmap, (y1 - y0, x1 - x0))[:oh - y0, :ow - x0]
    return out


def top_region_contour(heatmap: np.ndarray, top_percent: float = 20, thickness: int = 1) -> np.ndarray:
    """Boundary (bool (H, W)) of the hottest `top_percent` % of pixels; empty for an all-zero map."""
    heat = np.asarray(heatmap, np.float32)
    region = (heat >= np.percentile(heat, 100 - top_percent)) & (heat > 0)
    boundary = region & ~_erode(region)
    for _ in range(thickness - 1):
        boundary = _dilate(boundary) & region
    return boundary


def _erode(mask: np.ndarray) -> np.ndarray:
    # 4-neighbourhood; outside the image counts as background, so a region touching the border
    # gets its contour drawn along the border.
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, *, heat_weighted: bool = True,
            contour_percent: float | None = None) -> np.ndarray:
    """Blend the coloured heatmap onto an RGB uint8 image -> uint8 (H, W, 3).

    heat_weighted scales alpha by the heat, so cold regions show the skin untouched (the
    colour map's blue end then marks only lukewarm areas). contour_percent draws the boundary of
    the hottest that-many percent in white.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    heat = np.clip(np.nan_to_num(resize_heatmap(heatmap, image.shape[:2]), nan=0.0), 0.0, 1.0)
    a = (alpha * heat if heat_weighted else np.full_like(heat, alpha))[..., None]
    out = image.astype(np.float32) * (1 - a) + colorize(heat).astype(np.float32) * a
    out = np.round(out).astype(np.uint8)
    if contour_percent is not None:
        thickness = max(1, round(min(image.shape[:2]) / 150))  # about 1 px at 150, 2 px at 300
        out[top_region_contour(heat, contour_percent, thickness)] = 255
    return out


def side_by_side(images: list[np.ndarray], labels: list[str] | None = None, gap: int = 4) -> np.ndarray:
    """One row of RGB uint8 images (tops aligned, white gaps), each under its label if given."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    label_h = 16 if labels else 0  # PIL's default bitmap font is 11 px high
    height = max(im.shape[0] for im in images) + label_h
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    left = 0
    for im in images:
        canvas[label_h:label_h + im.shape[0], left:left + im.shape[1]] = im
        left += im.shape[1] + gap
    if labels:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        left = 0
        for im, label in zip(images, labels):
            draw.text((left + 2, 2), str(label), fill=(0, 0, 0))
            left += im.shape[1] + gap
        canvas = np.asarray(pil).copy()
    return canvas
