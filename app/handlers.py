"""Event handlers as plain functions: no Gradio server needed to test them.

    ctx = Services(predictor, store)
    case, result, overlay_png = classify_path(ctx, "data/samples/mel_ISIC_0030828.jpg", user="")
    for history, state in chat_respond(ctx, {"text": "", "files": [path]}, [], {}, user=""): ...

Every handler gets the services (read-only), the per-session state and the user name, and
returns new values; the UI module only wires them to components. Model access goes through
`model.predictor.Predictor` and `model.render`; images through `model.images.load_image`.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model import render
from model.errors import UserError
from model.images import load_image

from .commands import METHOD_LABELS, help_text, parse_command
from .store import CaseStore

log = logging.getLogger("lesionlens")

MAX_FILES = 8            # per chat message: ~1 s each on a laptop CPU; more goes in a second message
STORE_MAX_SIDE = 1024    # px: the model sees <= 512 px; keeps history PNGs to ~1-3 MB
DISPLAY_MAX_SIDE = 448   # px: overlays in chat and compare
DISPLAY_MIN_SIDE = 384   # px: smaller images are enlarged for display (never for the model)
UNSURE_MAX_PROB = 0.5    # top class below 50 %: no class is more likely than all others together
UNSURE_ENTROPY = 0.7     # normalised entropy (0 = certain, 1 = uniform) above which we warn
CLOSE_CALL = 0.10        # top-2 probabilities closer than this: the ranking is a coin flip
DEFAULT_ALPHA = 0.5
CONTOUR_PERCENT = 10     # outline the hottest 10 % of the map
TMP_MAX_AGE_S = 3600     # overlay PNGs are copied into Gradio's cache at once; ours can go

CAVEAT = ("_Not a medical device: this research tool supports, and never replaces, a clinician. "
          "See a doctor about any lesion that is new, changing, bleeding or worrying you._")


@dataclass(frozen=True)
class Services:
    predictor: object
    store: CaseStore
    tmp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lesionlens-")))


@dataclass
class Result:
    """One image's analysis; `prepared` is the model's (S, S, 3) uint8 view of it."""
    image: Image.Image
    prepared: np.ndarray
    probs: np.ndarray
    malignant: float
    ood_score: float
    unusual: bool
    warnings: list[str]


def user_of(request) -> str:
    """The logged-in user, or '' without auth (everyone then shares one history)."""
    return (getattr(request, "username", None) or "") if request is not None else ""


# ------------------------------------------------------------------ analysis
def shrink(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=3.0)
    return image


def uncertainty_warnings(probs: np.ndarray, class_names, unusual: bool) -> list[str]:
    warnings = []
    if unusual:
        warnings.append("**This image does not look like the dermoscopy images the model was "
                        "trained on** (it may be a normal photo, not a single skin lesion, or "
                        "badly lit or blurred). Treat the result below as meaningless unless a "
                        "clinician says the image is suitable.")
    order = np.argsort(probs)[::-1]
    top, second = float(probs[order[0]]), float(probs[order[1]]) if len(probs) > 1 else 0.0
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(p * np.log(p)).sum() / math.log(len(p))) if len(p) > 1 else 0.0
    if top < UNSURE_MAX_PROB or entropy > UNSURE_ENTROPY:
        warnings.append(f"**The model is unsure**: its top answer has only {top:.0%} and the "
                        f"probability is spread over several classes (uncertainty {entropy:.0%}).")
    elif top - second < CLOSE_CALL:
        warnings.append(f"**Close call** between {class_names[order[0]]} ({top:.0%}) and "
                        f"{class_names[order[1]]} ({second:.0%}).")
    return warnings


def analyse(predictor, image: Image.Image) -> Result:
    """Probabilities, malignancy, OOD flag and warnings in one forward pass."""
    prepared = predictor.prepare([image])
    out = predictor.analyse(prepared)
    probs = np.asarray(out["probs"])[0]
    unusual = bool(np.asarray(out["unusual"])[0])
    return Result(image=image, prepared=prepared[0], probs=probs,
                  malignant=float(np.asarray(out["malignant"])[0]),
                  ood_score=float(np.asarray(out["ood_score"])[0]), unusual=unusual,
                  warnings=uncertainty_warnings(probs, predictor.class_names, unusual))


def overlay(predictor, image: Image.Image, prepared: np.ndarray, method: str = "gradcam",
            class_index: int | None = None, alpha: float = DEFAULT_ALPHA, heat=None):
    """(overlay uint8 (H, W, 3) at display size, heat map (S, S)) for one image."""
    if heat is None:
        heat = predictor.explain(prepared, method=method, class_index=class_index)
    return blend(image, heat, alpha), heat


def display_image(image: Image.Image) -> np.ndarray:
    """The raw image at display size: big photos shrunk, small crops (HAM's 200 px) enlarged
    so the heat map's detail is visible in the chat."""
    longest = max(image.size)
    if longest < DISPLAY_MIN_SIDE:
        scale = DISPLAY_MIN_SIDE / longest
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC)
    return np.asarray(shrink(image, DISPLAY_MAX_SIDE).convert("RGB"))


def blend(image: Image.Image, heat: np.ndarray, alpha: float) -> np.ndarray:
    return render.overlay(display_image(image), heat, alpha=alpha,
                          contour_percent=CONTOUR_PERCENT)


def write_png(ctx: Services, array, stem: str) -> str:
    """Save for Gradio to serve or download; old files in our temp folder are pruned."""
    ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in ctx.tmp_dir.glob("*.png"):
        try:
            if now - old.stat().st_mtime > TMP_MAX_AGE_S:
                old.unlink()
        except OSError:
            pass
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:60]
    path = ctx.tmp_dir / f"{safe}-{uuid.uuid4().hex[:8]}.png"
    img = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(array, np.uint8))
    img.save(path, compress_level=1)  # served once, then deleted: speed over size (3x faster)
    return str(path)


def classify_path(ctx: Services, path, user: str = "", note: str = "", filename: str = ""):
    """Load, analyse, explain (Grad-CAM), then store: (case, result, overlay png path).

    UserError for unreadable images; nothing is stored unless every step succeeded.
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
    result = analyse(ctx.predictor, image)
    top = int(np.argmax(result.probs))
    over, _ = overlay(ctx.predictor, image, result.prepared, "gradcam", top)
    png = write_png(ctx, over, f"gradcam-{Path(filename).stem}")
    p = ctx.predictor
    case = ctx.store.add_case(
        image, predictions={c: float(v) for c, v in zip(p.classes, result.probs)},
        malignant_probability=result.malignant, checkpoint_id=p.checkpoint_id, user=user,
        filename=filename, note=note, unusual=result.unusual, ood_score=result.ood_score)
    return case, result, png


def probabilities_by_name(predictor, probs) -> dict[str, float]:
    return {n: round(float(v), 6) for n, v in zip(predictor.class_names, probs)}


# ------------------------------------------------------------------ messages
def md_escape(text: str) -> str:
    """User text (notes, file names) shown literally inside Markdown."""
    return "".join("\\" + ch if ch in "\\`*_{}[]()<>#+-.!|~" else ch
                   for ch in str(text).replace("\n", " "))


def malignant_codes(predictor) -> list[str]:
    """The classes the predictor counts as malignant (asked, not hard-coded)."""
    k = len(predictor.classes)
    hits = np.asarray(predictor.malignant_probability(np.eye(k, dtype=np.float32)))
    return [c for c, v in zip(predictor.classes, hits) if v > 0.5]


def report_markdown(predictor, case, warnings: list[str]) -> str:
    names = dict(zip(predictor.classes, predictor.class_names))
    ranked = sorted(case.predictions.items(), key=lambda kv: -kv[1])[:3]
    lines = [f"⚠️ {w}" for w in warnings]
    if lines:
        lines.append("")
    title = f"**Case #{case.id}**" + (f" · {md_escape(case.filename)}" if case.filename else "")
    if case.note:
        title += f" · _{md_escape(case.note)}_"
    lines.append(title)
    lines.append("")
    lines.append("| | class | probability |")
    lines.append("|---|---|---|")
    for rank, (code, prob) in enumerate(ranked, 1):
        lines.append(f"| {rank} | {names.get(code, code)} (`{code}`) | {prob:.1%} |")
    lines.append("")
    m = case.malignant_probability
    lean = "leans malignant" if m >= 0.5 else "leans benign"
    mal_codes = malignant_codes(predictor)
    lines.append(f"**Malignant vs benign:** {m:.0%} malignant / {1 - m:.0%} benign ({lean}; "
                 f"malignant = {', '.join(mal_codes) or 'malignant classes'}).")
    lines.append("")
    lines.append(f"Grad-CAM below shows where the model looked for **{names.get(case.top_class)}**. "
                 "Type `help` for more explanations.")
    lines.append("")
    lines.append(CAVEAT)
    return "\n".join(lines)


def image_message(path: str, alt: str) -> dict:
    return {"role": "assistant", "content": {"path": path, "alt_text": alt}}


def text_message(text: str, role: str = "assistant") -> dict:
    return {"role": role, "content": text}


# ------------------------------------------------------------------ chat
def chat_add(message: dict | None, history: list | None):
    """Show the user's message at once; the reply comes from `chat_respond`. Returns
    (history, pending message)."""
    history = list(history or [])
    message = message or {"text": "", "files": []}
    files = [f if isinstance(f, str) else f.get("path") for f in (message.get("files") or [])]
    for f in files[:MAX_FILES]:
        history.append({"role": "user", "content": {"path": f}})
    if len(files) > MAX_FILES:
        history.append(text_message(f"(+{len(files) - MAX_FILES} more files)", "user"))
    text = (message.get("text") or "").strip()
    if text:
        history.append(text_message(text, "user"))
    return history, {"text": text, "files": files}


def chat_respond(ctx: Services, pending: dict | None, history: list | None, state: dict | None,
                 user: str = ""):
    """Generator of (history, state): one reply per image, or the answer to a follow-up."""
    history, state = list(history or []), dict(state or {})
    pending = pending or {}
    files, text = pending.get("files") or [], (pending.get("text") or "").strip()
    if not files:
        try:
            history += follow_up(ctx, text, state, user)
        except Exception:
            log.exception("follow-up %r failed", text)
            history.append(text_message("❌ Something went wrong while answering that (an "
                                        "internal error, logged on the server). Try again, or "
                                        "drop the image again to start a new case."))
        yield history, state
        return
    if len(files) > MAX_FILES:
        history.append(text_message(
            f"You sent {len(files)} files; I analyse at most {MAX_FILES} per message. Here are "
            f"the first {MAX_FILES}: send the others in another message."))
        files = files[:MAX_FILES]
    for path in files:
        name = Path(str(path)).name
        try:
            case, result, png = classify_path(ctx, path, user=user, note=text)
        except UserError as e:
            history.append(text_message(f"❌ I could not use **{name}**: {e}"
                                        "\n\nNothing was saved. Send a JPEG or PNG photo of one "
                                        "skin lesion, ideally a dermoscopy image."))
            yield history, state
            continue
        except Exception:  # a bug, not the user's fault: say so, keep serving, save nothing
            log.exception("analysing %s failed", name)
            history.append(text_message(f"❌ Something went wrong while analysing **{name}** "
                                        "(an internal error, logged on the server). Nothing "
                                        "was saved; please try again or try another image."))
            yield history, state
            continue
        state = {"case_id": case.id}
        history.append(text_message(report_markdown(ctx.predictor, case, result.warnings)))
        top = ctx.predictor.class_names[int(np.argmax(result.probs))]
        history.append(image_message(png, f"Grad-CAM overlay for {top}"))
        yield history, state


def _strip_path(message: str, path) -> str:
    """Error messages name the upload's temp path; people know it by its file name."""
    return message.replace(str(path), Path(str(path)).name)


def follow_up(ctx: Services, text: str, state: dict, user: str) -> list[dict]:
    p = ctx.predictor
    cmd = parse_command(text, p.classes, p.class_names)
    if cmd.kind in ("help", "empty"):
        return [text_message(help_text(p.classes, p.class_names))]
    case = ctx.store.get_case(state.get("case_id"), user=user) if state.get("case_id") else None
    if cmd.kind == "unknown":
        hint = "" if case else " First drop an image of a skin lesion here."
        return [text_message(f"I did not understand “{text}”.{hint} Type `help` for what I can "
                             "do; to start a new case, drop an image (a note is optional).")]
    if case is None:
        return [text_message("There is no current case: drop an image first, or open one "
                             "from the History tab.")]
    image = case.load_image()
    prepared = p.prepare([image])
    method = cmd.method or "gradcam"
    ci = cmd.class_index if cmd.class_index is not None else int(
        p.classes.index(case.top_class))
    over, _ = overlay(p, image, prepared[0], method, ci)
    name, prob = p.class_names[ci], case.predictions.get(p.classes[ci], 0.0)
    label = METHOD_LABELS.get(method, method)
    png = write_png(ctx, over, f"{method}-{p.classes[ci]}-case{case.id}")
    if cmd.kind == "why_not":
        top_name = p.class_names[p.classes.index(case.top_class)]
        if p.classes[ci] == case.top_class:
            msg = (f"The model **did** pick {name}: {prob:.1%}. {label} shows the evidence "
                   "it used.")
        else:
            msg = (f"**{name}: {prob:.1%}** (the model's pick, {top_name}, has "
                   f"{case.predictions[case.top_class]:.1%}). {label} for {name} shows what "
                   "in the image speaks *for* it; weak or scattered heat means little evidence.")
    else:
        msg = f"{label} for **{name}** ({prob:.1%}) on case #{case.id}."
    return [text_message(msg), image_message(png, f"{label} overlay for {name}")]


def open_case_in_chat(ctx: Services, case_id, history, user: str):
    """History -> chat: show the stored case as the current one. Returns (history, state)."""
    history = list(history or [])
    case = ctx.store.get_case(int(case_id), user=user) if case_id else None
    if case is None:
        history.append(text_message("That case no longer exists (it may have been deleted)."))
        return history, {}
    p = ctx.predictor
    image = case.load_image()
    ci = p.classes.index(case.top_class)
    over, _ = overlay(p, image, p.prepare([image])[0], "gradcam", ci)
    png = write_png(ctx, over, f"gradcam-case{case.id}")
    history.append(text_message(f"Opened case #{case.id} from history.", "user"))
    warnings = ["This case was analysed by another checkpoint "
                f"(`{case.checkpoint_id}`); the heatmap is from the current one."] \
        if case.checkpoint_id != p.checkpoint_id else []
    if case.unusual:
        warnings.insert(0, "When stored, this image was flagged as unlike the training images.")
    history.append(text_message(report_markdown(p, case, warnings)))
    history.append(image_message(png, f"Grad-CAM overlay for {p.class_names[ci]}"))
    return history, {"case_id": case.id}


# ------------------------------------------------------------------ API
def classify_api(ctx: Services, path, user: str = "", note: str = ""):
    """One file in -> ({class name: probability}, Grad-CAM overlay png). Stored in history."""
    if not path:
        raise UserError("no file received: send one image file (JPEG or PNG).")
    case, result, png = classify_path(ctx, path, user=user, note=note or "")
    return probabilities_by_name(ctx.predictor, result.probs), png


# ------------------------------------------------------------------ compare
COMPARE_METHODS = ("gradcam", "integrated_gradients", "smoothgrad", "occlusion")


def case_label(case) -> str:
    note = f" · {case.note[:30]}" if case.note else ""
    name = f" · {case.filename[:30]}" if case.filename else ""
    return f"#{case.id} · {case.created[:16].replace('T', ' ')} · {case.top_class}{name}{note}"


def case_choices(ctx: Services, user: str, limit: int = 300) -> list[tuple[str, int]]:
    return [(case_label(c), c.id) for c in ctx.store.list_cases(user=user, limit=limit)]


def compare_compute(ctx: Services, case_id, mode: str, methods, class_codes, user: str) -> dict:
    """Heat maps for one case: several methods (for the top class) or several classes (for
    one method, the first ticked, Grad-CAM by default). Returns the session's compare state:
    {"case_id", "items": [(caption, heat)]}; re-blending at another opacity needs no model."""
    if not case_id:
        raise UserError("pick a case from the list, or upload a new image, first.")
    case = ctx.store.get_case(int(case_id), user=user)
    if case is None:
        raise UserError(f"case #{case_id} no longer exists; pick another one.")
    p = ctx.predictor
    image = case.load_image()
    prepared = p.prepare([image])[0]
    top = p.classes.index(case.top_class)
    methods = [m for m in (methods or []) if m in METHOD_LABELS] or ["gradcam"]
    items = []
    if mode == "classes":
        codes = [c for c in (class_codes or []) if c in p.classes] or [case.top_class]
        for code in codes:
            ci = p.classes.index(code)
            heat = p.explain(prepared, method=methods[0], class_index=ci)
            items.append((f"{METHOD_LABELS[methods[0]]} · {p.class_names[ci]} "
                          f"({case.predictions.get(code, 0):.0%})", heat))
    else:
        for m in methods:
            heat = p.explain(prepared, method=m, class_index=top)
            items.append((f"{METHOD_LABELS[m]} · {p.class_names[top]} "
                          f"({case.predictions[case.top_class]:.0%})", heat))
    return {"case_id": case.id, "items": items}


def compare_render(ctx: Services, compare: dict, alpha: float, pick: str | None, user: str):
    """(gallery [(img, caption)], slider (raw, overlay), download paths) at opacity `alpha`."""
    if not compare or not compare.get("items"):
        return [], None, []
    case = ctx.store.get_case(compare["case_id"], user=user)
    if case is None:
        return [], None, []
    image = case.load_image()
    raw = display_image(image)
    gallery, files = [], []
    for caption, heat in compare["items"]:
        over = blend(image, heat, alpha)
        gallery.append((over, caption))
        files.append(write_png(ctx, over, f"case{case.id}-{caption.split(' · ')[0]}-"
                                         f"{caption.split(' · ')[1].split(' (')[0]}"))
    panel = render.side_by_side([raw] + [g[0] for g in gallery],
                                ["original"] + [g[1] for g in gallery])
    files.insert(0, write_png(ctx, panel, f"case{case.id}-side-by-side"))
    captions = [c for c, _ in compare["items"]]
    idx = captions.index(pick) if pick in captions else 0
    return gallery, (raw, gallery[idx][0]), files


# ------------------------------------------------------------------ history
HISTORY_COLUMNS = ["case", "date (UTC)", "file", "note", "prediction", "probability",
                   "malignant", "flag"]


def _day(value) -> str | None:
    """gr.DateTime gives '', None, 'YYYY-MM-DD', a full timestamp, or epoch seconds."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d", time.gmtime(value))
    text = str(value).strip()[:10]
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise UserError(f"“{value}” is not a date; use YYYY-MM-DD.") from None
    return text


def history_cases(ctx: Services, user: str, query: str = "", top_class: str | None = None,
                  date_from=None, date_to=None):
    return ctx.store.list_cases(user=user, query=query or "", top_class=top_class or None,
                                date_from=_day(date_from), date_to=_day(date_to))


def history_table(ctx: Services, cases) -> list[list]:
    names = dict(zip(ctx.predictor.classes, ctx.predictor.class_names))
    rows = []
    for c in cases:
        flag = "unusual image" if c.unusual else ""
        rows.append([c.id, c.created[:19].replace("T", " "), c.filename, c.note,
                     names.get(c.top_class, c.top_class),
                     f"{c.predictions.get(c.top_class, 0):.0%}",
                     f"{c.malignant_probability:.0%}", flag])
    return rows


def case_details(ctx: Services, case_id, user: str):
    """(thumbnail image or None, markdown) for the History tab's selected row."""
    case = ctx.store.get_case(int(case_id), user=user) if case_id else None
    if case is None:
        return None, "Select a row to see the case."
    names = dict(zip(ctx.predictor.classes, ctx.predictor.class_names))
    ranked = sorted(case.predictions.items(), key=lambda kv: -kv[1])[:3]
    top3 = ", ".join(f"{names.get(k, k)} {v:.0%}" for k, v in ranked)
    md = (f"**Case #{case.id}** · {case.created[:19].replace('T', ' ')} UTC\n\n"
          f"File: {md_escape(case.filename) or '–'} · Note: {md_escape(case.note) or '–'}\n\n"
          f"Top 3: {top3} · malignant {case.malignant_probability:.0%}\n\n"
          f"Checkpoint: `{case.checkpoint_id}`")
    with Image.open(case.thumb_path) as thumb:   # pixels, not a path: the store may live
        return thumb.convert("RGB"), md          # outside the folders Gradio may serve


def export_history(ctx: Services, kind: str, cases) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = ctx.tmp_dir / "exports" / uuid.uuid4().hex[:8]
    classes = list(ctx.predictor.classes)
    if kind == "zip":
        return str(ctx.store.export_zip(out / f"lesionlens-cases-{stamp}.zip", cases, classes))
    return str(ctx.store.export_csv(out / f"lesionlens-cases-{stamp}.csv", cases, classes))


# ------------------------------------------------------------------ model card
HEADLINE_METRICS = (("n", "validation images"), ("accuracy", "accuracy"),
                    ("balanced_accuracy", "balanced accuracy"), ("macro_auc", "macro AUC"),
                    ("malignant_auc", "malignant-vs-benign AUC"),
                    ("malignant_sensitivity", "malignant sensitivity"),
                    ("malignant_specificity", "malignant specificity"),
                    ("melanoma_sensitivity", "melanoma sensitivity"),
                    ("ece", "calibration error (ECE)"), ("temperature", "temperature"))
PER_CLASS = ("recall", "specificity", "precision", "auc", "support")


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _metrics_lines(val: dict, classes, names) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for key, label in HEADLINE_METRICS:
        if key in val:
            ci = val.get(f"{key}_ci")
            extra = f" (95% CI {_fmt(ci[0])}–{_fmt(ci[1])})" if ci and len(ci) == 2 else ""
            lines.append(f"| {label} | {_fmt(val[key])}{extra} |")
    if any(isinstance(val.get(k), dict) for k in PER_CLASS):
        lines += ["", "| class | " + " | ".join(PER_CLASS) + " |",
                  "|---|" + "---|" * len(PER_CLASS)]
        for code, name in zip(classes, names):
            cells = [_fmt((val.get(k) or {}).get(code)) for k in PER_CLASS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def model_card_markdown(predictor) -> str:
    md = dict(predictor.metadata or {})
    training = md.get("training") or {}
    config = training.get("config") or {}
    lines = ["## Model card", "",
             f"**Checkpoint:** `{predictor.checkpoint_id}`  ",
             f"**Architecture:** `{md.get('arch', '?')}` · input {predictor.image_size}×"
             f"{predictor.image_size} px ({md.get('resize', 'squash')} resize)"
             + (f" · task `{md['task']}`" if md.get("task") else "")
             + (" · test-time augmentation" if md.get("tta") else ""), "",
             "### Classes", "", "| code | name |", "|---|---|"]
    lines += [f"| `{c}` | {n} |" for c, n in zip(predictor.classes, predictor.class_names)]
    data = training.get("data")
    if data or config.get("data"):
        lines += ["", "### Training data", ""]
        if config.get("data"):
            lines.append(f"- **source**: {_fmt(config['data'])}")
        if isinstance(data, dict):
            lines += [f"- **{k}**: {_fmt(v)}" for k, v in data.items()]
        elif data:
            lines.append(f"- {_fmt(data)}")
        lines += [f"- **{k}**: {_fmt(config[k])}" for k in ("epochs", "image_size", "pretrained")
                  if k in config]
    val = (md.get("metrics") or {}).get("val")
    if isinstance(val, dict):
        lines += ["", "### Validation metrics", ""]
        if "epoch" in (md.get("metrics") or {}):
            lines.append(f"Best epoch {md['metrics']['epoch']}; lesion-grouped validation split.")
            lines.append("")
        lines += _metrics_lines({**val, "temperature": md.get("temperature")},
                                predictor.classes, predictor.class_names)
    ood = md.get("ood") or {}
    if ood.get("threshold") is not None:
        lines += ["", f"Unusual-image warning: feature distance above {ood['threshold']:.2f} "
                  f"(passes {ood.get('validation_pass_rate', 0):.1%} of validation lesions)."]
    lines += ["", "### Intended use", "",
              md.get("intended_use") or
              "Research and education: showing how an image classifier for dermoscopic images "
              "of pigmented skin lesions behaves, and where it looks. It is **not a medical "
              "device** and must not be used to diagnose, rule out or triage skin cancer.",
              "", "### Limitations", ""]
    limitations = md.get("limitations") or [
        "Trained on dermoscopy images (HAM10000); clinical phone photos, non-skin images and "
        "rare diagnoses are out of scope, and predictions on them are unreliable.",
        "HAM10000 comes mostly from fair-skinned European and Australian patients: "
        "performance on darker skin types is unknown.",
        "Probabilities are calibrated on the validation split only; a saliency map shows "
        "where the model looked, not why a lesion is benign or malignant.",
    ]
    lines += [f"- {x}" for x in (limitations if isinstance(limitations, list) else [limitations])]
    licence = md.get("licence") or md.get("license")
    lines += ["", "### Licence", "",
              (f"{_fmt(licence)} " if licence else "") + "The training images (HAM10000, "
              "Tschandl et al. 2018, doi:10.1038/sdata.2018.161) are licensed **CC BY-NC-SA "
              "4.0**: this model and its outputs are for **non-commercial** use only."]
    return "\n".join(lines)


def warm_up(predictor) -> None:
    """Compile the forward pass and Grad-CAM before the first user waits for them (JAX jits
    on first call, and once more on the second)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    for _ in range(2):
        prepared = predictor.prepare([image])
        predictor.analyse(prepared)
        predictor.explain(prepared[0], method="gradcam", class_index=0)
