"""Run the LesionLens web app.

    python -m app [--checkpoint checkpoints/default] [--host 127.0.0.1] [--port 7860]
                  [--db history/cases.db] [--auth user:pass,user2:pass2]

Auth can also come from the environment (LESIONLENS_AUTH=user:pass,...); with it each user
sees only their own cases. Nothing leaves the machine: analytics are off, there is no share
link, and the page loads no external fonts or scripts.
"""
from __future__ import annotations

import argparse
import os
import sys

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default",
                    help="checkpoint folder or training workdir (default: %(default)s)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; 0.0.0.0 exposes it to your network")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--db", default="history/cases.db",
                    help="case history database; images are stored next to it")
    ap.add_argument("--auth", default=os.environ.get("LESIONLENS_AUTH"),
                    help="user:password[,user:password...] (default: $LESIONLENS_AUTH; none)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip compiling the model before serving (faster start, slow first reply)")
    args = ap.parse_args(argv)

    try:
        auth = parse_auth(args.auth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from model.errors import UserError
    try:
        from model.predictor import Predictor
        predictor = Predictor.load(args.checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .services import warm_up
    from .store import CaseStore
    from .ui import build_demo, launch_kwargs
    try:
        store = CaseStore(args.db)
    except Exception as e:  # unreadable/locked/foreign database: say which file
        print(f"error: cannot open the case database {args.db}: {e}", file=sys.stderr)
        return 2
    if not args.no_warmup:
        print("Compiling the model (a few seconds)...", flush=True)
        warm_up(predictor)
    demo = build_demo(predictor, store)
    demo.queue(max_size=64)
    print(f"LesionLens: checkpoint {predictor.checkpoint_id}; history in {store.db_path}"
          + (f"; {len(auth)} user(s) with login" if auth else ""), flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, **launch_kwargs(auth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
