"""Hugging Face Space entry point: `python -m app` itself, with the Space's settings.

History goes to /data (kept across restarts) when the Space has persistent storage, else it is lost at
each restart. Users come from $LESIONLENS_AUTH_FILE (a Space secret file; see `python -m app --help`)
or $LESIONLENS_AUTH. The Space page frames the app, so huggingface.co may frame it.
"""
import os
import sys

from app.__main__ import main

if __name__ == "__main__":
    from model.runtime import use_huge_pages
    use_huge_pages()   # as `python -m app` does: restart once with huge-page malloc (model/runtime.py)
    history = "/data/history/cases.db" if os.path.isdir("/data") else "history/cases.db"
    sys.exit(main(["--host", "0.0.0.0", "--port", os.environ.get("PORT", "7860"), "--db", history,
                   "--checkpoint", os.environ.get("LESIONLENS_CHECKPOINT", "checkpoints/default"),
                   "--frame-ancestors", "https://huggingface.co", *sys.argv[1:]]))
