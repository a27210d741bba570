"""What every handler shares: the services (predictor, case store, temp folder) and the image
helpers that turn a heat map into something to show or download.

    ctx = Services(Predictor.load("checkpoints/default"), CaseStore("history/cases.db"))
    png = write_png(ctx, overlay(ctx, image, prepared, "gradcam", 4)[0], "gradcam-mel")

Handlers are plain functions in `analysis`, `chat`, `compare`, `history` and `model_card`:
each gets the services (read-only), the per-session state and the user name, and returns new
values; `ui` only wires them to components. Model access goes through
`model.predictor.Predictor` and `model.render`.
"""
from __future__ import annotations

import atexit
import functools
import logging
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model import render
from model.predictor import Predictor

from .batching import ModelQueue, batch_limit
from .store import CaseStore, storage_errors

log = logging.getLogger("lesionlens")

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"  # named <true dx>_<image id>.jpg
DISPLAY_MAX_SIDE = 448   # px: overlays in chat and compare
DISPLAY_MIN_SIDE = 384   # px: smaller images are enlarged for display (never for the model)
DEFAULT_ALPHA = 0.5
CONTOUR_PERCENT = 10     # outline the hottest 10 % of the map
# Said beside every overlay: the colours alone do not tell a newcomer which end is "more".
HEATMAP_LEGEND = (f"Red and yellow mark the strongest evidence, green and blue weaker evidence, untinted "
                  f"skin the least; the white line outlines the hottest {CONTOUR_PERCENT} % of the map. It "
                  "shows what the model used, not where the lesion is.")
TMP_MAX_AGE_S = 3600     # overlay PNGs are copied into Gradio's cache at once; ours can go
PRUNE_EVERY_S = 60       # look for old ones at most this often: a look stats every file there


class Throttle:
    """`due(now)` is True at most once per `seconds`: for housekeeping that must not run on every call."""

    def __init__(self, seconds: float):
        self.seconds, self._last, self._lock = seconds, float("-inf"), threading.Lock()

    def due(self, now: float) -> bool:
        with self._lock:
            if now - self._last <= self.seconds:
                return False
            self._last = now
            return True


def remove_older_than(folder: Path, max_age_s: float, now: float, pattern: str = "*.png") -> int:
    """Delete the files matching `pattern` in `folder` last written more than `max_age_s` ago (a file
    that vanishes meanwhile is skipped). Returns how many went."""
    removed = 0
    for old in folder.glob(pattern):
        try:
            if now - old.stat().st_mtime > max_age_s:
                old.unlink()
                removed += 1
        except OSError:
            pass
    return removed


@dataclass(frozen=True)
class Services:
    predictor: Predictor
    store: CaseStore
    tmp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lesionlens-")))
    gradio_dir: Path | None = None   # where Gradio keeps uploads and copies of outputs
    # Bundled public images (the examples): Gradio's copies of them serve every session.
    public_names: frozenset = frozenset()
    # case id -> the upload and the pictures shown for it: deleting the case removes them
    case_files: dict = field(default_factory=dict, compare=False)
    _files_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)
    # Every new image's prediction and default map, micro-batched across concurrent requests.
    model_queue: ModelQueue = field(init=False, compare=False, repr=False)
    # The temp folder is pruned at most once a PRUNE_EVERY_S.
    _prune_due: Throttle = field(default_factory=lambda: Throttle(PRUNE_EVERY_S), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "model_queue",
                           ModelQueue(self.predictor.analyse_and_explain, batch_limit(self.predictor)))


def remember_files(ctx: Services, case_id: int, *paths) -> None:
    """Files that show case `case_id` (an upload, overlays): removed when it is deleted."""
    with ctx._files_lock:
        ctx.case_files.setdefault(int(case_id), set()).update(str(p) for p in paths if p)


def remove_case_files(ctx: Services, case_id: int) -> int:
    """Delete a deleted case's upload and pictures, and Gradio's copies of them, so that no URL
    serves them any more; files another case also shows (the same upload twice) stay.
    Returns how many files were removed."""
    with ctx._files_lock:
        mine = ctx.case_files.pop(int(case_id), set())
        shared = set().union(*ctx.case_files.values()) if ctx.case_files else set()
    ours = [d.resolve() for d in (ctx.tmp_dir, ctx.gradio_dir) if d is not None]
    removed = 0
    for name in mine - shared:
        path = Path(name)
        # Only our temp files and Gradio's: never a file the app was pointed at elsewhere.
        if path.name in ctx.public_names or not any(path.resolve().is_relative_to(d) for d in ours):
            continue
        copies = [path]
        if ctx.gradio_dir is not None and path.parent.parent != ctx.gradio_dir:
            # Gradio copies what it serves to <gradio_dir>/<content hash>/<same name>; our
            # names carry a random suffix, so the name finds the copy.
            copies += list(ctx.gradio_dir.glob(f"*/{glob_escape(path.name)}"))
        for copy in copies:
            try:
                copy.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not remove %s of deleted case %s: %r", copy, case_id, e)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def remove_on_exit(folder: Path) -> None:
    """Delete `folder` (overlays, exports, copies of uploads) when the process ends: at a normal
    exit (atexit) and on SIGTERM (`kill`, `docker stop`, systemd), whose default action would
    skip atexit and leave the images in /tmp for good. Signal handlers can only be set from
    the main thread; elsewhere (an app built inside another program) atexit alone is used."""
    cleanup = functools.partial(shutil.rmtree, folder, ignore_errors=True)
    atexit.register(cleanup)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        cleanup()
        if callable(previous):      # another app's folder, or the host program's own handler
            previous(signum, frame)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def user_of(request) -> str:
    """The logged-in user, or '' without auth (everyone then shares one history)."""
    return (getattr(request, "username", None) or "") if request is not None else ""


def md_escape(text: str) -> str:
    """User text (notes, file names) shown literally inside Markdown."""
    return "".join("\\" + ch if ch in "\\`*_{}[]()<>#+-.!|~" else ch
                   for ch in str(text).replace("\n", " "))


# ------------------------------------------------------------------ images
def shrink(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=3.0)
    return image


def display_image(image: Image.Image) -> np.ndarray:
    """The raw image at display size: big photos shrunk, small crops (HAM's 200 px) enlarged
    so the heat map's detail is visible in the chat."""
    longest = max(image.size)
    if longest < DISPLAY_MIN_SIDE:
        scale = DISPLAY_MIN_SIDE / longest
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC)
    return np.asarray(shrink(image, DISPLAY_MAX_SIDE).convert("RGB"))


def blend(shown: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """The overlay of `heat` on `shown` (`display_image`), `heat` at that size (`heat_on_display`)."""
    return render.overlay(shown, heat, alpha=alpha, contour_percent=CONTOUR_PERCENT)


def heat_on_display(predictor, heat: np.ndarray, image: Image.Image, shown: np.ndarray | None = None,
                    box=None) -> np.ndarray:
    """The model-view map placed on the image as displayed (through a field-of-view crop, if any);
    `shown`: `display_image(image)`, when already made; `box`: the crop `prepare_with_boxes` found."""
    shown = display_image(image) if shown is None else shown
    return predictor.to_image_frame(heat, image, out_size=(shown.shape[1], shown.shape[0]), box=box)


def explain(ctx: Services, prepared: np.ndarray, method: str | None = None, class_index: int | None = None):
    """One prepared image's map (S, S), computed in turn with every other model call (the queue's)."""
    return ctx.model_queue.call(ctx.predictor.explain, prepared, method=method, class_index=class_index)


def overlay(ctx: Services, image: Image.Image, prepared: np.ndarray, method: str | None = None,
            class_index: int | None = None, alpha: float = DEFAULT_ALPHA, heat=None, box=None):
    """(overlay uint8 (H, W, 3) at display size, heat map (S, S)) for one image; `heat` when
    already computed (the analysis pass makes the default map), else `method`'s map; `box`: the crop
    `prepare_with_boxes` found, when known."""
    if heat is None:
        heat = explain(ctx, prepared, method, class_index)
    shown = display_image(image)
    return blend(shown, heat_on_display(ctx.predictor, heat, image, shown, box), alpha), heat


def sample_truth(case) -> str | None:
    """The true diagnosis code when `case` is one of the bundled samples (same name, same pixels)."""
    sample = SAMPLES / (case.filename or "")
    if not case.filename or "/" in case.filename or not sample.is_file():
        return None
    try:
        with Image.open(sample) as im:
            same = np.array_equal(np.asarray(im.convert("RGB")), np.asarray(case.load_image()))
    except OSError:
        return None
    return case.filename.split("_")[0] if same else None


def write_png(ctx: Services, array, stem: str, case_id: int | None = None) -> str:
    """Save for Gradio to serve or download; old files in our temp folder are pruned. A picture
    of a stored case (`case_id`) goes when the case is deleted. NotStored (a clear message)
    when the temp folder is full or read-only."""
    with storage_errors("save the picture", ctx.tmp_dir, "the app's temporary folder"):
        path = _write_png(ctx, array, stem)
    if case_id is not None:
        remember_files(ctx, case_id, path)
    return path


def _write_png(ctx: Services, array, stem: str) -> str:
    ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    if ctx._prune_due.due(now):
        remove_older_than(ctx.tmp_dir, TMP_MAX_AGE_S, now)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:60]
    path = ctx.tmp_dir / f"{safe}-{uuid.uuid4().hex[:8]}.png"
    img = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(array, np.uint8))
    img.save(path, compress_level=1)  # served once, then deleted: speed over size (3x faster)
    return str(path)


def warm_up(predictor) -> None:
    """Compile every batch size the model queue may run (1, 2, 4, 8 up to `batch_limit`) and a
    follow-up's map before the first user waits for them (JAX compiles each shape on first use),
    and import what Gradio's first event would."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    prepared = predictor.prepare([image])
    size = 1
    while size <= batch_limit(predictor):
        predictor.analyse_and_explain(np.repeat(prepared, size, axis=0))
        size *= 2
    predictor.explain(prepared[0], class_index=0)  # the default method, as a follow-up asks for it
    # Gradio asks matplotlib for its backend around every event, which imports pyplot the first
    # time (2-3 s here): pay that now, not on the first user's request.
    import matplotlib.pyplot  # noqa: F401, PLC0415
