"""Hugging Face Space entry point: the same app as `python -m app`."""
import os

if __name__ == "__main__":   # as `python -m app` does: restart once with huge-page malloc (model/runtime.py)
    from model.runtime import use_huge_pages
    use_huge_pages()

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.__main__ import parse_auth
from app.services import warm_up
from app.store import CaseStore
from app.ui import build_demo, launch_kwargs
from model.predictor import Predictor

# /data survives restarts when the Space has persistent storage; otherwise history is lost
# whenever the Space restarts.
HISTORY = "/data/history/cases.db" if os.path.isdir("/data") else "history/cases.db"

predictor = Predictor.load(os.environ.get("LESIONLENS_CHECKPOINT", "checkpoints/default"))
warm_up(predictor)
demo = build_demo(predictor, CaseStore(HISTORY))
demo.queue(max_size=64)

if __name__ == "__main__":
    demo.launch(server_name="0.0.0.0", **launch_kwargs(parse_auth(os.environ.get("LESIONLENS_AUTH"))))
