"""App tests: handlers in-process, then the real app in a subprocess driven by gradio_client.

    .venv/bin/python -m pytest tests/test_app.py -q

Everything runs the real `Predictor` on a tiny random-weight checkpoint made here in a few
seconds (simple_cnn, 64 px); the bundled checkpoints/default is not needed.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow   # launches apps, trains or loads real models: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
SAMPLE = SAMPLES / "mel_ISIC_0024310.jpg"
SAMPLE2 = SAMPLES / "nv_ISIC_0024340.jpg"


# ------------------------------------------------------------------ helpers (shared with
# test_browser.py)
def make_tiny_checkpoint(path, size: int = 64, seed: int = 0, widths=(8, 16, 16, 16), resize: str = "squash") -> Path:
    """A real lesionlens checkpoint with random weights, written in ~1 s.

    Weights are filled from their abstract shapes (nnx.eval_shape) instead of running the
    initialisers, which on a busy CPU costs ~20 s of one-off op compilations.
    """
    import jax
    from flax import nnx

    from model import checkpoint
    from model.networks import build
    from model.preprocess import Normalisation

    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    cfg = {"widths": list(widths)}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build("simple_cnn", len(classes), **cfg)))
    rng = np.random.default_rng(seed)

    def fill(keypath, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in keypath]
        name = names[-2] if names[-1] == "value" else names[-1]
        if "key" in str(leaf.dtype):
            return jax.random.key(seed)
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        if name in ("var", "scale"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("mean", "bias"):
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    metadata = {"arch": "simple_cnn", "arch_config": cfg, "classes": classes, "task": "ham7",
                "image_size": size, "resize": resize,
                "normalisation": Normalisation().to_dict(), "temperature": 1.0, "tta": False,
                "training": {"data": {"source": "none: random weights for tests"}},
                "licence": "Test checkpoint."}
    checkpoint.save(path, 1, model, metadata)
    return Path(path)


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python -m app ...` in a subprocess, on loopback; `stop()` terminates it."""

    def __init__(self, checkpoint, db, *extra, port=None, log_path=None, env=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONPATH": _pythonpath(), "GRADIO_ANALYTICS_ENABLED": "False",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
               "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(log_path or Path(db).parent / f"app-{self.port}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--checkpoint", str(checkpoint), "--db", str(db),
             "--port", str(self.port), "--host", "127.0.0.1", *extra],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 150.0) -> "AppProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(self.url + "config", timeout=2) as r:
                    if r.status in (200, 401):
                        return self
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"app did not start in {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def bad_inputs(folder: Path) -> dict[str, Path]:
    """Files the chat must refuse with a clear message, by what is wrong with them."""
    folder.mkdir(parents=True, exist_ok=True)
    data = SAMPLE.read_bytes()
    files = {"truncated": folder / "truncated.jpg", "not_an_image": folder / "notes.jpg",
             "empty": folder / "empty.png", "tiny": folder / "tiny.png",
             "huge": folder / "huge.png"}
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["not_an_image"].write_text("patient notes, definitely not a JPEG\n" * 20)
    files["empty"].write_bytes(b"")
    Image.new("RGB", (8, 8), (120, 80, 60)).save(files["tiny"])
    # A PNG header claiming 20000 x 20000 px (400 MP): a decompression bomb in 100 bytes.
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 20000, 20000) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    files["huge"].write_bytes(bytes(png))
    return files


def odd_but_valid(folder: Path) -> dict[str, Path]:
    """Images in every mode people upload; the loader converts each to RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(SAMPLE).convert("RGB")
    files = {}
    files["grey"] = folder / "grey.jpg"
    rgb.convert("L").save(files["grey"])
    files["rgba"] = folder / "alpha.png"
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 128))
    rgba.save(files["rgba"])
    files["cmyk"] = folder / "cmyk.jpg"
    rgb.convert("CMYK").save(files["cmyk"])
    files["16bit"] = folder / "sixteen.png"
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(files["16bit"])
    files["palette"] = folder / "palette.png"
    rgb.convert("P", palette=Image.ADAPTIVE).save(files["palette"])
    files["exif_rotated"] = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(files["exif_rotated"], exif=exif)
    return files


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    from model.predictor import Predictor
    return Predictor.load(tiny_checkpoint)


@pytest.fixture
def ctx(predictor, tmp_path):
    from app.services import Services
    from app.store import CaseStore
    return Services(predictor, CaseStore(tmp_path / "history" / "cases.db"), tmp_dir=tmp_path / "tmp")


def _chat(ctx, text="", files=(), state=None, history=None, user=""):
    from app.chat import chat_add, chat_respond
    history, pending = chat_add({"text": text, "files": [str(f) for f in files]}, history)
    *_, (history, state) = chat_respond(ctx, pending, history, state or {}, user)
    return history, state


def _assistant_texts(history):
    return [m["content"] for m in history
            if m["role"] == "assistant" and isinstance(m["content"], str)]


def _assistant_images(history):
    return [m["content"]["path"] for m in history
            if m["role"] == "assistant" and isinstance(m["content"], dict)]


# ------------------------------------------------------------------ handlers, no server
def test_chat_reply_has_top3_malignancy_overlay_and_caveat(ctx):
    from app.services import DISPLAY_MIN_SIDE
    history, state = _chat(ctx, "54 y, left shoulder", [SAMPLE])
    (reply,) = _assistant_texts(history)
    names = ctx.predictor.class_names
    assert sum(n in reply for n in names) == 3                  # top-3 with full names
    assert "Malignant vs benign" in reply and "not a medical device" in reply.lower()
    (png,) = _assistant_images(history)
    assert max(Image.open(png).size) == DISPLAY_MIN_SIDE       # 200 px sample, enlarged
    case = ctx.store.get_case(state["case_id"])
    assert case.note == "54 y, left shoulder" and case.filename == SAMPLE.name
    assert case.checkpoint_id == ctx.predictor.checkpoint_id
    assert sum(case.predictions.values()) == pytest.approx(1.0, abs=1e-4)
    # A bundled sample carries its true diagnosis; the reply says whether the model agrees.
    verdict = "the model agrees" if case.top_class == "mel" else "the model is wrong on this one"
    assert "known diagnosis: **Melanoma** (`mel`)" in reply and verdict in reply


def test_only_the_bundled_sample_itself_gets_a_true_diagnosis(ctx, tmp_path):
    # Another image under a sample's name (different pixels) is not that sample.
    impostor = tmp_path / SAMPLE.name
    Image.open(SAMPLE2).save(impostor)
    history, _ = _chat(ctx, "", [impostor])
    assert "known diagnosis" not in _assistant_texts(history)[0]


def test_reply_places_malignancy_against_the_sensitive_threshold(ctx, monkeypatch):
    p = ctx.predictor
    history, state = _chat(ctx, "", [SAMPLE])
    assert "Sensitive threshold" not in _assistant_texts(history)[0]  # uncalibrated: nothing to compare with
    malignant = ctx.store.get_case(state["case_id"]).malignant_probability
    for threshold, side in ((malignant / 2, "at or above"), (min(1.0, malignant * 2 + 0.01), "below")):
        monkeypatch.setitem(p.metadata, "operating_point", {"target_sensitivity": 0.9, "threshold": threshold})
        monkeypatch.setitem(p.metadata, "metrics", {"val": {"operating_point": {
            "threshold": threshold, "malignant_sensitivity": 0.91, "malignant_specificity": 0.6}}})
        history, _ = _chat(ctx, "", [SAMPLE])
        (reply,) = _assistant_texts(history)
        assert f"is {'**at or above**' if side == 'at or above' else 'below'} {threshold:.0%}" in reply
        assert "flagged 91% of malignant validation lesions (and 40% of benign ones)" in reply


def test_warning_comes_first_when_unsure_or_unusual(ctx, monkeypatch):
    from model import checkpoint

    p = ctx.predictor
    monkeypatch.setitem(p.metadata, "ood", {"neighbours": 1, "reference": checkpoint.pack_array(np.full((1, 16), 0.25)),
                                            "threshold": -1.0})   # every image is unusual
    history, state = _chat(ctx, "", [SAMPLE])
    history, _ = _chat(ctx, "analyse anyway", history=history, state=state)
    reply = _assistant_texts(history)[-1]
    assert reply.startswith("⚠️ **This image does not look like")
    # random weights give near-uniform probabilities: the unsure warning is there too
    assert "The model is unsure" in reply.split("**Case #")[0]


def _gate_between(p, lesion: Path, other: Path) -> dict:
    """An unusual-image gate (metadata["ood"], as model/calibration.py writes it) centred on
    `lesion`'s features, its threshold halfway to `other`'s: `other` is unusual, `lesion` not."""
    from model import checkpoint
    from model.gate import reference_distance

    _, pooled = p.forward_arrays(p.prepare([Image.open(lesion), Image.open(other)]))
    gate = {"neighbours": 1, "reference": checkpoint.pack_array(pooled[:1] / np.linalg.norm(pooled[0]))}
    far = float(reference_distance(pooled[1:], gate)[0])
    assert far > 0
    return {**gate, "threshold": far / 2}


def test_non_lesion_image_leads_with_that_and_holds_the_table_back(ctx, tmp_path, monkeypatch):
    p = ctx.predictor
    sky = tmp_path / "sky.png"
    Image.new("RGB", (320, 240), (110, 160, 230)).save(sky)       # flat blue: no lesion at all
    monkeypatch.setitem(p.metadata, "ood", _gate_between(p, SAMPLE, sky))

    history, _ = _chat(ctx, "", [SAMPLE])                          # a lesion: the full reply
    assert "| 1 |" in _assistant_texts(history)[0] and len(_assistant_images(history)) == 1

    history, state = _chat(ctx, "holiday photo", [sky])
    (reply,) = _assistant_texts(history)
    assert reply.startswith("⚠️ **This image does not look like the dermoscopy images")
    assert ": it is far from the validation lesions the model was checked on." in reply   # which check, in words
    assert "not showing a diagnosis" in reply and "`analyse anyway`" in reply
    assert "| 1 |" not in reply and "Malignant vs benign" not in reply
    assert not any(name in reply for name in p.class_names)      # no diagnosis named at all
    assert _assistant_images(history) == []                       # nor a heat map "for" one
    case = ctx.store.get_case(state["case_id"])                   # the case is still stored
    assert case.unusual and case.filename == "sky.png" and case.note == "holiday photo"
    assert f"**Case #{case.id}**" in reply and ctx.store.count() == 2

    held_back_everywhere(ctx, case, p)

    history, state = _chat(ctx, "analyse anyway", history=history, state=state)
    shown = _assistant_texts(history)[-1]
    assert shown.startswith("⚠️ **This image does not look like")   # the warning still leads
    assert "| 1 |" in shown and "Malignant vs benign" in shown
    top = p.class_names[p.classes.index(case.top_class)]
    assert top in shown and len(_assistant_images(history)) == 1
    assert ctx.store.count() == 2                                 # the follow-up added nothing
    case = ctx.store.get_case(case.id)                            # the request is recorded with the case
    assert case.analysed_anyway and not case.held_back and case.status.startswith("analysed anyway")
    from app.history import history_table
    row = next(r for r in history_table(ctx, ctx.store.list_cases()) if r[0] == case.id)
    assert row[4] == top and row[7].startswith("analysed anyway")
    history, _ = _chat(ctx, "explain melanoma", history=history, state=state)
    assert "treat this map with caution" in _assistant_texts(history)[-1]


def held_back_everywhere(ctx, case, p):
    """Every view of a held-back case says so and shows no diagnosis: History (table, details, CSV export),
    Compare (list and compute), the case reopened in the chat, follow-ups."""
    import csv as csv_module

    from app import compare
    from app.chat import open_case_in_chat
    from app.history import case_details, export_history, history_table
    from model.errors import UserError
    assert case.id not in [c.id for c in ctx.store.list_cases(top_class=case.top_class)]   # not found by class
    row = next(r for r in history_table(ctx, ctx.store.list_cases()) if r[0] == case.id)
    assert row[4:7] == ["held back", "", ""] and row[7].startswith("held back: unlike a dermoscopic lesion")
    _, details = case_details(ctx, case.id, "")
    assert "Held back" in details and "Top 3" not in details and "analyse anyway" in details
    label = dict((i, l) for l, i in compare.case_choices(ctx, ""))[case.id]
    assert "held back" in label and case.top_class not in label
    with pytest.raises(UserError, match="held back"):
        compare.compare_compute(ctx, case.id, "methods", ["gradcam"], [], "")
    reopened, state = open_case_in_chat(ctx, case.id, [], "")
    assert "not showing a diagnosis" in _assistant_texts(reopened)[-1] and _assistant_images(reopened) == []
    for follow in ("explain melanoma", "why not nv", "show layercam"):
        history, _ = _chat(ctx, follow, history=reopened, state=state)
        assert "held back" in _assistant_texts(history)[-1] and len(_assistant_images(history)) == 0
    with open(export_history(ctx, "csv", ctx.store.list_cases()), newline="") as f:
        exported = next(r for r in csv_module.DictReader(f) if r["id"] == str(case.id))
    assert exported["status"].startswith("held back") and exported["top_class"] == ""
    assert exported["malignant_probability"] == "" and all(exported[f"p_{c}"] == "" for c in p.classes)
    assert exported["unusual_because"] == "far_from_lesions" and exported["analysed_anyway"] == ""


def test_bad_inputs_get_clear_replies_and_nothing_is_stored(ctx, tmp_path):
    bad = bad_inputs(tmp_path / "bad")
    history, _ = _chat(ctx, "", list(bad.values()))
    replies = _assistant_texts(history)
    assert len(replies) == len(bad)
    expect = {"truncated": "not a readable image", "not_an_image": "not a readable image",
              "empty": "empty", "tiny": "8x8", "huge": "too large"}
    for (kind, path), reply in zip(bad.items(), replies):
        assert reply.startswith(f"❌ I could not use **{path.name}**"), reply
        assert expect[kind] in reply, (kind, reply)
        assert str(tmp_path) not in reply            # people see file names, not temp paths
    assert ctx.store.count() == 0 and ctx.store.check() == []


def test_odd_modes_and_exif_rotation_are_analysed(ctx, tmp_path):
    odd = odd_but_valid(tmp_path / "odd")
    history, _ = _chat(ctx, "", list(odd.values()))
    assert len(_assistant_images(history)) == len(odd)
    cases = {c.filename: c for c in ctx.store.list_cases()}
    assert len(cases) == len(odd)
    w, h = Image.open(SAMPLE).size
    assert Image.open(cases["rotated.jpg"].image_path).size == (h, w)   # EXIF applied
    assert all(Image.open(c.image_path).mode == "RGB" for c in cases.values())


def test_too_many_files_are_capped_with_a_message(ctx, tmp_path):
    from app.chat import MAX_FILES
    files = []
    for i in range(MAX_FILES + 2):
        f = tmp_path / f"copy{i}.jpg"
        f.write_bytes(SAMPLE.read_bytes())
        files.append(f)
    history, _ = _chat(ctx, "", files)
    assert f"at most {MAX_FILES}" in _assistant_texts(history)[0]
    assert ctx.store.count() == MAX_FILES


def test_follow_up_commands(ctx):
    from app.services import HEATMAP_LEGEND
    history, state = _chat(ctx, "", [SAMPLE])
    p = ctx.predictor
    assert HEATMAP_LEGEND in _assistant_texts(history)[-1]   # every overlay says what its colours mean
    assert "hottest 10 %" in HEATMAP_LEGEND
    history, state = _chat(ctx, "help", history=history, state=state)
    assert "why not nevus" in _assistant_texts(history)[-1]
    history, state = _chat(ctx, "show occlusion", history=history, state=state)
    assert _assistant_texts(history)[-1].startswith("Occlusion for")
    assert _assistant_texts(history)[-1].endswith(HEATMAP_LEGEND)
    assert Path(_assistant_images(history)[-1]).exists()
    history, state = _chat(ctx, "why not nevus?", history=history, state=state)
    nv = ctx.store.get_case(state["case_id"]).predictions["nv"]
    assert "Melanocytic nevus" in _assistant_texts(history)[-1]
    assert f"{nv:.1%}" in _assistant_texts(history)[-1]
    n_images = len(_assistant_images(history))
    history, state = _chat(ctx, "explain melanoma", history=history, state=state)
    assert "Melanoma" in _assistant_texts(history)[-1]
    assert len(_assistant_images(history)) == n_images + 1
    history, state = _chat(ctx, "what's the weather", history=history, state=state)
    assert "did not understand" in _assistant_texts(history)[-1]
    assert p.class_names  # unchanged predictor
    assert ctx.store.count() == 1                     # follow-ups never add cases


def test_follow_up_without_case_and_other_users_case(ctx):
    history, _ = _chat(ctx, "show smoothgrad")
    assert "no current case" in _assistant_texts(history)[-1]
    _, state = _chat(ctx, "", [SAMPLE], user="ana")
    history, _ = _chat(ctx, "show grad-cam", state=state, user="bo")   # bo cannot read ana's
    assert "no current case" in _assistant_texts(history)[-1]


def test_classify_api_compare_history_export_and_delete(ctx, tmp_path):
    from app import compare
    from app import history as hist
    from app.analysis import classify_api
    from model.errors import UserError
    probs, png, summary = classify_api(ctx, str(SAMPLE2), user="ana")
    assert set(probs) == set(ctx.predictor.class_names)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    Image.open(png).verify()
    (case,) = ctx.store.list_cases(user="ana")
    assert summary == {"case_id": case.id, "status": "analysed",
                       "malignant_probability": pytest.approx(case.malignant_probability, abs=1e-6),
                       "above_sensitive_threshold": None,   # the tiny checkpoint has no threshold
                       "unusual": False, "unusual_because": [], "ood_score": 0.0,
                       "checkpoint_id": ctx.predictor.checkpoint_id}

    state = compare.compare_compute(ctx, case.id, "methods", ["gradcam", "gradients"], [], "ana")
    gallery, (raw, over), files = compare.compare_render(ctx, state, 0.3, None, "ana")
    assert len(gallery) == 2 and raw.shape == over.shape and len(files) == 3
    assert all(Path(f).exists() for f in files)
    state = compare.compare_compute(ctx, case.id, "classes", ["gradcam"], ["mel", "nv", "df"],
                                    "ana")
    gallery, _, _ = compare.compare_render(ctx, state, 0.7, state["items"][1][0], "ana")
    assert [c.split(" · ")[1].split(" (")[0] for _, c in gallery] == \
        ["Melanoma", "Melanocytic nevus", "Dermatofibroma"]
    with pytest.raises(UserError):
        compare.compare_compute(ctx, case.id, "methods", ["gradcam"], [], "bo")   # not bo's case

    rows = hist.history_table(ctx, hist.history_cases(ctx, "ana", query="nv_ISIC"))
    assert rows[0][0] == case.id and rows[0][2] == SAMPLE2.name
    assert hist.history_cases(ctx, "bo") == []
    assert hist.history_cases(ctx, "ana", date_to="2001-01-01") == []
    with pytest.raises(UserError, match="YYYY-MM-DD"):
        hist.history_cases(ctx, "ana", date_from="last tuesday")
    assert [c.id for c in hist.history_cases(ctx, "ana", date_from="yesterday", date_to="today")] == [case.id]
    thumb, md = hist.case_details(ctx, case.id, "ana")
    assert max(thumb.size) <= 128 and f"Case #{case.id}" in md
    zpath = hist.export_history(ctx, "zip", ctx.store.list_cases(user="ana"))
    assert Path(zpath).stat().st_size > 1000
    assert ctx.store.delete_case(case.id, user="ana") and not case.image_path.exists()


def test_history_table_shortens_long_values_and_details_and_csv_keep_them(ctx):
    from app import history as hist
    from app.services import md_escape
    note = ("54 y, left shoulder, growing for three months, itchy, bleeds sometimes when "
            "scratched; mother had melanoma")
    name = "IMG_20261130_141038_dermatoscope_left_shoulder_close_up.jpg"
    preds = dict.fromkeys(ctx.predictor.classes, 1 / len(ctx.predictor.classes))
    case = ctx.store.add_case(Image.open(SAMPLE), predictions=preds, malignant_probability=0.2,
                              filename=name, note=note)
    (row,) = hist.history_table(ctx, [case])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row[1]), row[1]   # to the minute
    assert row[2] == "IMG_20261130_14…close_up.jpg" and len(row[2]) <= hist.FILE_CHARS
    assert row[3] == "54 y, left shoulder, growing for three…", row[3]   # at a word
    _, md = hist.case_details(ctx, case.id, "")
    assert md_escape(note) in md and md_escape(name) in md
    csv_text = Path(hist.export_history(ctx, "csv", [case])).read_text()
    assert note in csv_text and name in csv_text and case.created in csv_text


def test_classify_api_says_which_side_of_the_sensitive_threshold(ctx, monkeypatch):
    from app.analysis import classify_api
    _, _, summary = classify_api(ctx, str(SAMPLE))
    malignant = summary["malignant_probability"]
    for threshold, above in ((malignant / 2, True), (min(1.0, malignant * 2 + 0.01), False)):
        monkeypatch.setitem(ctx.predictor.metadata, "operating_point", {"threshold": threshold})
        _, _, summary = classify_api(ctx, str(SAMPLE))
        assert summary["above_sensitive_threshold"] is above


def test_open_case_in_chat_and_model_card(ctx):
    from app.chat import open_case_in_chat
    from app.model_card import model_card_markdown
    _, state = _chat(ctx, "", [SAMPLE])
    history, state2 = open_case_in_chat(ctx, state["case_id"], [], "")
    assert state2 == state and _assistant_images(history)
    card = model_card_markdown(ctx.predictor)
    assert "CC BY-NC-SA 4.0" in card and "non-commercial" in card
    assert all(n in card for n in ctx.predictor.class_names)
    assert "image only; age, sex and body site are **not** used" in card


@pytest.mark.slow
def test_image_only_model_says_the_note_was_not_used(ctx):
    history, _ = _chat(ctx, "60 year old male, back", [SAMPLE])
    assert "This model uses the image only" in _assistant_texts(history)[-1]
    history, _ = _chat(ctx, "growing, 3 mm", [SAMPLE])   # nothing clinical: nothing to say
    assert "Clinical" not in _assistant_texts(history)[-1]
    assert "image only" not in _assistant_texts(history)[-1]


@pytest.fixture(scope="module")
def fused_checkpoint(tiny_checkpoint, synthetic_data_shared, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with age/sex/site fusion fitted by `python -m model fuse`
    on a lesion-grouped split of the synthetic HAM set (the tiny checkpoint has no run)."""
    from model.data import load_dataset, select_task
    from model.splits import make_split, write_split
    root = tmp_path_factory.mktemp("fused")
    ckpt = shutil.copytree(tiny_checkpoint, root / "tiny")
    records, labels, _ = select_task(load_dataset(str(synthetic_data_shared.ham_dir)), "ham7")
    split = write_split(root / "split.csv", records,
                        make_split(records, labels, val_frac=0.34, seed=0))
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "JAX_PLATFORMS": "cpu",
           "LESIONLENS_CACHE": str(root / "cache")}
    done = subprocess.run([sys.executable, "-m", "model", "fuse", "--checkpoint", str(ckpt),
                           "--csv", str(split)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return ckpt


def test_clinical_note_feeds_a_fused_model(fused_checkpoint, tmp_path):
    from app.model_card import model_card_markdown
    from app.services import Services
    from app.store import CaseStore
    from model.predictor import Predictor
    p = Predictor.load(fused_checkpoint)
    assert p.uses_clinical
    ctx = Services(p, CaseStore(tmp_path / "history" / "cases.db"), tmp_dir=tmp_path / "tmp")

    history, state = _chat(ctx, "60 year old male, back", [SAMPLE])
    assert "**Clinical data used:** age 60, male, site back." in _assistant_texts(history)[-1]
    with_note = ctx.store.get_case(state["case_id"]).predictions
    history, state = _chat(ctx, "", [SAMPLE])
    assert "treated as missing: age, sex, site" in _assistant_texts(history)[-1]
    without = ctx.store.get_case(state["case_id"]).predictions
    assert max(abs(with_note[c] - without[c]) for c in p.classes) > 1e-3

    history, _ = _chat(ctx, "F 40", [SAMPLE])
    reply = _assistant_texts(history)[-1]
    assert "age 40, female." in reply and "treated as missing: site" in reply
    assert "**age, sex and body site**" in model_card_markdown(p)


def test_long_note_is_refused_and_nothing_is_stored(ctx):
    from app.store import MAX_NOTE_CHARS, NotStored
    note = "growing." * 1750                                     # 14,000 characters
    history, state = _chat(ctx, note, [SAMPLE, SAMPLE2])
    (reply,) = _assistant_texts(history)
    assert reply.startswith("❌ Nothing was analysed or saved: the note has 14,000 characters")
    assert f"limited to {MAX_NOTE_CHARS:,}" in reply and not _assistant_images(history)
    echoed = [m["content"] for m in history if m["role"] == "user" and isinstance(m["content"], str)]
    assert len(echoed[0]) < MAX_NOTE_CHARS + 40 and echoed[0].endswith("(14,000 characters)")
    assert ctx.store.count() == 0 and state == {}
    assert not any(ctx.store.images_dir.rglob("*.png"))
    with pytest.raises(NotStored):                                 # the store refuses it too
        ctx.store.add_case(Image.open(SAMPLE), predictions={"nv": 1.0}, malignant_probability=0.0,
                           note="x" * (MAX_NOTE_CHARS + 1))
    history, state = _chat(ctx, "x" * MAX_NOTE_CHARS, [SAMPLE])    # at the limit: stored
    case = ctx.store.get_case(state["case_id"])
    assert len(case.note) == MAX_NOTE_CHARS
    with pytest.raises(NotStored):
        ctx.store.update_note(case.id, "x" * (MAX_NOTE_CHARS + 1))
    assert ctx.store.get_case(case.id).note == case.note


def test_history_quota_per_user(predictor, tmp_path):
    from app.analysis import classify_api
    from app.services import Services
    from app.store import CaseStore, NotStored
    store = CaseStore(tmp_path / "history" / "cases.db", max_cases_per_user=2)
    ctx = Services(predictor, store, tmp_dir=tmp_path / "tmp")
    history, _ = _chat(ctx, "", [SAMPLE, SAMPLE2, SAMPLE], user="ana")
    replies = _assistant_texts(history)
    assert len(_assistant_images(history)) == 2 and store.count("ana") == 2
    assert replies[-1].startswith(f"❌ **{SAMPLE.name}** was not saved: your history is full: "
                                  "2 cases is the limit per user")
    assert "Delete cases you no longer need in the History tab" in replies[-1]
    history, _ = _chat(ctx, "", [SAMPLE2], user="ana")
    assert _assistant_texts(history)[0].startswith("❌ Nothing was analysed or saved: your "
                                                   "history is full")
    with pytest.raises(NotStored, match="history is full"):      # the API says the same
        classify_api(ctx, str(SAMPLE), user="ana")
    _chat(ctx, "", [SAMPLE], user="bo")                           # others are not affected
    assert store.count("ana") == 2 and store.count("bo") == 1
    store.delete_case(store.list_cases(user="ana")[0].id, user="ana")   # room again
    _chat(ctx, "", [SAMPLE], user="ana")
    assert store.count("ana") == 2
    unlimited = CaseStore(tmp_path / "history" / "cases.db", max_cases_per_user=0)
    unlimited.check_room("ana")


def test_unwritable_data_folder_gets_a_clear_message_and_the_log_the_detail(ctx, monkeypatch,
                                                                             caplog):
    import errno

    import app.store
    from app.analysis import classify_api
    from app.store import NotStored

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(app.store, "atomic_write_bytes", read_only)
    with caplog.at_level("ERROR", logger="lesionlens"):
        history, _ = _chat(ctx, "", [SAMPLE])
    (reply,) = _assistant_texts(history)
    assert reply.startswith(f"❌ **{SAMPLE.name}** was not saved: could not save: the data "
                            "folder is not writable (the disk may be full or read-only)")
    assert "Errno" not in reply and str(ctx.store.root) not in reply
    assert "Read-only file system" in caplog.text and str(ctx.store.root) in caplog.text
    with pytest.raises(NotStored, match="could not save: the data folder is not writable"):
        classify_api(ctx, str(SAMPLE))
    assert ctx.store.count() == 0 and ctx.store.check() == []


def test_deleting_a_case_removes_its_upload_and_pictures(predictor, tmp_path):
    """The upload, the chat's overlays, the compare pictures and Gradio's copies of them go with
    the case; a file another case still shows, and files outside the temp folders, stay."""
    from app import compare
    from app import history as hist
    from app.services import Services
    from app.store import CaseStore
    gradio_dir = tmp_path / "gradio"
    ctx = Services(predictor, CaseStore(tmp_path / "history" / "cases.db"), tmp_dir=tmp_path / "tmp",
                   gradio_dir=gradio_dir)
    upload = gradio_dir / "a1b2" / "lesion.jpg"                   # as Gradio stores an upload
    upload.parent.mkdir(parents=True)
    shutil.copy(SAMPLE, upload)
    history, state = _chat(ctx, "", [upload])
    history, state = _chat(ctx, "show smoothgrad", history=history, state=state)
    case_id = state["case_id"]
    cstate = compare.compare_compute(ctx, case_id, "methods", ["gradcam"], [], "")
    _, _, compare_files = compare.compare_render(ctx, cstate, 0.5, None, "")
    pictures = [Path(p) for p in _assistant_images(history) + compare_files]
    copies = []
    for p in pictures:                                            # Gradio's served copies
        copy = gradio_dir / f"hash-{p.stem}" / p.name
        copy.parent.mkdir()
        shutil.copy(p, copy)
        copies.append(copy)
    _, other = _chat(ctx, "same file again", [upload])            # shares the upload
    _, outside = _chat(ctx, "", [SAMPLE2])                        # a file not in a temp folder
    assert all(p.exists() for p in pictures + copies + [upload])

    assert hist.delete_case(ctx, case_id, "")
    assert [p for p in pictures + copies if p.exists()] == []
    assert upload.exists()                                        # the other case shows it
    assert hist.delete_case(ctx, other["case_id"], "") and not upload.exists()
    assert hist.delete_case(ctx, outside["case_id"], "") and SAMPLE2.exists()
    assert not hist.delete_case(ctx, case_id, "")                 # already gone
    assert ctx.store.count() == 0 and ctx.store.check() == []


def test_old_pictures_in_the_temp_folder_go_at_most_once_a_minute(ctx):
    """Overlays are copied into Gradio's cache at once: ours older than an hour are removed when a new
    one is written, but the folder is looked through at most once a minute (a look stats every file)."""
    import os
    from app.services import PRUNE_EVERY_S, TMP_MAX_AGE_S, Throttle, write_png
    ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
    old, fresh, other = (ctx.tmp_dir / name for name in ("old-1.png", "fresh-1.png", "notes.txt"))
    for f in (old, fresh, other):
        f.write_bytes(b"x")
    two_hours_ago = time.time() - 2 * TMP_MAX_AGE_S
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    ctx._prune_due._last = float("-inf")                # as if the app had just started
    new = write_png(ctx, np.zeros((4, 4, 3), np.uint8), "gradcam")
    assert not old.exists() and fresh.exists() and other.exists() and Path(new).exists()
    old.write_bytes(b"x")
    os.utime(old, (two_hours_ago, two_hours_ago))
    write_png(ctx, np.zeros((4, 4, 3), np.uint8), "gradcam")
    assert old.exists()                                 # within the minute: not looked at again
    throttle = Throttle(PRUNE_EVERY_S)
    assert throttle.due(1000.0) and not throttle.due(1000.0 + PRUNE_EVERY_S) and throttle.due(1001.0 + PRUNE_EVERY_S)


def test_build_demo_wires_without_a_server(ctx):
    from app.ui import build_demo
    demo = build_demo(ctx.predictor, ctx.store)
    api_names = {d.api_name for d in demo.fns.values()}
    assert {"classify", "chat_add", "chat_respond", "history"} <= api_names


def test_parse_auth():
    from app.__main__ import parse_auth
    assert parse_auth("ana:pw1, bo:p:w2") == [("ana", "pw1"), ("bo", "p:w2")]
    assert parse_auth("") is None
    with pytest.raises(ValueError):
        parse_auth("ana")


@pytest.mark.slow
def test_password_hashes_and_auth_file(tmp_path):
    from app.auth import Authenticator, hash_password, read_auth_file, verify_password
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a != b and a.startswith("scrypt$")                       # salted
    assert verify_password("correct horse", a) and not verify_password("Correct horse", a)
    assert not verify_password("correct horse", "scrypt$garbage")
    done = subprocess.run([sys.executable, "-m", "app", "hash-password", "ana"], cwd=ROOT,
                          input="pw with spaces: and colons\n", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": _pythonpath()}, timeout=60)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("ana:scrypt$") and "pw with spaces" not in line
    auth_file = tmp_path / "auth.txt"
    auth_file.write_text(f"# LesionLens users\n\n{line}\n")
    hashes = read_auth_file(auth_file)
    assert verify_password("pw with spaces: and colons", hashes["ana"])
    auth = Authenticator.from_sources([("bo", "pw-bo")], hashes)
    assert auth("ana", "pw with spaces: and colons") and auth("bo", "pw-bo")
    assert not auth("ana", "pw-bo") and not auth("nobody", "pw-bo") and len(auth) == 2
    for bad, why in (("ana:plain-password\n", "line 1: expected user:scrypt$"),
                     (f"{line}\n{line}\n", "line 2: user 'ana' is listed twice"),
                     ("# nobody\n", "no users")):
        auth_file.write_text(bad)
        with pytest.raises(ValueError, match=re.escape(why)):
            read_auth_file(auth_file)
    with pytest.raises(ValueError, match="given twice"):
        Authenticator.from_sources([("ana", "x")], hashes)


def test_login_throttle_locks_out_for_a_growing_time():
    from app.auth import (ADDRESS_FREE_FAILURES, FIRST_LOCK_S, MAX_LOCK_S, PAIR_FREE_FAILURES, LoginThrottle)
    now = [1000.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    key = "pair:ana@10.0.0.1"
    for i in range(1, PAIR_FREE_FAILURES):
        assert throttle.failed(key, PAIR_FREE_FAILURES) == (i, 0.0)
        assert throttle.wait_s(key) == 0
    locks = []
    for _ in range(12):
        now[0] += throttle.wait_s(key)                            # wait out each lock-out
        locks.append(throttle.failed(key, PAIR_FREE_FAILURES)[1])
    assert locks[:3] == [FIRST_LOCK_S, 2 * FIRST_LOCK_S, 4 * FIRST_LOCK_S]
    assert locks[-1] == MAX_LOCK_S
    assert throttle.wait_s("user:bo", key) == MAX_LOCK_S           # any locked key locks
    throttle.succeeded(key)
    assert throttle.wait_s(key) == 0
    for _ in range(ADDRESS_FREE_FAILURES):
        throttle.failed("address:10.0.0.1", ADDRESS_FREE_FAILURES)
    assert throttle.wait_s("address:10.0.0.1") == FIRST_LOCK_S
    assert not throttle.known("ana", "10.0.0.1")
    throttle.remember("ana", "10.0.0.1")
    assert throttle.known("ana", "10.0.0.1") and not throttle.known("ana", "10.0.0.2")


def test_an_attacker_cannot_lock_a_known_user_out():
    """Guessing ana's password from one address locks that address's tries for ana only; ana signs in from
    another address, and from a NAT address where she signed in before even after a spray of other names."""
    from app.auth import ADDRESS_FREE_FAILURES, PAIR_FREE_FAILURES, Authenticator, _client_address
    auth = Authenticator.from_sources([("ana", "pw-ana"), ("bo", "pw-bo")])

    def login(user, password, address):
        token = _client_address.set(address)
        try:
            return auth(user, password)
        except Exception as e:   # the 429
            return getattr(e, "status_code", e)
        finally:
            _client_address.reset(token)

    assert login("ana", "pw-ana", "10.0.0.9") is True                      # ana's clinic, behind a NAT
    for i in range(PAIR_FREE_FAILURES):
        assert login("ana", f"guess-{i}", "6.6.6.6") is False
    assert login("ana", "guess-x", "6.6.6.6") == 429                        # the attacker slows down
    assert login("ana", "pw-ana", "6.6.6.6") == 429                         # (the right password too)
    assert login("ana", "pw-ana", "192.0.2.1") is True                      # ana from another address
    for i in range(ADDRESS_FREE_FAILURES):                                  # a spray from the NAT
        login(f"user{i}", "guess", "10.0.0.9")
    assert login("carl", "guess", "10.0.0.9") == 429                        # new names from it: locked
    assert login("ana", "pw-ana", "10.0.0.9") is True                       # ana signed in there before


# ------------------------------------------------------------------ the real app
@pytest.mark.slow
def test_missing_or_broken_checkpoint_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    for ckpt in (tmp_path / "nope", tmp_path):
        r = subprocess.run([sys.executable, "-m", "app", "--checkpoint", str(ckpt), "--db",
                            str(tmp_path / "h" / "cases.db")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        assert str(ckpt) in r.stderr


@pytest.mark.slow
def test_busy_port_exits_2_at_once_naming_the_port(tiny_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "JAX_PLATFORMS": "cpu"}
    with socket.socket() as held:          # another program already listening on the port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "app", "--checkpoint", str(tiny_checkpoint),
                            "--db", str(tmp_path / "h" / "cases.db"), "--host", "127.0.0.1",
                            "--port", str(port)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()        # one line, no traceback
    assert line.startswith("error: ") and f"port {port} on 127.0.0.1 is already in use" in line
    assert "make run PORT=" in line and "python -m app --port" in line
    # Checked before the model loads: nothing was compiled, no database was made.
    assert "Compiling" not in r.stdout and not (tmp_path / "h").exists()


def _client(app, auth):
    from gradio_client import Client
    return Client(app.url, auth=auth, verbose=False,
                  download_files=str(Path(app.log_path).parent / "downloads"))


@pytest.mark.slow
def test_app_end_to_end_with_auth_and_restart(tiny_checkpoint, tmp_path):
    from gradio_client import handle_file
    db = tmp_path / "history" / "cases.db"
    auth = "ana:pw-ana,bo:pw-bo"
    app = AppProcess(tiny_checkpoint, db, "--auth", auth, "--no-warmup").wait_ready()
    try:
        ana = _client(app, ("ana", "pw-ana"))
        probs, overlay, _ = ana.predict(handle_file(str(SAMPLE)), api_name="/classify")
        assert set(probs) == {"Melanoma", "Melanocytic nevus", "Basal cell carcinoma",
                              "Benign keratosis-like lesion", "Dermatofibroma",
                              "Vascular lesion",
                              "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)"}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert Image.open(overlay).size == (384, 288)       # the 200x150 sample, enlarged

        corrupt = tmp_path / "corrupt.jpg"
        corrupt.write_bytes(SAMPLE.read_bytes()[:500])
        with pytest.raises(Exception, match="not a readable image"):
            ana.predict(handle_file(str(corrupt)), api_name="/classify")

        # The chat, as the browser drives it: add the message, then the streamed reply.
        ana.predict({"text": "chat upload", "files": [handle_file(str(SAMPLE2))]},
                    api_name="/chat_add")
        history = ana.predict(api_name="/chat_respond")
        texts = [str(m["content"]) for m in history if m["role"] == "assistant"]
        assert any("Case #" in t and "Malignant vs benign" in t for t in texts)
        assert any("'file'" in t or "path" in t for t in texts)

        bo = _client(app, ("bo", "pw-bo"))
        bo.predict(handle_file(str(SAMPLE2)), api_name="/classify")
        with pytest.raises(Exception):
            _client(app, ("ana", "wrong password"))
    finally:
        app.stop()

    app = AppProcess(tiny_checkpoint, db, "--auth", auth, "--no-warmup").wait_ready()
    try:
        table, count = _client(app, ("ana", "pw-ana")).predict("", "", None, None,
                                                               api_name="/history")
        rows = table["data"]
        assert count == "2 cases" and {r[2] for r in rows} == {SAMPLE.name, SAMPLE2.name}
        assert [r[3] for r in rows if r[2] == SAMPLE2.name] == ["chat upload"]
        table, count = _client(app, ("bo", "pw-bo")).predict("", "", None, None,
                                                             api_name="/history")
        assert count == "1 case"
    finally:
        app.stop()
    from app.store import CaseStore
    store = CaseStore(db)
    assert store.count() == 3 and store.check() == []


@pytest.mark.slow
def test_api_classify_summary_and_compare_from_gradio_client(tiny_checkpoint, tmp_path):
    from gradio_client import handle_file
    app = AppProcess(tiny_checkpoint, tmp_path / "history" / "cases.db", "--auth",
                     "ana:pw-ana,bo:pw-bo", "--no-warmup").wait_ready()
    try:
        ana = _client(app, ("ana", "pw-ana"))
        # Every output of every endpoint is named (not value_12).
        api = ana.view_api(print_info=False, return_format="dict")["named_endpoints"]
        names = {ep: [r["label"] for r in info["returns"]] for ep, info in api.items()}
        assert all(label and not re.fullmatch(r"value_\d+", label)
                   for labels in names.values() for label in labels), names
        assert names["/classify"] == ["class probabilities", "saliency overlay for the top class",
                                      "case summary"]

        probs, overlay, summary = ana.predict(handle_file(str(SAMPLE)), api_name="/classify")
        assert len(probs) == 7 and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)  # as before
        assert Image.open(overlay).size == (384, 288)
        assert set(summary) == {"case_id", "status", "malignant_probability", "above_sensitive_threshold",
                                "unusual", "unusual_because", "ood_score", "checkpoint_id"}
        assert summary["above_sensitive_threshold"] is None and summary["unusual"] is False
        assert summary["checkpoint_id"].startswith("tiny@")
        malignant = sum(v for k, v in probs.items()
                        if k in ("Melanoma", "Basal cell carcinoma") or k.startswith("Actinic"))
        assert summary["malignant_probability"] == pytest.approx(malignant, abs=1e-5)

        # /compare straight from the client: no browser ever opened the Compare tab.
        gallery, (raw, over), files, _ = ana.predict(summary["case_id"], "methods",
                                                     ["gradcam", "gradients"], [], 0.5,
                                                     api_name="/compare")
        assert [g["caption"].split(" · ")[0] for g in gallery] == ["Grad-CAM", "Input gradients"]
        assert Image.open(raw).size == Image.open(over).size and len(files) == 3
        gallery, *_ = ana.predict(str(summary["case_id"]), "classes", ["gradcam"], ["mel", "nv"],
                                  0.5, api_name="/compare")
        assert len(gallery) == 2

        bo = _client(app, ("bo", "pw-bo"))                      # not bo's case: refused
        with pytest.raises(Exception, match=f"case #{summary['case_id']} no longer exists"):
            bo.predict(summary["case_id"], "methods", ["gradcam"], [], 0.5, api_name="/compare")
        with pytest.raises(Exception, match="not a case number"):
            ana.predict("latest", "methods", ["gradcam"], [], 0.5, api_name="/compare")
    finally:
        app.stop()


@pytest.mark.slow
def test_held_back_case_over_the_api(tmp_path):
    """A checkpoint whose unusual-image gate flags every image: /classify, /history and /compare of the
    launched app all say the case is held back, and none gives a diagnosis."""
    from gradio_client import handle_file

    from model import checkpoint
    path = make_tiny_checkpoint(tmp_path / "gated")
    meta = checkpoint.read_metadata(path)
    meta["ood"] = {"neighbours": 1, "reference": checkpoint.pack_array(np.full((1, 16), 0.25)), "threshold": -1.0}
    checkpoint.update_metadata(path, meta)
    app = AppProcess(path, tmp_path / "history" / "cases.db", "--auth", "ana:pw-ana", "--no-warmup").wait_ready()
    try:
        ana = _client(app, ("ana", "pw-ana"))
        probs, overlay, summary = ana.predict(handle_file(str(SAMPLE)), api_name="/classify")
        assert summary["status"].startswith("held back: unlike a dermoscopic lesion (far from lesions")
        assert summary["unusual"] and summary["malignant_probability"] is None
        assert summary["above_sensitive_threshold"] is None and overlay is None
        assert not any(name in str(probs) for name in ("Melanoma", "nevus", "carcinoma"))   # no class at all
        table, _ = ana.predict("", None, None, None, api_name="/history")
        (row,) = table["data"]
        assert row[4] == "held back" and row[5:7] == ["", ""] and row[7].startswith("held back")
        with pytest.raises(Exception, match="held back"):
            ana.predict(summary["case_id"], "methods", ["gradcam"], [], 0.5, api_name="/compare")
    finally:
        app.stop()


@pytest.mark.slow
def test_headers_cross_site_requests_and_cookies(tiny_checkpoint, tmp_path):
    """The page may not be framed by other sites, a page of another site cannot post to the app, and over
    HTTPS (behind a proxy) the login cookie has no insecure copy."""
    import http.client
    import urllib.parse
    app = AppProcess(tiny_checkpoint, tmp_path / "data" / "cases.db", "--no-warmup", "--auth", "ana:pw-ana").wait_ready()

    def request(method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
        try:
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            response.read()
            return response.status, response.getheaders()
        finally:
            connection.close()

    try:
        status, headers = request("GET", "/")
        named = {k.lower(): v for k, v in headers}
        assert named["content-security-policy"] == "frame-ancestors 'none'" and named["x-frame-options"] == "DENY"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        login = urllib.parse.urlencode({"username": "ana", "password": "pw-ana"})
        status, _ = request("POST", "/login", login, {**form, "Origin": "https://evil.example"})
        assert status == 403
        status, headers = request("POST", "/login", login, {**form, "Origin": f"http://127.0.0.1:{app.port}"})
        assert status == 200 and any("access-token-unsecure" in v for k, v in headers if k.lower() == "set-cookie")
        status, headers = request("POST", "/login", login, {**form, "X-Forwarded-Proto": "https"})
        cookies = [v for k, v in headers if k.lower() == "set-cookie"]
        assert status == 200 and cookies and not any("access-token-unsecure" in v for v in cookies)
        assert all("secure" in v.lower() for v in cookies if v.startswith("access-token"))
    finally:
        app.stop()


def test_parse_follow_up_commands():
    from app.commands import parse_command
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    names = ["Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
             "Basal cell carcinoma", "Benign keratosis-like lesion", "Dermatofibroma",
             "Melanoma", "Melanocytic nevus", "Vascular lesion"]
    cases = {
        "help": ("help", None, None), "?": ("help", None, None), "": ("empty", None, None),
        "show integrated gradients": ("method", "integrated_gradients", None),
        "Show SmoothGrad": ("method", "smoothgrad", None),
        "show occlusion": ("method", "occlusion", None),
        "show Grad-CAM++": ("method", "gradcampp", None), "show grad-cam": ("method", "gradcam", None),
        "gradients": ("method", "gradients", None),
        "explain melanoma": ("explain", None, 4),
        "why not nevus?": ("why_not", None, 5),
        "analyse anyway": ("anyway", None, None), "Analyze it anyway!": ("anyway", None, None),
        "show the results": ("anyway", None, None),
        "Why isn't it a BCC": ("why_not", None, 1),
        "show IG for mel": ("explain", "integrated_gradients", 4),
        "explain basal cell carcinoma": ("explain", None, 1),
        "what about the mole": ("explain", None, 5),
        "hello there": ("unknown", None, None),
    }
    for text, (kind, method, ci) in cases.items():
        cmd = parse_command(text, classes, names)
        assert (cmd.kind, cmd.method, cmd.class_index) == (kind, method, ci), text


def test_parse_clinical_note():
    from app.commands import parse_clinical
    cases = {
        "55 year old man, back": (55, "male", "back"),
        "F 40 face": (40, "female", "face"),
        "age 62, female, lower extremity": (62, "female", "lower extremity"),
        "70yo male scalp": (70, "male", "scalp"),
        "62-year-old woman, left palm": (62, "female", "acral"),
        "45 y/o M, upper arm": (45, "male", "upper extremity"),
        "40F, sole of foot": (40, "female", None),         # acral or foot: unsure, so unknown
        "aged: 80, both hands": (80, None, "hand"),
        "75 y, lower leg": (75, None, "lower extremity"),  # the bundled samples' notes
        "54 y, left shoulder": (54, None, None),           # shoulder: no clear HAM site
        # negatives: none of these is an age, a sex or a site
        "3 mm, growing for 2 years": (None, None, None),
        "appeared 3 years ago": (None, None, None),
        "stage 3, the mole is malelike and human-shaped": (None, None, None),
        "10 m from the lab, I'M WORRIED": (None, None, None),
        "female? male? not sure": (None, None, None),      # contradictions stay unknown
        "back and arm": (None, None, None),
        "M 3mm": (None, "male", None),
        "": (None, None, None),
    }
    for text, expected in cases.items():
        c = parse_clinical(text)
        assert (c.age, c.sex, c.site) == expected, text
    assert parse_clinical("55 y, M").known == {"age": 55.0, "sex": "male"}
    assert parse_clinical(None).known == {}


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.slow
def test_app_files_are_private_and_its_temp_folder_goes_on_sigterm(tiny_checkpoint, tmp_path):
    """Folders 0700 and files 0600 (the data folder and the temp folder with Gradio's copies of
    uploads and overlays), and SIGTERM removes the temp folder as a normal exit would."""
    from gradio_client import Client, handle_file
    tmp = tmp_path / "tmp"            # the app's TMPDIR: its temp folder is created in here
    tmp.mkdir()
    data = tmp_path / "data"
    upload = tmp_path / "patient-upload.jpg"
    shutil.copy(SAMPLE2, upload)
    upload.chmod(0o644)
    env = {"TMPDIR": str(tmp), "GRADIO_TEMP_DIR": ""}        # "": the app picks its own
    app = AppProcess(tiny_checkpoint, data / "cases.db", "--no-warmup",
                     log_path=tmp_path / "logs" / "app.log", env=env).wait_ready()
    try:
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        client.predict(handle_file(str(SAMPLE)), api_name="/classify")
        client.predict({"text": "back", "files": [handle_file(str(upload))]}, api_name="/chat_add")
        client.predict(api_name="/chat_respond")
        (app_tmp,) = tmp.glob("lesionlens-*")
        stored, temp = _modes(data), _modes(app_tmp)
        assert any(name.endswith(".png") for name in temp)              # overlays and copies
        assert any(name.endswith(upload.name) for name in temp), temp   # Gradio's upload copy
        assert any(name.startswith("images/") and name.endswith(".png") for name in stored)
        # Gradio copies the bundled (public) example images keeping their own mode (0644 in a
        # clone, 0444 where a checkout is read-only); they sit in the 0700 folder, out of reach.
        samples = {p.name: p.stat().st_mode & 0o777 for p in SAMPLES.glob("*")}
        temp = {n: m for n, m in temp.items() if samples.get(Path(n).name) != m}
        for root, modes in ((data, stored), (app_tmp, temp)):
            folders = {n for n in modes if root.joinpath(n).is_dir()}
            assert {n: m for n, m in modes.items() if n in folders and m != 0o700} == {}
            assert {n: m for n, m in modes.items() if n not in folders and m != 0o600} == {}
    finally:
        app.stop()
    assert app.proc.returncode == 128 + 15                            # SIGTERM, handled
    assert list(tmp.glob("lesionlens-*")) == [], app.log()


@pytest.mark.slow
def test_temp_folder_of_a_killed_run_is_removed_at_the_next_start(tiny_checkpoint, tmp_path):
    """kill -9 leaves the run's temp folder (uploads, overlays) behind; the next start removes it, and
    neither a live server's folder nor one that is not ours."""
    from gradio_client import Client, handle_file
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "GRADIO_TEMP_DIR": ""}
    other = tmp / "lesionlens-xla-cache-keepme"                        # someone else's, by its name
    other.mkdir()
    os.utime(other, (0, 0))
    live = AppProcess(tiny_checkpoint, tmp_path / "data2" / "cases.db", "--no-warmup", env=env).wait_ready()
    try:
        before = set(tmp.glob("lesionlens-*"))
        killed = AppProcess(tiny_checkpoint, tmp_path / "data" / "cases.db", "--no-warmup", env=env).wait_ready()
        Client(killed.url, verbose=False, download_files=str(tmp_path / "dl")).predict(
            handle_file(str(SAMPLE)), api_name="/classify")
        (left,) = set(tmp.glob("lesionlens-*")) - before
        assert any(p.suffix == ".png" for p in left.rglob("*"))           # patient pictures in it
        killed.proc.kill()
        killed.proc.wait()
        restarted = AppProcess(tiny_checkpoint, tmp_path / "data" / "cases.db", "--no-warmup", env=env).wait_ready()
        try:
            assert not left.exists(), restarted.log()
            assert "Removed 1 temp folder(s) left by a killed run" in restarted.log()
            assert before <= set(tmp.glob("lesionlens-*"))                    # the live server's, and the other
            assert len(list(tmp.glob("lesionlens-*"))) == 3
        finally:
            restarted.stop()
    finally:
        live.stop()


@pytest.mark.slow
def test_app_start_collects_orphans_and_a_broken_data_folder_gets_a_clear_message(
        tiny_checkpoint, tmp_path):
    from gradio_client import Client, handle_file
    from app.store import CaseStore
    db = tmp_path / "data" / "cases.db"
    store = CaseStore(db)
    orphan = store.image_path("ab" + "0" * 62)           # a file a crash left without its row
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a case")
    app = AppProcess(tiny_checkpoint, db, "--no-warmup", log_path=tmp_path / "app.log").wait_ready()
    try:
        assert not orphan.exists()
        assert "Removed 1 image file(s) no case refers to" in app.log()
        assert "this checkpoint has no unusual-image reference" in app.log()   # never calibrated
        # The data folder breaks while serving (a real OS error: the lock file is a folder).
        (db.parent / ".lock").unlink()
        (db.parent / ".lock").mkdir()
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        with pytest.raises(Exception) as refused:
            client.predict(handle_file(str(SAMPLE)), api_name="/classify")
        message = str(refused.value)
        assert "could not save: the data folder is not writable" in message
        assert "Errno" not in message and str(db.parent) not in message
        time.sleep(0.5)
        assert "could not save in" in app.log() and "Is a directory" in app.log()
    finally:
        app.stop()
    assert store.count() == 0


def _login(app, user: str, password: str, source: str = "127.0.0.1") -> tuple[int, dict]:
    """POST /login as the browser's sign-in form does, from the loopback address `source` (all of
    127.0.0.0/8 reaches the app): (HTTP status, headers in lower case)."""
    import http.client
    import urllib.parse
    body = urllib.parse.urlencode({"username": user, "password": password})
    connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.mark.slow
def test_login_is_throttled_by_user_and_address_and_logged(tiny_checkpoint, tmp_path):
    from app.auth import ADDRESS_FREE_FAILURES, PAIR_FREE_FAILURES, hash_password
    auth_file = tmp_path / "auth.txt"
    auth_file.write_text(f"ana:{hash_password('pw-ana')}\n")
    app = AppProcess(tiny_checkpoint, tmp_path / "data" / "cases.db", "--no-warmup",
                     "--auth-file", str(auth_file), "--auth", "bo:pw-bo",
                     log_path=tmp_path / "app.log").wait_ready()
    try:
        assert _login(app, "ana", "pw-ana")[0] == 200                 # the hashed password works
        for i in range(PAIR_FREE_FAILURES):
            assert _login(app, "ana", f"guess-{i}")[0] == 400
        status, headers = _login(app, "ana", "pw-ana")                # right, but locked out
        assert status == 429 and int(headers["retry-after"]) >= 1, headers
        assert _login(app, "ana", "guess-x")[0] == 429
        assert _login(app, "bo", "pw-bo")[0] == 200                   # other users unaffected
        time.sleep(int(headers["retry-after"]) + 0.5)
        assert _login(app, "ana", "pw-ana")[0] == 200                 # the lock-out ends

        # One address guessing many user names is locked out, for names never signed in from it.
        statuses = [_login(app, f"user{i}", "guess")[0]
                    for i in range(ADDRESS_FREE_FAILURES - PAIR_FREE_FAILURES)]
        assert statuses == [400] * len(statuses)
        assert _login(app, "carl", "pw-carl")[0] == 429
        assert _login(app, "bo", "pw-bo")[0] == 200                    # bo signed in from here before

        # Guessing ana's password from one address does not lock ana out of another.
        for i in range(PAIR_FREE_FAILURES):
            assert _login(app, "ana", f"again-{i}", source="127.0.0.2")[0] == 400
        assert _login(app, "ana", "again-x", source="127.0.0.2")[0] == 429   # the guesser slows down
        assert _login(app, "ana", "pw-ana", source="127.0.0.3")[0] == 200    # ana, from a clean address
        log = app.log()
    finally:
        app.stop()
    failed = [l for l in log.splitlines() if "failed login for user 'ana' from 127.0.0.1" in l]
    assert len(failed) == PAIR_FREE_FAILURES and "locked out for 2 s" in failed[-1]
    assert "login refused for user 'ana' from 127.0.0.1: locked out" in log
    assert "guess-" not in log and "pw-ana" not in log and "pw-bo" not in log   # no passwords


def test_the_crop_box_is_found_once_and_places_the_map_as_before(tmp_path):
    """The upload walk finds the field-of-view crop once (`prepare_with_boxes`) and puts the map back through
    it: the same view and the same placed map as finding it again."""
    from PIL import ImageDraw

    from model.images import square_box
    from model.predictor import Predictor
    p = Predictor.load(make_tiny_checkpoint(tmp_path / "fov", resize="fov"))
    framed = Image.new("RGB", (320, 240), "black")                   # a dermatoscope's round frame
    ImageDraw.Draw(framed).ellipse((60, 20, 260, 220), fill=(200, 150, 130))
    prepared, (box,) = p.prepare_with_boxes([framed])
    assert box == square_box(framed, "fov") and box != (0, 0, 320, 240)
    np.testing.assert_array_equal(prepared, p.prepare([framed]))
    heat = np.random.default_rng(0).random((p.image_size, p.image_size)).astype(np.float32)
    np.testing.assert_array_equal(p.to_image_frame(heat, framed, box=box), p.to_image_frame(heat, framed))
    assert p.prepare_with_boxes([prepared[0]])[1] == [None]           # already the model's view: no crop
