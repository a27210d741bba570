"""The chat: one reply per dropped image (report + Grad-CAM), then follow-up commands.

    for history, state in chat_respond(ctx, {"text": "60 y, male, back", "files": [path]},
                                       [], {}, user=""): ...

A message is shown at once (`chat_add`), then answered (`chat_respond`, a generator so each
image's reply appears as soon as it is ready).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from model.errors import UserError

from .analysis import admit, classify_path, uncertainty_warnings, why_unusual
from .commands import METHOD_LABELS, Clinical, help_text, parse_clinical, parse_command
from .services import HEATMAP_LEGEND, Services, md_escape, overlay, sample_truth, write_png
from .store import MAX_NOTE_CHARS, NotStored

log = logging.getLogger("lesionlens")

MAX_FILES = 8            # per chat message: ~1 s each on a laptop CPU; more goes in a second message

CAVEAT = ("_Not a medical device: this research tool supports, and never replaces, a clinician. "
          "See a doctor about any lesion that is new, changing, bleeding or worrying you._")


# ------------------------------------------------------------------ messages
def malignant_codes(predictor) -> list[str]:
    """The classes the predictor counts as malignant (asked, not hard-coded)."""
    k = len(predictor.classes)
    hits = np.asarray(predictor.malignant_probability(np.eye(k, dtype=np.float32)))
    return [c for c, v in zip(predictor.classes, hits) if v > 0.5]


def clinical_line(predictor, clinical: Clinical) -> str | None:
    """Which of the note's age, sex and body site the model used, or that it uses none."""
    known = clinical.known
    if not predictor.uses_clinical:
        return ("_This model uses the image only: the age, sex or body site in your note "
                "did not change the result._") if known else None
    shown = {"age": lambda v: f"age {v:g}", "sex": str, "site": lambda v: f"site {v}"}
    used = ", ".join(shown[k](v) for k, v in known.items()) or "none"
    missing = [k for k in ("age", "sex", "site") if k not in known]
    line = f"**Clinical data used:** {used}."
    if missing:
        line += (f" Not found in the note, so treated as missing: {', '.join(missing)} "
                 "(add e.g. “60 y, male, back” to the note).")
    return line


def operating_point_line(predictor, malignant: float) -> str | None:
    """Where the malignancy estimate sits against the checkpoint's high-sensitivity threshold."""
    threshold = predictor.operating_threshold
    if threshold is None:
        return None
    val = ((predictor.metadata.get("metrics") or {}).get("val") or {}).get("operating_point") or {}
    side = "**at or above**" if malignant >= threshold else "below"
    line = f"**Sensitive threshold:** {malignant:.0%} is {side} {threshold:.0%}, the cut-off"
    if val.get("malignant_sensitivity") is not None and val.get("malignant_specificity") is not None:
        line += (f" at which the model flagged {val['malignant_sensitivity']:.0%} of malignant validation "
                 f"lesions (and {1 - val['malignant_specificity']:.0%} of benign ones)")
    return line + "."


def report_markdown(predictor, case, warnings: list[str], clinical: str | None = None) -> str:
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
    # The verdict (table, malignant share, threshold) comes right after the title, so that it is
    # what the chat shows first, on a phone too; the notes on it follow.
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
    point = operating_point_line(predictor, m)
    if point:
        lines += ["", point]
    lines.append("")
    truth = sample_truth(case)
    if truth:
        verdict = ("the model agrees" if truth == case.top_class else
                   f"**the model is wrong on this one** (it says {names.get(case.top_class, case.top_class)})")
        lines += [f"Bundled sample with a known diagnosis: **{names.get(truth, truth)}** (`{truth}`): {verdict}. "
                  "The bundled model never trained on it (see data/samples/ATTRIBUTION.md).", ""]
    if clinical:
        lines += [clinical, ""]
    label = METHOD_LABELS.get(predictor.default_method, predictor.default_method)
    lines.append(f"{label} below shows where the model looked for **{names.get(case.top_class)}**. "
                 f"{HEATMAP_LEGEND} Type `help` for more explanations.")
    lines.append("")
    lines.append(CAVEAT)
    return "\n".join(lines)


def unusual_markdown(case, because=()) -> str:
    """The reply for an image that does not look like a lesion: that first, with the checks it
    failed, and no diagnosis; the table waits until the person asks for it (`analyse anyway`)."""
    title = f"**Case #{case.id}**" + (f" · {md_escape(case.filename)}" if case.filename else "")
    return "\n".join([
        "⚠️ **This image does not look like the dermoscopy images the model was trained on** (it "
        f"may be a normal photo, not a single skin lesion, or badly lit or blurred){why_unusual(because)}. "
        "I am not showing a diagnosis: on an image like this the model's probabilities mean nothing.", "",
        f"{title} is saved in your history.", "",
        "If it really is a close-up of one skin lesion, type `analyse anyway` to see the model's "
        "probabilities and heat map, and treat them with caution. Otherwise, drop a dermoscopy "
        "image of one lesion.", "", CAVEAT])


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
    if text:   # echo at most a note's worth: a pasted book would slow every later render
        shown = text if len(text) <= MAX_NOTE_CHARS else f"{text[:MAX_NOTE_CHARS]}… ({len(text):,} characters)"
        history.append(text_message(shown, "user"))
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
        except UserError as e:   # e.g. the temp folder is full: NotStored says so
            history.append(text_message(f"❌ {e}"))
        except Exception:
            log.exception("follow-up %r failed", text)
            history.append(text_message("❌ Something went wrong while answering that (an "
                                        "internal error, logged on the server). Try again, or "
                                        "drop the image again to start a new case."))
        yield history, state
        return
    try:   # the same for every image: say it once, before any model time is spent
        admit(ctx, user, text)
    except NotStored as e:
        history.append(text_message(f"❌ Nothing was analysed or saved: {e}"))
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
        except NotStored as e:   # the history filled up during this message, or the disk
            history.append(text_message(f"❌ **{name}** was not saved: {e}"))
            yield history, state
            continue
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
        if result.unusual:   # not a lesion, by the look of it: say so, hold the diagnosis back
            history.append(text_message(unusual_markdown(case, result.unusual_because)))
            yield history, state
            continue
        history.append(text_message(report_markdown(
            ctx.predictor, case, result.warnings, clinical_line(ctx.predictor, result.clinical))))
        top = ctx.predictor.class_names[int(np.argmax(result.probs))]
        label = METHOD_LABELS.get(ctx.predictor.default_method, ctx.predictor.default_method)
        history.append(image_message(png, f"{label} overlay for {top}"))
        yield history, state


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
    if case.held_back and cmd.kind != "anyway":
        return [text_message(f"Case #{case.id} is {case.status}, so I am not explaining a diagnosis for it. "
                             "If it really is a close-up of one skin lesion, type `analyse anyway` first; "
                             "otherwise drop a dermoscopy image of one lesion.")]
    image = case.load_image()
    prepared = p.prepare([image])
    method = cmd.method or p.default_method
    ci = cmd.class_index if cmd.class_index is not None else int(
        p.classes.index(case.top_class))
    over, _ = overlay(ctx, image, prepared[0], method, ci)
    name, prob = p.class_names[ci], case.predictions.get(p.classes[ci], 0.0)
    label = METHOD_LABELS.get(method, method)
    png = write_png(ctx, over, f"{method}-{p.classes[ci]}-case{case.id}", case.id)
    if cmd.kind == "anyway":   # the full reply held back for an unusual image (or shown again)
        if case.held_back:
            ctx.store.mark_analysed_anyway(case.id, user=user)   # the case's status says so from now on
        probs = np.array([case.predictions.get(c, 0.0) for c in p.classes])
        entropy = float(p.normalised_entropy(probs[None])[0])
        warnings = uncertainty_warnings(probs, entropy, p.class_names, case.unusual, case.unusual_because)
        same_model = case.checkpoint_id == p.checkpoint_id
        if not same_model:
            warnings.append(f"This case was analysed by another checkpoint (`{case.checkpoint_id}`); "
                            "the heatmap is from the current one.")
        clinical = clinical_line(p, parse_clinical(case.note)) if same_model else None
        return [text_message(report_markdown(p, case, warnings, clinical)),
                image_message(png, f"{label} overlay for {name}")]
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
    caution = f" ⚠️ Case #{case.id} was {case.status}: treat this map with caution." if case.unusual else ""
    return [text_message(f"{msg} {HEATMAP_LEGEND}{caution}"), image_message(png, f"{label} overlay for {name}")]


def open_case_in_chat(ctx: Services, case_id, history, user: str):
    """History -> chat: show the stored case as the current one. Returns (history, state)."""
    history = list(history or [])
    case = ctx.store.get_case(int(case_id), user=user) if case_id else None
    if case is None:
        history.append(text_message("That case no longer exists (it may have been deleted)."))
        return history, {}
    history.append(text_message(f"Opened case #{case.id} from history.", "user"))
    if case.held_back:   # as when it was sent: the reasons, no diagnosis, `analyse anyway` to see it
        history.append(text_message(unusual_markdown(case, case.unusual_because)))
        return history, {"case_id": case.id}
    p = ctx.predictor
    image = case.load_image()
    ci = p.classes.index(case.top_class)
    over, _ = overlay(ctx, image, p.prepare([image])[0], None, ci)
    png = write_png(ctx, over, f"{p.default_method}-case{case.id}", case.id)
    same_model = case.checkpoint_id == p.checkpoint_id
    warnings = [] if same_model else ["This case was analysed by another checkpoint "
                                      f"(`{case.checkpoint_id}`); the heatmap is from the "
                                      "current one."]
    if case.unusual:
        warnings.insert(0, f"This case was {case.status}.")
    # The stored probabilities came from this checkpoint and this note: say what it used.
    clinical = clinical_line(p, parse_clinical(case.note)) if same_model else None
    history.append(text_message(report_markdown(p, case, warnings, clinical)))
    label = METHOD_LABELS.get(p.default_method, p.default_method)
    history.append(image_message(png, f"{label} overlay for {p.class_names[ci]}"))
    return history, {"case_id": case.id}
