"""The Model tab: the model card built from the checkpoint's own metadata.

    gr.Markdown(model_card_markdown(Predictor.load("checkpoints/default")))

The card itself is rendered by `model.card` (inference-side), so the tab, `python -m model card
--checkpoint DIR` and docs/MODEL_CARD.md show the same Markdown: architecture and resize mode,
classes, training sources with their counts, pooled and per-source validation metrics, other
sources, the unusual-image gate, whether age/sex/site are used, intended use, limitations, licence.
"""
from __future__ import annotations

from model.card import model_card_markdown as render_card


def model_card_markdown(predictor) -> str:
    """The card of a loaded `Predictor` (its metadata carries the checkpoint id the app records)."""
    return render_card(predictor.metadata or {})
