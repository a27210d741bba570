"""Shortcut audit: how far a checkpoint's predictions move under changes that carry no lesion information.

    python -m model audit --checkpoint DIR --out OUT SET [SET ...]     (SET as for benchmark: NAME=PATH[:split])

Each image of each set is read once and shown to the model as it is and after each change below, applied to
the file's pixels before the checkpoint's own crop and resize (so a frame meets the field-of-view crop as a
real one would). A model that reads lesions barely moves; one that learned what tells its sources apart
(BCN_20000's 84 px thumbnails and round frames) changes its mind. Reported per true class and for the whole
set: the share of images whose top class flips, and the mean change of the malignant probability (signed:
positive means the change made lesions look more malignant). Writes OUT/audit.json and OUT/audit.md;
`--record` stores the table in the checkpoint (shown on its model card).
"""
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import metrics
from .data import load_labelled, parse_source
from .errors import UserError
from .images import field_of_view_box, load_image

THUMBNAIL_SIDE = 84           # BCN_20000's thumbnails
JPEG_QUALITY = 30
TEMPERATURE_GAIN = 0.1        # red up and blue down by 10% (warmer), or the reverse (cooler)


def thumbnail(img: Image.Image) -> Image.Image:
    """Squashed to 84x84 as BCN_20000's images were, then enlarged back to its size."""
    return img.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BICUBIC).resize(img.size, Image.BICUBIC)


def jpeg(img: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return Image.open(buffer).convert("RGB")


def add_frame(img: Image.Image) -> Image.Image:
    """Black outside a centred disc as wide as the shorter side: a contact dermatoscope's round field of view."""
    w, h = img.size
    d = min(w, h)
    disc = Image.new("L", img.size, 0)
    ImageDraw.Draw(disc).ellipse(((w - d) / 2, (h - d) / 2, (w + d) / 2, (h + d) / 2), fill=255)
    return Image.composite(img, Image.new("RGB", img.size), disc)


def remove_frame(img: Image.Image) -> Image.Image | None:
    """The square inscribed in the round field of view, where the image has one (None where it has no frame)."""
    box = field_of_view_box(img)
    if box is None:
        return None
    left, top, right, bottom = box
    cx, cy, half = (left + right) / 2, (top + bottom) / 2, min(right - left, bottom - top) / 2 / np.sqrt(2)
    return img.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))


def colour_temperature(gain: float):
    def shift(img: Image.Image) -> Image.Image:
        scaled = np.asarray(img, np.float32) * np.array([1 + gain, 1.0, 1 - gain], np.float32)
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))
    return shift


CHANGES = {
    "thumbnail_84px": thumbnail,
    "jpeg_q30": jpeg,
    "frame_added": add_frame,
    "frame_removed": remove_frame,
    "warmer": colour_temperature(TEMPERATURE_GAIN),
    "cooler": colour_temperature(-TEMPERATURE_GAIN),
}


def _movement(base: np.ndarray, moved: np.ndarray, malignant: np.ndarray, labels: np.ndarray, applied: np.ndarray,
              classes) -> dict:
    """Per true class and overall: images changed, top-class flips, mean change of the malignant probability."""
    flips = base.argmax(1) != moved.argmax(1)
    delta = moved[:, malignant].sum(1) - base[:, malignant].sum(1)

    def row(mask):
        mask = mask & applied
        n = int(mask.sum())
        return {"n": n, "flip_share": float(flips[mask].mean()) if n else None,
                "malignant_change": float(delta[mask].mean()) if n else None}
    return {"all": row(np.ones(len(labels), bool)),
            "per_class": {c: row(labels == i) for i, c in enumerate(classes) if (labels == i).any()}}


def audit_set(predictor, spec: str, *, max_images: int = 0, tta: bool = False, seed: int = 0) -> dict:
    """The audit of one labelled set: its unchanged metrics and each change's movement."""
    records, labels, data_classes, *_ = load_labelled(spec, predictor.metadata["task"])
    if not records:
        raise UserError(f"{spec}: no labelled images for the task {predictor.metadata['task']!r}.")
    labels = np.array([predictor.classes.index(c) for c in data_classes])[labels]
    if max_images and len(records) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(records), max_images, replace=False))
        records, labels = [records[i] for i in keep], labels[keep]
    images = [load_image(r.path) for r in records]
    malignant = np.array(metrics.resolve_malignant(predictor.classes), int)

    def probs(imgs):
        return predictor.probabilities(predictor.decision_logits(
            predictor.logits_from_arrays(predictor.prepare(imgs), tta), records))

    base = probs(images)
    out = {"n": len(records), "balanced_accuracy": metrics.balanced_accuracy(base, labels), "changes": {}}
    for name, change in CHANGES.items():
        changed = [change(img) for img in images]
        applied = np.array([c is not None for c in changed])
        moved = probs([c if c is not None else img for c, img in zip(changed, images)])
        out["changes"][name] = {**_movement(base, moved, malignant, labels, applied, predictor.classes),
                                "balanced_accuracy": metrics.balanced_accuracy(moved[applied], labels[applied])
                                if applied.any() else None}
    return out


def audit(checkpoint: str, sets: list[str], out: str, *, max_images: int = 0, tta: bool = False,
          record: bool = False) -> dict:
    # JAX only here: the model card renders recorded audits with `markdown` and must not import it.
    from . import checkpoint as checkpoints   # noqa: PLC0415
    from .predictor import Predictor   # noqa: PLC0415
    predictor = Predictor.load(checkpoint)
    result = metrics.to_jsonable({
        "checkpoint": str(checkpoint), "checkpoint_id": predictor.checkpoint_id, "tta": tta,
        "sets": {parse_source(spec)[0]: {"spec": spec, **audit_set(predictor, spec, max_images=max_images, tta=tta)}
                 for spec in sets}})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "audit.md").write_text(markdown(result))
    if record:
        predictor.metadata.setdefault("metrics", {})["audit"] = result
        checkpoints.update_metadata(predictor.metadata["checkpoint_path"], predictor.metadata)
    return result


def _f(value, signed=False) -> str:
    return "–" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"


def markdown(result: dict, *, heading: str = "#") -> str:
    """The audit as Markdown: per set, one row per change (all images), then top-class flips per true class."""
    lines = []
    for name, s in result["sets"].items():
        classes = list(next(iter(s["changes"].values()))["per_class"])
        lines += [f"{heading} Shortcut audit: {name} ({s['n']} images, balanced accuracy {_f(s['balanced_accuracy'])} "
                  "unchanged)", "",
                  "| change | images changed | top class flips | malignant probability change | balanced accuracy | "
                  + " | ".join(f"{c} flips" for c in classes) + " |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in classes) + " |"]
        for change, m in s["changes"].items():
            per = [_f(m["per_class"][c]["flip_share"]) for c in classes]
            lines.append(f"| {change} | {m['all']['n']} | {_f(m['all']['flip_share'])} | "
                         f"{_f(m['all']['malignant_change'], signed=True)} | {_f(m['balanced_accuracy'])} | "
                         + " | ".join(per) + " |")
        lines.append("")
    return "\n".join(lines)
