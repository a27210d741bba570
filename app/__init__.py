"""LesionLens web app: Gradio UI (`ui`); handlers as plain functions, one module per job
(`analysis`, `chat`, `compare`, `history`, `model_card`) sharing `services`; chat text parsing
(`commands`) and the SQLite case store (`store`). Run it with `python -m app`."""
