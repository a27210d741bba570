"""The ISIC archive's diagnosis vocabulary mapped to this project's classes.

`isic image download OUTDIR` (isic-cli) writes `OUTDIR/metadata.csv` whose current schema carries the
hierarchical diagnosis in `diagnosis_1` .. `diagnosis_5` (e.g. `Malignant` / `Malignant melanocytic
proliferations (Melanoma)` / `Melanoma in situ`); older exports carry a flat `diagnosis` (the legacy
vocabulary) and `benign_malignant`. The hierarchy itself comes from the ISIC team's `isic-metadata`
package; what is ours is only which branch of it each HAM10000 class covers.
"""
from __future__ import annotations

from functools import cache

from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
from isic_metadata.fields import LegacyDxEnum

# Branches of the hierarchy (a node and everything under it) per HAM10000 class; the deepest
# matching branch wins. HAM's akiec is actinic keratosis and intraepithelial carcinoma (Bowen's);
# invasive squamous cell carcinoma is mapped there too, as for ISIC 2019's SCC (a stretch).
HAM_BRANCHES = {
    "mel": ["Malignant:Malignant melanocytic proliferations (Melanoma)"],
    "nv": ["Benign:Benign melanocytic proliferations:Nevus"],
    "bcc": ["Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma"],
    "akiec": ["Indeterminate:Indeterminate epidermal proliferations:Solar or actinic keratosis",
              "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma in situ",
              "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, Invasive",
              "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, NOS"],
    "bkl": ["Benign:Benign epidermal proliferations:Seborrheic keratosis",
            "Benign:Benign epidermal proliferations:Solar lentigo",
            "Benign:Benign epidermal proliferations:Lichen planus like keratosis",
            "Benign:Benign epidermal proliferations:Pigmented benign keratosis"],
    "df": ["Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma"],
    "vasc": ["Benign:Benign soft tissue proliferations - Vascular", "Benign:Hemorrhagic lesions"],
}

# The legacy flat `diagnosis` values (isic-metadata's LegacyDxEnum) that name a HAM10000 class.
LEGACY_HAM = {
    LegacyDxEnum.melanoma: "mel", LegacyDxEnum.nevus: "nv", LegacyDxEnum.basal_cell_carcinoma: "bcc",
    LegacyDxEnum.actinic_keratosis: "akiec", LegacyDxEnum.squamous_cell_carcinoma: "akiec",
    LegacyDxEnum.seborrheic_keratosis: "bkl", LegacyDxEnum.solar_lentigo: "bkl",
    LegacyDxEnum.lichenoid_keratosis: "bkl", LegacyDxEnum.pigmented_benign_keratosis: "bkl",
    LegacyDxEnum.dermatofibroma: "df", LegacyDxEnum.vascular_lesion: "vasc", LegacyDxEnum.angioma: "vasc",
    LegacyDxEnum.angiokeratoma: "vasc", LegacyDxEnum.pyogenic_granuloma: "vasc",
}


@cache
def _branches() -> list[tuple[str, str]]:
    """(branch, class), deepest first; every branch must be a node of isic-metadata's hierarchy."""
    known = {m.value for m in DiagnosisEnum}
    pairs = [(branch, dx) for dx, branches in HAM_BRANCHES.items() for branch in branches]
    unknown = [b for b, _ in pairs if b not in known]
    if unknown:  # the ISIC vocabulary moved under us: fail loudly rather than mislabel
        raise RuntimeError(f"isic-metadata no longer defines {unknown}; update model/isic_archive.py")
    return sorted(pairs, key=lambda p: -p[0].count(":"))


def hierarchical_value(levels: list[str | None]) -> str | None:
    """'Malignant:...:Melanoma in situ' from the diagnosis_1..5 cells (a terminal value alone is accepted)."""
    parts = [p.strip() for p in levels if p and p.strip()]
    if not parts:
        return None
    value = ":".join(parts)
    if len(parts) == 1:
        value = DiagnosisEnum.accept_terminal_values(value)
    return value


def ham_class(value: str) -> str | None:
    """The HAM10000 class of a hierarchical diagnosis, or None when no class covers it."""
    for branch, dx in _branches():
        if value == branch or value.startswith(branch + ":"):
            return dx
    return None


def legacy_ham_class(diagnosis: str) -> str | None:
    try:
        return LEGACY_HAM.get(LegacyDxEnum(diagnosis.strip()))
    except ValueError:
        try:
            return LEGACY_HAM.get(LegacyDxEnum(diagnosis.strip().lower()))
        except ValueError:
            return None


def archive_label(row: dict) -> tuple[str | None, str | None]:
    """(label, diagnosis text) of one metadata.csv row: a HAM class where one covers the diagnosis,
    else 'benign' / 'malignant' from the top of the hierarchy (or `benign_malignant`), else None."""
    value = hierarchical_value([row.get(f"diagnosis_{i}") for i in range(1, 6)])
    if value is not None:
        top = value.split(":")[0].lower()
        return ham_class(value) or (top if top in ("benign", "malignant") else None), value
    legacy = (row.get("diagnosis") or "").strip()
    if legacy:
        top = (row.get("benign_malignant") or "").strip().lower()
        return legacy_ham_class(legacy) or (top if top in ("benign", "malignant") else None), legacy
    return None, None
