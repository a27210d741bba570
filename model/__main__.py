"""lesionlens command line: `python -m model COMMAND --help`.

    python -m model train     [train.py flags]      same as `python train.py`
    python -m model evaluate  --checkpoint DIR --csv LABELS.csv --out OUTDIR
    python -m model benchmark --checkpoint DIR --out OUT SET [SET ...]   (NAME=PATH[:split])
    python -m model predict   --checkpoint DIR --out preds.csv IMAGE_OR_FOLDER...
    python -m model organize  METADATA.csv IMAGE_DIR OUT_DIR [--link]
    python -m model split     DATA --out split.csv [--val_frac 0.15 --seed 0]
    python -m model calibrate --checkpoint DIR --csv split.csv --split val [--csv NAME=SPEC ...] [--external_eval CSV:test]
                              [--non_lesions FOLDER]
    python -m model fuse      --checkpoint DIR --csv split.csv   (age/sex/site fusion)
    python -m model info      --checkpoint DIR [--json]   (summary; --json: all metadata)
    python -m model card      --checkpoint DIR [--out FILE]   (the model card as Markdown)
    python -m model loso      --recipe multisource --out runs/loso [--fold NAME] [--proxy] [train.py flags]
    python -m model audit     --checkpoint DIR --out OUT SET [SET ...]   (shortcut audit)
"""
import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def cmd_train(args):
    from .config import from_arguments
    from .train import train_and_evaluate
    train_and_evaluate(from_arguments(args))


def cmd_evaluate(args):
    from .evaluate import evaluate
    result = evaluate(args.checkpoint, args.csv, args.out, split=args.split, tta=args.tta,
                      n_bootstrap=args.bootstrap, strict=args.strict)
    print(evaluation_summary(result))
    print(f"wrote {args.out}/metrics.json, report.md, predictions.csv and plots")


def evaluation_summary(result: dict) -> str:
    """The headline numbers of an evaluation, 3 decimals, then what was skipped."""
    def number(key):
        value = result.get(key)
        return "n/a" if value is None or value != value else f"{value:.3f}"
    lines = [f"{result['n']} images" + (f"; {result['scored_by']}" if result.get("scored_by") else ""),
             *(f"  {label:<24}{number(key)}" for label, key in (
                 ("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
                 ("macro AUC", "macro_auc"), ("malignant AUC", "malignant_auc"), ("ECE", "ece")))]
    point = result.get("operating_point")
    if point:
        lines.append(f"  at the sensitive threshold {point['threshold']:.3f}: malignant sensitivity {point['malignant_sensitivity']:.3f}, "
                     f"specificity {point['malignant_specificity']:.3f}")
    skipped = result.get("skipped") or []
    lines += [f"skipped or changed ({len(skipped)} notes; --strict stops instead):"] if skipped else []
    return "\n".join(lines + [f"  {note}" for note in skipped])


def cmd_benchmark(args):
    from .benchmark import benchmark, table
    result = benchmark(args.checkpoint, args.sets, args.out, tta=args.tta, n_bootstrap=args.bootstrap,
                       record=args.record, resize=args.resize)
    print(table(result))
    print(f"wrote {args.out}/benchmark.json and benchmark.png")


def cmd_predict(args):
    from .predict import predict_files
    s = predict_files(args.checkpoint, args.inputs, args.out, tta=args.tta)
    counts = ", ".join(f"{c} {n}" for c, n in s["predicted"].most_common()) or "none"
    lines = [f"{s['n']} images predicted: {counts}",
             f"  unusual (unlike the lesions the model knows; their probabilities mean little): {s['unusual']}"]
    if s["threshold"] is not None:
        lines.append(f"  at or above the sensitive threshold {s['threshold']:.3f} and not unusual: {s['flagged']}")
    if s["failures"]:
        lines.append(f"  could not be read: {s['failures']} (see the error column)")
    print("\n".join(lines + [f"wrote {args.out}"]))


def cmd_loso(args):
    import dataclasses

    from .config import from_arguments
    from .loso import PROXY, run_folds, table
    cfg = from_arguments(args)
    if args.proxy:   # the proxy's sizes, under any the command line gives itself
        cfg = dataclasses.replace(cfg, **{k: v for k, v in PROXY.items() if getattr(args, k) is None})
    if not args.table_only:
        run_folds(cfg, args.out, args.fold)
    result = table(cfg, args.out, args.reference or ())
    print((Path(args.out) / "loso.md").read_text())
    print(f"wrote {args.out}/loso.json and loso.md ({result['finished']} of {result['of']} folds finished)")


def cmd_audit(args):
    from .audit import audit
    audit(args.checkpoint, args.sets, args.out, max_images=args.max_images, tta=args.tta, record=args.record)
    print((Path(args.out) / "audit.md").read_text())
    print(f"wrote {args.out}/audit.json and audit.md")


def cmd_organize(args):
    from .data import organize
    counts = organize(args.csv, args.images, args.out, mode="link" if args.link else "copy")
    print(json.dumps(counts, indent=2))


def cmd_split(args):
    from .data import load_dataset, select_task
    from .splits import make_split, write_split
    records, labels, _ = select_task(load_dataset(args.data), args.task)
    assignment = make_split(records, labels, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    write_split(args.out, records, assignment, relative=True)
    print(f"wrote {args.out}: " + ", ".join(f"{s} {int((assignment == s).sum())}" for s in ("train", "val", "test")))


def cmd_calibrate(args):
    import numpy as np

    from .calibration import calibrate
    from .data import parse_source
    from .evaluate import Split, external_summary, labelled_split, record_external
    from .predictor import Predictor
    predictor = Predictor.load(args.checkpoint)
    non_lesions = read_non_lesions(predictor, args.non_lesions) if args.non_lesions else None   # fails fast
    # Several --csv: one validation set, each part keeping its source's name for the operating point.
    names, _, splits = zip(*map(parse_source, args.csv))
    parts = [labelled_split(predictor, spec, None if split else args.split) for spec, split in zip(args.csv, splits)]
    val = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                [r for p in parts for r in p.records])
    sources = np.repeat(names, [len(p.labels) for p in parts])
    note_dropped_boundary(predictor, non_lesions)
    result = calibrate(predictor, val, predictor.classes, sources if len(parts) > 1 else None, args.prior_tau,
                       non_lesions)
    external = record_external(predictor, args.external_eval or [])
    print(json.dumps({**{k: result[k] for k in ("temperature", "ece_before", "ece_after")},
                      "operating_point": {**predictor.metadata.get("operating_point", {}),
                                          **(result["val"].get("operating_point") or {})},
                      "external": {spec: external_summary(m) for spec, m in external.items()}}, indent=2))


def note_dropped_boundary(predictor, non_lesions) -> None:
    """Recalibration redraws the gate's reference, so an old non-lesion boundary cannot be kept: say so."""
    if non_lesions is None and (predictor.metadata.get("ood") or {}).get("non_lesion"):
        print("note: the checkpoint's non-lesion boundary is refitted only with `calibrate --non_lesions`; "
              "without it, it is removed")


def read_non_lesions(predictor, inputs):
    """The pictures of --non_lesions in the checkpoint's view; unreadable ones are counted and skipped."""
    from .images import load_squares
    from .predict import expand_inputs
    paths = expand_inputs(inputs)
    images, errors = load_squares(paths, predictor.image_size, predictor.resize)
    print(f"non-lesion pictures: {len(images)} read" + (f", {len(errors)} left out, e.g. {next(iter(errors.values()))}"
                                                         if errors else ""))
    if len(images) < 10:
        raise UserError(f"--non_lesions: {len(images)} readable pictures; a boundary needs at least 10 (photographs, "
                        "textures, documents: e.g. OpenCV's samples/data, docs/TRAINING.md).")
    return images


def cmd_fuse(args):
    from .calibration import calibrate, fit_clinical_fusion
    from .evaluate import labelled_split
    from .predictor import Predictor
    from .train_step import class_weights
    predictor = Predictor.load(args.checkpoint)
    train = labelled_split(predictor, args.csv, "train")
    val = labelled_split(predictor, args.csv, "val")
    weighting = predictor.metadata.get("training", {}).get("config", {}).get("class_weighting", "sqrt")
    fit_clinical_fusion(predictor, train, class_weights(train.labels, len(predictor.classes), weighting))
    note_dropped_boundary(predictor, None)
    result = calibrate(predictor, val, predictor.classes)
    print(json.dumps({"image_only": result["image_only_val"],
                      "with_clinical": {k: result["val"][k] for k in result["image_only_val"]}}, indent=2))


def cmd_info(args):
    """A readable summary of the checkpoint's metadata; `--json`: all of it (the gate's packed reference too)."""
    from .card import gate_summary
    from .checkpoint import read_metadata
    md = read_metadata(args.checkpoint)
    if args.json:
        print(json.dumps(md, indent=2))
        return

    def num(v, fmt=".3f"):
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"

    def counts(c):
        return ", ".join(f"{k} {v}" for k, v in c.items()) if isinstance(c, dict) else "–"

    def headline(m):
        ci = m.get("balanced_accuracy_ci")
        ci = f" (95% CI {num(ci[0])}–{num(ci[1])})" if isinstance(ci, list) and len(ci) == 2 else ""
        line = (f"n {m.get('n', '–')}: balanced accuracy {num(m.get('balanced_accuracy'))}{ci}, "
                f"macro AUC {num(m.get('macro_auc'))}, malignant AUC {num(m.get('malignant_auc'))}")
        if m.get("accuracy") is not None:
            line += f", accuracy {num(m['accuracy'])}"
        if m.get("melanoma_sensitivity") is not None:
            line += f", melanoma sensitivity {num(m['melanoma_sensitivity'])}"
        if m.get("ece") is not None:
            line += f", ECE {num(m['ece'])}"
        point = m.get("operating_point") or {}
        if point.get("malignant_sensitivity") is not None:
            line += (f"; at the sensitive threshold: malignant sensitivity {num(point['malignant_sensitivity'])}, "
                     f"specificity {num(point.get('malignant_specificity'))}")
        elif m.get("melanoma_recall_sensitive") is not None:   # a benchmark row
            line += (f"; at the sensitive threshold: melanoma recall {num(m['melanoma_recall_sensitive'])}, "
                     f"specificity {num(m.get('specificity_sensitive'))}")
        return line

    norm = md.get("normalisation") or {}
    cfg_arch = md.get("arch_config") or {}
    classes = md.get("classes") or []
    size = md.get("image_size", "?")
    lines = [f"Checkpoint     {args.checkpoint}",
             f"Architecture   {md.get('arch', '?')}" + (f" ({counts(cfg_arch)})" if cfg_arch else ""),
             f"Task           {md.get('task', '?')}: {len(classes)} classes: {', '.join(classes)}",
             f"Input          {size}x{size} px, resize {md.get('resize', 'squash')}; normalisation mean "
             f"{norm.get('mean', '?')} std {norm.get('std', '?')}, colour constancy "
             f"{'on' if norm.get('color_constancy') else 'off'}",
             f"Temperature    {num(md.get('temperature'), '.4g')} (test-time augmentation "
             f"{'on' if md.get('tta') else 'off'})"]
    point = md.get("operating_point") or {}
    lines.append("Sensitive threshold  " + (
        f"malignant probability >= {num(point['threshold'])} (chosen for validation sensitivity "
        f"{num(point.get('target_sensitivity'), '.0%')}, {point.get('rule', 'pooled malignant')})"
        if point.get("threshold") is not None else "none (not calibrated)"))
    ood = md.get("ood") or {}
    if ood:
        lines.append(f"Unusual-image gate   {gate_summary(ood)}")
    lines.append(f"Clinical fusion      {'age, sex and body site' if md.get('clinical_fusion') else 'none (image only)'}")
    prior = md.get("prior_correction") or {}
    lines.append("Prior correction     " + (f"logits minus {num(prior.get('tau'), 'g')} x log(training class frequency)"
                                          if prior else "none"))

    data = (md.get("training") or {}).get("data") or {}
    if data:
        lines += ["", "Training data"]
        sources = data.get("sources") if isinstance(data.get("sources"), list) else []
        for src in sources or [{"name": data.get("source"), **data}]:
            lines.append(f"  {src.get('name') or src.get('spec') or '?'}"
                         + (f" ({src['spec']})" if src.get("spec") and src.get("spec") != src.get("name") else "")
                         + f": {src.get('train_images', '–')} training, {src.get('val_images', '–')} validation images")
        if data.get("extra_train"):
            lines.append(f"  extra training sources: {', '.join(map(str, data['extra_train']))}")
        if data.get("train_class_counts"):
            lines.append(f"  training classes:   {counts(data['train_class_counts'])}")
        if data.get("val_class_counts"):
            lines.append(f"  validation classes: {counts(data['val_class_counts'])}")
        if data.get("dropped_duplicates"):
            lines.append(f"  dropped {data['dropped_duplicates']} training images identical to held-out ones")

    all_metrics = md.get("metrics") or {}
    val = all_metrics.get("val")
    if isinstance(val, dict):
        epoch = all_metrics.get("epoch")
        lines += ["", "Validation" + (f" (best epoch {epoch})" if epoch else ""), f"  {headline(val)}"]
        for name, m in (all_metrics.get("val_sources") or {}).items():
            if isinstance(m, dict):
                lines.append(f"  {name}: {headline(m)}")
    external = all_metrics.get("external") or {}
    if external:
        lines += ["", "Other sources (never trained on)"]
        lines += [f"  {spec}: {headline(m)}" for spec, m in external.items() if isinstance(m, dict)]
    bench = all_metrics.get("benchmark") or {}
    rows = [r for r in bench.get("sets") or [] if isinstance(r, dict)] if isinstance(bench, dict) else []
    if rows:
        lines += ["", "Benchmark (python -m model benchmark --record)"]
        lines += [f"  {r.get('name', '?')} ({r.get('spec', '?')}): {headline(r)}" for r in rows]
    saliency = md.get("saliency") or {}
    if saliency.get("default"):
        lines += ["", f"Saliency default     {saliency['default']}"]

    lines += ["", "Versions       " + (counts(md.get("versions")) if md.get("versions") else "–"),
              f"Licence        {md.get('licence') or md.get('license') or '–'}",
              "", f"All metadata as JSON: python -m model info --checkpoint {args.checkpoint} --json"]
    print("\n".join(lines))


def cmd_card(args):
    from .card import model_card_markdown
    from .checkpoint import read_metadata
    card = model_card_markdown({**read_metadata(args.checkpoint), "checkpoint_path": args.checkpoint})
    if not args.out:
        print(card, end="")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!-- Generated from the checkpoint's metadata by `python -m model card --checkpoint "
                   f"{args.checkpoint} --out {args.out}`; edit model/card.py, not this file. -->\n\n{card}")
    print(f"wrote {out}")


def parser() -> argparse.ArgumentParser:
    from .config import add_arguments
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    add_arguments(sub.add_parser("train", help="train a model in one process (same flags as train.py; several processes or "
                                "hosts: python train.py, docs/TRAINING.md)")).set_defaults(run=cmd_train)

    p = add_arguments(sub.add_parser(
        "loso", help="leave-one-source-out: train without each source in turn, score on it; one table"))
    p.add_argument("--out", required=True, help="folder of the folds (one training run each) and loso.json / loso.md")
    p.add_argument("--fold", action="append", metavar="SOURCE",
                   help="run only this held-out source's fold (repeatable); for folds on several processes or machines")
    p.add_argument("--proxy", action="store_true", help="the cheap proxy: smaller images, fewer epochs, part of "
                                                        "each source (model.loso.PROXY)")
    p.add_argument("--table_only", action="store_true", help="train nothing: gather the finished folds into the table")
    p.add_argument("--reference", action="append", metavar="CHECKPOINT",
                   help="also score this checkpoint on every source it did not train on (e.g. a single-source "
                        "model), beside the folds; repeatable")
    p.set_defaults(run=cmd_loso)

    p = sub.add_parser("evaluate", help="metrics, report and plots for a checkpoint on a labelled set")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a training workdir)")
    p.add_argument("--csv", required=True, help="labelled set: path,dx CSV (paths relative to it), "
                                                "ISIC metadata CSV/folder, class folders, or a split.csv")
    p.add_argument("--split", help="only rows whose `split` column has this value (e.g. test, val)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="dihedral test-time augmentation (default: as the checkpoint was validated)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals")
    p.add_argument("--strict", action="store_true",
                   help="stop (exit 2) when reading the set skips any row or image or counts a label under "
                        "another class, instead of reporting it and scoring the rest")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("benchmark", help="one checkpoint on several labelled sources: a table, JSON and a plot")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a training workdir)")
    p.add_argument("--out", required=True, help="output folder for benchmark.json and benchmark.png")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="dihedral test-time augmentation (default: as the checkpoint was validated)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% intervals")
    p.add_argument("--resize", choices=["squash", "center", "fov"],
                   help="override the checkpoint's crop-and-resize mode (an inference-only ablation)")
    p.add_argument("--record", action="store_true",
                   help="also store the table in the checkpoint's metadata (shown on its model card)")
    p.add_argument("sets", nargs="+", metavar="SET",
                   help="labelled source, optionally NAME=PATH and a :split suffix (e.g. bcn=split.csv:val)")
    p.set_defaults(run=cmd_benchmark)

    p = sub.add_parser("audit", help="shortcut audit: how predictions move under changes that carry no lesion "
                                     "information (84 px round trip, JPEG, a round frame, colour temperature)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a training workdir)")
    p.add_argument("--out", required=True, help="output folder for audit.json and audit.md")
    p.add_argument("--max_images", type=int, default=0, help="score a random sample of at most this many images "
                                                             "per set (0: all)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="average the 8 dihedral views (default: plain view, 8x cheaper)")
    p.add_argument("--record", action="store_true", help="also store the audit in the checkpoint (its model card)")
    p.add_argument("sets", nargs="+", metavar="SET",
                   help="labelled source, optionally NAME=PATH and a :split suffix (e.g. bcn=split.csv:val)")
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser("predict", help="class probabilities for images or folders -> CSV, with the unusual-image "
                                       "check and the sensitive threshold per image")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a training workdir), e.g. "
                                                       "checkpoints/default")
    p.add_argument("--out", required=True, help="CSV to write: one row per image")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the 8 dihedral views (default: as the checkpoint was validated)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("organize", help="copy or link images into class folders from a metadata CSV")
    p.add_argument("csv")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--link", action="store_true", help="symlink instead of copying")
    p.set_defaults(run=cmd_organize)

    p = sub.add_parser("split", help="write a lesion-grouped, stratified train/val/test split")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="ham7", choices=["ham7", "binary"])
    p.add_argument("--val_frac", type=float, default=0.15)
    p.add_argument("--test_frac", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_split)

    p = sub.add_parser("calibrate", help="refit temperature, operating point and unusual-image gate on a validation set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--csv", required=True, action="append", metavar="SPEC",
                   help="validation set (e.g. the run's split.csv); repeat it, as NAME=PATH[:split], for a "
                        "model trained on several sources: each source's melanomas then set the operating point too")
    p.add_argument("--split", default="val", help="the split to use where a --csv names none")
    p.add_argument("--external_eval", action="append", metavar="SPEC",
                   help="also evaluate on another source (CSV[:split,...]) and store it in the checkpoint")
    p.add_argument("--prior_tau", type=float, default=None, metavar="TAU",
                   help="decide with logits minus TAU x log(training class frequency): 0.5 for a model trained "
                        "with sqrt class weights, 0 removes the correction; default: keep the checkpoint's")
    p.add_argument("--non_lesions", action="append", metavar="FOLDER",
                   help="pictures that are not skin lesions (folders searched recursively): the unusual-image "
                        "gate also learns a boundary between them and the validation lesions; repeatable")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("fuse", help="fit age/sex/site fusion on a split's train rows, recalibrate on its val rows")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--csv", required=True, help="split file with a `split` column (train/val) and metadata")
    p.set_defaults(run=cmd_fuse)

    p = sub.add_parser("info", help="a readable summary of a checkpoint's metadata (--json: all of it)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a training workdir)")
    p.add_argument("--json", action="store_true",
                   help="print the full metadata as JSON (long: it holds the unusual-image statistics)")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("card", help="the model card (Markdown) from a checkpoint's metadata, as the app shows it")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a training workdir)")
    p.add_argument("--out", help="write the Markdown to this file instead of printing it")
    p.set_defaults(run=cmd_card)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from .runtime import use_huge_pages
    use_huge_pages()   # XLA:CPU's buffers on huge pages: restarts this process once (model/runtime.py)
    sys.exit(main())
