"""Case store: an embedded SQLite database plus content-addressed image files.

    store = CaseStore("history/cases.db")      # images under history/images/ab/abcd....png
    case = store.add_case(pil_image, predictions={"mel": 0.7, ...}, checkpoint_id="...")
    store.list_cases(user="", query="back", top_class="mel", date_from="2025-01-01")

Crash safety comes from ordering, not from cleverness:
  * add: the image (and its thumbnail) are written first, each as tmp file + fsync + os.replace,
    then the row is inserted in one transaction. A crash in between leaves an orphan file,
    which is harmless (`collect_orphans` removes them); a row never points at a missing file.
  * delete: the row goes first (one transaction), the file after, and only when no other case
    uses the same hash.
Adds and deletes also hold an exclusive `flock` on <root>/.lock, so a delete's unlink cannot
race an add that found the file already present (another process or thread).
SQLite runs in WAL mode (readers never block the writer) with foreign keys on: every case row
references an `images` row, and every `images` row has its file.
Cases are medical images: the store's folders are 0700 and its files 0600 (only the user the
app runs as can read them), whatever the umask.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import sqlite3
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from model.errors import UserError

log = logging.getLogger("lesionlens")

SCHEMA_VERSION = 2   # 2: unusual_because, analysed_anyway
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
THUMB_SIDE = 128  # px, longest side: enough for a history table row
MAX_NOTE_CHARS = 2000             # a clinical note, not a document: keeps pages and exports small
DEFAULT_MAX_CASES_PER_USER = 500  # ~1-3 MB each: one user cannot fill the disk for everyone

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    sha256   TEXT PRIMARY KEY,
    width    INTEGER NOT NULL,
    height   INTEGER NOT NULL,
    created  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cases (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    user                  TEXT NOT NULL DEFAULT '',
    created               TEXT NOT NULL,      -- ISO 8601 UTC, 'YYYY-MM-DDTHH:MM:SS.ffffffZ'
    image_sha256          TEXT NOT NULL REFERENCES images(sha256),
    filename              TEXT NOT NULL DEFAULT '',
    note                  TEXT NOT NULL DEFAULT '',
    predictions           TEXT NOT NULL,      -- JSON {class code: probability}
    top_class             TEXT NOT NULL,
    malignant_probability REAL NOT NULL,
    checkpoint_id         TEXT NOT NULL DEFAULT '',
    unusual               INTEGER NOT NULL DEFAULT 0,
    ood_score             REAL,
    unusual_because       TEXT NOT NULL DEFAULT '',  -- the unusual-image checks it failed, space-separated
    analysed_anyway       TEXT NOT NULL DEFAULT ''   -- when its owner asked for the held-back result
);
CREATE INDEX IF NOT EXISTS cases_user_created ON cases(user, created);
CREATE INDEX IF NOT EXISTS cases_sha ON cases(image_sha256);
"""

# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (`=HYPERLINK(...)` in a note, an upload named `=1+1.jpg`): such text gets a leading quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

# Columns a schema-1 database lacks, added in place when the store opens it.
_ADDED_COLUMNS = {"unusual_because": "TEXT NOT NULL DEFAULT ''", "analysed_anyway": "TEXT NOT NULL DEFAULT ''"}

CSV_FIELDS = ["id", "user", "created", "filename", "note", "status", "top_class", "malignant_probability",
              "unusual", "unusual_because", "analysed_anyway", "ood_score", "checkpoint_id", "image_sha256", "image"]
HELD_BACK = "held back: unlike a dermoscopic lesion"


class NotStored(UserError):
    """The case was refused before anything was written: note too long, history full, or the
    data folder not writable. The message says what to do."""


@contextlib.contextmanager
def storage_errors(action: str, folder: Path, what: str = "the data folder"):
    """A full or read-only disk is for whoever runs the app to fix: people get a clear message
    (never `[Errno 30] Read-only file system: /srv/.../.lock`), the log gets the detail."""
    try:
        yield
    except NotStored:
        raise
    except (OSError, sqlite3.Error) as e:
        log.error("could not %s in %s: %r", action, folder, e)
        raise NotStored(f"could not {action}: {what} is not writable (the disk may be full or "
                        "read-only), so nothing was changed. Please tell whoever runs "
                        "LesionLens; the details are in the server log.") from None


def check_note(note: str | None) -> None:
    if note and len(note) > MAX_NOTE_CHARS:
        raise NotStored(f"the note has {len(note):,} characters; notes are limited to "
                        f"{MAX_NOTE_CHARS:,}. Shorten it and send it again.")


@dataclass(frozen=True)
class Case:
    id: int
    user: str
    created: str
    image_sha256: str
    filename: str
    note: str
    predictions: dict = field(hash=False)
    top_class: str
    malignant_probability: float
    checkpoint_id: str
    unusual: bool
    ood_score: float | None
    image_path: Path
    thumb_path: Path
    unusual_because: tuple[str, ...] = ()
    analysed_anyway: str = ""        # when the owner asked for the held-back result; '' if never

    @property
    def held_back(self) -> bool:
        """Unusual, and its owner never asked for the result anyway: no view shows its probabilities."""
        return self.unusual and not self.analysed_anyway

    @property
    def status(self) -> str:
        """One line every view of the case uses: held back (and why), analysed anyway, or analysed."""
        why = f" ({', '.join(name.replace('_', ' ') for name in self.unusual_because)})" if self.unusual_because else ""
        if self.held_back:
            return HELD_BACK + why
        return f"analysed anyway, although unlike a dermoscopic lesion{why}" if self.unusual else "analysed"

    def load_image(self) -> Image.Image:
        """The stored RGB image (what the model saw before its square resize)."""
        with Image.open(self.image_path) as im:
            return im.convert("RGB")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file, or the whole new one (mode 0600:
    mkstemp's)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def encode_png(image: Image.Image) -> bytes:
    # zlib level 1: 5x faster than the default 6 (a 1024 x 768 photo: 50 vs 177 ms, on the request's
    # path) for files 10-30% larger. Lossless either way.
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def csv_safe(text: str) -> str:
    """People's text as a spreadsheet shows it, never runs it (the OWASP CSV-injection rule)."""
    text = str(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _day_after(day: str) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class CaseStore:
    """Cases of one deployment. Safe to share across threads; each call opens its own connection."""

    def __init__(self, db_path: str | os.PathLike,
                 max_cases_per_user: int | None = DEFAULT_MAX_CASES_PER_USER):
        """`max_cases_per_user`: the cases one user may keep (0 or None: no limit); with no
        login everyone is user '' and shares it."""
        self.max_cases_per_user = max_cases_per_user or None
        self.db_path = Path(db_path)
        self.root = self.db_path.parent
        self.images_dir = self.root / "images"
        self.thumbs_dir = self.root / "thumbs"
        # A new data folder is private; an existing one may be a shared folder (the working
        # directory for `--db cases.db`), so only what the store itself owns is tightened.
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        for folder in (self.images_dir, self.thumbs_dir):
            folder.mkdir(exist_ok=True, mode=PRIVATE_DIR)
            os.chmod(folder, PRIVATE_DIR)
        self._lock_path = self.root / ".lock"
        # SQLite gives -wal and -shm the database's mode: create it 0600 before it does.
        os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
        for path in (self.db_path, self._lock_path, *self._sidecars()):
            if path.exists():   # written by an older version with the umask's 0644
                os.chmod(path, PRIVATE_FILE)
        self._thread_lock = threading.Lock()
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.db_path} was written by a newer lesionlens "
                                   f"(schema {version} > {SCHEMA_VERSION}); upgrade the app")
            con.executescript(_SCHEMA)
            present = {row["name"] for row in con.execute("PRAGMA table_info(cases)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    con.execute(f"ALTER TABLE cases ADD COLUMN {column} {kind}")
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---------------------------------------------------------------- plumbing
    def _sidecars(self) -> list[Path]:
        return [self.db_path.with_name(self.db_path.name + suffix) for suffix in ("-wal", "-shm")]

    @contextlib.contextmanager
    def _connect(self):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per case.
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _write_lock(self):
        """Serialise writers across threads (threading.Lock) and processes (flock)."""
        with self._thread_lock:
            with open(os.open(self._lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE), "r+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def image_path(self, sha: str) -> Path:
        return self.images_dir / sha[:2] / f"{sha}.png"

    def thumb_path(self, sha: str) -> Path:
        return self.thumbs_dir / sha[:2] / f"{sha}.png"

    def _row_to_case(self, row: sqlite3.Row) -> Case:
        sha = row["image_sha256"]
        return Case(id=row["id"], user=row["user"], created=row["created"], image_sha256=sha,
                    filename=row["filename"], note=row["note"],
                    predictions=json.loads(row["predictions"]), top_class=row["top_class"],
                    malignant_probability=float(row["malignant_probability"]),
                    checkpoint_id=row["checkpoint_id"], unusual=bool(row["unusual"]),
                    ood_score=row["ood_score"], image_path=self.image_path(sha),
                    thumb_path=self.thumb_path(sha), unusual_because=tuple(row["unusual_because"].split()),
                    analysed_anyway=row["analysed_anyway"])

    # ---------------------------------------------------------------- writes
    def check_room(self, user: str = "") -> None:
        """NotStored when `user` already keeps `max_cases_per_user` cases."""
        limit = self.max_cases_per_user
        with storage_errors("save", self.root):
            full = bool(limit) and self.count(user or "") >= limit
        if full:
            raise NotStored(f"your history is full: {limit:,} cases is the limit per user. Delete "
                            "cases you no longer need in the History tab (export them first to "
                            "keep a copy), then try again.")

    def add_case(self, image: Image.Image, *, predictions: dict[str, float],
                 malignant_probability: float, checkpoint_id: str = "", user: str = "",
                 filename: str = "", note: str = "", top_class: str | None = None,
                 unusual: bool = False, ood_score: float | None = None, unusual_because=()) -> Case:
        """Store one analysed image; returns the new Case. The image file lands before the row.
        NotStored (nothing written) for a note over MAX_NOTE_CHARS or a full history."""
        if not predictions:
            raise ValueError("predictions must not be empty")
        check_note(note)
        image = image.convert("RGB")
        png = encode_png(image)
        sha = hashlib.sha256(png).hexdigest()
        if top_class is None:
            top_class = max(predictions, key=predictions.get)
        preds = {str(k): float(v) for k, v in predictions.items()}
        with storage_errors("save", self.root), self._write_lock():
            self.check_room(user)     # under the lock: two adds cannot both take the last place
            path, thumb = self.image_path(sha), self.thumb_path(sha)
            if not path.exists():
                atomic_write_bytes(path, png)
            if not thumb.exists():
                small = image.copy()
                small.thumbnail((THUMB_SIDE, THUMB_SIDE))
                atomic_write_bytes(thumb, encode_png(small))
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    con.execute("INSERT OR IGNORE INTO images(sha256, width, height, created) "
                                "VALUES (?, ?, ?, ?)", (sha, image.width, image.height, utc_now()))
                    cur = con.execute(
                        "INSERT INTO cases(user, created, image_sha256, filename, note, predictions,"
                        " top_class, malignant_probability, checkpoint_id, unusual, ood_score, unusual_because)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (user or "", utc_now(), sha, filename or "", note or "", json.dumps(preds),
                         top_class, float(malignant_probability), checkpoint_id or "",
                         int(bool(unusual)), None if ood_score is None else float(ood_score),
                         " ".join(unusual_because) if unusual else ""))
                    case_id = cur.lastrowid
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                row = con.execute("SELECT * FROM cases WHERE id=?", (case_id,)).fetchone()
        return self._row_to_case(row)

    def mark_analysed_anyway(self, case_id: int, user: str | None = None) -> bool:
        """Record that the case's owner asked for the result of an unusual image (the first time counts)."""
        with storage_errors("save the request", self.root), self._connect() as con:
            sql, args = "UPDATE cases SET analysed_anyway=? WHERE id=? AND analysed_anyway=''", [utc_now(), case_id]
            if user is not None:
                sql += " AND user=?"
                args.append(user)
            return con.execute(sql, args).rowcount > 0

    def update_note(self, case_id: int, note: str, user: str | None = None) -> bool:
        check_note(note)
        with storage_errors("save the note", self.root), self._connect() as con:
            sql, args = "UPDATE cases SET note=? WHERE id=?", [note, case_id]
            if user is not None:
                sql += " AND user=?"
                args.append(user)
            return con.execute(sql, args).rowcount > 0

    def delete_case(self, case_id: int, user: str | None = None) -> bool:
        """Delete one case (only the user's own when `user` is given); drop its image if unused."""
        with storage_errors("delete the case", self.root), self._write_lock():
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    sql, args = "SELECT image_sha256 FROM cases WHERE id=?", [case_id]
                    if user is not None:
                        sql += " AND user=?"
                        args.append(user)
                    row = con.execute(sql, args).fetchone()
                    if row is None:
                        con.execute("ROLLBACK")
                        return False
                    sha = row[0]
                    con.execute("DELETE FROM cases WHERE id=?", (case_id,))
                    still_used = con.execute("SELECT 1 FROM cases WHERE image_sha256=? LIMIT 1",
                                             (sha,)).fetchone()
                    if not still_used:
                        con.execute("DELETE FROM images WHERE sha256=?", (sha,))
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            if not still_used:  # after the commit: a crash here only leaves an orphan file
                for p in (self.image_path(sha), self.thumb_path(sha)):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        return True

    def collect_orphans(self) -> int:
        """Remove image files no row references (left by a crash mid-add/delete); returns count."""
        removed = 0
        with self._write_lock():
            with self._connect() as con:
                known = {r[0] for r in con.execute("SELECT sha256 FROM images")}
            for folder in (self.images_dir, self.thumbs_dir):
                for p in folder.glob("*/*"):
                    sha = p.name.split(".")[0]
                    if p.name.startswith(".tmp-") or sha not in known:
                        p.unlink(missing_ok=True)
                        removed += 1
        return removed

    # ---------------------------------------------------------------- reads
    def get_case(self, case_id: int, user: str | None = None) -> Case | None:
        with self._connect() as con:
            sql, args = "SELECT * FROM cases WHERE id=?", [case_id]
            if user is not None:
                sql += " AND user=?"
                args.append(user)
            row = con.execute(sql, args).fetchone()
        return None if row is None else self._row_to_case(row)

    def list_cases(self, user: str | None = None, query: str = "", top_class: str | None = None,
                   date_from: str | None = None, date_to: str | None = None,
                   limit: int | None = None) -> list[Case]:
        """Newest first. `user=None` means every user; dates are 'YYYY-MM-DD' (UTC, inclusive);
        `query` matches note or filename, case-insensitively."""
        where, args = [], []
        if user is not None:
            where.append("user = ?")
            args.append(user)
        if query and query.strip():
            where.append("(note LIKE ? ESCAPE '\\' OR filename LIKE ? ESCAPE '\\')")
            pattern = f"%{_like_escape(query.strip())}%"
            args += [pattern, pattern]
        if top_class:   # a held-back case has no class to show, so none to be found by
            where.append("top_class = ? AND NOT (unusual = 1 AND analysed_anyway = '')")
            args.append(top_class)
        if date_from:
            where.append("created >= ?")
            args.append(dt.date.fromisoformat(date_from).isoformat())
        if date_to:
            where.append("created < ?")
            args.append(_day_after(date_to))
        sql = "SELECT * FROM cases"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as con:
            rows = con.execute(sql, args).fetchall()
        return [self._row_to_case(r) for r in rows]

    def count(self, user: str | None = None) -> int:
        with self._connect() as con:
            if user is None:
                return con.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
            return con.execute("SELECT COUNT(*) FROM cases WHERE user=?", (user,)).fetchone()[0]

    # ---------------------------------------------------------------- export
    def _csv_text(self, cases: list[Case], classes: list[str] | None) -> str:
        if classes is None:
            classes = sorted({k for c in cases for k in c.predictions})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_FIELDS + [f"p_{k}" for k in classes])
        for c in cases:
            # Text is neutralised; the numbers are ours (a negative score stays a number). A held-back
            # case's probabilities stay in the store, out of the export, as out of every other view.
            shown = not c.held_back
            w.writerow([c.id, csv_safe(c.user), c.created, csv_safe(c.filename), csv_safe(c.note), c.status,
                        csv_safe(c.top_class) if shown else "", f"{c.malignant_probability:.6f}" if shown else "",
                        int(c.unusual), " ".join(c.unusual_because), c.analysed_anyway,
                        "" if c.ood_score is None else f"{c.ood_score:.6f}", csv_safe(c.checkpoint_id),
                        c.image_sha256, f"images/{c.image_sha256}.png"]
                       + [f"{c.predictions[k]:.6f}" if shown and k in c.predictions else "" for k in classes])
        return buf.getvalue()

    def export_csv(self, path: str | os.PathLike, cases: list[Case] | None = None,
                   classes: list[str] | None = None, **filters) -> Path:
        """Write the cases (default: `list_cases(**filters)`) as CSV, one p_<class> column each."""
        cases = self.list_cases(**filters) if cases is None else cases
        path = Path(path)
        with storage_errors("write the export", path.parent, "the app's temporary folder"):
            atomic_write_bytes(path, self._csv_text(cases, classes).encode("utf-8"))
        return path

    def export_zip(self, path: str | os.PathLike, cases: list[Case] | None = None,
                   classes: list[str] | None = None, **filters) -> Path:
        """cases.csv plus images/<sha256>.png for every case (each image once)."""
        cases = self.list_cases(**filters) if cases is None else cases
        path = Path(path)
        with storage_errors("write the export", path.parent, "the app's temporary folder"):
            path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".zip")  # 0600
            os.close(fd)
            try:
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                    z.writestr("cases.csv", self._csv_text(cases, classes))
                    for sha in dict.fromkeys(c.image_sha256 for c in cases):
                        # PNG is already compressed: store it as is.
                        z.write(self.image_path(sha), f"images/{sha}.png",
                                compress_type=zipfile.ZIP_STORED)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        return path

    # ---------------------------------------------------------------- checks
    def check(self) -> list[str]:
        """Problems found (empty list when healthy): SQLite integrity, foreign keys, files."""
        problems = []
        with self._connect() as con:
            res = [r[0] for r in con.execute("PRAGMA integrity_check")]
            if res != ["ok"]:
                problems += [f"integrity_check: {r}" for r in res]
            for r in con.execute("PRAGMA foreign_key_check"):
                problems.append(f"foreign key violation: {tuple(r)}")
            for (sha,) in con.execute("SELECT sha256 FROM images"):
                if not self.image_path(sha).exists():
                    problems.append(f"missing image file for {sha}")
        return problems
