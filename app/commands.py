"""Chat follow-up commands: free text -> a small, explicit `Command`.

    parse_command("why not nevus?", classes, class_names)
    -> Command(kind="why_not", class_index=5)

Kinds: "help", "method" (show another saliency method), "explain" (overlay for one class),
"why_not" (overlay + probability for a class the model did not pick), "unknown", "empty".
Class names come from the predictor (codes and full names); the synonyms below only add the
words people type ("mole", "melanoma", "basal cell") on top of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Method key the predictor understands -> phrases people type (longest first matters: "gradients"
# must not win over "integrated gradients").
METHODS = {
    "integrated_gradients": ("integrated gradients", "integrated gradient", "integrated-gradients",
                             "integrated_gradients", "integrated", "ig"),
    "smoothgrad": ("smoothgrad", "smooth grad", "smooth-grad", "smooth gradients", "smooth"),
    "occlusion": ("occlusion", "occlude", "occluded", "sliding window"),
    "gradcam": ("grad-cam", "gradcam", "grad cam", "cam", "heatmap", "heat map"),
    "gradients": ("vanilla gradients", "input gradients", "gradients", "gradient", "saliency"),
}

METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradients": "Input gradients",
    "smoothgrad": "SmoothGrad",
    "integrated_gradients": "Integrated Gradients",
    "occlusion": "Occlusion",
}

# Extra words for HAM10000 codes (and the binary task); matched as whole words.
SYNONYMS = {
    "akiec": ("actinic keratosis", "actinic", "bowen", "bowens", "bowen's", "intraepithelial",
              "ak"),
    "bcc": ("basal cell carcinoma", "basal cell", "basal", "basalioma"),
    "bkl": ("benign keratosis", "seborrheic keratosis", "seborrhoeic keratosis", "keratosis",
            "solar lentigo", "lentigo", "lichen planus"),
    "df": ("dermatofibroma", "dermatofibromas"),
    "mel": ("melanoma", "melanomas", "melanom"),
    "nv": ("nevus", "naevus", "nevi", "naevi", "mole", "moles", "melanocytic nevus"),
    "vasc": ("vascular lesion", "vascular", "angioma", "haemangioma", "hemangioma",
             "angiokeratoma", "pyogenic granuloma"),
    "malignant": ("malignant", "cancer", "cancerous"),
    "benign": ("benign", "non cancer", "not cancer", "harmless"),
}

HELP_WORDS = ("help", "commands", "what can you do", "?", "how")


@dataclass(frozen=True)
class Command:
    kind: str
    method: str | None = None
    class_index: int | None = None
    text: str = ""


def _norm(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9'_\- ]+", " ", text)
    return " " + re.sub(r"\s+", " ", text).strip() + " "


def _has_phrase(norm: str, phrase: str) -> bool:
    return f" {phrase} " in norm


def find_method(text: str) -> str | None:
    norm = _norm(text)
    best, best_len = None, 0
    for method, phrases in METHODS.items():
        for ph in phrases:
            if _has_phrase(norm, ph) and len(ph) > best_len:
                best, best_len = method, len(ph)
    return best


def find_class(text: str, classes, class_names) -> int | None:
    """Index of the class named in `text` (code, full name, or a synonym); longest match wins."""
    norm = _norm(text)
    best, best_len = None, 0
    for i, (code, name) in enumerate(zip(classes, class_names)):
        phrases = {code.lower(), _norm(name).strip(), *SYNONYMS.get(code, ())}
        # The first part of a full name ("Basal cell carcinoma" / "Actinic keratosis / ...").
        phrases |= {_norm(part).strip() for part in re.split(r"[/(]", name) if part.strip()}
        for ph in phrases:
            if ph and _has_phrase(norm, ph) and len(ph) > best_len:
                best, best_len = i, len(ph)
    return best


def parse_command(text: str, classes, class_names) -> Command:
    raw = (text or "").strip()
    if not raw:
        return Command("empty")
    norm = _norm(raw)
    if norm.strip() in HELP_WORDS or _has_phrase(norm, "help") or raw.strip() == "?":
        return Command("help", text=raw)
    cls = find_class(raw, classes, class_names)
    why_not = bool(re.search(r"\bwhy\b.*\bnot\b|\bwhy\b.*\bisn'?t\b|\bwhy no\b", norm))
    if why_not and cls is not None:
        return Command("why_not", class_index=cls, text=raw)
    method = find_method(raw)
    if cls is not None and (method is None or _has_phrase(norm, "explain")
                            or _has_phrase(norm, "for")):
        return Command("explain", method=method, class_index=cls, text=raw)
    if method is not None:
        return Command("method", method=method, class_index=cls, text=raw)
    if cls is not None:
        return Command("explain", class_index=cls, text=raw)
    return Command("unknown", text=raw)


def help_text(classes, class_names) -> str:
    examples = ", ".join(f"`{c}` ({n})" for c, n in zip(classes, class_names))
    return (
        "**What you can ask about the current image**\n"
        "- `show integrated gradients`, `show smoothgrad`, `show occlusion`, `show gradients`, "
        "`show grad-cam`: the same image explained by another saliency method\n"
        "- `explain melanoma` (or any class): where the model looks for that class\n"
        "- `why not nevus?`: that class's probability and its heatmap\n"
        "- `help`: this list\n\n"
        "Drop one or more images (with an optional note: age, body site...) to start a new case.\n\n"
        f"Classes: {examples}."
    )
