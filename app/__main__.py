"""Run the LesionLens web app.

    python -m app [--checkpoint checkpoints/default] [--host 127.0.0.1] [--port 7860]
                  [--db history/cases.db] [--auth-file auth.txt] [--max-cases 500]
    python -m app hash-password USER >> auth.txt    # add a user: asks for the password

With a login each user sees only their own cases. The auth file holds one `user:hash` line per
user (salted scrypt hashes, written by `hash-password`; '#' starts a comment); it can also be
named by $LESIONLENS_AUTH_FILE. `--auth user:pass,...` and $LESIONLENS_AUTH still work, but a
password on the command line is visible to everyone on the machine (`ps`): prefer the file.
Repeated failed logins are answered HTTP 429 for a growing lock-out, and logged.
Nothing leaves the machine: analytics are off, there is no share link, and the page loads no
external fonts or scripts.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from .store import DEFAULT_MAX_CASES_PER_USER   # the store does not import gradio

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """'ana:pw1,bo:pw2' -> [('ana', 'pw1'), ('bo', 'pw2')]; None/'' -> None."""
    if not spec or not spec.strip():
        return None
    pairs = []
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"bad --auth entry {item.strip()!r}: expected user:password "
                             "(several separated by commas)")
        pairs.append((user, password))
    return pairs


TEMP_PREFIX = "lesionlens-"
OWNER_FILE = "owner.pid"
UNOWNED_TEMP = re.compile(r"lesionlens-[a-z0-9_]{8}")   # mkdtemp's names, from before the owner file


def private_temp_dir() -> Path:
    """This server's temp folder (0700, removed at exit): our overlays and exports, and Gradio's
    copies of uploads and outputs (GRADIO_TEMP_DIR, unless set) instead of the shared, 0755
    /tmp/gradio. Call before gradio is imported: it reads GRADIO_TEMP_DIR at import. Its owner file
    lets a later start tell it from a live server's (`remove_abandoned_temp_dirs`)."""
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    (folder / OWNER_FILE).write_text(str(os.getpid()))
    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        return True
    return pid > 0


def remove_abandoned_temp_dirs(root=None, max_age_s: float = 24 * 3600) -> int:
    """Remove the temp folders of earlier runs killed before they could clean up (`kill -9`, a power cut):
    they hold patients' uploads and overlays. A folder is abandoned when its owner file names no live
    process, or, written before owner files, when untouched for `max_age_s`. Only this user's folders."""
    removed = 0
    for folder in Path(root or tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            owner = folder / OWNER_FILE
            if owner.exists():
                abandoned = not _alive(int(owner.read_text().strip() or 0))
            else:
                abandoned = bool(UNOWNED_TEMP.fullmatch(folder.name)) and time.time() - folder.stat().st_mtime > max_age_s
        except (OSError, ValueError):
            continue
        if abandoned:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, in one line, or None when it can. Checked
    before the model loads, so a busy port is reported at once, not after the warm-up."""
    if not 1 <= port <= 65535:
        return f"--port {port} is not a port number (1-65535)"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return f"cannot listen on {host}: the address does not resolve ({e}); check --host"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds it
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another LesionLens, or another "
                        f"program); pick a free one: make run PORT={port + 1}, or python -m app "
                        f"--port {port + 1}")
            return f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host or --port"
    return None


def hash_password_command(argv) -> int:
    """`python -m app hash-password [USER]`: print 'USER:hash' (or the hash) for an auth file.
    The password is asked twice on a terminal, else read as one line from stdin (scripts)."""
    import getpass

    from .auth import hash_password
    ap = argparse.ArgumentParser(prog="python -m app hash-password",
                                 description=hash_password_command.__doc__.split("\n")[0][3:])
    ap.add_argument("user", nargs="?", help="user name to put before the hash")
    args = ap.parse_args(argv)
    if args.user is not None and (not args.user.strip() or ":" in args.user):
        print("error: a user name must not be empty or contain ':'", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 2
    hashed = hash_password(password)
    print(f"{args.user.strip()}:{hashed}" if args.user else hashed)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["hash-password"]:
        return hash_password_command(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m app", description=__doc__.split("\n\n")[0],
                                 epilog="Add a user to an auth file: python -m app hash-password "
                                        "USER >> auth.txt")
    ap.add_argument("--checkpoint", default="checkpoints/default",
                    help="checkpoint folder or training workdir (default: %(default)s)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; 0.0.0.0 exposes it to your network")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--db", default="history/cases.db",
                    help="case history database; images are stored next to it")
    ap.add_argument("--auth-file", default=os.environ.get("LESIONLENS_AUTH_FILE"), metavar="PATH",
                    help="users who may log in: one user:hash line each, hashes from "
                         "`python -m app hash-password USER` (default: $LESIONLENS_AUTH_FILE; none)")
    ap.add_argument("--auth", default=os.environ.get("LESIONLENS_AUTH"),
                    help="user:password[,user:password...] in plain text, visible in `ps`: prefer "
                         "--auth-file (default: $LESIONLENS_AUTH; none)")
    ap.add_argument("--max-cases", type=int, default=DEFAULT_MAX_CASES_PER_USER, metavar="N",
                    help="cases each user may keep; 0: no limit (default: %(default)s)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip compiling the model before serving (faster start, slow first reply)")
    ap.add_argument("--frame-ancestors", default="'none'", metavar="SOURCES",
                    help="sites that may show the app in a frame, as a CSP source list (default: none may; "
                         "a Hugging Face Space: https://huggingface.co)")
    args = ap.parse_args(argv)

    from .auth import Authenticator, read_auth_file
    try:
        pairs = parse_auth(args.auth)
        hashes = read_auth_file(args.auth_file) if args.auth_file else None
        auth = Authenticator.from_sources(pairs, hashes) if pairs or hashes else None
    except (ValueError, OSError) as e:   # a bad line, or a file that is not there
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from model.errors import UserError
    try:
        from model.predictor import Predictor
        predictor = Predictor.load(args.checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not predictor.has_distance_gate:
        print("note: this checkpoint has no unusual-image reference (calibrated before 2026-12-06, or never), so "
              "only near-uniform predictions are flagged as not like a lesion; add it with `python -m model "
              "calibrate --checkpoint DIR --csv VALIDATION_SET`.", flush=True)
    # Cases, overlays, exports and copies of uploads are medical images: every file this
    # server writes is private to the user it runs as (folders 0700, files 0600).
    os.umask(0o077)
    from .store import CaseStore
    try:
        store = CaseStore(args.db, max_cases_per_user=args.max_cases)
        # Image files a crash left between writing and the database row (or after a delete).
        orphans = store.collect_orphans()
    except Exception as e:  # unreadable/locked/foreign database: say which file
        print(f"error: cannot open the case database {args.db}: {e}", file=sys.stderr)
        return 2
    if orphans:
        print(f"Removed {orphans} image file(s) no case refers to (left by a crash).", flush=True)
    abandoned = remove_abandoned_temp_dirs()
    if abandoned:
        print(f"Removed {abandoned} temp folder(s) left by a killed run (uploads and overlays).", flush=True)
    tmp_dir = private_temp_dir()
    from .services import warm_up
    from .ui import build_demo, launch_kwargs
    if not args.no_warmup:
        print("Compiling the model (a few seconds)...", flush=True)
        warm_up(predictor)
    demo = build_demo(predictor, store, tmp_dir)
    demo.queue(max_size=64)
    print(f"LesionLens: checkpoint {predictor.checkpoint_id}; history in {store.db_path}"
          + (f"; {len(auth)} user(s) with login" if auth else ""), flush=True)
    # quiet: Gradio's own start-up lines suggest `share=True`, a public link this app never makes.
    demo.launch(server_name=args.host, server_port=args.port, share=False, quiet=True,
                prevent_thread_lock=True, **launch_kwargs(auth, args.frame_ancestors))
    print(f"Open {demo.local_url} in a browser (Ctrl+C stops the app).", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    from model.runtime import use_huge_pages
    use_huge_pages()   # XLA:CPU's buffers on huge pages: restarts this process once (model/runtime.py)
    sys.exit(main())
