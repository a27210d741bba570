"""The app in a real browser: Playwright driving the system's headless Chromium.

    .venv/bin/python -m pytest tests/test_browser.py -q      # screenshots land in screenshots/

Uploads a sample in the Chat tab and waits for the reply with its overlay image, runs a
comparison in the Compare tab (every overlay and caption shown whole), finds the case in the
History tab (its columns lined up and readable at 1280 px and on a 400 px phone), and reads the
model card (no table wider than the window); then clicks a sample card and sends it (the reply
names the sample's known diagnosis), drops a picture that is not a lesion (the reply leads with
that and holds the diagnosis back), and checks that a fresh reply's verdict is on screen at
1400x1000 and on a 400x800 phone.
Skips (with the reason) when Playwright or /usr/bin/chromium is missing; never downloads a
browser. The page must not request anything outside the machine.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_app import SAMPLE, AppProcess, _gate_between, make_tiny_checkpoint

pytestmark = pytest.mark.slow   # launches apps, trains or loads real models: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright (python) is not installed in this venv")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package",
                allow_module_level=True)


def _flat_image(path: Path) -> Path:
    from PIL import Image
    Image.new("RGB", (320, 240), (110, 160, 230)).save(path)   # flat blue: no lesion at all
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from model import checkpoint
    from model.predictor import Predictor

    root = tmp_path_factory.mktemp("browser")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    # An unusual-image gate (as calibration writes it) centred on the sample's features, its
    # threshold halfway to a flat picture's: the sample is a lesion, the flat picture is not.
    p = Predictor.load(ckpt)
    checkpoint.update_metadata(ckpt, {**p.metadata,
                                      "ood": _gate_between(p, SAMPLE, _flat_image(root / "f.png"))})
    proc = AppProcess(ckpt, root / "history" / "cases.db").wait_ready()
    assert "no unusual-image reference" not in proc.log()   # the gate above has one
    yield proc
    proc.stop()


@pytest.mark.slow
def test_chat_compare_history_model_in_chromium(app):
    SHOTS.mkdir(exist_ok=True)
    outside = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
            page.set_default_timeout(90_000)
            page.goto(app.url)

            # Chat: drop an image with a note, press Enter, wait for the reply and its overlay.
            _send(page, SAMPLE, "75 y, lower leg")
            bot = page.locator("#chatbot [data-testid='bot']")
            bot.filter(has_text="Malignant vs benign").first.wait_for()
            page.locator("#chatbot [data-testid='bot'] img[src*='gradcam-']").first.wait_for()
            assert "not a medical device" in page.locator("#chatbot").inner_text().lower()
            sync_api.expect(page.locator("#chat-input textarea")).to_be_enabled()  # unlocked
            page.wait_for_timeout(500)
            page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)

            # Compare: the current case is preselected; run the default methods (two quick CAMs).
            page.get_by_role("tab", name="Compare").click()
            page.get_by_role("button", name="Compare", exact=True).click()
            page.locator("#compare-gallery img").nth(1).wait_for()
            sync_api.expect(page.get_by_role("button", name="Compare", exact=True)).to_be_enabled()
            page.wait_for_timeout(500)
            page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)
            _check_gallery_shows_all(page, 2)

            # History: the case is listed with its note.
            page.get_by_role("tab", name="History").click()
            sync_api.expect(page.locator("#history-table")).to_contain_text("75 y, lower leg",
                                                                          timeout=30_000)
            date_from = page.locator(".ll-date input, .ll-date textarea").first   # a date it cannot read
            date_from.fill("31/12/2025")
            date_from.press("Enter")
            sync_api.expect(page.get_by_text("is not a date the history can search by")).to_be_visible()
            date_from.fill("yesterday")
            date_from.press("Enter")
            sync_api.expect(page.locator("#history-table")).to_contain_text("75 y, lower leg")
            page.get_by_role("button", name="Export ZIP (CSV + images)").click()
            sync_api.expect(page.get_by_text(".zip").first).to_be_visible()
            page.screenshot(path=str(SHOTS / "history.png"), full_page=True)
            _check_history_columns(page, 1280, want={"case", "date (UTC)", "file", "note",
                                                     "prediction", "probability", "malignant",
                                                     "flag"}, scrolls=False)
            page.set_viewport_size({"width": 400, "height": 1000})   # a phone
            _check_history_columns(page, 400, want={"case", "date (UTC)", "prediction",
                                                    "probability", "malignant", "flag"},
                                   scrolls=True)
            page.screenshot(path=str(SHOTS / "history-phone.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 1000})

            # Delete it: select the row, confirm; the table empties.
            page.locator("#history-table [role=gridcell]").filter(has_text="75 y, lower leg") \
                .first.click()
            sync_api.expect(page.get_by_text("Case #1 · 20")).to_be_visible()
            page.get_by_role("button", name="Delete case").click()
            page.get_by_role("button", name="Yes, delete").click()
            sync_api.expect(page.get_by_text("0 cases")).to_be_visible()

            page.get_by_role("tab", name="Model").click()
            sync_api.expect(page.get_by_text("Model card")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(SHOTS / "model.png"), full_page=True)
            for width in (1400, 1280, 400):   # wide tables fit, or scroll in their own box
                page.set_viewport_size({"width": width, "height": 1000})
                page.wait_for_timeout(300)
                got = page.evaluate(_MODEL_WIDTH_JS)
                assert got["page"] <= got["window"] and got["widest"] <= got["window"], (width, got)
        finally:
            browser.close()
    assert outside == [], f"the page reached outside the machine: {outside}"
    assert (SHOTS / "chat.png").stat().st_size > 10_000


# Where each History column's header and first body cell are ([text, x, width]), what the
# table's scroll box shows and holds, and the page's width. Gradio draws the header as a <table>
# and the rows as absolutely placed <div>s: nothing but equal widths keeps them aligned.
_COLUMNS_JS = """() => {
  const t = document.querySelector('#history-table');
  const shown = e => getComputedStyle(e).display !== 'none';
  const box = e => { const r = e.getBoundingClientRect();
                     return [e.innerText.trim(), Math.round(r.x), Math.round(r.width)]; };
  const row = t.querySelector('.virtual-row');
  const vp = t.querySelector('.virtual-table-viewport');
  return {heads: [...t.querySelectorAll('th[role=columnheader]')].filter(shown).map(box),
          cells: row ? [...row.querySelectorAll('[role=gridcell]')].filter(shown).map(box) : [],
          view: [vp.clientWidth, vp.scrollWidth],
          page: [document.documentElement.clientWidth, document.documentElement.scrollWidth]};
}"""


def _check_history_columns(page, width: int, want: set, scrolls: bool) -> None:
    """History at `width` px: the `want` columns are shown, header over body, none squeezed to
    a letter a line; the table scrolls sideways (not the page) when it does not fit."""
    page.wait_for_timeout(800)                     # Gradio re-measures the columns on resize
    got = page.evaluate(_COLUMNS_JS)
    heads, cells = got["heads"], got["cells"]
    assert {h[0] for h in heads} == want, got
    assert len(cells) == len(heads), got
    for (name, hx, hw), (_, cx, cw) in zip(heads, cells):
        assert abs(hx - cx) <= 2 and abs(hw - cw) <= 2, f"{name!r} misaligned at {width} px: {got}"
        assert hw >= 40, f"{name!r} is {hw} px wide at {width} px: {got}"
    view, full = got["view"]
    assert (full > view) == scrolls, got
    assert full >= heads[-1][1] + heads[-1][2] - heads[0][1] - 2, got   # the last is reachable
    assert got["page"][1] <= got["page"][0], f"the page itself scrolls sideways: {got}"


# How far the page and the Model tab's tables reach to the right, against the window's width.
_MODEL_WIDTH_JS = """() => ({
  page: document.documentElement.scrollWidth, window: innerWidth,
  widest: Math.max(0, ...[...document.querySelectorAll('.ll-model table')]
                           .map(t => t.getBoundingClientRect().right))})"""


def _check_gallery_shows_all(page, n: int) -> None:
    """The Compare gallery shows its `n` overlays and every caption whole: no scroll bar of its
    own, no caption cut off."""
    got = page.evaluate("""() => {
      const wrap = document.querySelector('#compare-gallery .grid-wrap');
      const caps = [...document.querySelectorAll('#compare-gallery .caption-label')];
      return {n: document.querySelectorAll('#compare-gallery img').length,
              scroll: [wrap.scrollHeight, wrap.clientHeight],
              cut: caps.filter(c => c.scrollWidth > c.clientWidth + 1 || c.scrollHeight > c.clientHeight + 1)
                       .map(c => c.innerText)};
    }""")
    assert got["n"] == n and got["scroll"][0] <= got["scroll"][1] + 1 and got["cut"] == [], got


def _page(browser, app):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(90_000)
    page.goto(app.url)
    return page


def _send(page, image, note: str) -> None:
    """Drop `image` into the chat with `note` and press Enter, as a person would."""
    page.locator("#chat-input input[type=file]").set_input_files(str(image))
    page.locator("#chat-input textarea").fill(note)
    page.wait_for_timeout(500)
    page.locator("#chat-input textarea").press("Enter")


@pytest.mark.slow
def test_sample_card_gives_a_reply_with_the_known_diagnosis(app):
    """A sample card sends itself (image and note): one click gets the full reply, with the
    sample's true diagnosis beside the model's answer."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = _page(browser, app)
            page.locator("button.gallery-item").filter(has_text="60 y, chest").first.click()
            box = page.locator("#chat-input textarea")
            user = page.locator("#chatbot [data-testid='user']").filter(has_text="60 y, chest").first
            user.wait_for()                                    # sent without pressing Enter
            bot = page.locator("#chatbot [data-testid='bot']")
            reply = bot.filter(has_text="known diagnosis").first
            reply.wait_for()
            text = reply.inner_text()
            assert "Bundled sample with a known diagnosis: Melanoma" in text, text
            assert "Malignant vs benign" in text
            page.locator("#chatbot [data-testid='bot'] img").first.wait_for()
            sync_api.expect(box).to_be_enabled()
        finally:
            browser.close()


@pytest.mark.slow
def test_non_lesion_image_leads_with_the_warning_and_holds_the_table_back(app, tmp_path):
    flat = _flat_image(tmp_path / "holiday.png")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = _page(browser, app)
            _send(page, flat, "holiday photo")
            bot = page.locator("#chatbot [data-testid='bot']")
            bot.filter(has_text="does not look like").first.wait_for()
            sync_api.expect(page.locator("#chat-input textarea")).to_be_enabled()
            page.wait_for_timeout(500)
            texts = [t.strip() for t in bot.all_inner_texts()]
            assert len(texts) == 1, texts
            reply = texts[0]
            assert reply.startswith("⚠️ This image does not look like the dermoscopy images"), reply
            assert "not showing a diagnosis" in reply and "analyse anyway" in reply
            assert "holiday.png" in reply
            assert "Malignant vs benign" not in reply and "Melanoma" not in reply
            assert page.locator("#chatbot [data-testid='bot'] table").count() == 0
            assert page.locator("#chatbot [data-testid='bot'] img").count() == 0   # no heat map
            _held_back_in_every_tab(page, bot)
            # asked for, the table comes, still behind the warning
            page.locator("#chat-input textarea").fill("analyse anyway")
            page.locator("#chat-input textarea").press("Enter")
            bot.filter(has_text="Malignant vs benign").first.wait_for()
            shown = bot.filter(has_text="Malignant vs benign").first.inner_text().strip()
            assert shown.startswith("⚠️ This image does not look like"), shown
            sync_api.expect(page.locator("#chatbot [data-testid='bot'] table").first).to_be_visible()
            page.screenshot(path=str(SHOTS / "chat-unusual.png"), full_page=True)
        finally:
            browser.close()


def _held_back_in_every_tab(page, bot):
    """The held-back case in History (row, details), Compare's case list, and reopened in the chat: held back,
    no diagnosis anywhere."""
    page.get_by_role("tab", name="History").click()
    row = page.locator("#history-table [role=gridcell]").filter(has_text="holiday photo").first
    row.wait_for()
    sync_api.expect(page.locator("#history-table")).to_contain_text("held back: unlike a dermoscopic lesion")
    row.click()
    sync_api.expect(page.get_by_text("Open it in the chat and type").first).to_be_visible()   # the details
    page.get_by_role("tab", name="Compare").click()
    sync_api.expect(page.locator("#case-dd input")).to_have_value(re.compile("held back"))
    page.get_by_role("tab", name="History").click()
    page.get_by_role("button", name="Open in chat").click()
    sync_api.expect(bot.last).to_contain_text("not showing a diagnosis")
    assert page.locator("#chatbot [data-testid='bot'] table").count() == 0
    page.screenshot(path=str(SHOTS / "held-back.png"), full_page=True)


# Where the newest reply's verdict lies ([top, bottom] of its table and of its "Malignant vs
# benign" and "Sensitive threshold" lines), against the window and the chat pane's visible part.
_VERDICT_JS = """() => {
  const span = e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom, r.left, r.right]; };
  const reply = [...document.querySelectorAll('#chatbot [data-testid=bot]')]
    .filter(m => m.querySelector('table')).pop();
  const lines = [...reply.querySelectorAll('p')]
    .filter(p => /^(Malignant vs benign|Sensitive threshold)/.test(p.innerText.trim()));
  return {window: [0, innerHeight, 0, innerWidth],
          pane: span(document.querySelector('#chatbot [role=log]')),
          parts: [['table', span(reply.querySelector('table'))],
                  ...lines.map(p => [p.innerText.slice(0, 20), span(p)])]};
}"""


@pytest.mark.slow
@pytest.mark.parametrize("width,height", [(1400, 1000), (400, 800)])
def test_fresh_reply_shows_its_verdict_without_scrolling(app, width, height):
    """Right after the reply to a dropped image, its verdict (the probability table, the
    malignant-vs-benign line and, when the checkpoint has one, the sensitive-threshold line) is
    on screen, on a desktop and on a phone: the chat does not leave it above the heat map."""
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(90_000)
            page.goto(app.url)
            _send(page, SAMPLE, "75 y, lower leg")
            bot = page.locator("#chatbot [data-testid='bot']")
            bot.filter(has_text="Malignant vs benign").first.wait_for()
            overlay = page.locator("#chatbot [data-testid='bot'] img[src*='gradcam-']").first
            overlay.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
            sync_api.expect(page.locator("#chat-input textarea")).to_be_enabled()
            page.wait_for_timeout(2000)                    # the scrolling after the reply settles
            page.screenshot(path=str(SHOTS / f"chat-verdict-{width}.png"))
            got = page.evaluate(_VERDICT_JS)
            assert [name for name, _ in got["parts"]][:2] == ["table", "Malignant vs benign:"], got
            for name, (top, bottom, left, right) in got["parts"]:
                for box in ("window", "pane"):
                    t, b, l, r = got[box]
                    assert t - 1 <= top and bottom <= b + 1 and l - 1 <= left and right <= r + 1, \
                        f"{name!r} is not in the {box} at {width}x{height}: {got}"
        finally:
            browser.close()
