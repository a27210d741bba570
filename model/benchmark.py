"""`python -m model benchmark --checkpoint DIR --out OUT SET [SET ...]`: one checkpoint on several sources.

Each SET is any labelled source `evaluate` reads, optionally named and split: `NAME=PATH[:split,...]`
(e.g. `bcn_val=data/splits/isic2019_bcn_val15_seed0.csv:val`). Prints one table, writes
`OUT/benchmark.json`, `OUT/benchmark.png` comparing the sets side by side, and each set's
`OUT/predictions_NAME.csv` (as `evaluate` writes them) for error analysis.
"""
import json
from pathlib import Path

from . import checkpoint as checkpoints, metrics, report
from .data import parse_source
from .evaluate import evaluate_split, labelled_split, write_predictions
from .predictor import Predictor

COLUMNS = ("n", "accuracy", "balanced_accuracy", "macro_auc", "malignant_auc", "melanoma_recall_sensitive",
           "specificity_sensitive", "ece")


def set_row(name: str, m: dict) -> dict:
    """The benchmark's view of one `classification_metrics` result."""
    point = m.get("operating_point") or {}
    return {"name": name, "n": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "balanced_accuracy_ci": m.get("balanced_accuracy_ci"), "macro_auc": m["macro_auc"],
            "malignant_auc": m.get("malignant_auc"), "malignant_auc_ci": m.get("malignant_auc_ci"),
            "recall": m["recall"],
            # recall of melanoma and specificity for benign lesions at the checkpoint's stored
            # high-sensitivity threshold on the malignant probability (model/calibration.py)
            "melanoma_recall_sensitive": point.get("melanoma_flagged"),
            "specificity_sensitive": point.get("malignant_specificity"), "ece": m["ece"]}


def benchmark(checkpoint: str, sets: list[str], out: str, *, tta: bool | None = None, n_bootstrap: int = 200,
              record: bool = False, resize: str | None = None) -> dict:
    """Evaluate `checkpoint` on each SET; with `record`, also store the table in the checkpoint's
    metadata (`metrics.benchmark`; `metrics.benchmark_plain` for tta=False), so the numbers travel
    with the model and show on its card.
    `resize` overrides the checkpoint's crop-and-resize mode: an inference-only ablation of the
    preprocessing (the model was trained with its own mode), never recorded."""
    predictor = Predictor.load(checkpoint)
    if resize is not None:
        if record:
            raise ValueError("a benchmark with another resize mode is an ablation: it is not recorded")
        predictor.resize = resize
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in sets:
        name, _, _ = parse_source(spec)
        data = labelled_split(predictor, spec)
        m, probs = evaluate_split(predictor, data, n_bootstrap=n_bootstrap, tta=tta)
        rows.append(set_row(name, m))
        write_predictions(out / f"predictions_{name}.csv", predictor.classes, data.records, data.labels, probs)
    result = metrics.to_jsonable({"checkpoint": str(checkpoint), "checkpoint_id": predictor.checkpoint_id,
                                  "resize": predictor.resize,
                                  "operating_threshold": predictor.operating_threshold, "sets": rows})
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    if record:   # the plain view's table is kept beside the served one: the card compares them
        key = "benchmark_plain" if tta is False else "benchmark"
        predictor.metadata.setdefault("metrics", {})[key] = {
            "sets": [{**row, "spec": spec} for row, spec in zip(result["sets"], sets)], "tta": tta}
        checkpoints.update_metadata(predictor.metadata["checkpoint_path"], predictor.metadata)
    report.plot_benchmark(rows, out / "benchmark.png", title=f"{predictor.checkpoint_id}")
    return result


def table(result: dict) -> str:
    """The benchmark as a Markdown table (what the command prints)."""
    header = ["set", *COLUMNS]
    body = [[r["name"], *(report._fmt(r.get(c)) for c in COLUMNS)] for r in result["sets"]]
    return "\n".join(report._table(header, body))
