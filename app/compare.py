"""The Compare tab: several saliency methods, or several classes, side by side for one case.

    state = compare_compute(ctx, case_id, "methods", ["gradcam", "occlusion"], [], user="")
    gallery, (raw, overlay), files = compare_render(ctx, state, alpha=0.5, pick=None, user="")

Heat maps are computed once; moving the opacity slider only re-blends them (no model call).
"""
from __future__ import annotations

from model import render
from model.errors import UserError

from .commands import METHOD_LABELS
from .services import Services, blend, display_image, explain, heat_on_display, write_png


def case_label(case) -> str:
    note = f" · {case.note[:30]}" if case.note else ""
    name = f" · {case.filename[:30]}" if case.filename else ""
    what = "held back (unlike a lesion)" if case.held_back else case.top_class
    return f"#{case.id} · {case.created[:16].replace('T', ' ')} · {what}{name}{note}"


def case_choices(ctx: Services, user: str, limit: int = 300) -> list[tuple[str, int]]:
    return [(case_label(c), c.id) for c in ctx.store.list_cases(user=user, limit=limit)]


def compare_compute(ctx: Services, case_id, mode: str, methods, class_codes, user: str) -> dict:
    """Heat maps for one case: several methods (for the top class) or several classes (for
    one method, the first ticked, Grad-CAM by default). Returns the session's compare state:
    {"case_id", "items": [(caption, heat)]}; re-blending at another opacity needs no model."""
    if not case_id:
        raise UserError("pick a case from the list, or upload a new image, first.")
    try:   # any case the user owns (the list is filled by the tab; API callers send the id)
        case_id = int(case_id)
    except (TypeError, ValueError):
        raise UserError(f"{str(case_id)[:40]!r} is not a case number; pick a case from the list.") from None
    case = ctx.store.get_case(case_id, user=user)
    if case is None:
        raise UserError(f"case #{case_id} no longer exists; pick another one.")
    if case.held_back:
        raise UserError(f"case #{case.id} is {case.status}: its maps would explain a diagnosis that means "
                        "nothing. If it really is one skin lesion, open it in the chat (History tab) and type "
                        "`analyse anyway` first.")
    p = ctx.predictor
    image = case.load_image()
    prepared = p.prepare([image])[0]
    shown = display_image(image)
    top = p.classes.index(case.top_class)
    methods = [m for m in (methods or []) if m in METHOD_LABELS] or [p.default_method]
    items = []
    if mode == "classes":
        codes = [c for c in (class_codes or []) if c in p.classes] or [case.top_class]
        for code in codes:
            ci = p.classes.index(code)
            heat = heat_on_display(p, explain(ctx, prepared, methods[0], ci), image, shown)
            items.append((f"{METHOD_LABELS[methods[0]]} · {p.class_names[ci]} "
                          f"({case.predictions.get(code, 0):.0%})", heat))
    else:
        for m in methods:
            heat = heat_on_display(p, explain(ctx, prepared, m, top), image, shown)
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
        over = blend(raw, heat, alpha)
        gallery.append((over, caption))
        files.append(write_png(ctx, over, f"case{case.id}-{caption.split(' · ')[0]}-"
                                         f"{caption.split(' · ')[1].split(' (')[0]}", case.id))
    panel = render.side_by_side([raw] + [g[0] for g in gallery],
                                ["original"] + [g[1] for g in gallery])
    files.insert(0, write_png(ctx, panel, f"case{case.id}-side-by-side", case.id))
    captions = [c for c, _ in compare["items"]]
    idx = captions.index(pick) if pick in captions else 0
    return gallery, (raw, gallery[idx][0]), files
