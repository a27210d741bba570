"""The Model tab: a model card built from the checkpoint's own metadata.

    gr.Markdown(model_card_markdown(Predictor.load("checkpoints/default")))

Architecture, classes, training data, validation metrics with intervals, the unusual-image
gate, whether age/sex/site are used, intended use, limitations and licence.
"""
from __future__ import annotations


HEADLINE_METRICS = (("n", "validation images"), ("accuracy", "accuracy"),
                    ("balanced_accuracy", "balanced accuracy"), ("macro_auc", "macro AUC"),
                    ("malignant_auc", "malignant-vs-benign AUC"),
                    ("malignant_sensitivity", "malignant sensitivity"),
                    ("malignant_specificity", "malignant specificity"),
                    ("melanoma_sensitivity", "melanoma sensitivity"),
                    ("ece", "calibration error (ECE)"), ("temperature", "temperature"))
PER_CLASS = ("recall", "specificity", "precision", "auc", "support")


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _metrics_lines(val: dict, classes, names) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for key, label in HEADLINE_METRICS:
        if key in val:
            ci = val.get(f"{key}_ci")
            extra = f" (95% CI {_fmt(ci[0])}–{_fmt(ci[1])})" if ci and len(ci) == 2 else ""
            lines.append(f"| {label} | {_fmt(val[key])}{extra} |")
    if any(isinstance(val.get(k), dict) for k in PER_CLASS):
        lines += ["", "| class | " + " | ".join(PER_CLASS) + " |",
                  "|---|" + "---|" * len(PER_CLASS)]
        for code, name in zip(classes, names):
            cells = [_fmt((val.get(k) or {}).get(code)) for k in PER_CLASS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def clinical_use(predictor) -> str:
    if predictor.uses_clinical:
        return ("**Clinical data:** uses the patient's **age, sex and body site** with the "
                "image (late fusion). In the chat they are read from the note sent with an "
                "image; any the note does not give are treated as missing.")
    return ("**Clinical data:** image only; age, sex and body site are **not** used, even when "
            "the note gives them.")


def _subgroup_lines(subgroups: dict) -> list[str]:
    lines = ["| group | value | n | balanced accuracy | malignant AUC |", "|---|---|---|---|---|"]
    for group, cells in subgroups.items():
        for value, cell in cells.items():
            lines.append(f"| {group.replace('_', ' ')} | {value} | {cell.get('n', '–')} | "
                         f"{_fmt(cell.get('balanced_accuracy'))} | {_fmt(cell.get('malignant_auc'))} |")
    return lines


def model_card_markdown(predictor) -> str:
    md = dict(predictor.metadata or {})
    training = md.get("training") or {}
    config = training.get("config") or {}
    lines = ["## Model card", "",
             f"**Checkpoint:** `{predictor.checkpoint_id}`  ",
             f"**Architecture:** `{md.get('arch', '?')}` · input {predictor.image_size}×"
             f"{predictor.image_size} px ({md.get('resize', 'squash')} resize)"
             + (f" · task `{md['task']}`" if md.get("task") else "")
             + (" · test-time augmentation" if md.get("tta") else ""), "",
             clinical_use(predictor), "",
             "### Classes", "", "| code | name |", "|---|---|"]
    lines += [f"| `{c}` | {n} |" for c, n in zip(predictor.classes, predictor.class_names)]
    data = training.get("data")
    if data or config.get("data"):
        lines += ["", "### Training data", ""]
        if config.get("data"):
            lines.append(f"- **source**: {_fmt(config['data'])}")
        if isinstance(data, dict):
            lines += [f"- **{k}**: {_fmt(v)}" for k, v in data.items()]
        elif data:
            lines.append(f"- {_fmt(data)}")
        lines += [f"- **{k}**: {_fmt(config[k])}" for k in ("epochs", "image_size", "pretrained")
                  if k in config]
    val = (md.get("metrics") or {}).get("val")
    if isinstance(val, dict):
        lines += ["", "### Validation metrics", ""]
        if "epoch" in (md.get("metrics") or {}):
            lines.append(f"Best epoch {md['metrics']['epoch']}; lesion-grouped validation split.")
            lines.append("")
        lines += _metrics_lines({**val, "temperature": md.get("temperature")},
                                predictor.classes, predictor.class_names)
        point = val.get("operating_point")
        if point:
            target = (md.get("operating_point") or {}).get("target_sensitivity")
            chosen = f"chosen on validation for {target:.0%} sensitivity" if target else "chosen on validation"
            lines += ["", f"**Sensitive threshold** (malignant probability ≥ {point['threshold']:.3f}, {chosen}): malignant "
                      f"sensitivity {_fmt(point.get('malignant_sensitivity'))}, specificity "
                      f"{_fmt(point.get('malignant_specificity'))}, melanomas flagged {_fmt(point.get('melanoma_flagged'))}."]
    if isinstance(val, dict) and val.get("subgroups"):
        lines += ["", "### Subgroups (validation)", "",
                  "Balanced accuracy and malignant-vs-benign AUC by group; small groups are uncertain.", ""]
        lines += _subgroup_lines(val["subgroups"])
    external = (md.get("metrics") or {}).get("external") or {}
    if external:
        lines += ["", "### Other sources (never trained on)", "",
                  "| set | images | balanced accuracy | malignant AUC (95% CI) | melanoma recall | "
                  "at the sensitive threshold: malignant sensitivity / specificity |",
                  "|---|---|---|---|---|---|"]
        for spec, m in external.items():
            ci = m.get("malignant_auc_ci")
            auc = _fmt(m.get("malignant_auc")) + (f" ({_fmt(ci[0])}–{_fmt(ci[1])})" if ci else "")
            point = m.get("operating_point") or {}
            at_point = (f"{_fmt(point.get('malignant_sensitivity'))} / {_fmt(point.get('malignant_specificity'))}"
                        if point else "–")
            lines.append(f"| {spec} | {m.get('n', '–')} | {_fmt(m.get('balanced_accuracy'))} | {auc} "
                         f"| {_fmt((m.get('recall') or {}).get('mel'))} | {at_point} |")
    ood = md.get("ood") or {}
    if ood.get("threshold") is not None:
        lines += ["", f"Unusual-image warning: feature distance above {ood['threshold']:.2f} "
                  f"(passes {ood.get('validation_pass_rate', 0):.1%} of validation lesions)."]
    lines += ["", "### Intended use", "",
              md.get("intended_use") or
              "Research and education: showing how an image classifier for dermoscopic images "
              "of pigmented skin lesions behaves, and where it looks. It is **not a medical "
              "device** and must not be used to diagnose, rule out or triage skin cancer.",
              "", "### Limitations", ""]
    limitations = md.get("limitations") or [
        "Trained on dermoscopy images (HAM10000); clinical phone photos, non-skin images and "
        "rare diagnoses are out of scope, and predictions on them are unreliable.",
        "HAM10000 comes mostly from fair-skinned European and Australian patients: "
        "performance on darker skin types is unknown.",
        "Probabilities are calibrated on the validation split only; a saliency map shows "
        "where the model looked, not why a lesion is benign or malignant.",
    ]
    lines += [f"- {x}" for x in (limitations if isinstance(limitations, list) else [limitations])]
    licence = md.get("licence") or md.get("license")
    lines += ["", "### Licence", "",
              (f"{_fmt(licence)} " if licence else "") + "The training images (HAM10000, "
              "Tschandl et al. 2018, doi:10.1038/sdata.2018.161) are licensed **CC BY-NC-SA "
              "4.0**: this model and its outputs are for **non-commercial** use only."]
    return "\n".join(lines)
