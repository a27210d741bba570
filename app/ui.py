"""Gradio Blocks for LesionLens: layout and event wiring only; the logic is in the handler
modules (`analysis`, `chat`, `compare`, `history`, `model_card`).

    demo = build_demo(Predictor.load("checkpoints/default"), CaseStore("history/cases.db"))
    demo.launch(**launch_kwargs())

Tabs: Chat (main screen), Compare, History, Model. The only globals are read-only (the
predictor, the store handle); per-user things live in gr.State or the database, scoped to
`request.username` when auth is on. New images (chat and /classify) are analysed by the services'
model queue, which batches the requests that arrive together into one forward pass: up to 8
of those events run at once, so that their decoding, drawing and saving overlap the model. The Compare tab's explanations share another group and run one at a time.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import gradio as gr
import pandas as pd
from starlette.middleware import Middleware

from model.errors import UserError

from . import chat, compare
from . import history as hist   # `history` is the chat's message list below
from .analysis import admit, classify_api, classify_path
from .auth import Authenticator, ClientAddressMiddleware
from .http_guard import HttpGuard
from .commands import METHOD_LABELS
from .model_card import model_card_markdown
from .services import DEFAULT_ALPHA, HEATMAP_LEGEND, SAMPLES, Services, remove_on_exit, user_of

log = logging.getLogger("lesionlens")

MODEL = dict(concurrency_id="model", concurrency_limit=1)   # one model call at a time on the CPU
# New images: the model queue serialises the model; 8 events at once overlap its decoding, drawing, saving.
ANALYSE = dict(concurrency_id="analyse", concurrency_limit=8)
LIGHT = dict(concurrency_limit=None)                        # store-only: never wait for the model

# After a reply, show its start (the verdict, the table), not its end: the chatbot autoscrolls
# to the bottom (heat map, caveat) 300 ms after each update, so wait that out first. Then the
# page shows the whole chat pane (on a phone it starts below the fold).
SHOW_REPLY_JS = """async () => {
  await new Promise(done => setTimeout(done, 500));
  const pane = document.querySelector('#chatbot [role=log]');
  const texts = [...document.querySelectorAll('#chatbot [data-testid=bot]')]
    .filter(m => !m.querySelector('img'));
  const last = texts[texts.length - 1];
  if (!pane || !last) return;
  pane.scrollTop += last.getBoundingClientRect().top - pane.getBoundingClientRect().top - 8;
  document.querySelector('#chatbot').scrollIntoView({block: 'nearest'});
}"""

CSS = """
.ll-banner {border-left: 4px solid #d97706; padding: 6px 12px; background: rgba(217,119,6,.08);}
/* Chat: the chatbot's label sits above the messages instead of floating over the first lines. */
#chatbot label[data-testid="block-label"] {position: static; margin: 0 0 4px 0;}
/* Chat on a phone: a reply uses the pane's width and smaller type, so that its verdict (title,
   table, malignant share, threshold) fits in the pane at once, not a word or two a line. */
@media (max-width: 640px) {
  #chatbot .message-row.bot-row {max-width: 100%; margin: 12px 0 6px;}
  #chatbot .bot.message {padding: 4px 8px;}
  #chatbot [data-testid=bot] :is(p, li, td, th) {font-size: 14px; line-height: 1.4;}
  #chatbot [data-testid=bot] :is(td, th) {padding: 4px 6px;}
  #chatbot [data-testid=bot] th {word-break: normal; overflow-wrap: normal;}
}
/* History: date pickers fit their column (the calendar button was pushed out and clipped), and
   neither they nor the class dropdown are cut off by their containers. */
.ll-filters, .ll-filters > .form, .ll-date, .ll-filters .block {overflow: visible !important;}
/* Compare: the case label is long; show it whole where there is room, smaller on a phone. */
@media (max-width: 640px) {
  #case-dd input {font-size: 13px;}
  #compare-gallery .grid-container {grid-template-columns: repeat(2, minmax(0, 1fr)) !important;}
}
/* Compare: every overlay and its whole caption in view. The gallery grows with its rows (Gradio
   caps it at 55 % of the window and scrolls inside), and a caption wraps below its picture
   instead of lying over it, cut off at 80 % of its width. */
#compare-gallery .grid-wrap {max-height: none; min-height: 0;}
#compare-gallery .grid-container {grid-auto-rows: auto;}   /* a row as tall as its own captions */
#compare-gallery .thumbnail-item {aspect-ratio: auto; display: flex; flex-direction: column;}
#compare-gallery .thumbnail-item img {flex: none; height: auto;}
#compare-gallery .caption-label {position: static; max-width: none; height: auto;
  white-space: normal; overflow: visible; text-overflow: clip; text-align: center;}
/* Model card: wide tables scroll sideways instead of squeezing a column to one letter a line. */
.ll-model table {display: block; overflow-x: auto; max-width: 100%; width: max-content;
  border: none; padding: 0;}   /* as a block, the table's own frame would box the cells twice */
.ll-model th, .ll-model td {min-width: 5.5em; word-break: normal; overflow-wrap: normal;}
.ll-model code {overflow-wrap: anywhere;}   /* a data path has no space to wrap at */
/* Per-class counts: a few lines, not ten, where a table scrolls anyway; on a wide screen the
   benchmark and audit tables (9 and 12 columns) fit with no floor of their own. */
@media (max-width: 1024px) {.ll-model td:nth-child(n+5) {min-width: 12em;}}
/* The arrow sits over the input's right end: keep a cut-off label's ellipsis clear of it. */
#case-dd input {text-overflow: ellipsis; padding-right: 24px; box-sizing: border-box;}
/* History table: Gradio turns column_widths (percentages of the table) into pixels and copies
   them onto the header cell, a hidden sizing cell and each body cell. The same floor on all
   three keeps header and body aligned; on a phone the floors win and the table scrolls sideways
   instead of wrapping a date one digit a line. Floors fit each header word (8.4 px a character
   of the 14 px mono font, plus 16 px padding); at 1280 px every percentage is above its floor. */
#history-table :is(th, td, [role=gridcell]):nth-child(1) {min-width: 56px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(2) {min-width: 104px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(3) {min-width: 150px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(4) {min-width: 170px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(5) {min-width: 144px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(6) {min-width: 112px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(7) {min-width: 96px !important;}
#history-table :is(th, td, [role=gridcell]):nth-child(8) {min-width: 80px !important;}
/* A phone shows case, date and prediction first: file and note are hidden there (the selected
   case's details below the table show both, in full), in the header and body alike. */
@media (max-width: 640px) {
  #history-table :is(th, td, [role=gridcell]):is(:nth-child(3), :nth-child(4)) {display: none;}
}
/* The case number stays in view when the table scrolls sideways (Gradio 6.31 takes
   pinned_columns but does not pin). */
#history-table :is(th, [role=gridcell]):nth-child(1) {position: sticky; left: 0; z-index: 3;
  border-right: 1px solid var(--border-color-primary);}
#history-table [role=gridcell]:nth-child(1) {background: inherit;}
"""

INTRO = ("# LesionLens\n"
         "Drop a dermoscopy image of one skin lesion: the model ranks seven diagnoses and shows "
         "where it looked. Images and results stay on this machine.")
BANNER = ("**Research tool, not a medical device.** It supports, and never replaces, a clinician. "
          "Trained on public dermoscopy sets under non-commercial licences (see the Model tab): "
          "non-commercial use only.")
PLACEHOLDER = ("**Drop one or more lesion images** below (optionally with a note such as "
               "*“54 y, left shoulder, growing”*).\n\nThen ask `show integrated gradients`, "
               "`explain melanoma`, `why not nevus?` or `help`.")


# The note each bundled sample comes with (its metadata; see data/samples/ATTRIBUTION.md).
SAMPLE_NOTES = {"akiec": "65 y, back", "bcc_ISIC_0024331": "65 y, lower leg", "bkl": "75 y, lower leg",
                "df": "60 y, lower leg", "mel_ISIC_0024310": "60 y, chest", "nv_ISIC_0024340": "10 y, foot",
                "vasc": "25 y, abdomen", "nv_ISIC_0053493": "40 y, trunk", "mel_ISIC_0053541": "85 y, lower leg",
                "bcc_ISIC_0053549": "85 y, trunk"}


def _samples() -> list:
    """The bundled held-out images (HAM10000, BCN_20000, ISIC 2017) as chat examples."""
    out = []
    for p in sorted(SAMPLES.glob("*.jpg")):
        note = SAMPLE_NOTES.get(p.stem) or SAMPLE_NOTES.get(p.stem.split("_")[0], "")
        out.append([{"text": note, "files": [str(p)]}])
    return out


def _user_error(fn):
    """Turn UserError into a Gradio error toast with the human message. Anything else is a bug
    or a server problem: logged in full, and the toast says so without the raw text (with
    show_error on, Gradio would send `str(exception)`, paths included, to the browser)."""
    @functools.wraps(fn)   # keeps the signature: Gradio injects gr.Request by annotation
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise gr.Error("Something went wrong (an internal error, logged on the server). "
                           "Please try again.", print_exception=False) from None
    return wrapped


def build_demo(predictor, store, tmp_dir: Path | None = None) -> gr.Blocks:
    """`tmp_dir`: this app's private temp folder (default: a new one); removed at exit."""
    folders = dict(gradio_dir=Path(gr.utils.get_upload_folder()),
                   public_names=frozenset(p.name for p in SAMPLES.glob("*")))
    ctx = (Services(predictor, store, **folders) if tmp_dir is None
           else Services(predictor, store, tmp_dir, **folders))
    remove_on_exit(ctx.tmp_dir)
    names = dict(zip(predictor.classes, predictor.class_names))
    # Compare ticks the checkpoint's method and one other CAM, so the first run takes seconds on
    # a CPU; all seven took 40 s (the gradient and occlusion methods are a tick away).
    first_methods = [predictor.default_method] + [
        m for m in ("gradcam", "layercam") if m != predictor.default_method][:1]

    # ---------------------------------------------------------------- handlers (thin wrappers)
    def chat_add(message, history):
        history, pending = chat.chat_add(message, history)
        return history, pending, gr.MultimodalTextbox(value=None, interactive=False)

    def chat_respond(pending, history, state, request: gr.Request):
        yield from chat.chat_respond(ctx, pending, history, state, user_of(request))

    def unlock():
        return gr.MultimodalTextbox(interactive=True)

    @_user_error
    def classify(path, request: gr.Request):
        return classify_api(ctx, path, user_of(request))

    def refresh_case_list(current, chat_state, request: gr.Request):
        choices = compare.case_choices(ctx, user_of(request))
        ids = [v for _, v in choices]
        want = current if current in ids else (chat_state or {}).get("case_id")
        value = want if want in ids else (ids[0] if ids else None)
        return gr.Dropdown(choices=choices, value=value)

    @_user_error
    def compare_upload(path, request: gr.Request):
        if not path:
            return gr.Dropdown()
        user = user_of(request)
        admit(ctx, user, "uploaded in Compare")
        case, _, _ = classify_path(ctx, path, user=user, note="uploaded in Compare")
        return gr.Dropdown(choices=compare.case_choices(ctx, user), value=case.id)

    @_user_error
    def compare_run(case_id, mode, methods, classes, alpha, request: gr.Request):
        user = user_of(request)
        state = compare.compare_compute(ctx, case_id, mode, methods, classes, user)
        gallery, slider, files = compare.compare_render(ctx, state, alpha, None, user)
        captions = [c for c, _ in state["items"]]
        return (state, gallery, slider, files,
                gr.Dropdown(choices=captions, value=captions[0] if captions else None))

    @_user_error
    def compare_api(case_id, mode, methods, classes, alpha, request: gr.Request):
        state, gallery, slider, files, _ = compare_run(case_id, mode, methods, classes, alpha, request)
        return gallery, slider, files, (state["items"][0][0] if gallery else None)

    @_user_error
    def compare_reblend(state, alpha, pick, request: gr.Request):
        return compare.compare_render(ctx, state, alpha, pick, user_of(request))

    @_user_error
    def history_search(query, cls, date_from, date_to, request: gr.Request):
        cases = hist.history_cases(ctx, user_of(request), query, cls, date_from, date_to)
        table = pd.DataFrame(hist.history_table(ctx, cases), columns=hist.HISTORY_COLUMNS)
        return table, f"{len(cases)} case{'s' if len(cases) != 1 else ''}"

    @_user_error
    def history_select(evt: gr.SelectData, request: gr.Request):
        row = evt.row_value or []
        case_id = int(row[0]) if row and str(row[0]).isdigit() else None
        thumb, md = hist.case_details(ctx, case_id, user_of(request))
        return case_id, thumb, md, gr.Row(visible=False)

    def ask_delete(case_id):
        if not case_id:
            raise gr.Error("Select a case in the table first.", print_exception=False)
        return gr.Row(visible=True), f"Delete case #{case_id} and its image? This cannot be undone."

    @_user_error
    def do_delete(case_id, request: gr.Request):
        ok = hist.delete_case(ctx, case_id, user_of(request))
        gr.Info(f"Case #{case_id} deleted." if ok else f"Case #{case_id} was already gone.")
        return None, None, "Select a row to see the case.", gr.Row(visible=False)

    @_user_error
    def open_in_chat(case_id, history, request: gr.Request):
        if not case_id:
            raise gr.Error("Select a case in the table first.", print_exception=False)
        history, state = chat.open_case_in_chat(ctx, case_id, history, user_of(request))
        return history, state, gr.Tabs(selected="chat")

    def open_in_compare(case_id, request: gr.Request):
        if not case_id:
            raise gr.Error("Select a case in the table first.", print_exception=False)
        choices = compare.case_choices(ctx, user_of(request))
        return gr.Dropdown(choices=choices, value=int(case_id)), gr.Tabs(selected="compare")

    @_user_error
    def export(kind, query, cls, date_from, date_to, request: gr.Request):
        cases = hist.history_cases(ctx, user_of(request), query, cls, date_from, date_to)
        return gr.File(value=hist.export_history(ctx, kind, cases), visible=True)

    def export_csv_fn(query, cls, date_from, date_to, request: gr.Request):
        return export("csv", query, cls, date_from, date_to, request)

    def export_zip_fn(query, cls, date_from, date_to, request: gr.Request):
        return export("zip", query, cls, date_from, date_to, request)

    # ---------------------------------------------------------------- layout
    # Gradio's copies of uploads and outputs: swept hourly, kept 6 h (cases live in the store).
    with gr.Blocks(title="LesionLens", analytics_enabled=False,
                   delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(BANNER, elem_classes=["ll-banner"])
        chat_state = gr.State({})       # {"case_id": current case}
        pending = gr.State({})          # the message being answered
        compare_state = gr.State({})    # heat maps of the compared case (re-blended on the slider)
        selected = gr.State(None)       # case id picked in the History table

        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(label="Conversation", height=560, placeholder=PLACEHOLDER,
                                     feedback_options=None, buttons=["copy"],
                                     elem_id="chatbot")
                chat_input = gr.MultimodalTextbox(
                    file_count="multiple", file_types=["image"], sources=["upload"],
                    placeholder="Drop lesion images here, add a note… or type help",
                    label="Message", show_label=False, elem_id="chat-input",
                    max_plain_text_length=2000)
                # A card shows its note (age, site; ISIC 2017 has none), not its diagnosis: that
                # would be sent as the note. The reply names it.
                samples = gr.Examples(_samples(), inputs=[chat_input], cache_examples=False, examples_per_page=8,
                                      label="Held-out samples (HAM10000, BCN_20000, ISIC 2017): "
                                            "the reply names each one's known diagnosis")
                clear = gr.Button("New conversation", size="sm", variant="secondary")

            with gr.Tab("Compare", id="compare") as compare_tab:
                # The case label ("#12 · date · class · file name") is long: a full-width
                # row, so it is not cut off in a narrow side column.
                with gr.Row(equal_height=True):
                    # Filled when the tab opens; any id is accepted (an API caller's own
                    # case): compare_compute checks it against the user's cases.
                    case_dd = gr.Dropdown(label="Case", choices=[], interactive=True,
                                          allow_custom_value=True, scale=3, min_width=300,
                                          elem_id="case-dd")
                    # gr.File, not gr.Image: our loader reads the original bytes and
                    # explains what is wrong with a bad file; gr.Image would re-encode it.
                    upload = gr.File(label="…or upload a new image", file_types=["image"],
                                     type="filepath", height=120, scale=1, min_width=200)
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        mode = gr.Radio([("Several methods", "methods"),
                                         ("Several classes", "classes")], value="methods",
                                        label="Compare")
                        methods = gr.CheckboxGroup([(v, k) for k, v in METHOD_LABELS.items()],
                                                   value=first_methods, label="Methods")
                        classes = gr.CheckboxGroup(
                            [(n, c) for c, n in names.items()], label="Classes",
                            info="For “several classes”: heat map of the first ticked method "
                                 "for each class (default: the predicted class).")
                        alpha = gr.Slider(0.0, 1.0, value=DEFAULT_ALPHA, step=0.05,
                                          label="Overlay opacity (all panels)")
                        run = gr.Button("Compare", variant="primary")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(label="Overlays", columns=3, height="auto",
                                             object_fit="contain", elem_id="compare-gallery")
                        gr.Markdown(HEATMAP_LEGEND)
                        pick = gr.Dropdown(label="Before / after: which overlay", choices=[])
                        slider = gr.ImageSlider(label="Raw image ↔ overlay", type="numpy",
                                                interactive=False, height=420)
                        downloads = gr.File(label="Download (side-by-side panel + each overlay)",
                                            file_count="multiple", interactive=False)

            with gr.Tab("History", id="history") as history_tab:
                with gr.Row(elem_classes=["ll-filters"]):
                    query = gr.Textbox(label="Search note or file name", scale=2, min_width=280,
                                       placeholder="e.g. shoulder, or part of a file name")
                    cls = gr.Dropdown([("All classes", "")] + [(n, c) for c, n in names.items()],
                                      value="", label="Predicted class", scale=1)
                    # Text, not gr.DateTime: its picker drops a date it cannot read without a word,
                    # where `history._day` says what it wants; Enter or leaving the box searches.
                    date_from = gr.Textbox(label="From (UTC)", placeholder="YYYY-MM-DD",
                                           scale=1, min_width=200, elem_classes=["ll-date"])
                    date_to = gr.Textbox(label="To (UTC)", placeholder="YYYY-MM-DD",
                                         scale=1, min_width=200, elem_classes=["ll-date"])
                with gr.Row():
                    count = gr.Markdown(label="Number of cases")
                    search = gr.Button("Search", size="sm", scale=0, min_width=120)
                table = gr.Dataframe(headers=hist.HISTORY_COLUMNS, interactive=False, wrap=True,
                                     max_height=420, elem_id="history-table", label="Cases",
                                     show_label=False,
                                     # prediction wraps; probability, malignant and flag stay on
                                     # screen at 1280 px (a phone scrolls the table sideways)
                                     column_widths=["5%", "13%", "17%", "19%", "17%", "10%",
                                                    "9%", "10%"])
                with gr.Row():
                    with gr.Column(scale=1, min_width=180):
                        thumb = gr.Image(label="Selected case", height=160, interactive=False)
                    with gr.Column(scale=3):
                        details = gr.Markdown("Select a row to see the case.")
                        with gr.Row():
                            to_chat = gr.Button("Open in chat", size="sm")
                            to_compare = gr.Button("Open in compare", size="sm")
                            delete = gr.Button("Delete case", size="sm", variant="stop")
                        with gr.Row(visible=False) as confirm_row:
                            confirm_text = gr.Markdown()
                            confirm = gr.Button("Yes, delete", size="sm", variant="stop")
                            cancel = gr.Button("Cancel", size="sm")
                with gr.Row():
                    export_csv = gr.Button("Export CSV", size="sm")
                    export_zip = gr.Button("Export ZIP (CSV + images)", size="sm")
                export_file = gr.File(label="Export", interactive=False, visible=False)

            with gr.Tab("Model", id="model"):
                gr.Markdown(model_card_markdown(predictor), elem_classes=["ll-model"])

        # Programmatic endpoints (gradio_client): invisible, callable as api_name="classify" and
        # "compare". /classify gives {class name: probability}, the overlay png, and the case
        # summary (analysis.classify_api); its case id goes on to /compare as text. The Compare
        # tab's own inputs would not do: its case list is filled when the tab opens (empty for
        # the API, which then lists no valid id), and it returns a dropdown update, not a value.
        with gr.Row(visible=False):
            api_file = gr.File(type="filepath", label="image")
            api_probs = gr.JSON(label="class probabilities")
            api_overlay = gr.Image(type="filepath", label="saliency overlay for the top class")
            api_summary = gr.JSON(label="case summary")
            api_go = gr.Button()
            api_case = gr.Textbox(label="case id (the case summary's case_id from /classify)")
            api_shown = gr.Textbox(label="caption of the before / after overlay")
            api_compare = gr.Button()

        # ---------------------------------------------------------------- wiring
        (chat_input.submit(chat_add, [chat_input, chatbot], [chatbot, pending, chat_input],
                           api_name="chat_add", **LIGHT)
         .then(chat_respond, [pending, chatbot, chat_state], [chatbot, chat_state],
               api_name="chat_respond", **ANALYSE)
         .then(unlock, None, chat_input, api_visibility="private", **LIGHT)
         .then(None, js=SHOW_REPLY_JS))
        # A sample card sends itself: once it has filled the input, the same chain as pressing Enter.
        (samples.load_input_event
         .then(chat_add, [chat_input, chatbot], [chatbot, pending, chat_input], api_visibility="private", **LIGHT)
         .then(chat_respond, [pending, chatbot, chat_state], [chatbot, chat_state], api_visibility="private",
               **ANALYSE)
         .then(unlock, None, chat_input, api_visibility="private", **LIGHT)
         .then(None, js=SHOW_REPLY_JS))
        clear.click(lambda: ([], {}), None, [chatbot, chat_state], api_visibility="private",
                    **LIGHT)

        api_go.click(classify, api_file, [api_probs, api_overlay, api_summary], api_name="classify",
                     **ANALYSE)
        api_compare.click(compare_api, [api_case, mode, methods, classes, alpha],
                          [gallery, slider, downloads, api_shown], api_name="compare", **MODEL)

        compare_tab.select(refresh_case_list, [case_dd, chat_state], case_dd,
                           api_visibility="private", **LIGHT)
        upload.upload(compare_upload, upload, case_dd, api_visibility="private", **MODEL) \
            .success(compare_run, [case_dd, mode, methods, classes, alpha],
                     [compare_state, gallery, slider, downloads, pick],
                     api_visibility="private", **MODEL)
        (run.click(lambda: gr.Button(interactive=False), None, run, api_visibility="private",
                   **LIGHT)
         .then(compare_run, [case_dd, mode, methods, classes, alpha],
               [compare_state, gallery, slider, downloads, pick], api_visibility="private", **MODEL)
         .then(lambda: gr.Button(interactive=True), None, run, api_visibility="private",
               **LIGHT))
        alpha.release(compare_reblend, [compare_state, alpha, pick], [gallery, slider, downloads],
                      api_visibility="private", **LIGHT)
        pick.input(compare_reblend, [compare_state, alpha, pick], [gallery, slider, downloads],
                   api_visibility="private", **LIGHT)

        filters = [query, cls, date_from, date_to]
        history_tab.select(history_search, filters, [table, count], api_visibility="private",
                           **LIGHT)
        gr.on([query.submit, search.click, cls.change, date_from.submit, date_from.blur, date_to.submit,
               date_to.blur],
              history_search,
              filters, [table, count], api_name="history", **LIGHT)
        table.select(history_select, None, [selected, thumb, details, confirm_row],
                     api_visibility="private", **LIGHT)
        delete.click(ask_delete, selected, [confirm_row, confirm_text], api_visibility="private",
                     **LIGHT)
        cancel.click(lambda: gr.Row(visible=False), None, confirm_row, api_visibility="private",
                     **LIGHT)
        confirm.click(do_delete, selected, [selected, thumb, details, confirm_row],
                      api_visibility="private", **LIGHT) \
            .then(history_search, filters, [table, count], api_visibility="private", **LIGHT)
        to_chat.click(open_in_chat, [selected, chatbot], [chatbot, chat_state, tabs],
                      api_visibility="private", **MODEL)
        (to_compare.click(open_in_compare, selected, [case_dd, tabs], api_visibility="private",
                          **LIGHT)
         .success(compare_run, [case_dd, mode, methods, classes, alpha],
                  [compare_state, gallery, slider, downloads, pick], api_visibility="private",
                  **MODEL))
        export_csv.click(export_csv_fn, filters, export_file, api_visibility="private", **LIGHT)
        export_zip.click(export_zip_fn, filters, export_file, api_visibility="private", **LIGHT)
    return demo


def launch_kwargs(auth=None, frame_ancestors: str = "'none'") -> dict:
    """launch() arguments shared by `python -m app`, the tests and a Space entry point.

    `auth`: an `auth.Authenticator`, or `(user, password)` pairs; either way logins are
    checked in constant time and throttled (HTTP 429 after repeated failures).
    `frame_ancestors`: who may show the app in a frame (CSP source list; `http_guard`)."""
    if auth and not isinstance(auth, Authenticator):
        auth = Authenticator.from_sources(pairs=auth)
    # the login throttle counts failures per client address too
    middleware = [Middleware(HttpGuard, frame_ancestors=frame_ancestors)] + (
        [Middleware(ClientAddressMiddleware)] if auth else [])
    return dict(auth=auth.check if auth else None, theme=gr.themes.Soft(), css=CSS, max_file_size="25mb",
                allowed_paths=[str(SAMPLES)],   # the bundled examples, wherever the app runs
                footer_links=["api"], show_error=True, app_kwargs={"middleware": middleware},
                auth_message="LesionLens: sign in to see your own cases." if auth else None)
