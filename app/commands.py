"""Chat text -> small, explicit values: follow-up commands and the clinical data in a note.

    parse_command("why not nevus?", classes, class_names)
    -> Command(kind="why_not", class_index=5)
    parse_clinical("55 year old man, back")
    -> Clinical(age=55.0, sex="male", site="back")

Kinds: "help", "method" (show another saliency method), "explain" (overlay for one class),
"why_not" (overlay + probability for a class the model did not pick), "anyway" (the full result
of an image held back as unusual), "unknown", "empty".
Class names come from the predictor (codes and full names); the synonyms below only add the
words people type ("mole", "melanoma", "basal cell") on top of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from model.clinical import SITES

# Method key the predictor understands -> phrases people type (longest first matters: "gradients"
# must not win over "integrated gradients").
METHODS = {
    "integrated_gradients": ("integrated gradients", "integrated gradient", "integrated-gradients",
                             "integrated_gradients", "integrated", "ig"),
    "smoothgrad": ("smoothgrad", "smooth grad", "smooth-grad", "smooth gradients", "smooth"),
    "occlusion": ("occlusion", "occlude", "occluded", "sliding window"),
    "gradcam": ("grad-cam", "gradcam", "grad cam", "cam", "heatmap", "heat map"),
    "gradcampp": ("grad-cam plus plus", "gradcam plus plus", "grad cam plus plus", "gradcampp", "gradcam pp",
                  "grad-cam pp"),
    "gradcam_fused": ("fused grad-cam", "fused gradcam", "fused grad cam", "multi-stage grad-cam", "fused"),
    "hirescam": ("hirescam", "hires-cam", "hires cam", "high-resolution cam", "high resolution cam"),
    "layercam": ("layercam", "layer-cam", "layer cam"),
    "gradients": ("vanilla gradients", "input gradients", "gradients", "gradient", "saliency"),
}

METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam_fused": "Fused Grad-CAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcampp": "Grad-CAM++",
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
# "analyse anyway", "analyze it", "show the results": the table held back for an unusual image.
ANYWAY = re.compile(r" (anyway|analy[sz]e|show (the |me the )?(table|results?|probabilities|diagnosis)) ")


@dataclass(frozen=True)
class Command:
    kind: str
    method: str | None = None
    class_index: int | None = None
    text: str = ""


def _norm(text: str) -> str:
    text = text.lower().replace("’", "'").replace("++", " plus plus ")   # "Grad-CAM++"
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
    if cls is None and method is None and ANYWAY.search(norm):
        return Command("anyway", text=raw)
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
    methods = ", ".join(f"`show {METHODS[key][0]}`" for key in METHOD_LABELS)   # every method, by its first phrase
    return (
        "**What you can ask about the current image**\n"
        f"- {methods}: the same image explained by another saliency method\n"
        "- `explain melanoma` (or any class): where the model looks for that class\n"
        "- `why not nevus?`: that class's probability and its heatmap\n"
        "- `analyse anyway`: the full result for an image I held back because it does not look "
        "like a skin lesion\n"
        "- `help`: this list\n\n"
        "Drop one or more images (with an optional note: age, body site...) to start a new case.\n\n"
        f"Classes: {examples}."
    )


# ------------------------------------------------------------------ clinical data in a note
# Conservative on purpose: a value the parser is not sure of stays unknown (the model treats
# it as missing), which is better than feeding it a wrong one.
AGE_UNIT = r"(?:y|yo|y/o|y\.o\.|yr|yrs|year|years)(?:[\s-]*old)?"
AGE_PATTERNS = (
    re.compile(rf"(?<![\d.])(\d{{1,3}})\s*-?\s*{AGE_UNIT}(?![a-z])"),   # 55 y, 70yo, 62-year-old
    re.compile(r"\bage[d]?\s*[:=]?\s*(\d{1,3})(?![\d.])"),           # age 62, aged: 40
)
# "for 2 years", "3 years ago": a duration, not an age.
DURATION_BEFORE = re.compile(r"\b(?:for|since|over|past|last|in|within|after|every|about)\s*$")
SEX_WORDS = {"male": "male", "man": "male", "female": "female", "woman": "female"}
SEX_LETTERS = {"M": "male", "F": "female"}   # upper case only: "3 m" is metres or months
SEX_NEXT_TO_NUMBER = re.compile(
    r"(?<![A-Za-z'’])(M|F|male|female|man|woman)\s*(\d{1,3})(?![\d.]|\s*(?:mm|cm|%))"
    r"|(?<![\d.])(\d{1,3})\s*(M|F)(?![A-Za-z'’])", re.IGNORECASE)
# Whole words or phrases -> a HAM10000 site (model.clinical.SITES); only unambiguous ones.
SITE_SYNONYMS = {
    "lower extremity": ("leg", "legs", "lower leg", "thigh", "thighs", "shin", "calf", "knee",
                        "lower limb"),
    "upper extremity": ("arm", "arms", "upper arm", "forearm", "elbow", "upper limb"),
    "acral": ("palm", "palms", "sole", "soles"),
    "foot": ("feet",),
    "hand": ("hands",),
    "face": ("cheek", "nose", "forehead"),
    "abdomen": ("belly",),
    "trunk": ("torso",),
}


@dataclass(frozen=True)
class Clinical:
    """Age, sex and body site from a note; None where the note does not say (model: missing)."""
    age: float | None = None
    sex: str | None = None    # "female" or "male"
    site: str | None = None   # one of model.clinical.SITES

    @property
    def known(self) -> dict:
        return {k: v for k, v in (("age", self.age), ("sex", self.sex), ("site", self.site))
                if v is not None}


def _one(values: set):
    """The value when the note names exactly one; contradictions stay unknown."""
    return next(iter(values)) if len(values) == 1 else None


def _sex_of(token: str) -> str | None:
    return SEX_LETTERS.get(token) if len(token) == 1 else SEX_WORDS.get(token.lower())


def find_age(text: str) -> float | None:
    lower = text.lower()
    ages = set()
    for pattern in AGE_PATTERNS:
        for m in pattern.finditer(lower):
            if pattern is AGE_PATTERNS[0] and (DURATION_BEFORE.search(lower[:m.start()])
                                               or re.match(r"\s*ago\b", lower[m.end():])):
                continue
            ages.add(float(m.group(1)))
    for m in SEX_NEXT_TO_NUMBER.finditer(text):   # "F 40", "male 62", "40F"
        sex, number = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        if _sex_of(sex):
            ages.add(float(number))
    return _one({a for a in ages if 0 <= a <= 120})


def find_sex(text: str) -> str | None:
    tokens = re.findall(r"(?<![A-Za-z'’])[A-Za-z]+(?![A-Za-z'’])", text)
    return _one({s for s in map(_sex_of, tokens) if s})


def find_site(text: str) -> str | None:
    norm = _norm(text.replace("-", " "))
    phrases = {site: (site, *SITE_SYNONYMS.get(site, ())) for site in SITES}
    return _one({site for site, words in phrases.items()
                 if any(_has_phrase(norm, w) for w in words)})


def parse_clinical(text: str | None) -> Clinical:
    """Age (a number with y/yo/years/year-old, or after "age"), sex (male/man/M,
    female/woman/F as whole words) and body site (model.clinical.SITES and a few synonyms)."""
    text = text or ""
    return Clinical(age=find_age(text), sex=find_sex(text), site=find_site(text))
