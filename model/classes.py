"""Label vocabulary: HAM10000 diagnosis codes, their full names, and the two tasks."""

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

FULL_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
    "benign": "Benign",
    "malignant": "Malignant",
}

# HAM10000's malignant diagnoses (Tschandl et al. 2018); the rest are benign.
MALIGNANT = frozenset({"akiec", "bcc", "mel"})

BINARY_CLASSES = ("benign", "malignant")

TASKS = {"ham7": HAM_CLASSES, "binary": BINARY_CLASSES}

# Folder and CSV spellings seen in public skin-lesion sets, mapped to our codes.
ALIASES = {
    "cancer": "malignant",
    "non_cancer": "benign",
    "noncancer": "benign",
    "non-cancer": "benign",
    "melanoma": "mel",
    "nevus": "nv",
    "naevus": "nv",
    "seborrheic_keratosis": "bkl",
    # ISIC 2018/2019 challenge columns. HAM's akiec covers actinic keratoses and intraepithelial
    # carcinoma (Bowen's disease).
    "ak": "akiec",
}

# Diagnoses with no class of their own, counted under the closest one; readers say so in what they skipped.
# ISIC 2019's invasive SCC goes to akiec, the closest keratinocyte class (a stretch: the model card says so).
LUMPED = {"scc": "akiec"}
ALIASES.update(LUMPED)


def canonical_label(raw: str) -> str:
    """Lower-cased code for a folder or CSV label ('Non_Cancer' -> 'benign', 'MEL' -> 'mel')."""
    key = raw.strip().lower()
    return ALIASES.get(key, key)


def task_label(dx: str, task: str) -> str | None:
    """The class of `dx` under `task`, or None when the task has no such class."""
    dx = canonical_label(dx)
    if task == "binary":
        if dx in BINARY_CLASSES:
            return dx
        if dx in HAM_CLASSES:
            return "malignant" if dx in MALIGNANT else "benign"
        return None
    return dx if dx in TASKS[task] else None


def malignant_indices(classes) -> list[int]:
    """Indices of the malignant classes in `classes` (works for both tasks)."""
    return [i for i, c in enumerate(classes) if c in MALIGNANT or c == "malignant"]


def full_name(code: str) -> str:
    return FULL_NAMES.get(code, code)
