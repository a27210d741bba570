"""The model card, rendered from a checkpoint's own metadata: one source of truth for the app's
Model tab, `python -m model card --checkpoint DIR [--out FILE]` and docs/MODEL_CARD.md.

    from model.checkpoint import read_metadata
    print(model_card_markdown(read_metadata("checkpoints/default")))

Architecture, input and resize mode, classes (and how other vocabularies map onto them), training
sources with their counts, pooled and per-source validation metrics with intervals, the sensitive
threshold, subgroups, other sources never trained on, the benchmark table (`benchmark --record`),
the unusual-image gate, whether age/sex/site are used, intended use, limitations and licence.
Every section after the first is optional: a checkpoint written before a key existed renders
without it. Needs no JAX (metadata is plain JSON).
"""
from __future__ import annotations

from .classes import full_name

HEADLINE_METRICS = (("n", "validation images"), ("accuracy", "accuracy"),
                    ("balanced_accuracy", "balanced accuracy"), ("macro_auc", "macro AUC"),
                    ("malignant_auc", "malignant-vs-benign AUC"),
                    ("malignant_sensitivity", "malignant sensitivity"),
                    ("malignant_specificity", "malignant specificity"),
                    ("melanoma_sensitivity", "melanoma sensitivity"),
                    ("ece", "calibration error (ECE)"), ("temperature", "temperature"))
PER_CLASS = ("recall", "specificity", "precision", "auc", "support")

RESIZE_MODES = {
    "squash": "the full frame resized to a square (aspect ratio not kept)",
    "center": "the centred square crop of the frame",
    "fov": "the dermatoscope's dark round field of view is detected and cropped out of its black frame "
           "before resizing to a square (the full frame when no field of view is found)",
}

# Licences of the public sets this project reads, matched on a source's name or path (lower case).
SOURCE_LICENCES = (
    ("ham10000", "HAM10000", "CC BY-NC-SA 4.0", "Tschandl et al. 2018, doi:10.1038/sdata.2018.161"),
    ("bcn", "BCN_20000", "CC BY-NC 4.0", "Combalia et al. 2019, arXiv:1908.02288; ISIC 2019 challenge"),
    ("isic2019", "ISIC 2019", "CC BY-NC 4.0", "ISIC 2019 challenge"),
    ("isic2018", "ISIC 2018", "CC BY-NC 4.0", "ISIC 2018 challenge"),
    ("isic2017", "ISIC 2017", "CC BY-NC", "Codella et al. 2018, arXiv:1710.05006"),
)

AKIEC_NOTE = ("`akiec` is HAM10000's actinic keratosis / intraepithelial carcinoma (Bowen's disease). "
              "Sources labelled with ISIC 2018/2019's vocabulary have **AK and SCC both mapped to akiec**; "
              "invasive squamous cell carcinoma has no HAM10000 class, so mapping it there is a stretch.")


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


def _ci(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f" ({_fmt(ci[0])}–{_fmt(ci[1])})" if ci and len(ci) == 2 else ""


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _fmt(value)


def _counts(counts) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) if isinstance(counts, dict) else _fmt(counts)


def _metrics_lines(val: dict, classes, names) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for key, label in HEADLINE_METRICS:
        if key in val:
            lines.append(f"| {label} | {_fmt(val[key])}{_ci(val, key)} |")
    if any(isinstance(val.get(k), dict) for k in PER_CLASS):
        lines += ["", "| class | " + " | ".join(PER_CLASS) + " |",
                  "|---|" + "---|" * len(PER_CLASS)]
        for code, name in zip(classes, names):
            cells = [_fmt((val.get(k) or {}).get(code)) for k in PER_CLASS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def clinical_use(metadata: dict) -> str:
    if metadata.get("clinical_fusion"):
        return ("**Clinical data:** uses the patient's **age, sex and body site** with the "
                "image (late fusion). In the chat they are read from the note sent with an "
                "image; any the note does not give are treated as missing.")
    return ("**Clinical data:** image only; age, sex and body site are **not** used, even when "
            "the note gives them.")


def prior_use(metadata: dict) -> list[str]:
    correction = metadata.get("prior_correction")
    if not correction:
        return []
    return [f"**Prior correction:** each class's score is divided by its training frequency to the power "
            f"{correction['tau']:g} before the arg-max and the probabilities (logit adjustment), so the common "
            "classes (nevus above all) do not out-vote the rare ones; it trades accuracy on common classes for "
            "balanced accuracy.", ""]


def _subgroup_lines(subgroups: dict) -> list[str]:
    lines = ["| group | value | n | balanced accuracy | malignant AUC |", "|---|---|---|---|---|"]
    for group, cells in subgroups.items():
        for value, cell in cells.items():
            lines.append(f"| {group.replace('_', ' ')} | {value} | {cell.get('n', '–')} | "
                         f"{_fmt(cell.get('balanced_accuracy'))} | {_fmt(cell.get('malignant_auc'))} |")
    return lines


def training_sources(metadata: dict) -> list[dict]:
    """The per-source summaries a multi-source run records (empty for older checkpoints)."""
    data = (metadata.get("training") or {}).get("data")
    sources = data.get("sources") if isinstance(data, dict) else None
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def _source_names(metadata: dict) -> list[str]:
    """Every training source named in the metadata: per-source names and specs, else the config's paths."""
    names = [f"{s.get('name', '')} {s.get('spec', '')}" for s in training_sources(metadata)]
    if not names:
        training = metadata.get("training") or {}
        for where in (training.get("data"), training.get("config")):
            if isinstance(where, dict):
                for key in ("source", "data", "extra_train"):
                    value = where.get(key)
                    names += value if isinstance(value, list) else [value] if value else []
    return [str(n) for n in names]


def source_licences(metadata: dict) -> list[tuple[str, str, str]]:
    """(set, licence, citation) for each known public set among the training sources, in table order."""
    text = " ".join(_source_names(metadata)).lower()
    found, seen = [], set()
    for key, name, licence, cite in SOURCE_LICENCES:
        if key in text and name not in seen and not (key == "isic2019" and "BCN_20000" in seen):
            found.append((name, licence, cite))
            seen.add(name)
    return found


def _summary(metadata: dict, size, resize: str) -> list[str]:
    sources = training_sources(metadata)
    data = (metadata.get("training") or {}).get("data") or {}
    known = [name for name, _, _ in source_licences(metadata)]
    trained_on = (", ".join(s.get("name", "?") for s in sources) if sources
                  else ", ".join(known) if known else None)
    parts = [f"`{metadata.get('arch', '?')}` classifying {len(metadata.get('classes') or [])} classes "
             f"from {size}×{size} px dermoscopic images ({resize} resize)"]
    if trained_on:
        n = data.get("train_images") if isinstance(data, dict) else None
        parts.append(f"trained on {trained_on}" + (f" ({n:,} training images)" if isinstance(n, int) else ""))
    val = (metadata.get("metrics") or {}).get("val") or {}
    if isinstance(val, dict) and val.get("balanced_accuracy") is not None:
        parts.append(f"validation balanced accuracy {_fmt(val['balanced_accuracy'])}{_ci(val, 'balanced_accuracy')}")
    return ["; ".join(parts) + "."]


def _as_list(value) -> list:
    return [v for v in value if v] if isinstance(value, (list, tuple)) else [value] if value else []


def _training_lines(metadata: dict) -> list[str]:
    training = metadata.get("training") or {}
    config = training.get("config") or {}
    data = training.get("data")
    sources = training_sources(metadata)
    if not (data or config.get("data")):
        return []
    data = data if isinstance(data, dict) else {"summary": data} if data else {}
    lines = ["", "### Training data", ""]
    if sources:
        lines += ["Each source is split by its own lesions and keeps a validation part of its own "
                  "(a source used for training only has none).", "",
                  "| source | spec | training images | validation images | training images per class | "
                  "validation images per class |", "|---|---|---|---|---|---|"]
        for s in sources:
            lines.append(f"| {s.get('name', '?')} | `{s.get('spec', '?')}` | {_n(s.get('train_images'))} | "
                         f"{_n(s.get('val_images'))} | {_counts(s.get('train_class_counts'))} | "
                         f"{_counts(s.get('val_class_counts'))} |")
        lines.append("")
    else:
        named = _as_list(data.get("source")) or _as_list(config.get("data"))
        if named:
            lines.append(f"- **source**: {_fmt(named)}")
        if _as_list(data.get("extra_train")):
            lines.append(f"- **training only**: {_fmt(_as_list(data['extra_train']))}")
    if "train_images" in data or "val_images" in data:
        lines.append(f"- **images**: {_n(data.get('train_images'))} training, {_n(data.get('val_images'))} "
                     "validation" + (" (all sources)" if len(sources) > 1 else ""))
    for key, label in (("train_class_counts", "training images per class"),
                       ("val_class_counts", "validation images per class")):
        if data.get(key):
            lines.append(f"- **{label}**: {_counts(data[key])}")
    if data.get("dropped_duplicates"):
        lines.append(f"- **dropped**: {data['dropped_duplicates']} training images identical to a validation "
                     "or external-evaluation image")
    if data.get("split_file"):
        lines.append(f"- **split file** (every image's part, written by the run): `{data['split_file']}`")
    shown = {"source", "extra_train", "sources", "train_images", "val_images", "train_class_counts",
             "val_class_counts", "dropped_duplicates", "split_file", "val_frac", "split_seed", "task"}
    lines += [f"- **{k}**: {_fmt(v)}" for k, v in data.items() if k not in shown]
    lines += [f"- **{k}**: {_fmt(config[k])}" for k in
              ("epochs", "image_size", "pretrained", "sampling", "class_weighting", "crop_scale_min",
               "color_jitter", "seed") if k in config]
    return lines


def _val_lines(metadata: dict, classes, names) -> list[str]:
    all_metrics = metadata.get("metrics") or {}
    val = all_metrics.get("val")
    per_source = all_metrics.get("val_sources") or {}
    lines = []
    if isinstance(val, dict):
        lines += ["", "### Validation metrics", ""]
        pooled = " (all sources' validation parts pooled)" if len(per_source) > 1 else ""
        if "epoch" in all_metrics:
            lines += [f"Best epoch {all_metrics['epoch']}; lesion-grouped validation split{pooled}.", ""]
        elif pooled:
            lines += [f"Lesion-grouped validation split{pooled}.", ""]
        lines += _metrics_lines({**val, "temperature": metadata.get("temperature")}, classes, names)
        point = val.get("operating_point")
        if point:
            stored = metadata.get("operating_point") or {}
            target = stored.get("target_sensitivity")
            chosen = (f"chosen on validation for {target:.0%} sensitivity of the malignant lesions" if target
                      else "chosen on validation")
            if stored.get("rule") == "per-source melanoma":
                chosen += " and of each source's melanomas"
            names = [n for n, t in (stored.get("per_source_melanoma_thresholds") or {}).items()
                     if t < point["threshold"]]
            if names:
                listed = " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
                chosen += (f"; fewer of the melanomas of {listed}: a threshold low enough for them flags more than "
                           "half of some source's benign lesions")
            lines += ["", f"**Sensitive threshold** (malignant probability ≥ {point['threshold']:.3f}, {chosen}): "
                      f"malignant sensitivity {_fmt(point.get('malignant_sensitivity'))}, specificity "
                      f"{_fmt(point.get('malignant_specificity'))}, melanomas flagged "
                      f"{_fmt(point.get('melanoma_flagged'))}."]
    if isinstance(per_source, dict) and per_source:
        lines += ["", "### Validation by source", "",
                  "Each training source's own validation part, as scored when the epoch was selected: "
                  "one view, without the test-time augmentation of the table above. The selection score "
                  "is the mean of these balanced accuracies, so a large source cannot hide a failing small one.", "",
                  "| source | images | balanced accuracy | macro AUC | malignant AUC | melanoma recall |",
                  "|---|---|---|---|---|---|"]
        for name, m in per_source.items():
            m = m or {}
            lines.append(f"| {name} | {m.get('n', '–')} | {_fmt(m.get('balanced_accuracy'))}"
                         f"{_ci(m, 'balanced_accuracy')} | {_fmt(m.get('macro_auc'))} | "
                         f"{_fmt(m.get('malignant_auc'))}{_ci(m, 'malignant_auc')} | "
                         f"{_fmt((m.get('recall') or {}).get('mel'))} |")
    if isinstance(val, dict) and val.get("subgroups"):
        lines += ["", "### Subgroups (validation)", "",
                  "Balanced accuracy and malignant-vs-benign AUC by group; small groups are uncertain.", ""]
        lines += _subgroup_lines(val["subgroups"])
    return lines


def _external_lines(metadata: dict) -> list[str]:
    external = (metadata.get("metrics") or {}).get("external") or {}
    if not external:
        return []
    lines = ["", "### Other sources (never trained on)", "",
             "| set | images | balanced accuracy | malignant AUC (95% CI) | melanoma recall | "
             "at the sensitive threshold: malignant sensitivity / specificity |",
             "|---|---|---|---|---|---|"]
    for spec, m in external.items():
        point = m.get("operating_point") or {}
        at_point = (f"{_fmt(point.get('malignant_sensitivity'))} / {_fmt(point.get('malignant_specificity'))}"
                    if point else "–")
        lines.append(f"| {spec} | {m.get('n', '–')} | {_fmt(m.get('balanced_accuracy'))} | "
                     f"{_fmt(m.get('malignant_auc'))}{_ci(m, 'malignant_auc')} "
                     f"| {_fmt((m.get('recall') or {}).get('mel'))} | {at_point} |")
    return lines + _same_source_note(metadata, list(external))


def _same_source_note(metadata: dict, specs: list[str]) -> list[str]:
    """A line naming the sets that are held-out parts of a training source (same path), if any."""
    trained = {_spec_path(s.get("spec", "")) for s in training_sources(metadata)}
    shared = [spec for spec in specs if _spec_path(spec) in trained]
    if not shared:
        return []
    return ["", f"{', '.join(f'`{s}`' for s in shared)}: never trained on, but a held-out part of a "
            "training source (same clinics and cameras), so not a test on another source."]


def _audit_lines(metadata: dict) -> list[str]:
    """The shortcut audit `python -m model audit --record` stores in `metrics.audit`."""
    recorded = (metadata.get("metrics") or {}).get("audit") or {}
    if not recorded.get("sets"):
        return []
    from .audit import markdown   # noqa: PLC0415 (one renderer of the audit table)
    return ["", "### Shortcut audit", "",
            "How far predictions move under changes that carry no lesion information (`python -m model audit`, "
            "plain view): the 84 px round trip of BCN_20000's thumbnails, JPEG quality 30, a dark round frame "
            "added or removed (only images that have one), a colour-temperature shift. A model that reads lesions "
            "barely moves; flips and malignant-probability changes mark cues that tell sources apart.", "",
            *markdown(recorded, heading="####").splitlines()]


def _benchmark_lines(metadata: dict) -> list[str]:
    """The table `python -m model benchmark --record` stores in `metrics.benchmark`."""
    bench = (metadata.get("metrics") or {}).get("benchmark") or {}
    rows = [r for r in bench.get("sets") or [] if isinstance(r, dict)] if isinstance(bench, dict) else []
    if not rows:
        return []
    tta = bench.get("tta")
    view = "" if tta is None else " with test-time augmentation" if tta else " without test-time augmentation"
    lines = ["", "### Benchmark", "",
             f"Sets scored by `python -m model benchmark --record`{view}; the last two columns are at the "
             "sensitive threshold.", "",
             "| set | spec | images | balanced accuracy (95% CI) | macro AUC | malignant AUC (95% CI) | "
             "ECE | melanoma recall | specificity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('name', '?')} | `{r.get('spec', '?')}` | {r.get('n', '–')} | "
                     f"{_fmt(r.get('balanced_accuracy'))}{_ci(r, 'balanced_accuracy')} | {_fmt(r.get('macro_auc'))} | "
                     f"{_fmt(r.get('malignant_auc'))}{_ci(r, 'malignant_auc')} | {_fmt(r.get('ece'))} | "
                     f"{_fmt(r.get('melanoma_recall_sensitive'))} | {_fmt(r.get('specificity_sensitive'))} |")
    return lines + _same_source_note(metadata, [r.get("spec", "") for r in rows])


def _tta_lines(metadata: dict) -> list[str]:
    """What the test-time augmentation buys, where both benchmarks were recorded (with and without)."""
    recorded = metadata.get("metrics") or {}
    with_tta, plain = (recorded.get(k) or {} for k in ("benchmark", "benchmark_plain"))
    plain_rows = {r.get("name"): r for r in plain.get("sets") or [] if isinstance(r, dict)}
    rows = [(r, plain_rows[r.get("name")]) for r in with_tta.get("sets") or []
            if isinstance(r, dict) and r.get("name") in plain_rows]
    if not rows or not with_tta.get("tta"):
        return []
    served = "the 8 dihedral views (flips and rotations), averaged" if metadata.get("tta") else "the plain view only"
    lines = ["", "### Test-time augmentation", "",
             f"The app and every command serve {served} (metadata `tta`). Both benchmarks, with and without, "
             "as `python -m model benchmark --record --tta` / `--no-tta` stored them:", "",
             "| set | balanced accuracy, 8 views | plain view | malignant AUC, 8 views | plain view |",
             "|---|---|---|---|---|"]
    for r, q in rows:
        lines.append(f"| {r.get('name', '?')} | {_fmt(r.get('balanced_accuracy'))} | {_fmt(q.get('balanced_accuracy'))} | "
                     f"{_fmt(r.get('malignant_auc'))} | {_fmt(q.get('malignant_auc'))} |")
    return lines


def _saliency_lines(metadata: dict) -> list[str]:
    """Which saliency method the overlay shows, chosen by the rule in docs/notebook/experiment-record.md,
    and its scores."""
    chosen = metadata.get("saliency") or {}
    served = (" Class-activation maps explain the prediction as served: the mean of the 8 views' maps, each turned "
              "back to the image." if metadata.get("tta") else "")
    if not chosen.get("default"):
        return ["", "### Explanations", "",
                "The overlay shows Grad-CAM on the last feature map; no method was chosen for this checkpoint "
                "by the faithfulness benchmark (`bench/saliency_faithfulness.py --record`)." + served]
    lines = ["", "### Explanations", "",
             f"The overlay shows **{chosen['default']}**, by a rule written before the measurements "
             f"(docs/notebook/experiment-record.md): {chosen.get('reason', '')}.{served} Every other method stays "
             "available in the chat and the Compare tab. "
             f"Scores on {chosen.get('n_images', '?')} HAM10000 validation images with lesion masks "
             f"(deletion / insertion on {chosen.get('n_faithfulness', '?')}):", "",
             "| map | energy in mask | pointing game | rank corr. with random weights | deletion AUC | insertion AUC "
             "| ms / map |",
             "|---|---|---|---|---|---|---|"]
    for name, row in (chosen.get("scores") or {}).items():
        cells = [_fmt((row.get(k) or {}).get("mean")) for k in
                 ("energy_in_mask", "pointing", "randomisation_spearman", "deletion_auc", "insertion_auc")]
        cells.append(_fmt(None) if row.get("single_map_ms") is None else f"{row['single_map_ms']:.0f}")
        lines.append(f"| {'**' + name + '**' if name == chosen['default'] else name} | " + " | ".join(cells) + " |")
    return lines


def _spec_path(spec: str) -> str:
    """The path of a source spec `[NAME=]PATH[:split,...]` (as `data.parse_source` reads it)."""
    spec = spec.partition("=")[2] if "=" in spec else spec
    return spec.rpartition(":")[0] if ":" in spec.rpartition("/")[2] else spec


def _licence_lines(metadata: dict) -> list[str]:
    sets = source_licences(metadata)
    if sets:  # the sources say it all; the trainer's one-line note would only repeat (or narrow) it
        listed = "; ".join(f"{name} ({cite}): **{lic}**" for name, lic, cite in sets)
        text = f"The training images: {listed}. This model and its outputs are for **non-commercial** use only."
    else:
        note = metadata.get("licence") or metadata.get("license")
        text = ((f"{_fmt(note)} " if note else "") +
                "The training images keep their sources' licences; the public dermoscopy sets this project "
                "reads are non-commercial (HAM10000: **CC BY-NC-SA 4.0**; ISIC challenge data: **CC BY-NC**), "
                "so a model trained on them and its outputs are for **non-commercial** use only.")
    return ["", "### Licence", "", text]


def _limitations(metadata: dict) -> list[str]:
    limitations = metadata.get("limitations")
    if limitations:
        return limitations if isinstance(limitations, list) else [limitations]
    sets = [name for name, _, _ in source_licences(metadata)]
    if sets == ["HAM10000"]:
        skin = ("HAM10000 comes mostly from fair-skinned European and Australian patients: "
                "performance on darker skin types is unknown.")
    elif sets:
        skin = (f"The training sets ({', '.join(sets)}) come mostly from fair-skinned patients: "
                "performance on darker skin types is unknown.")
    else:
        skin = ("Public dermoscopy sets come mostly from fair-skinned patients: performance on darker "
                "skin types is unknown.")
    named = f" ({', '.join(sets)})" if sets else ""
    boundary = (metadata.get("ood") or {}).get("non_lesion")
    if boundary:
        caught = (f"The unusual-image warning, which also learned from {boundary['non_lesions']} known non-lesion "
                  "pictures, catches most such images, not all: a picture unlike those can pass it and get an "
                  "answer like a lesion's.")
    else:
        caught = ("The unusual-image warning catches many such images, not all: textures, microscopy and grey "
                  "documents can pass it and get an answer like a lesion's.")
    return [f"Trained on dermoscopy images{named}; clinical phone photos, "
            "non-skin images and rare diagnoses are out of scope, and predictions on them are unreliable. " + caught,
            skin,
            "Probabilities are calibrated on the validation split only; a saliency map shows "
            "where the model looked, not why a lesion is benign or malignant."]


def gate_summary(ood: dict) -> str:
    """The unusual-image gate (metadata["ood"], model/calibration.py) in words, for the card and `info`."""
    gates = []
    if "reference" in ood and ood.get("threshold") is not None:
        k = int(ood["neighbours"])
        nth = f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"
        gates.append(f"cosine distance to the {nth} nearest of {ood['reference']['shape'][0]:,} "
                     f"reference validation lesions above {ood['threshold']:.3f}")
    if (ood.get("non_lesion") or {}).get("threshold") is not None:
        gates.append(f"a score above {ood['non_lesion']['threshold']:.3f} on a linear boundary learned from "
                     f"{ood['non_lesion']['non_lesions']} known non-lesion pictures")
    if ood.get("entropy_threshold") is not None:
        gates.append(f"predictive entropy above {ood['entropy_threshold']:.3f}")
    text = " or ".join([", ".join(gates[:-1]), gates[-1]] if len(gates) > 2 else gates) or "none"
    if "class_means" in ood:
        text += (" (this checkpoint's feature-distance gate predates the nearest-neighbour one and is not applied: "
                 "recalibrate it with `python -m model calibrate`)")
    elif ood.get("validation_pass_rate") is not None:
        text += f" (passes {ood['validation_pass_rate']:.1%} of the validation lesions outside the reference)"
    return text


def model_card_markdown(metadata: dict) -> str:
    """The Markdown model card of a checkpoint, from its metadata dict alone."""
    md = dict(metadata or {})
    classes = list(md.get("classes") or [])
    names = [full_name(c) for c in classes]
    size = md.get("image_size", "?")
    resize = md.get("resize") or "squash"
    ident = md.get("checkpoint_id") or md.get("checkpoint_path")
    lines = ["## Model card", ""]
    lines += _summary(md, size, resize) + [""]
    if ident:
        lines.append(f"**Checkpoint:** `{ident}`  ")
    lines += [f"**Architecture:** `{md.get('arch', '?')}` · input {size}×{size} px ({resize} resize)"
              + (f" · task `{md['task']}`" if md.get("task") else "")
              + (" · test-time augmentation" if md.get("tta") else ""), ""]
    if resize in RESIZE_MODES:
        lines += [f"**Resize `{resize}`:** {RESIZE_MODES[resize]}.", ""]
    lines += [clinical_use(md), ""] + prior_use(md) + [
              "### Classes", "", "| code | name |", "|---|---|"]
    lines += [f"| `{c}` | {n} |" for c, n in zip(classes, names)]
    if "akiec" in classes:
        lines += ["", AKIEC_NOTE]
    lines += _training_lines(md)
    lines += _val_lines(md, classes, names)
    lines += _external_lines(md)
    lines += _benchmark_lines(md)
    lines += _audit_lines(md)
    lines += _tta_lines(md)
    lines += _saliency_lines(md)
    if md.get("ood"):
        lines += ["", f"Unusual-image warning: {gate_summary(md['ood'])}."]
    lines += ["", "### Intended use", "",
              md.get("intended_use") or
              "Research and education: showing how an image classifier for dermoscopic images "
              "of pigmented skin lesions behaves, and where it looks. It is **not a medical "
              "device** and must not be used to diagnose, rule out or triage skin cancer.",
              "", "### Limitations", ""]
    lines += [f"- {x}" for x in _limitations(md)]
    lines += _licence_lines(md)
    return "\n".join(lines) + "\n"
