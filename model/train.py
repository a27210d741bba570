"""The one train loop: `train_and_evaluate(config)`; `python train.py` is its command-line face.

Sections follow big_vision: input pipeline / model and optimiser / update step / checkpoint /
evals / loop. Training interrupted at any point loses at most the current epoch (`--resume`).
"""
import csv
import dataclasses
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from . import checkpoint, distributed, metrics, report
from .evaluate import Split, record_external
from .augment import AugmentConfig
from .calibration import calibrate, check_prior_tau, fit_clinical_fusion
from .config import TrainConfig
from .classes import TASKS, malignant_indices
from .data import load_labelled, parse_source
from .errors import UserError
from .images import UnreadableImages, build_cache, default_cache_dir
from .networks import build
from .pipeline import balances_classes, epoch_order, global_batches, prefetch
from .inference import EVAL_BATCH, forward
from .predictor import Predictor
from .preprocess import Normalisation
from .splits import lesion_sample, make_split, not_in, read_split, write_split
from .train_step import (class_weights, data_mesh, make_ema_update, make_optimizer, make_train_step, process_rows,
                         replicate, shard_batch)

# ----------------------------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """One training source: its records and labels, and which split each record belongs to."""
    name: str
    spec: str
    records: list
    labels: np.ndarray
    assignment: np.ndarray      # "train" / "val" / "test" per record


def cache_split(records, labels, cfg: TrainConfig) -> Split:
    images = build_cache([r.path for r in records], cfg.image_size, cfg.resize, default_cache_dir(),
                         progress=distributed.is_main())
    return Split(images, np.asarray(labels, np.int32), list(records))


def cache_splits(parts, cfg: TrainConfig) -> list[Split]:
    """`cache_split` of each (records, labels); the unreadable images of all of them named in one error,
    so a set with bad files in several splits is fixed in one go."""
    splits, failures = [], []
    for records, labels in parts:
        try:
            splits.append(cache_split(records, labels, cfg))
        except UnreadableImages as e:
            failures += e.failures
    if failures:
        raise UnreadableImages(failures, sum(len(records) for records, _ in parts))
    return splits


def _covers(split_csv: Path, records) -> bool:
    """True when `split_csv` names every record (by path, or by file name as `read_split` matches)."""
    with open(split_csv, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    paths = {r.get("path", "") for r in rows}
    names = {os.path.basename(p) for p in paths}
    return all(r.path in paths or os.path.basename(r.path) in names for r in records)


def load_source(spec: str, cfg: TrainConfig, workdir: Path, *, train_only: bool = False) -> Source:
    """Read one `--data` source and split it by its own lesions.

    A spec that names its official splits (`labels.csv:train,val`) keeps them; otherwise the
    split comes from `--split_file` when that file covers the source, then from the run's own
    split.csv (resuming), else a new lesion-grouped, class-stratified split is made.
    """
    name, _, _ = parse_source(spec)
    records, labels, _, origin, skipped = load_labelled(spec, cfg.task)
    for note in skipped:
        print(f"{name}: {note}")
    split_path = workdir / "split.csv"
    if train_only:
        assignment = np.full(len(records), "train")
    elif "val" in origin:
        assignment = np.array(["val" if o == "val" else "test" if o == "test" else "train" for o in origin])
    elif cfg.split_file and _covers(Path(cfg.split_file), records):
        assignment = read_split(cfg.split_file, records)
    elif split_path.exists() and _covers(split_path, records):
        assignment = read_split(split_path, records)
    else:
        assignment = make_split(records, labels, val_frac=cfg.val_frac, seed=cfg.split_seed)
    return Source(name, spec, records, labels, np.asarray(assignment))


def source_counts(source: Source, classes, keep: np.ndarray) -> dict:
    counts = {}
    for part in ("train", "val"):
        mask = (source.assignment == part) & (keep if part == "train" else True)
        counts[f"{part}_images"] = int(mask.sum())
        counts[f"{part}_class_counts"] = {c: int((source.labels[mask] == i).sum()) for i, c in enumerate(classes)}
    return {"name": source.name, "spec": source.spec, **counts}


def prepare_data(cfg: TrainConfig, workdir: Path):
    """Training and validation splits over every `--data` source (each split by its own lesions),
    plus `--extra_train` sources used for training only. Training images byte-identical to any
    validation or external-evaluation image are dropped: ISIC 2017 has copies across its splits."""
    sources = [load_source(spec, cfg, workdir) for spec in cfg.data]   # select_task checks the task
    sources += [load_source(spec, cfg, workdir, train_only=True) for spec in cfg.extra_train]
    classes = TASKS[cfg.task]
    held_out = [r for s in sources for r, a in zip(s.records, s.assignment) if a == "val"]
    held_out += [r for spec in cfg.external_eval for r in load_labelled(spec, cfg.task).records]
    unique = [not_in(s.records, held_out) | (s.assignment != "train") for s in sources]
    dropped = sum(int(((~k) & (s.assignment == "train")).sum()) for s, k in zip(sources, unique))
    keeps = [k & (lesion_sample(s.records, cfg.train_fraction, cfg.split_seed) | (s.assignment != "train"))
             for s, k in zip(sources, unique)]
    if dropped:
        distributed.say(f"dropped {dropped} training images identical to a validation or external-eval image")
    all_records = [r for s in sources[:len(cfg.data)] for r in s.records]
    if distributed.is_main():
        write_split(workdir / "split.csv", all_records, np.concatenate([s.assignment for s in sources[:len(cfg.data)]]))

    def gather(part: str):
        picked = [(r, y, s.name) for s, k in zip(sources, keeps)
                  for r, y, a, kk in zip(s.records, s.labels, s.assignment, k) if a == part and kk]
        return [p[0] for p in picked], np.array([p[1] for p in picked], np.int32), np.array([p[2] for p in picked])

    train_records, train_labels, train_sources = gather("train")
    val_records, val_labels, val_sources = gather("val")
    train, val = cache_splits([(train_records, train_labels), (val_records, val_labels)], cfg)
    summary = {"source": list(cfg.data), "extra_train": cfg.extra_train, "dropped_duplicates": dropped,
               "task": cfg.task,
               "sources": [source_counts(s, classes, k) for s, k in zip(sources, keeps)],
               "train_images": len(train.labels), "val_images": len(val.labels),
               "train_class_counts": {c: int((train.labels == i).sum()) for i, c in enumerate(classes)},
               "val_class_counts": {c: int((val.labels == i).sum()) for i, c in enumerate(classes)},
               "split_file": str(workdir / "split.csv"), "val_frac": cfg.val_frac, "split_seed": cfg.split_seed}
    return train, val, tuple(classes), summary, train_sources, val_sources


# ----------------------------------------------------------------------------------------------
# Model and optimiser
# ----------------------------------------------------------------------------------------------

def arch_config(cfg: TrainConfig) -> dict:
    return {"dropout": cfg.dropout, "dtype": cfg.dtype} if cfg.dtype != "float32" else {"dropout": cfg.dropout}


def build_model(cfg: TrainConfig, num_classes: int):
    model = build(cfg.arch, num_classes, seed=cfg.seed, **arch_config(cfg))
    if cfg.pretrained:
        from .networks.imagenet import load_imagenet  # noqa: PLC0415 (needs weights only when asked)
        model = load_imagenet(model, cfg.arch)
    return model


def normalisation(cfg: TrainConfig) -> Normalisation:
    """The input scaling the architecture's ImageNet weights expect ([-1, 1] for Lite, ImageNet stats for ResNet)."""
    from .networks.imagenet import input_normalization  # noqa: PLC0415
    mean, std = input_normalization(cfg.arch)
    return Normalisation(mean=tuple(mean), std=tuple(std), color_constancy=cfg.color_constancy)


def config_train_step(cfg: TrainConfig, num_classes: int):
    """The jitted update step with the run's augmentation, normalisation, loss and compute type."""
    aug = AugmentConfig(crop_scale=(cfg.crop_scale_min, 1.0), brightness=cfg.color_jitter,
                        contrast=cfg.color_jitter, saturation=cfg.color_jitter,
                        hue=0.15 * cfg.color_jitter, hair=cfg.hair_aug, vignette=cfg.vignette_aug,
                        low_res=cfg.low_res_aug)
    return make_train_step(aug=aug, norm=normalisation(cfg), num_classes=num_classes,
                           label_smoothing=cfg.label_smoothing, mixup=cfg.mixup, cutmix=cfg.cutmix,
                           dtype=jnp.dtype(cfg.dtype))


def model_metadata(cfg: TrainConfig, classes, summary: dict) -> dict:
    import flax, optax, orbax.checkpoint  # noqa: E401 (versions for the record)
    return {
        "arch": cfg.arch, "arch_config": arch_config(cfg), "classes": list(classes), "task": cfg.task,
        "image_size": cfg.image_size, "resize": cfg.resize,
        "normalisation": normalisation(cfg).to_dict(),
        "temperature": 1.0, "tta": cfg.tta, "training": {"config": cfg.to_dict(), "data": summary},
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "orbax-checkpoint": orbax.checkpoint.__version__},
        "licence": (f"Trained on {', '.join(parse_source(spec)[0] for spec in [*cfg.data, *cfg.extra_train])}; "
                    "public dermoscopy sets under CC BY-NC / CC BY-NC-SA licences: non-commercial use only."),
    }


# ----------------------------------------------------------------------------------------------
# Evals
# ----------------------------------------------------------------------------------------------

def sharded_logits(predictor: Predictor, images: np.ndarray, mesh) -> np.ndarray:
    """Plain-view logits of `images`, in chunks split over the mesh: each process reads and runs its own
    rows of every chunk, and every process gets all the logits back (so all compute the same metrics)."""
    n_dev = mesh.devices.size
    chunk = min(-(-EVAL_BATCH // n_dev), -(-len(images) // n_dev)) * n_dev   # one compiled shape
    rows = process_rows(mesh, chunk)
    logits = []
    for start in range(0, len(images), chunk):
        mine = np.minimum(np.arange(start, start + chunk)[rows], len(images) - 1)  # the tail: padding, cut below
        x, = shard_batch(mesh, images[mine])
        logits.append(distributed.gather(forward(predictor.graphdef, predictor.state, x, predictor.norm, False)[0]))
    return np.concatenate(logits)[:len(images)]


def validate(predictor: Predictor, val: Split, val_sources: np.ndarray, classes, mesh) -> tuple[dict, dict, float]:
    """Pooled validation metrics, each source's own, and the selection score: the mean of the
    sources' balanced accuracies (one source's score when there is one), so a large source
    cannot hide a failing small one. Plain view: 8-view TTA every epoch would cost half an epoch."""
    probs = predictor.probabilities(sharded_logits(predictor, val.images, mesh))
    pooled = metrics.classification_metrics(probs, val.labels, list(classes), n_bootstrap=0)
    per_source = {}
    for name in dict.fromkeys(val_sources.tolist()):
        mask = val_sources == name
        per_source[name] = metrics.classification_metrics(probs[mask], val.labels[mask], list(classes), n_bootstrap=0)
    score = float(np.mean([m["balanced_accuracy"] for m in per_source.values()]))
    return pooled, per_source, score


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train_and_evaluate(cfg: TrainConfig) -> dict:
    check_prior_tau(cfg.prior_tau, cfg.sampling)   # calibration would refuse it, after the whole run
    workdir = Path(cfg.workdir)
    with distributed.main_first("prepare_data"):   # the others read the split and image cache process 0 wrote
        fresh = not workdir.exists()   # a run that fails on its data removes the workdir it made, never an older one
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            train, val, classes, summary, train_sources, val_sources = prepare_data(cfg, workdir)
            if len(train.labels) == 0 or len(val.labels) == 0:
                raise UserError(f"{', '.join(cfg.data)}: {len(train.labels)} training and {len(val.labels)} validation "
                                f"images; need both. Add images or lower --val_frac.")
            trained = [c for i, c in enumerate(classes) if (train.labels == i).any()]
            if len(trained) < 2:
                raise UserError(f"{', '.join(cfg.data)}: only {len(trained)} class ({', '.join(trained)}) has training "
                                f"images; a classifier needs at least two. Is a class folder empty, or --task wrong?")
            # The global batch: --batch_size over every device of every process, rounded down to a multiple of them.
            mesh = data_mesh()
            n_dev = mesh.devices.size
            batch = max(n_dev, cfg.batch_size - cfg.batch_size % n_dev)
            steps_per_epoch = len(train.labels) // batch
            if cfg.max_steps_per_epoch:
                steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
            if steps_per_epoch == 0:
                raise UserError(f"{len(train.labels)} training images are fewer than one batch ({batch}); "
                                "lower --batch_size.")
        except BaseException:
            if fresh:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
    if distributed.is_main():
        (workdir / "config.json").write_text(cfg.to_json())
    # Too little validation data to select or calibrate on: say so before any time is spent.
    untrained = [c for c in classes if c not in trained]
    thin = [c for i, c in enumerate(classes) if (val.labels == i).sum() < 2]
    if len(val.labels) < 20 or thin or untrained:
        distributed.say("WARNING: " + "; ".join(filter(None, [
            f"only {len(val.labels)} validation images (fewer than 20)" if len(val.labels) < 20 else "",
            f"fewer than 2 validation images of {', '.join(thin)}" if thin else "",
            f"no training images of {', '.join(untrained)} (the model cannot learn them)" if untrained else ""]))
              + ". Validation metrics, the best-epoch choice and the calibration will mean little; add images "
                "or raise --val_frac.")
    if balances_classes(cfg.sampling) and cfg.class_weighting != "none":
        distributed.say(f"WARNING: --sampling {cfg.sampling} already evens out the classes; "
                        f"--class_weighting {cfg.class_weighting} weights the rare classes again, counting their "
                        "rarity twice. Pass --class_weighting none unless that is what you want.")
    num_classes = len(classes)
    metadata = model_metadata(cfg, classes, summary)
    metadata["training"]["mesh"] = {"processes": jax.process_count(), "devices": mesh.devices.size, "global_batch": batch}

    total_steps = steps_per_epoch * cfg.epochs

    model = build_model(cfg, num_classes)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total_steps,
                               warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
                               body_lr_mult=cfg.body_lr_mult)
    train_step = config_train_step(cfg, num_classes)
    weights = jnp.asarray(class_weights(train.labels, num_classes, cfg.class_weighting))
    # With weight averaging on, the average is the model that is evaluated, selected, saved and served.
    ema_model = nnx.clone(model) if cfg.ema_decay else None
    update_ema = make_ema_update(cfg.ema_decay) if cfg.ema_decay else None
    served = ema_model or model

    # --- checkpoint: resume from latest/ if asked ---
    progress = {"epoch": 0, "history": [], "best_balanced_accuracy": -1.0, "best_epoch": 0}
    if cfg.resume:
        restored = checkpoint.restore_training(workdir / "latest", model, optimizer, ema=ema_model)
        if restored is None:
            distributed.say(f"--resume: no checkpoint in {workdir / 'latest'}; starting from scratch.")
        else:
            progress = restored
            distributed.say(f"Resuming after epoch {progress['epoch']} of {cfg.epochs}.")
    replicate((model, optimizer, served), mesh)
    log_path = workdir / "log.jsonl"
    # The log holds exactly the checkpointed epochs (a kill may land between save and log write).
    if distributed.is_main():
        log_path.write_text("".join(json.dumps(row) + "\n" for row in progress["history"]))

    distributed.open_collectives(mesh)
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        # Per-epoch seeds: a resumed run draws the same batches as an uninterrupted one, and every process
        # the same order.
        rng = np.random.default_rng([cfg.seed, epoch])
        key = jax.random.fold_in(jax.random.key(cfg.seed), epoch)
        order = epoch_order(rng, train.labels, cfg.sampling, train_sources, malignant_indices(classes))
        model.train()
        losses, preds, seen, t0 = [], [], [], time.time()
        batches = prefetch(global_batches(train.images, train.labels, order, batch, steps_per_epoch, mesh))
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                   dynamic_ncols=True, disable=not distributed.is_main())
        for step, (idx, images, labels) in enumerate(bar):
            loss, pred = train_step(model, optimizer, images, labels, weights, jax.random.fold_in(key, step))
            if update_ema:
                update_ema(ema_model, model, (epoch - 1) * steps_per_epoch + step)
            losses.append(loss)
            preds.append(pred)
            seen.append(idx)
            if distributed.is_main() and (step % 10 == 0 or step == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{float(loss):.3f}", img_s=f"{(step + 1) * batch / (time.time() - t0):.1f}")
        seen = np.concatenate(seen)
        train_pred = np.concatenate([distributed.gather(p) for p in preds])
        epoch_time = time.time() - t0

        # --- evals --- (a predictor of this epoch's weights; it switches the served model to eval mode)
        val_metrics, per_source, score = validate(Predictor(served, metadata), val, val_sources, classes, mesh)
        row = {"epoch": epoch, "time_s": round(epoch_time, 1),
               "train_img_per_s": round(len(seen) / epoch_time, 1),
               "train_loss": float(np.mean([float(l) for l in losses])),
               "train_accuracy": float((train_pred == train.labels[seen]).mean()),
               "train_balanced_accuracy": float(np.nanmean([(train_pred[train.labels[seen] == c] == c).mean()
                                                            for c in np.unique(train.labels[seen])])),
               "val_loss": val_metrics["nll"], "val_accuracy": val_metrics["accuracy"],
               "val_balanced_accuracy": val_metrics["balanced_accuracy"], "val_macro_auc": val_metrics["macro_auc"],
               "val_selection_score": score,
               "val_sources": {name: {"balanced_accuracy": m["balanced_accuracy"], "malignant_auc": m.get("malignant_auc"),
                                      "n": m["n"]} for name, m in per_source.items()}}
        progress["history"].append(row)
        progress["epoch"] = epoch

        # --- checkpoint: best first, then latest, so a crash in between never loses the best ---
        # (every process saves: orbax writes each array once; the score is the same on all of them)
        if score > progress["best_balanced_accuracy"]:
            progress["best_balanced_accuracy"] = score
            progress["best_epoch"] = epoch
            checkpoint.save(workdir / "best", epoch, served, {**metadata, "metrics": {"epoch": epoch, "val": val_metrics,
                                                                        "val_sources": per_source}})
        checkpoint.save(workdir / "latest", epoch, model, metadata, optimizer=optimizer, progress=progress,
                        ema=ema_model)
        # Logged after the checkpoint: a run killed in between redoes this epoch and logs it once.
        if distributed.is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            report.plot_learning_curves(progress["history"], workdir / "learning_curves.png")

    result = finalize(cfg, workdir, train, val, classes, val_sources)
    distributed.say(run_summary(cfg, workdir, progress, result, len(val.labels)))
    return result


def run_summary(cfg: TrainConfig, workdir: Path, progress: dict, result: dict, n_val: int) -> str:
    """What came out of a run, and the commands to run next (paths quoted: they are for pasting)."""
    best = next((r for r in progress["history"] if r["epoch"] == progress["best_epoch"]), {})
    val_m, point = result["val"], result["val"].get("operating_point") or {}

    def f3(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "–"
    q = lambda path: shlex.quote(str(path))  # noqa: E731
    checks = " ".join(map(q, cfg.external_eval)) or q(f"{workdir / 'split.csv'}:val")
    return "\n".join([
        f"Done. Best checkpoint: {workdir / 'best'} (epoch {progress['best_epoch']} of {cfg.epochs}).",
        f"  validation ({n_val} images) at that epoch: balanced accuracy "
        f"{f3(best.get('val_balanced_accuracy'))}, macro AUC {f3(best.get('val_macro_auc'))}, accuracy "
        f"{f3(best.get('val_accuracy'))}; calibrated: malignant AUC {f3(val_m.get('malignant_auc'))}, "
        f"ECE {f3(result.get('ece_after'))}"
        + (f"; at the sensitive threshold {f3(point['threshold'])}: malignant sensitivity "
           f"{f3(point.get('malignant_sensitivity'))}, specificity {f3(point.get('malignant_specificity'))}"
           if point.get("threshold") is not None else ""),
        f"  files: {workdir / 'results.json'}, {workdir / 'log.jsonl'}, {workdir / 'learning_curves.png'}",
        "Next:",
        f"  python -m model evaluate --checkpoint {q(workdir)} --csv {q(workdir / 'split.csv')} --split val "
        f"--out {q(workdir / 'eval')}",
        f"  python -m model benchmark --checkpoint {q(workdir)} --out {q(workdir / 'benchmark')} {checks}",
        f"  python -m app --checkpoint {q(workdir)}"])


def finalize(cfg: TrainConfig, workdir: Path, train: Split, val: Split, classes, val_sources) -> dict:
    """Fit the optional clinical fusion, calibrate the best model on validation, evaluate external sets.

    On several processes each computes it all on its first device, with the same result (no process
    waits on another); process 0 writes the metadata (`checkpoint.update_metadata`) and results.json."""
    predictor = Predictor.load(workdir / "best")
    if cfg.clinical_fusion:
        fit_clinical_fusion(predictor, train, class_weights(train.labels, len(classes), cfg.class_weighting))
    result = calibrate(predictor, val, classes, val_sources, cfg.prior_tau)
    result["external"] = record_external(predictor, cfg.external_eval)
    if distributed.is_main():
        (workdir / "results.json").write_text(json.dumps(metrics.to_jsonable(result), indent=2))
    return result
