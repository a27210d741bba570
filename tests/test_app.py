"""App tests: handlers in-process, then the real app in a subprocess driven by gradio_client.

    .venv/bin/python -m pytest tests/test_app.py -q

Everything runs the real `Predictor` on a tiny random-weight checkpoint made here in a few
seconds (simple_cnn, 64 px); the bundled checkpoints/default is not needed.
"""
from __future__ import annotations

import io
import os
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

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
SAMPLE = SAMPLES / "mel_ISIC_0030828.jpg"
SAMPLE2 = SAMPLES / "nv_ISIC_0031646.jpg"


# ------------------------------------------------------------------ helpers (shared with
# test_browser.py and bench/bench_app.py)
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

    def __init__(self, checkpoint, db, *extra, port=None, log_path=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONPATH": _pythonpath(), "GRADIO_ANALYTICS_ENABLED": "False",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
               "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
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
    p = ctx.predictor
    monkeypatch.setitem(p.metadata, "ood", {"class_means": [[0.0] * 16] * 7,
                                            "variance": [1.0] * 16, "threshold": -1.0})
    history, _ = _chat(ctx, "", [SAMPLE])
    (reply,) = _assistant_texts(history)
    assert reply.startswith("⚠️ **This image does not look like")
    # random weights give near-uniform probabilities: the unsure warning is there too
    assert "The model is unsure" in reply.split("**Case #")[0]


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
    history, state = _chat(ctx, "", [SAMPLE])
    p = ctx.predictor
    history, state = _chat(ctx, "help", history=history, state=state)
    assert "why not nevus" in _assistant_texts(history)[-1]
    history, state = _chat(ctx, "show occlusion", history=history, state=state)
    assert _assistant_texts(history)[-1].startswith("Occlusion for")
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
    probs, png = classify_api(ctx, str(SAMPLE2), user="ana")
    assert set(probs) == set(ctx.predictor.class_names)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    Image.open(png).verify()
    (case,) = ctx.store.list_cases(user="ana")

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
    with pytest.raises(UserError):
        hist.history_cases(ctx, "ana", date_from="last tuesday")
    thumb, md = hist.case_details(ctx, case.id, "ana")
    assert max(thumb.size) <= 128 and f"Case #{case.id}" in md
    zpath = hist.export_history(ctx, "zip", ctx.store.list_cases(user="ana"))
    assert Path(zpath).stat().st_size > 1000
    assert ctx.store.delete_case(case.id, user="ana") and not case.image_path.exists()


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
        probs, overlay = ana.predict(handle_file(str(SAMPLE)), api_name="/classify")
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
        "gradients": ("method", "gradients", None),
        "explain melanoma": ("explain", None, 4),
        "why not nevus?": ("why_not", None, 5),
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
