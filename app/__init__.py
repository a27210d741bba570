"""LesionLens web app: Gradio UI (`ui`), plain event handlers (`handlers`), chat commands
(`commands`) and the SQLite case store (`store`). Run it with `python -m app`."""
