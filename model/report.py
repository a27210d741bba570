"""Evaluation report: metrics.json, a Markdown report, and PNG plots (Agg backend)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.classes import full_name  # noqa: E402
from model.metrics import (  # noqa: E402
    ECE_BINS,
    confusion_matrix,
    reliability_bins,
    malignant_split,
    roc_curve,
    to_jsonable,
)

DPI = 110


# --------------------------------------------------------------------------- formatting


def _fmt(value, digits: int = 3) -> str:
    """A number for a table; '—' for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _fmt_ci(ci) -> str:
    if not ci or any(v is None for v in ci):
        return "—"
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------- markdown


def _headline(m: dict) -> list[str]:
    level = m.get("ci_level", 0.95)
    ci_note = f"{round(100 * level)}% bootstrap CI" + (f", {m['bootstrap_n']} resamples" if "bootstrap_n" in m else "")
    rows = [
        ["Images", _fmt(m.get("n")), ""],
        ["Accuracy", _fmt(m.get("accuracy")), ""],
        ["Balanced accuracy", _fmt(m.get("balanced_accuracy")), _fmt_ci(m.get("balanced_accuracy_ci"))],
        ["Macro AUC (one-vs-rest)", _fmt(m.get("macro_auc")), _fmt_ci(m.get("macro_auc_ci"))],
    ]
    if "melanoma_sensitivity" in m:
        rows.append(["Melanoma sensitivity", _fmt(m["melanoma_sensitivity"]), ""])
    if m.get("malignant_auc") is not None:
        rows.append(["Malignant-vs-benign AUC", _fmt(m["malignant_auc"]), _fmt_ci(m.get("malignant_auc_ci"))])
    rows += [["ECE (15 bins)", _fmt(m.get("ece")), ""], ["NLL", _fmt(m.get("nll")), ""]]
    return ["## Headline", ""] + _table(["Metric", "Value", ci_note], rows)


def _per_class(m: dict, classes: list[str]) -> list[str]:
    rows = []
    for c in classes:
        rows.append([f"`{c}`", full_name(c), _fmt(m.get("support", {}).get(c)),
                     _fmt(m.get("recall", {}).get(c)), _fmt(m.get("specificity", {}).get(c)),
                     _fmt(m.get("precision", {}).get(c)), _fmt(m.get("auc", {}).get(c))])
    lines = ["## Per class", ""]
    lines += _table(["Code", "Class", "Support", "Recall (sensitivity)", "Specificity", "Precision", "AUC"], rows)
    absent = m.get("absent_classes") or []
    if absent:
        names = ", ".join(f"`{c}` ({full_name(c)})" for c in absent)
        lines += ["", f"**Absent classes:** {names}: no example in this set, so recall and AUC are "
                  "undefined and the class is left out of balanced accuracy and macro AUC."]
    return lines


def _skipped(m: dict) -> list[str]:
    lines = [f"Scored as {m['scored_by']}."] if m.get("scored_by") else []
    if m.get("skipped"):
        lines += ["", "## Skipped or changed while reading", "",
                  *(f"- {note}" for note in m["skipped"]), "", "(`evaluate --strict` stops instead.)"]
    return lines


def _malignant(m: dict) -> list[str]:
    if m.get("malignant_auc") is None and m.get("malignant_sensitivity") is None:
        return []
    thr = m.get("malignant_threshold", 0.5)
    lines = ["## Malignant vs benign", "",
             f"Score: summed probability of the malignant classes, read at {thr}"
             + (" and at the checkpoint's high-sensitivity operating point (chosen on validation)."
                if m.get("operating_point") else "."), ""]
    rows = [["AUC", _fmt(m.get("malignant_auc")), _fmt_ci(m.get("malignant_auc_ci"))],
            [f"Sensitivity @ {thr}", _fmt(m.get("malignant_sensitivity")), ""],
            [f"Specificity @ {thr}", _fmt(m.get("malignant_specificity")), ""]]
    point = m.get("operating_point")
    if point:
        t = _fmt(point["threshold"])
        rows += [[f"Sensitivity @ {t} (operating point)", _fmt(point.get("malignant_sensitivity")), ""],
                 [f"Specificity @ {t} (operating point)", _fmt(point.get("malignant_specificity")), ""]]
        if "melanoma_flagged" in point:
            rows.append([f"Melanomas flagged @ {t}", _fmt(point["melanoma_flagged"]), ""])
    if "malignant_n" in m:
        rows.append(["Malignant / benign images", f"{m['malignant_n']} / {m.get('benign_n', '—')}", ""])
    return lines + _table(["Metric", "Value", "CI"], rows)


def _calibration(m: dict, rel: dict) -> list[str]:
    lines = ["## Calibration", "",
             f"Expected calibration error (ECE, {ECE_BINS} equal-width bins of the top probability): "
             f"**{_fmt(m.get('ece'))}**; negative log-likelihood: **{_fmt(m.get('nll'))}**."]
    if m.get("temperature") is not None:
        lines[-1] += f" Temperature applied to the logits: **{_fmt(m['temperature'])}**."
    rows = [[f"{rel['edges'][i]:.2f}–{rel['edges'][i + 1]:.2f}", _fmt(int(rel["count"][i])),
             _fmt(rel["confidence"][i]), _fmt(rel["accuracy"][i])]
            for i in range(len(rel["count"])) if rel["count"][i] > 0]
    if rows:
        lines += ["", "![Reliability diagram](reliability.png)", ""]
        lines += _table(["Confidence bin", "Images", "Mean confidence", "Accuracy"], rows)
    return lines


def _confusion(m: dict, classes: list[str]) -> list[str]:
    cm = m.get("confusion")
    if not cm:
        return []
    lines = ["## Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
    lines += _table(["true \\ pred"] + [f"`{c}`" for c in classes],
                    [[f"`{c}`"] + [str(v) for v in row] for c, row in zip(classes, cm)])
    return lines + ["", "![Confusion matrix](confusion_matrix.png)"]


def _subgroups(m: dict) -> list[str]:
    sub = m.get("subgroups")
    if not sub:
        return []
    lines = ["## Subgroups", "",
             "Small groups give noisy estimates; read them alongside n. '—' means undefined "
             "(e.g. no malignant or no benign example in the group)."]
    for name, cells in sub.items():
        rows = [[str(v), _fmt(c.get("n")), _fmt(c.get("accuracy")), _fmt(c.get("balanced_accuracy")),
                 _fmt(c.get("malignant_auc")), _fmt(c.get("malignant_sensitivity")),
                 _fmt(c.get("malignant_specificity"))] for v, c in cells.items()]
        lines += ["", f"### {name}", ""]
        lines += _table([name, "n", "Accuracy", "Balanced acc.", "Malignant AUC", "Mal. sens.", "Mal. spec."], rows)
    return lines


def _extra(extra_sections) -> list[str]:
    if not extra_sections:
        return []
    items = extra_sections.items() if isinstance(extra_sections, Mapping) else extra_sections
    lines = []
    for heading, body in items:
        lines += [f"## {heading}", "", str(body).rstrip(), ""]
    return lines


def render_markdown(metrics: dict, classes, *, title: str, reliability: dict, extra_sections=None) -> str:
    """The report.md text (figures are referenced by their file names in the same folder)."""
    classes = list(classes)
    parts = [[f"# {title}"], _headline(metrics), _skipped(metrics), _per_class(metrics, classes), _malignant(metrics),
             _calibration(metrics, reliability), _confusion(metrics, classes),
             ["## ROC curves", "", "![ROC curves](roc_curves.png)"], _subgroups(metrics),
             _extra(extra_sections)]
    return "\n\n".join("\n".join(p).strip() for p in parts if p).rstrip() + "\n"


# --------------------------------------------------------------------------- plots


def plot_confusion(confusion, classes, path) -> Path:
    """Row-normalised confusion matrix (colour) with raw counts written in each cell."""
    cm = np.asarray(confusion, dtype=np.float64)
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k), dpi=DPI)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (colour: row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_roc(probs, labels, classes, path, *, malignant_score=None, malignant_positive=None) -> Path:
    """One-vs-rest ROC curve per class present, plus malignant-vs-benign when given."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=DPI)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    for i, c in enumerate(classes):
        pos = labels == i
        if not pos.any() or pos.all():
            continue
        fpr, tpr, _ = roc_curve(probs[:, i], pos)
        ax.plot(fpr, tpr, lw=1.3, label=c)
    if malignant_score is not None and np.any(malignant_positive) and not np.all(malignant_positive):
        fpr, tpr, _ = roc_curve(malignant_score, malignant_positive)
        ax.plot(fpr, tpr, lw=2.2, color="black", ls="--", label="malignant vs benign")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curves (one-vs-rest)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(rel: dict, path) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) over a histogram of confidences."""
    edges = np.asarray(rel["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.nan_to_num(np.asarray(rel["accuracy"], dtype=np.float64))
    conf = np.asarray(rel["confidence"], dtype=np.float64)
    count = np.asarray(rel["count"])
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6), dpi=DPI, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="perfect calibration")
    ax.bar(centers, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    has = count > 0
    gap_low = np.minimum(acc, np.nan_to_num(conf))
    gap = np.abs(acc - np.nan_to_num(conf))
    ax.bar(centers[has], gap[has], bottom=gap_low[has], width=width * 0.95, color="tab:red", alpha=0.25,
           edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = rel.get("ece")
    ax.set_title("Reliability diagram" + (f" (ECE {ece:.3f})" if ece is not None and math.isfinite(ece) else ""))
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centers, count, width=width * 0.95, color="0.5")
    axh.set_xlim(0, 1)
    axh.set_xlabel("confidence (top probability)")
    axh.set_ylabel("images")
    return _save(fig, path)


def plot_learning_curves(history: list[dict], path) -> Path:
    """Loss / accuracy / balanced-accuracy panels, train and val lines, against epoch.

    Rows may miss keys or hold None; such points are skipped. `epoch` defaults to the
    row's 1-based position.
    """
    panels = [("loss", "Loss"), ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=DPI)
    for ax, (key, label) in zip(axes, panels):
        drawn = False
        for split, style, color in (("train", "-", "tab:blue"), ("val", "--", "tab:orange")):
            pts = []
            for i, row in enumerate(history or []):
                v = row.get(f"{split}_{key}")
                if v is None or not math.isfinite(float(v)):
                    continue
                epoch = row.get("epoch")
                pts.append((i + 1 if epoch is None else epoch, float(v)))
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, color=color, marker="o", ms=3, label=split)
                drawn = True
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.tight_layout()
    return _save(fig, path, tight=False)


def plot_benchmark(rows: list[dict], path, *, title: str = "") -> Path:
    """Grouped bars: one group per metric, one bar per set (missing values left out)."""
    keys = [("balanced_accuracy", "balanced acc."), ("macro_auc", "macro AUC"), ("malignant_auc", "malignant AUC"),
            ("melanoma_recall_sensitive", "melanoma recall\n(sensitive thr.)"),
            ("specificity_sensitive", "specificity\n(sensitive thr.)")]
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=DPI)
    width = 0.8 / max(1, len(rows))
    for j, row in enumerate(rows):
        x = [i + (j - (len(rows) - 1) / 2) * width for i, (k, _) in enumerate(keys) if row.get(k) is not None]
        y = [row[k] for k, _ in keys if row.get(k) is not None]
        ax.bar(x, y, width, label=f"{row['name']} (n={row['n']})")
    ax.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


def write_report(outdir, metrics: dict, probs, labels, classes, *, title: str,
                 extra_sections=None, malignant=None) -> list[Path]:
    """Write metrics.json, report.md, confusion_matrix.png, roc_curves.png, reliability.png.

    `metrics` is a `classification_metrics` dict (optionally with a "subgroups" entry from
    `subgroup_metrics` and a "temperature"). `extra_sections` is a {heading: markdown}
    mapping or a list of (heading, markdown) pairs appended to the report; `malignant`
    overrides the malignant class indices as in `classification_metrics`. Returns the
    written paths.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    rel = reliability_bins(probs, labels)

    written = []
    metrics_path = outdir / "metrics.json"
    metrics_path.write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    written.append(metrics_path)

    report_path = outdir / "report.md"
    report_path.write_text(render_markdown(metrics, classes, title=title, reliability=rel,
                                           extra_sections=extra_sections))
    written.append(report_path)

    confusion = metrics.get("confusion")
    if confusion is None:
        confusion = confusion_matrix(labels, probs.argmax(axis=1), len(classes))
    written.append(plot_confusion(confusion, classes, outdir / "confusion_matrix.png"))

    score, positive = malignant_split(probs, labels, classes, malignant) or (None, None)
    written.append(plot_roc(probs, labels, classes, outdir / "roc_curves.png",
                            malignant_score=score, malignant_positive=positive))
    written.append(plot_reliability(rel, outdir / "reliability.png"))
    return written
