"""The one image loader: files/uploads -> RGB PIL images -> square uint8 arrays -> memmap cache.

Training, the predictor and the app all go through `load_image` and `to_square`, so an image
is decoded and resized the same way at training time and at inference time.

Resampling: `Image.BILINEAR` with `reducing_gap=3.0`. Pillow's bilinear filter widens its
support with the downscale factor (it averages over the whole source footprint, unlike the
naive bilinear of tf/jax resize), so it does not alias when shrinking; it is cheaper than
LANCZOS and does not ring around dark lesion borders. `reducing_gap` first shrinks big phone
photos by an integer factor with a box filter, which is several times faster and, at 3.0,
visually indistinguishable from the full filter.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

# Refuse images above 64 megapixels (a 64 MP RGB image is ~190 MB decoded). Pillow warns above
# this and refuses above twice this; `load_image` refuses everything above it with a UserError.
Image.MAX_IMAGE_PIXELS = 64_000_000
MIN_SIDE = 16
RESAMPLE = Image.BILINEAR
REDUCING_GAP = 3.0
MODES = ("squash", "center", "fov")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # PH2 ships BMP
# Bump when decoding or resizing changes, so old caches are not reused.
CACHE_VERSION = 1
# Field-of-view detection: a pixel darker than this (0-255 grey) belongs to the dermatoscope's black frame.
FOV_DARK = 40
FOV_THUMB = 128

_UNREADABLE_HINT = "save it again as JPEG or PNG, or remove it"


def default_cache_dir() -> Path:
    """`$LESIONLENS_CACHE/images`, default `~/.cache/lesionlens/images`."""
    return Path(os.environ.get("LESIONLENS_CACHE", "~/.cache/lesionlens")).expanduser() / "images"


def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "uploaded image"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float single-channel images to 8-bit greyscale."""
    a = np.asarray(img)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 if hi <= 1.0 else (1.0 if hi <= 255 else (255.0 / 65535 if hi <= 65535 else 255.0 / hi))
    else:
        a = a.astype(np.float64)
        hi = float(a.max()) if a.size else 0.0
        # 16-bit PNGs store 0..65535; "I" images may hold 8-bit values in 32-bit ints.
        scale = 1.0 if hi <= 255 else (255.0 / 65535 if hi <= 65535 else 255.0 / hi)
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _bomb_error(name: str, size=None) -> UserError:
    dims = f"{size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} MP, " if size else ""
    return UserError(
        f"{name}: image is too large ({dims}limit {Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP); it may be a "
        "decompression bomb. Resize it below the limit (a few megapixels is plenty) and try again."
    )


def load_image(src) -> Image.Image:
    """Open a path, bytes, file-like object, PIL image or uint8 array as an RGB PIL image.

    Applies the EXIF orientation, converts every mode (palette, greyscale, 16-bit, CMYK,
    alpha composited on white) to 8-bit RGB, and turns unreadable, truncated, oversized
    (decompression bomb) and tiny images into a `UserError` naming the file.
    """
    name = _describe(src)
    try:
        if isinstance(src, Image.Image):
            src.load()
            img = _finish(src, name)
            return img.copy() if img is src else img
        if isinstance(src, np.ndarray):
            return _finish(_from_array(src, name), name)
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        with Image.open(src) as im:
            if im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:
                raise _bomb_error(name, im.size)
            im.load()
            img = _finish(im, name)
            # `_finish` returns a new image unless nothing had to change; detach it from the file.
            return img.copy() if img is im else img
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise _bomb_error(name) from None
    except FileNotFoundError:
        raise UserError(f"{name}: no such file. Check the path (and the CSV's folder for relative paths).") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, not an image file.") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied; make the file readable and try again.") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not a readable image (Pillow cannot identify the format); "
                        f"expected a JPEG or PNG; {_UNREADABLE_HINT}.") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # Truncated/corrupt data: OSError ("image file is truncated"), SyntaxError (bad header),
        # ValueError/IndexError/TypeError from broken chunks or unsupported mode conversions.
        raise UserError(f"{name}: not a readable image ({type(e).__name__}: {e}); {_UNREADABLE_HINT}.") from None


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise UserError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}.")
    if a.dtype != np.uint8:
        if a.dtype.kind == "f" and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def _finish(img: Image.Image, name: str) -> Image.Image:
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # malformed EXIF: the pixels are still fine, keep them unrotated
        pass
    img = _to_rgb(img)
    if min(img.size) < MIN_SIDE:
        raise UserError(f"{name}: image is only {img.size[0]}x{img.size[1]} pixels; need at least "
                        f"{MIN_SIDE} px on each side. Use a larger photo of the lesion.")
    return img


def field_of_view_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of a dermatoscope's round field of view, or None.

    Contact dermatoscopes image a bright disc inside a black frame; BCN_20000 and PH2 show it
    often, HAM10000 rarely. A frame is present when at least three corners are mostly dark; the
    box is then the extent of the rows and columns that are more than 10% bright. The decision is
    made on a <= 128 px thumbnail, so it costs well under a millisecond per image.
    """
    w, h = img.size
    scale = max(w, h) / FOV_THUMB
    thumb = img.convert("L")
    if scale > 1:
        thumb = thumb.resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.BOX)
    grey = np.asarray(thumb)
    th, tw = grey.shape
    dark = grey < FOV_DARK
    c = max(2, round(0.08 * min(th, tw)))
    corners = [dark[:c, :c], dark[:c, -c:], dark[-c:, :c], dark[-c:, -c:]]
    if sum(float(k.mean()) >= 0.8 for k in corners) < 3:
        return None
    bright = ~dark
    rows = np.flatnonzero(bright.mean(axis=1) > 0.1)
    cols = np.flatnonzero(bright.mean(axis=0) > 0.1)
    if len(rows) == 0 or len(cols) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) * (right - left) < 0.2 * th * tw:  # a dark image, not a frame around a bright disc
        return None
    sx, sy = w / tw, h / th
    return (round(left * sx), round(top * sy), min(w, round(right * sx)), min(h, round(bottom * sy)))


def square_box(img: Image.Image, mode: str = "squash") -> tuple[float, float, float, float]:
    """The region of `img` (left, top, right, bottom) that `to_square` resizes to the model's square.

    "squash": the full frame. "center": the centred square of side min(w, h). "fov": the
    dermatoscope's field of view where one is found (`field_of_view_box`), else the full frame.
    """
    if mode not in MODES:
        raise UserError(f"unknown resize mode {mode!r}; choose one of: {', '.join(MODES)}")
    w, h = img.size
    if mode == "center":
        s = min(w, h)
        return ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    if mode == "fov":
        box = field_of_view_box(img)
        if box is not None:
            return box
    return (0, 0, w, h)


def to_square(img, size: int, mode: str = "squash", box=None) -> np.ndarray:
    """Resize the `square_box` region of `img` to a (size, size, 3) uint8 array.

    "squash": the full frame resized to a square, aspect ratio not kept (how ISIC 2017 was
    made 256x256, and nothing at the borders is lost). "center": the centred square crop.
    "fov": the dermatoscope's round field of view cropped out of its black frame, then squashed.
    `img` is anything `load_image` accepts. `box` overrides the region, e.g. to cut a lesion mask
    exactly as its image was cut (a mask has no dermatoscope frame of its own).
    """
    if mode not in MODES:
        raise UserError(f"unknown resize mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not (isinstance(img, Image.Image) and img.mode == "RGB"):
        img = load_image(img)
    box = square_box(img, mode) if box is None else box
    out = img.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    return np.asarray(out, dtype=np.uint8)


def load_squares(paths, size: int, mode: str = "squash") -> tuple[np.ndarray, dict]:
    """`to_square` of each file, (N, size, size, 3) uint8 for those that read, and {path: reason} for the
    rest: one bad file is reported, not fatal."""
    images, errors = [], {}
    for path in paths:
        try:
            images.append(to_square(load_image(path), size, mode))
        except UserError as e:
            errors[path] = str(e)
    return (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)), errors


# --------------------------------------------------------------------------- cache

def _cache_key(paths: list[str], size: int, mode: str) -> tuple[str, list[str]]:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "size": size, "mode": mode,
                         "resample": int(RESAMPLE), "gap": REDUCING_GAP}).encode())
    missing = []
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            missing.append(p)
    return h.hexdigest()[:24], missing


class UnreadableImages(UserError):
    """Every image of a set that could not be read, named together; `failures` holds (path, reason) pairs
    so a caller that may skip them (evaluation) can."""

    def __init__(self, failures: list[tuple[str, str]], total: int):
        self.failures = failures
        shown = "\n".join(f"  {msg}" for _, msg in failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} of {total} images could not be read:\n{shown}{more}\n"
                         "Remove or fix these files (or drop their rows from the CSV), then run again.")


def _clean_stale_tmp(cache_dir: Path, max_age_s: float = 6 * 3600) -> None:
    now = time.time()
    for f in cache_dir.glob("*.tmp-*"):
        try:
            if now - f.stat().st_mtime > max_age_s:
                f.unlink()
        except OSError:
            pass


def cache_path(paths, size: int, mode: str = "squash", cache_dir=None) -> Path:
    """Where `build_cache` keeps (or would keep) the array for these arguments."""
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    key, _ = _cache_key(paths, size, mode)
    return Path(cache_dir or default_cache_dir()) / f"{key}_{len(paths)}x{size}_{mode}.npy"


def build_cache(paths, size: int, mode: str = "squash", cache_dir=None, *,
                workers: int | None = None, progress: bool = True) -> np.memmap:
    """Decode and resize every image once into a read-only (N, size, size, 3) uint8 memmap.

    The cache file is keyed by the path list, each file's size and mtime, `size`, `mode` and
    the loader version. It is written to a temporary file and renamed into place when complete,
    so an interrupted build is never reused. A later call with the same key just opens it.
    Unreadable or missing files are collected and reported together in one `UserError`.
    """
    if mode not in MODES:
        raise UserError(f"unknown resize mode {mode!r}; choose one of: {', '.join(MODES)}")
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise UserError("no images to cache: the dataset is empty. Check the data path and the task's classes.")
    n = len(paths)
    cache_dir = Path(cache_dir or default_cache_dir())
    key, missing = _cache_key(paths, size, mode)
    if missing:
        raise UnreadableImages([(p, f"{p}: no such file") for p in missing], n)
    final = cache_dir / f"{key}_{n}x{size}_{mode}.npy"
    shape = (n, size, size, 3)

    if final.exists():
        try:
            arr = np.load(final, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass
        final.unlink(missing_ok=True)  # wrong shape or unreadable header: rebuild

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{cache_dir}: cannot create the image cache folder ({e}); "
                        "set LESIONLENS_CACHE to a writable folder.") from None
    _clean_stale_tmp(cache_dir)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    workers = workers or min(2, os.cpu_count() or 1)
    failures: list[tuple[str, str]] = []
    committed = False
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

        def work(i: int):
            try:
                out[i] = to_square(load_image(paths[i]), size, mode)
                return None
            except UserError as e:
                return paths[i], str(e)

        from tqdm import tqdm
        ex = ThreadPoolExecutor(max_workers=workers)
        try:
            with tqdm(total=n, desc=f"caching images {size}px", unit="img", disable=not progress) as bar:
                for res in ex.map(work, range(n)):
                    if res is not None:
                        failures.append(res)
                    bar.update(1)
        finally:
            # on Ctrl-C or an error: drop queued work, wait only for the images being decoded
            ex.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise UnreadableImages(failures, n)
        out.flush()
        del out
        with open(final.with_suffix(".json"), "w") as f:
            json.dump({"size": size, "mode": mode, "count": n, "version": CACHE_VERSION,
                       "first": paths[:3]}, f)
        os.replace(tmp, final)
        committed = True
    except OSError as e:
        raise UserError(f"{cache_dir}: could not write the image cache ({e}); free some disk space "
                        "or set LESIONLENS_CACHE to another folder.") from None
    finally:
        if not committed:
            tmp.unlink(missing_ok=True)
    return np.load(final, mmap_mode="r")
