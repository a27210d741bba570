"""One image in, one stored case out: probabilities, malignancy, unusual-image flag, warnings
and a Grad-CAM overlay.

    case, result, overlay_png = classify_path(ctx, "data/samples/mel_ISIC_0024310.jpg",
                                              note="60 y, male, back")

The note's age, sex and body site (`commands.parse_clinical`) go to the model only when the
checkpoint fuses them with the image (`Predictor.uses_clinical`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.errors import UserError
from model.images import load_image

from .commands import Clinical, parse_clinical
from .services import Services, overlay, remember_files, shrink, write_png
from .store import check_note

STORE_MAX_SIDE = 1024    # px: the model sees <= 512 px; keeps history PNGs to ~1-3 MB
UNSURE_MAX_PROB = 0.5    # top class below 50 %: no class is more likely than all others together
UNSURE_ENTROPY = 0.7     # normalised entropy (0 = certain, 1 = uniform) above which we warn
CLOSE_CALL = 0.10        # top-2 probabilities closer than this: the ranking is a coin flip
UNUSUAL_BECAUSE = {      # Predictor.unusual_checks' names, as the warning explains them
    "far_from_lesions": "it is far from the validation lesions the model was checked on",
    "unlike_a_lesion": "it is nearer the non-lesion pictures the warning learned from than a lesion",
    "near_uniform": "the model spreads its answer almost evenly over the classes",
}


@dataclass
class Result:
    """One image's analysis; `prepared` is the model's (S, S, 3) uint8 view of it, `heat` the
    default method's map of the top class in that view, and `clinical` what the note said (given
    to the model only if it uses clinical data)."""
    image: Image.Image
    prepared: np.ndarray
    probs: np.ndarray
    malignant: float
    ood_score: float
    unusual: bool
    warnings: list[str]
    heat: np.ndarray
    clinical: Clinical = Clinical()
    unusual_because: tuple[str, ...] = ()
    box: tuple | None = None   # the region of `image` the model's view was resized from


def why_unusual(because) -> str:
    """': ' and the failed checks in words, or '' where they are not known (a case from history)."""
    return ": " + "; ".join(UNUSUAL_BECAUSE[name] for name in because) if because else ""


def uncertainty_warnings(probs: np.ndarray, entropy: float, class_names, unusual: bool,
                         because=()) -> list[str]:
    """`entropy`: the predictor's normalised entropy of `probs` (0 = certain, 1 = uniform); `because`: the
    unusual-image checks the image failed (`UNUSUAL_BECAUSE`' keys), named in the warning where known."""
    warnings = []
    if unusual:
        warnings.append("**This image does not look like the dermoscopy images the model was "
                        "trained on** (it may be a normal photo, not a single skin lesion, or "
                        f"badly lit or blurred){why_unusual(because)}. Treat the result "
                        "below as meaningless unless a clinician says the image is suitable.")
    order = np.argsort(probs)[::-1]
    top, second = float(probs[order[0]]), float(probs[order[1]]) if len(probs) > 1 else 0.0
    if top < UNSURE_MAX_PROB or entropy > UNSURE_ENTROPY:
        warnings.append(f"**The model is unsure**: its top answer has only {top:.0%} and the "
                        f"probability is spread over several classes (uncertainty {entropy:.0%}).")
    elif top - second < CLOSE_CALL:
        warnings.append(f"**Close call** between {class_names[order[0]]} ({top:.0%}) and "
                        f"{class_names[order[1]]} ({second:.0%}).")
    return warnings


def analyse(ctx: Services, image: Image.Image, clinical: Clinical = Clinical()) -> Result:
    """Probabilities, malignancy, OOD flag, warnings and the default map in one forward pass,
    batched with other requests (`ctx.model_queue`); `clinical` is passed on only when the
    checkpoint fuses it (unknown values count as missing)."""
    predictor = ctx.predictor
    (prepared,), (box,) = predictor.prepare_with_boxes([image])
    out = ctx.model_queue.submit(prepared, clinical)
    probs = np.asarray(out["probs"])
    unusual, because = bool(out["unusual"]), tuple(out["unusual_because"])
    return Result(image=image, prepared=prepared, probs=probs, malignant=float(out["malignant"]),
                  ood_score=float(out["ood_score"]), unusual=unusual,
                  warnings=uncertainty_warnings(probs, float(out["entropy"]), predictor.class_names, unusual,
                                                because),
                  heat=np.asarray(out["heat"]), clinical=clinical, unusual_because=because, box=box)


def admit(ctx: Services, user: str, note: str) -> None:
    """NotStored for a note too long or a full history: checked once per request, before any model time
    is spent on a case that cannot be kept (the store checks the room again under its lock, when it writes)."""
    check_note(note)
    ctx.store.check_room(user)


def classify_path(ctx: Services, path, user: str = "", note: str = "", filename: str = ""):
    """Load, analyse and explain (the default method), then store: (case, result, overlay png path).
    The caller has `admit`ted the request. UserError for unreadable images; nothing is stored unless
    every step succeeded.
    """
    filename = filename or Path(str(path)).name
    try:
        if os.path.getsize(path) == 0:
            raise UserError(f"{filename}: the file is empty (0 bytes); upload the image again.")
    except OSError:
        pass
    try:
        image = shrink(load_image(path), STORE_MAX_SIDE)
    except UserError as e:  # name the file as the user knows it, not Gradio's temp path
        raise UserError(_strip_path(str(e), path)) from None
    result = analyse(ctx, image, parse_clinical(note))
    over, _ = overlay(ctx, image, result.prepared, heat=result.heat, box=result.box)
    png = write_png(ctx, over, f"gradcam-{Path(filename).stem}")
    p = ctx.predictor
    case = ctx.store.add_case(
        image, predictions={c: float(v) for c, v in zip(p.classes, result.probs)},
        malignant_probability=result.malignant, checkpoint_id=p.checkpoint_id, user=user,
        filename=filename, note=note, unusual=result.unusual, ood_score=result.ood_score,
        unusual_because=result.unusual_because)
    remember_files(ctx, case.id, png, path)   # the upload too: Gradio's copy in its temp folder
    return case, result, png


def _strip_path(message: str, path) -> str:
    """Error messages name the upload's temp path; people know it by its file name."""
    return message.replace(str(path), Path(str(path)).name)


def classify_api(ctx: Services, path, user: str = "", note: str = ""):
    """One file in -> ({class name: probability}, overlay png of the top class, summary). Stored
    in history. The summary: case_id (for /compare), status (`Case.status`: analysed, or held back
    because the image does not look like a lesion), malignant_probability, above_sensitive_threshold
    (None when the checkpoint has no threshold), unusual, unusual_because (the checks it failed:
    far_from_lesions, unlike_a_lesion, near_uniform), ood_score (the distance check's score),
    checkpoint_id. A held-back case gets no probabilities, malignancy or overlay, as in the chat."""
    if not path:
        raise UserError("no file received: send one image file (JPEG or PNG).")
    admit(ctx, user, note or "")
    case, result, png = classify_path(ctx, path, user=user, note=note or "")
    p = ctx.predictor
    threshold = p.operating_threshold
    shown = not case.held_back
    summary = {"case_id": case.id, "status": case.status,
               "malignant_probability": round(result.malignant, 6) if shown else None,
               "above_sensitive_threshold": None if threshold is None or not shown
               else bool(result.malignant >= threshold),
               "unusual": result.unusual, "unusual_because": list(result.unusual_because),
               "ood_score": round(result.ood_score, 6),
               "checkpoint_id": p.checkpoint_id}
    if not shown:
        return {}, None, summary
    return {n: round(float(v), 6) for n, v in zip(p.class_names, result.probs)}, png, summary
