"""Case store: round trips, filters, exports, deletes, and real crash safety (SIGKILL)."""
import csv
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _preds(top: str) -> dict:
    p = {"mel": 0.1, "nv": 0.1, "bkl": 0.1}
    p[top] = 0.8
    return p


def test_add_get_and_survive_reopen(tmp_path):
    store = CaseStore(tmp_path / "cases.db")
    case = store.add_case(_image(0), predictions=_preds("mel"), malignant_probability=0.8,
                          checkpoint_id="ck1", filename="a.jpg", note="back, 54 y")
    assert case.top_class == "mel" and case.image_path.exists() and case.thumb_path.exists()
    assert case.image_path.parent.name == case.image_sha256[:2]
    again = CaseStore(tmp_path / "cases.db").get_case(case.id)
    assert again == case
    assert again.load_image().size == (40, 30)
    assert again.predictions["mel"] == pytest.approx(0.8)
    assert store.check() == []


def test_filters_and_users(tmp_path):
    store = CaseStore(tmp_path / "cases.db")
    store.add_case(_image(1), predictions=_preds("mel"), malignant_probability=0.8,
                   user="ana", note="left shoulder")
    store.add_case(_image(2), predictions=_preds("nv"), malignant_probability=0.1,
                   user="ana", note="100% sure_nevus")
    store.add_case(_image(3), predictions=_preds("nv"), malignant_probability=0.1,
                   user="bo", filename="shoulder.png")
    assert len(store.list_cases()) == 3
    assert len(store.list_cases(user="ana")) == 2
    assert [c.note for c in store.list_cases(user="ana", top_class="mel")] == ["left shoulder"]
    assert len(store.list_cases(query="SHOULDER")) == 2          # note or filename, any case
    assert len(store.list_cases(query="100%")) == 1               # LIKE wildcards are escaped
    assert len(store.list_cases(query="0%")) == 1
    assert len(store.list_cases(query="e_n")) == 1
    today = store.list_cases()[0].created[:10]
    assert len(store.list_cases(date_from=today, date_to=today)) == 3
    assert store.list_cases(date_to="2000-01-01") == []
    assert store.get_case(store.list_cases(user="bo")[0].id, user="ana") is None
    # newest first
    ids = [c.id for c in store.list_cases()]
    assert ids == sorted(ids, reverse=True)


def test_delete_keeps_shared_image_until_last_reference(tmp_path):
    store = CaseStore(tmp_path / "cases.db")
    a = store.add_case(_image(5), predictions=_preds("nv"), malignant_probability=0.1, user="u")
    b = store.add_case(_image(5), predictions=_preds("nv"), malignant_probability=0.1, user="u")
    assert a.image_sha256 == b.image_sha256
    assert not store.delete_case(a.id, user="someone else")
    assert store.delete_case(a.id, user="u")
    assert b.image_path.exists()
    assert store.delete_case(b.id)
    assert not b.image_path.exists() and not b.thumb_path.exists()
    assert store.get_case(b.id) is None and not store.delete_case(b.id)
    assert store.check() == []


def test_exports(tmp_path):
    store = CaseStore(tmp_path / "cases.db")
    store.add_case(_image(6), predictions=_preds("mel"), malignant_probability=0.8,
                   note='comma, "quote"\nnewline')
    store.add_case(_image(7), predictions=_preds("nv"), malignant_probability=0.1)
    out = store.export_csv(tmp_path / "out" / "cases.csv", classes=["mel", "nv", "bkl"])
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 2 and rows[1]["note"] == 'comma, "quote"\nnewline'
    assert float(rows[1]["p_mel"]) == pytest.approx(0.8)
    zpath = store.export_zip(tmp_path / "out" / "cases.zip", top_class="mel")
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
        assert names[0] == "cases.csv" and len(names) == 2
        rows = list(csv.DictReader(io.StringIO(z.read("cases.csv").decode())))
        assert rows[0]["image"] in names
        Image.open(io.BytesIO(z.read(rows[0]["image"]))).verify()


def test_csv_export_neutralises_formulas(tmp_path):
    store = CaseStore(tmp_path / "cases.db")
    store.add_case(_image(10), predictions=_preds("mel"), malignant_probability=0.8,
                   user="@ana", note='=HYPERLINK("http://x","y")', filename="=1+1.jpg")
    for start in "+-\t\r":
        store.add_case(_image(10), predictions=_preds("nv"), malignant_probability=0.1,
                       note=f"{start}cmd|' /C calc'!A0", filename=f"{start}x.png")
    store.add_case(_image(11), predictions=_preds("nv"), malignant_probability=0.1,
                   note="left shoulder, -2 mm", filename="ok.jpg")
    out = store.export_csv(tmp_path / "out" / "cases.csv", classes=["mel", "nv", "bkl"])
    rows = list(csv.DictReader(out.open(newline="")))
    first = rows[-1]                                    # oldest last
    assert first["note"] == '\'=HYPERLINK("http://x","y")'
    assert first["filename"] == "'=1+1.jpg" and first["user"] == "'@ana"
    for row in rows[1:-1]:
        assert row["note"].startswith("'") and row["filename"].startswith("'"), row
        assert row["note"][1] in "+-\t\r"                # the text itself is kept
    assert rows[0]["note"] == "left shoulder, -2 mm" and rows[0]["filename"] == "ok.jpg"
    assert all(not r[k].startswith(tuple("=+-@\t\r")) for r in rows for k in r)
    zpath = store.export_zip(tmp_path / "out" / "cases.zip")      # the ZIP's CSV too
    with zipfile.ZipFile(zpath) as z:
        zipped = list(csv.DictReader(io.StringIO(z.read("cases.csv").decode(), newline="")))
    assert zipped == rows


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_data_folder_and_files_are_private(tmp_path):
    old_umask = os.umask(0o022)                 # the usual umask: 0755 folders, 0644 files
    try:
        store = CaseStore(tmp_path / "history" / "cases.db")
        case = store.add_case(_image(12), predictions=_preds("nv"), malignant_probability=0.1)
        store.export_zip(tmp_path / "history" / "exports" / "cases.zip")
        root = tmp_path / "history"
        folders = [root, store.images_dir, store.thumbs_dir, case.image_path.parent,
                   case.thumb_path.parent, root / "exports"]
        assert {str(f): _mode(f) for f in folders} == {str(f): 0o700 for f in folders}
        import sqlite3
        reader = sqlite3.connect(root / "cases.db")   # while open, the -wal and -shm files exist
        try:
            reader.execute("SELECT COUNT(*) FROM cases").fetchone()
            files = [p for p in root.rglob("*") if p.is_file()]
            assert {"cases.db", "cases.db-wal", "cases.db-shm", ".lock", "cases.zip",
                    case.image_path.name} <= {p.name for p in files}
            assert {str(p): _mode(p) for p in files} == {str(p): 0o600 for p in files}
        finally:
            reader.close()

        # A store written by an older version (umask modes) is tightened when opened.
        old = tmp_path / "old"
        old.mkdir()
        CaseStore(old / "cases.db").add_case(_image(13), predictions=_preds("nv"),
                                             malignant_probability=0.1)
        for p in old.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        CaseStore(old / "cases.db")
        assert _mode(old / "cases.db") == _mode(old / ".lock") == 0o600
        assert _mode(old / "images") == _mode(old / "thumbs") == 0o700
        assert _mode(old) == 0o755                # a folder it did not create is left alone
    finally:
        os.umask(old_umask)


def test_orphans_are_collected(tmp_path):
    store = CaseStore(tmp_path / "cases.db")
    case = store.add_case(_image(8), predictions=_preds("nv"), malignant_probability=0.1)
    orphan = store.image_path("ff" + "0" * 62)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    assert store.collect_orphans() == 1
    assert not orphan.exists() and case.image_path.exists()


_WRITER = r"""
import random, sys
import numpy as np
from PIL import Image
from app.store import CaseStore
store = CaseStore(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
ids = []
for i in range(100000):
    r = rng.random()
    if r < 0.2 and ids:
        store.delete_case(ids.pop(rng.randrange(len(ids))))
    else:
        seed = rng.randrange(30)            # repeats: shared content-addressed images
        px = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ids.append(store.add_case(Image.fromarray(px), predictions={"mel": 0.5, "nv": 0.5},
                                  malignant_probability=0.5, note=f"n{i}").id)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path):
    db = tmp_path / "cases.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), str(round_)],
                                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        done = 0
        deadline = time.monotonic() + 60
        while done < 25 + 10 * round_ and time.monotonic() < deadline:
            if not proc.stdout.readline():
                break
            done += 1
        time.sleep(0.003 * round_)  # land the kill at different points of a write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert done >= 25, "writer did not start"

        store = CaseStore(db)   # reopen: WAL recovery happens here
        assert store.check() == []
        cases = store.list_cases()
        assert cases, "committed cases vanished"
        for c in cases:
            assert c.image_path.exists() and c.thumb_path.exists()
            Image.open(c.image_path).verify()
        import sqlite3
        con = sqlite3.connect(db)
        n_images = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        n_shas = con.execute("SELECT COUNT(DISTINCT image_sha256) FROM cases").fetchone()[0]
        con.close()
        assert n_images == n_shas
        store.collect_orphans()
        assert store.check() == []
    # still writable after all that
    store.add_case(_image(9), predictions=_preds("nv"), malignant_probability=0.1)
    assert store.check() == []


def test_a_schema_1_history_opens_with_the_case_state_columns(tmp_path):
    """A history written before cases carried why they were held back opens, keeps its cases, and an unusual
    one of them reads as held back (its owner never asked for the result anyway)."""
    import sqlite3
    db = tmp_path / "cases.db"
    with sqlite3.connect(db) as con:
        con.executescript("""
            CREATE TABLE images (sha256 TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL,
                                 created TEXT NOT NULL);
            CREATE TABLE cases (id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL DEFAULT '',
                created TEXT NOT NULL, image_sha256 TEXT NOT NULL REFERENCES images(sha256),
                filename TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '', predictions TEXT NOT NULL,
                top_class TEXT NOT NULL, malignant_probability REAL NOT NULL, checkpoint_id TEXT NOT NULL DEFAULT '',
                unusual INTEGER NOT NULL DEFAULT 0, ood_score REAL);
            INSERT INTO images VALUES ('ab', 4, 4, '2026-01-01T00:00:00.000000Z');
            INSERT INTO cases(created, image_sha256, predictions, top_class, malignant_probability, unusual)
                VALUES ('2026-01-01T00:00:00.000000Z', 'ab', '{"mel": 0.7, "nv": 0.3}', 'mel', 0.7, 1);
            PRAGMA user_version=1;""")
    store = CaseStore(db)
    (case,) = store.list_cases()
    assert case.unusual and case.held_back and case.unusual_because == () and case.status.startswith("held back")
    assert store.mark_analysed_anyway(case.id) and not store.get_case(case.id).held_back
    assert not store.mark_analysed_anyway(case.id)   # the first request is the one recorded
