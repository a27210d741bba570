"""Leave-one-source-out (LOSO): how a recipe does at a clinic none of its training data comes from.

    python -m model loso --recipe multisource --out runs/loso                 # every fold, then the table
    python -m model loso --recipe multisource --out runs/loso --fold isic2017 # one fold: one process or machine each
    python -m model loso --recipe multisource --out runs/loso_proxy --proxy   # the cheap proxy, for ranking levers
    python -m model loso --recipe multisource --out runs/loso --table_only --reference CKPT   # another model beside it

Fold k is an ordinary training run (in OUT/k, resumable) of the recipe on every `--data` source but k,
scored on all of source k: its training, validation and test images together, a clinic the model never
saw. The in-source validation of the same run stands beside it. The table (OUT/loso.json, OUT/loso.md)
gathers the folds that are done, so folds run apart are joined by running the command once more.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data import parse_source
from .errors import UserError

# The proxy: small images, few epochs, a third of each source's training lesions (docs/notebook/ says how
# well it ranks recipes like full runs do).
PROXY = dict(image_size=96, epochs=3, train_fraction=0.3)


def source_names(cfg: TrainConfig) -> list[str]:
    names = [parse_source(spec)[0] for spec in cfg.data]
    if len(names) < 2:
        raise UserError(f"leave-one-source-out needs at least two --data sources; got {len(names)} "
                        f"({', '.join(names) or 'none'}).")
    if len(set(names)) < len(names):
        raise UserError(f"two --data sources share a name ({', '.join(names)}); name them apart as NAME=PATH.")
    return names


def whole_source(spec: str) -> str:
    """The spec of every image of a source, whatever splits the recipe trains on ('labels.csv:train,val'
    held out means all of labels.csv)."""
    name, path, _ = parse_source(spec)
    return f"{name}={path}"


def fold_config(cfg: TrainConfig, held_out: str, out) -> TrainConfig:
    """The recipe without `held_out`, scored on all of it (plain view, as the fold's checkpoint is validated)."""
    spec = next(s for s in cfg.data if parse_source(s)[0] == held_out)
    workdir = Path(out) / held_out
    return dataclasses.replace(cfg, data=[s for s in cfg.data if s != spec], external_eval=[whole_source(spec)],
                               tta=False, workdir=str(workdir), resume=(workdir / "latest").exists())


def check_same_recipe(fold: TrainConfig) -> None:
    """Refuse a fold folder that an earlier command filled with other settings: its numbers would be
    reported under this recipe's name."""
    saved = Path(fold.workdir) / "config.json"
    if not saved.exists():
        return
    before, now = json.loads(saved.read_text()), fold.to_dict()
    changed = sorted(k for k in now if k not in ("resume", "workdir") and before.get(k) != now[k])   # not where
    if changed:
        raise UserError(f"{fold.workdir} holds a fold trained with other settings ("
                        + ", ".join(f"{k}: {before.get(k)!r} there, {now[k]!r} now" for k in changed[:4])
                        + (", ..." if len(changed) > 4 else "") + "); give this recipe its own --out.")


def fold_result(cfg: TrainConfig, held_out: str, out) -> dict | None:
    """The finished fold's held-out metrics and in-source validation, or None while it is not finished."""
    fold = fold_config(cfg, held_out, out)
    check_same_recipe(fold)
    results_path = Path(fold.workdir) / "results.json"
    if not results_path.exists():
        return None
    results = json.loads(results_path.read_text())
    held = results["external"][fold.external_eval[0]]
    rows = [json.loads(line) for line in (Path(fold.workdir) / "log.jsonl").read_text().splitlines() if line]
    best = max(rows, key=lambda r: r["val_selection_score"])
    keys = ("n", "balanced_accuracy", "balanced_accuracy_ci", "malignant_auc", "malignant_auc_ci", "recall",
            "support", "absent_classes", "confusion")
    return {"held_out": held_out, "trained_on": [parse_source(s)[0] for s in fold.data], "best_epoch": best["epoch"],
            **{k: held.get(k) for k in keys}, "in_source_val": best["val_sources"]}


def run_folds(cfg: TrainConfig, out, folds=None) -> None:
    """Train and score each fold that is not finished; an interrupted fold continues where it stopped."""
    from .train import train_and_evaluate   # noqa: PLC0415 (the table needs no JAX)
    names = source_names(cfg)
    unknown = sorted(set(folds or ()) - set(names))
    if unknown:
        raise UserError(f"--fold {', '.join(unknown)}: not a source of this recipe; its sources are "
                        f"{', '.join(names)}.")
    todo = [n for n in names if not folds or n in folds]
    for i, name in enumerate(todo, 1):
        if fold_result(cfg, name, out) is not None:
            print(f"fold {i}/{len(todo)}: {name} held out: done already", flush=True)
            continue
        fold = fold_config(cfg, name, out)
        state = "resuming" if fold.resume else "training"
        print(f"fold {i}/{len(todo)}: {name} held out: {state} on {', '.join(parse_source(s)[0] for s in fold.data)}"
              f" in {fold.workdir}", flush=True)
        train_and_evaluate(fold)


def _trained_paths(metadata: dict) -> set[str]:
    config = metadata.get("training", {}).get("config", {})
    specs = config.get("data") or []
    specs = [specs] if isinstance(specs, str) else list(specs)
    return {str(Path(parse_source(spec)[1]).resolve()) for spec in [*specs, *(config.get("extra_train") or [])]}


def reference_rows(cfg: TrainConfig, checkpoint: str) -> dict:
    """Another checkpoint (e.g. one trained on a single source) scored like a fold on each source it did not
    train on, plain view; a source it trained on is marked, never scored."""
    from .evaluate import evaluate_split, labelled_split   # noqa: PLC0415 (JAX only when asked)
    from .predictor import Predictor   # noqa: PLC0415
    predictor = Predictor.load(checkpoint)
    trained = _trained_paths(predictor.metadata)
    rows = {}
    for spec in cfg.data:
        name, path, _ = parse_source(spec)
        if str(Path(path).resolve()) in trained:
            rows[name] = "trained on it"
            continue
        m = evaluate_split(predictor, labelled_split(predictor, whole_source(spec)), tta=False)[0]
        rows[name] = {k: m.get(k) for k in ("n", "balanced_accuracy", "balanced_accuracy_ci", "malignant_auc",
                                           "malignant_auc_ci", "recall", "absent_classes")}
    return {"checkpoint": str(checkpoint), "checkpoint_id": predictor.checkpoint_id, "rows": rows}


def table(cfg: TrainConfig, out, references=()) -> dict:
    """Every fold's row (None while unfinished), the mean over finished folds, and each reference checkpoint
    on the same held-out sources; written to OUT/loso.json and OUT/loso.md."""
    names = source_names(cfg)
    folds = {name: fold_result(cfg, name, out) for name in names}
    done = [f for f in folds.values() if f]
    mean = {k: float(np.mean([f[k] for f in done if f[k] is not None])) if any(f[k] is not None for f in done)
            else None for k in ("balanced_accuracy", "malignant_auc")}
    result = {"recipe": cfg.to_dict(), "folds": folds, "finished": len(done), "of": len(names), "mean": mean,
              "references": [reference_rows(cfg, c) for c in references]}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "loso.json").write_text(json.dumps(result, indent=2))
    (Path(out) / "loso.md").write_text(markdown(result))
    return result


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(values) -> str:
    return f" ({values[0]:.3f}-{values[1]:.3f})" if values else ""


def _cells(m: dict, classes) -> str:
    """n, balanced accuracy and malignant AUC with their intervals, and recall per class ('absent' where the
    source has none of it): the columns a fold and a reference share."""
    recall = ["absent" if c in m["absent_classes"] else _f(m["recall"].get(c)) for c in classes]
    return (f"{m['n']} | {_f(m['balanced_accuracy'])}{_ci(m['balanced_accuracy_ci'])} | "
            f"{_f(m['malignant_auc'])}{_ci(m['malignant_auc_ci'])} | " + " | ".join(recall))


def markdown(result: dict) -> str:
    folds = result["folds"]
    classes = next((list(f["support"]) for f in folds.values() if f), [])
    header = "| n | balanced accuracy | malignant AUC | " + " | ".join(f"{c} recall" for c in classes)
    rule = "| --- | --- | --- | " + " | ".join("---" for _ in classes)
    blank = " | ".join("" for _ in classes)
    lines = [f"# Leave-one-source-out: {result['finished']} of {result['of']} folds finished", "",
             "Each row: trained on every other source, scored on all images of the held-out one (plain view, "
             "balanced accuracy over the classes that source has; 95% bootstrap intervals). "
             "'absent': the source has no such lesion.", "",
             f"| held out {header} | in-source val. bal. acc. |", f"| --- {rule} | --- |"]
    for name, f in folds.items():
        if f is None:
            lines.append(f"| {name} | not finished | | | {blank} | |")
            continue
        val = ", ".join(f"{s} {_f(m['balanced_accuracy'])}" for s, m in f["in_source_val"].items())
        lines.append(f"| {name} | {_cells(f, classes)} | {val} |")
    mean = result["mean"]
    lines += [f"| **mean** | | **{_f(mean['balanced_accuracy'])}** | **{_f(mean['malignant_auc'])}** | {blank} | |", ""]
    for ref in result.get("references") or []:
        lines += [f"Beside it, `{ref['checkpoint']}` ({ref['checkpoint_id']}) on the same sources, plain view:", "",
                  f"| source {header} |", f"| --- {rule} |"]
        lines += [f"| {name} | {r} | | | {blank} |" if isinstance(r, str) else f"| {name} | {_cells(r, classes)} |"
                  for name, r in ref["rows"].items()]
        lines.append("")
    for name, f in folds.items():
        if f:
            lines += [f"Confusion, {name} held out (rows: true {', '.join(classes)}; columns: predicted):", "",
                      "```", *(" ".join(f"{v:5d}" for v in row) for row in f["confusion"]), "```", ""]
    return "\n".join(lines)
