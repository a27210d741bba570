"""The app in a real browser: Playwright driving the system's headless Chromium.

    .venv/bin/python -m pytest tests/test_browser.py -q      # screenshots land in screenshots/

Uploads a sample in the Chat tab and waits for the reply with its overlay image, runs a
comparison in the Compare tab, finds the case in the History tab, and reads the model card.
Skips (with the reason) when Playwright or /usr/bin/chromium is missing; never downloads a
browser. The page must not request anything outside the machine.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from test_app import SAMPLE, AppProcess, make_tiny_checkpoint

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


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    proc = AppProcess(ckpt, root / "history" / "cases.db").wait_ready()
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
            page.locator("#chat-input input[type=file]").set_input_files(str(SAMPLE))
            page.locator("#chat-input textarea").fill("75 y, lower leg")
            page.wait_for_timeout(500)
            page.locator("#chat-input textarea").press("Enter")
            bot = page.locator("#chatbot [data-testid='bot']")
            bot.filter(has_text="Malignant vs benign").first.wait_for()
            page.locator("#chatbot [data-testid='bot'] img[src*='gradcam-']").first.wait_for()
            assert "not a medical device" in page.locator("#chatbot").inner_text().lower()
            sync_api.expect(page.locator("#chat-input textarea")).to_be_enabled()  # unlocked
            page.wait_for_timeout(500)
            page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)

            # Compare: the current case is preselected; run the default methods.
            page.get_by_role("tab", name="Compare").click()
            page.get_by_role("button", name="Compare", exact=True).click()
            page.locator("#compare-gallery img").nth(3).wait_for()
            page.wait_for_timeout(500)
            page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)

            # History: the case is listed with its note.
            page.get_by_role("tab", name="History").click()
            sync_api.expect(page.locator("#history-table")).to_contain_text("75 y, lower leg",
                                                                          timeout=30_000)
            page.get_by_role("button", name="Export ZIP (CSV + images)").click()
            sync_api.expect(page.get_by_text(".zip").first).to_be_visible()
            page.screenshot(path=str(SHOTS / "history.png"), full_page=True)

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
        finally:
            browser.close()
    assert outside == [], f"the page reached outside the machine: {outside}"
    assert (SHOTS / "chat.png").stat().st_size > 10_000
