"""The History tab: search the stored cases, show one, export them (CSV or ZIP).

    rows = history_table(ctx, history_cases(ctx, user="", query="shoulder"))
    path = export_history(ctx, "zip", history_cases(ctx, user=""))
"""
from __future__ import annotations

import time
import uuid

from PIL import Image

from model.errors import UserError

from .services import Services, md_escape, remove_case_files

HISTORY_COLUMNS = ["case", "date (UTC)", "file", "note", "prediction", "probability",
                   "malignant", "flag"]


def _day(value) -> str | None:
    """'' / None (no limit), 'YYYY-MM-DD' (a full timestamp is cut to its day), 'today', 'yesterday' (UTC),
    or epoch seconds (an API caller); anything else is refused, saying what to type."""
    if value is None or not str(value).strip():
        return None
    if isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d", time.gmtime(value))
    words = {"today": 0, "yesterday": 1}
    text = str(value).strip().lower()
    if text in words:
        return time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400 * words[text]))
    try:
        time.strptime(text[:10], "%Y-%m-%d")
    except ValueError:
        raise UserError(f"“{str(value)[:40]}” is not a date the history can search by; type it as YYYY-MM-DD "
                        "(e.g. 2026-12-31), or today or yesterday.") from None
    return text[:10]


MAX_QUERY_CHARS = 200   # a search term, not a document


def history_cases(ctx: Services, user: str, query: str = "", top_class: str | None = None,
                  date_from=None, date_to=None):
    if len(query or "") > MAX_QUERY_CHARS:
        raise UserError(f"the search text has {len(query):,} characters; search for a word or part of a file "
                        f"name (at most {MAX_QUERY_CHARS} characters).")
    return ctx.store.list_cases(user=user, query=query or "", top_class=top_class or None,
                                date_from=_day(date_from), date_to=_day(date_to))


# Table cells show a short form (a note of a few hundred characters made every row a column of
# text); the selected case's details and the exports keep the full values.
NOTE_CHARS = 40       # two lines in the note column at 1280 px
FILE_CHARS = 28       # an ISIC or camera file name keeps its start and its number + extension


def shorten(text: str, limit: int, keep_end: int = 0) -> str:
    """`text` cut to about `limit` characters with an ellipsis: at a word boundary, or in the
    middle when `keep_end` characters of the end matter (a file name's number and extension)."""
    text = " ".join((text or "").split())
    if len(text) <= limit:
        return text
    if keep_end:
        return text[:limit - keep_end - 1] + "…" + text[-keep_end:]
    head = text[:limit - 1]
    cut = head.rfind(" ")
    return (head[:cut] if cut > limit // 2 else head).rstrip(" ,;.") + "…"


def history_table(ctx: Services, cases) -> list[list]:
    names = dict(zip(ctx.predictor.classes, ctx.predictor.class_names))
    rows = []
    for c in cases:
        when, file, note = c.created[:16].replace("T", " "), shorten(c.filename, FILE_CHARS, keep_end=12), \
            shorten(c.note, NOTE_CHARS)   # the date to the minute: fits 2 lines
        if c.held_back:   # no probabilities in any view until its owner asks for them
            rows.append([c.id, when, file, note, "held back", "", "", c.status])
            continue
        rows.append([c.id, when, file, note, names.get(c.top_class, c.top_class),
                     f"{c.predictions.get(c.top_class, 0):.0%}", f"{c.malignant_probability:.0%}",
                     c.status if c.unusual else ""])
    return rows


def case_details(ctx: Services, case_id, user: str):
    """(thumbnail image or None, markdown) for the History tab's selected row."""
    case = ctx.store.get_case(int(case_id), user=user) if case_id else None
    if case is None:
        return None, "Select a row to see the case."
    names = dict(zip(ctx.predictor.classes, ctx.predictor.class_names))
    ranked = sorted(case.predictions.items(), key=lambda kv: -kv[1])[:3]
    top3 = ", ".join(f"{names.get(k, k)} {v:.0%}" for k, v in ranked)
    result = (f"⚠️ {case.status.capitalize()}. Open it in the chat and type `analyse anyway` to see the result."
              if case.held_back else f"Top 3: {top3} · malignant {case.malignant_probability:.0%}"
              + (f"\n\n⚠️ {case.status.capitalize()}." if case.unusual else ""))
    md = (f"**Case #{case.id}** · {case.created[:19].replace('T', ' ')} UTC\n\n"
          f"File: {md_escape(case.filename) or '–'} · Note: {md_escape(case.note) or '–'}\n\n"
          f"{result}\n\nCheckpoint: `{case.checkpoint_id}`")
    with Image.open(case.thumb_path) as thumb:   # pixels, not a path: the store may live
        return thumb.convert("RGB"), md          # outside the folders Gradio may serve


def delete_case(ctx: Services, case_id, user: str) -> bool:
    """Delete one of `user`'s cases: the row and stored image, then every picture of it this
    app showed and Gradio's copies (which would otherwise stay fetchable by URL for hours)."""
    if not case_id or not ctx.store.delete_case(int(case_id), user=user):
        return False
    remove_case_files(ctx, int(case_id))
    return True


def export_history(ctx: Services, kind: str, cases) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = ctx.tmp_dir / "exports" / uuid.uuid4().hex[:8]
    classes = list(ctx.predictor.classes)
    if kind == "zip":
        return str(ctx.store.export_zip(out / f"lesionlens-cases-{stamp}.zip", cases, classes))
    return str(ctx.store.export_csv(out / f"lesionlens-cases-{stamp}.csv", cases, classes))
