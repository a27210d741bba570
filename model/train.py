"""The one train loop: `train_and_evaluate(config)`; `python train.py` is its command-line face.

Sections follow big_vision: input pipeline / model and optimiser / update step / checkpoint /
evals / loop. Training interrupted at any point loses at most the current epoch (`--resume`).
"""
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from . import checkpoint, metrics, report
from .augment import AugmentConfig
from .config import TrainConfig
from .data import load_dataset, select_task
from .errors import UserError
from .images import build_cache, default_cache_dir
from .networks import build
from .predictor import Predictor
from .preprocess import Normalisation
from .splits import make_split, not_in, read_split, write_split
from .train_step import (class_weights, data_mesh, make_ema_update, make_optimizer, make_train_step, replicate,
                         shard_batch)

# ----------------------------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    images: np.ndarray          # uint8 (N, S, S, 3), usually a read-only memmap
    labels: np.ndarray          # int32 (N,)
    records: list


def parse_source(spec: str) -> tuple[str, list]:
    """'labels.csv:train,val' -> ('labels.csv', ['train', 'val']); a bare path means every row."""
    path, _, splits = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "")
    return path, [s for s in splits.split(",") if s]


def load_labelled(spec: str, task: str) -> tuple[list, np.ndarray, tuple]:
    path, splits = parse_source(spec)
    records, labels = [], []
    classes = None
    for split in splits or [None]:
        recs, labs, classes = select_task(load_dataset(path, split=split), task)
        records += list(recs)
        labels += list(labs)
    return records, np.asarray(labels, np.int32), classes


def cache_split(records, labels, cfg: TrainConfig) -> Split:
    images = build_cache([r.path for r in records], cfg.image_size, cfg.resize, default_cache_dir())
    return Split(images, np.asarray(labels, np.int32), list(records))


def prepare_data(cfg: TrainConfig, workdir: Path):
    records, labels, classes = load_labelled(cfg.data, cfg.task)
    split_path = workdir / "split.csv"
    if cfg.split_file:
        assignment = read_split(cfg.split_file, records)
    elif split_path.exists():  # resuming: reuse the run's own split
        assignment = read_split(split_path, records)
    else:
        assignment = make_split(records, labels, val_frac=cfg.val_frac, seed=cfg.split_seed)
    write_split(split_path, records, assignment)
    assignment = np.asarray(assignment)
    pick = lambda name: [i for i in range(len(records)) if assignment[i] == name]
    train_idx, val_idx = pick("train"), pick("val")
    train_records = [records[i] for i in train_idx]
    train_labels = labels[train_idx]
    dropped = 0
    if cfg.extra_train:  # ISIC 2017 has exact copies across its splits: never train on a held-out image
        held_out = [records[i] for i in val_idx] + [r for spec in cfg.external_eval
                                                    for r in load_labelled(spec, cfg.task)[0]]
    for spec in cfg.extra_train:
        extra_records, extra_labels, extra_classes = load_labelled(spec, cfg.task)
        keep = not_in(extra_records, held_out)
        dropped += int((~keep).sum())
        remap = np.array([classes.index(c) for c in extra_classes])
        train_records += [r for r, k in zip(extra_records, keep) if k]
        train_labels = np.concatenate([train_labels, remap[extra_labels[keep]]])
    if dropped:
        print(f"extra_train: dropped {dropped} images identical to a validation or external-eval image")
    train = cache_split(train_records, train_labels, cfg)
    val = cache_split([records[i] for i in val_idx], labels[val_idx], cfg)
    summary = {"source": cfg.data, "extra_train": cfg.extra_train, "extra_train_dropped_duplicates": dropped,
               "task": cfg.task,
               "train_images": len(train.labels), "val_images": len(val.labels),
               "train_class_counts": {c: int((train.labels == i).sum()) for i, c in enumerate(classes)},
               "val_class_counts": {c: int((val.labels == i).sum()) for i, c in enumerate(classes)},
               "split_file": str(split_path), "val_frac": cfg.val_frac, "split_seed": cfg.split_seed}
    return train, val, tuple(classes), summary


def epoch_order(rng: np.random.Generator, labels: np.ndarray, sampling: str, num_classes: int) -> np.ndarray:
    """Indices for one epoch: a permutation, or a class-balanced draw of the same length."""
    if sampling == "uniform":
        return rng.permutation(len(labels))
    counts = np.bincount(labels, minlength=num_classes)
    p = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())


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


def model_metadata(cfg: TrainConfig, classes, summary: dict) -> dict:
    import flax, optax, orbax.checkpoint  # noqa: E401 (versions for the record)
    return {
        "arch": cfg.arch, "arch_config": arch_config(cfg), "classes": list(classes), "task": cfg.task,
        "image_size": cfg.image_size, "resize": cfg.resize,
        "normalisation": normalisation(cfg).to_dict(),
        "temperature": 1.0, "tta": cfg.tta, "training": {"config": cfg.to_dict(), "data": summary},
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "orbax-checkpoint": orbax.checkpoint.__version__},
        "licence": "Trained on HAM10000 (CC BY-NC-SA 4.0): non-commercial use only.",
    }


# ----------------------------------------------------------------------------------------------
# Evals
# ----------------------------------------------------------------------------------------------

def evaluate_split(predictor: Predictor, split: Split, classes, n_bootstrap=200, tta=None) -> tuple[dict, np.ndarray]:
    logits = predictor.with_clinical(predictor.logits_from_arrays(split.images, tta), split.records)
    probs = predictor.probabilities(logits)  # with the temperature once calibrated
    return metrics.classification_metrics(probs, split.labels, list(classes), n_bootstrap=n_bootstrap,
                                          operating_threshold=predictor.operating_threshold), logits


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train_and_evaluate(cfg: TrainConfig) -> dict:
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json())
    train, val, classes, summary = prepare_data(cfg, workdir)
    if len(train.labels) == 0 or len(val.labels) == 0:
        raise UserError(f"{cfg.data}: {len(train.labels)} training and {len(val.labels)} validation images; "
                        f"need both. Add images or lower --val_frac.")
    num_classes = len(classes)
    metadata = model_metadata(cfg, classes, summary)

    mesh = data_mesh()
    n_dev = mesh.devices.size
    batch = max(n_dev, cfg.batch_size - cfg.batch_size % n_dev)
    steps_per_epoch = len(train.labels) // batch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train.labels)} training images are fewer than one batch ({batch}); lower --batch_size.")
    total_steps = steps_per_epoch * cfg.epochs

    model = build_model(cfg, num_classes)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total_steps,
                               warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
                               body_lr_mult=cfg.body_lr_mult)
    norm = normalisation(cfg)
    aug = AugmentConfig(crop_scale=(cfg.crop_scale_min, 1.0), brightness=cfg.color_jitter,
                        contrast=cfg.color_jitter, saturation=cfg.color_jitter,
                        hue=0.15 * cfg.color_jitter, hair=cfg.hair_aug, vignette=cfg.vignette_aug)
    train_step = make_train_step(aug=aug, norm=norm, num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                                 mixup=cfg.mixup, cutmix=cfg.cutmix, dtype=jnp.dtype(cfg.dtype))
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
            print(f"--resume: no checkpoint in {workdir / 'latest'}; starting from scratch.")
        else:
            progress = restored
            print(f"Resuming after epoch {progress['epoch']} of {cfg.epochs}.")
    replicate((model, optimizer, served), mesh)
    predictor = Predictor(served, metadata)
    log_path = workdir / "log.jsonl"
    # The log holds exactly the checkpointed epochs (a kill may land between save and log write).
    log_path.write_text("".join(json.dumps(row) + "\n" for row in progress["history"]))

    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        # Per-epoch seeds: a resumed run draws the same batches as an uninterrupted one.
        rng = np.random.default_rng([cfg.seed, epoch])
        key = jax.random.fold_in(jax.random.key(cfg.seed), epoch)
        order = epoch_order(rng, train.labels, cfg.sampling, num_classes)
        model.train()
        losses, preds, seen, t0 = [], [], [], time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", dynamic_ncols=True)
        for step in bar:
            idx = np.sort(order[step * batch:(step + 1) * batch])
            images, labels = shard_batch(mesh, np.asarray(train.images[idx]), train.labels[idx])
            loss, pred = train_step(model, optimizer, images, labels, weights, jax.random.fold_in(key, step))
            if update_ema:
                update_ema(ema_model, model, (epoch - 1) * steps_per_epoch + step)
            losses.append(loss)
            preds.append(pred)
            seen.append(idx)
            if step % 10 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{float(loss):.3f}", img_s=f"{(step + 1) * batch / (time.time() - t0):.1f}")
        seen = np.concatenate(seen)
        train_pred = np.concatenate([np.asarray(p) for p in preds])
        epoch_time = time.time() - t0

        # --- evals --- (the predictor switches the served model to eval mode)
        # Model selection on the plain view: 8-view TTA every epoch would cost half an epoch on a CPU.
        val_metrics, _ = evaluate_split(predictor, val, classes, n_bootstrap=0, tta=False)
        row = {"epoch": epoch, "time_s": round(epoch_time, 1),
               "train_img_per_s": round(len(seen) / epoch_time, 1),
               "train_loss": float(np.mean([float(l) for l in losses])),
               "train_accuracy": float((train_pred == train.labels[seen]).mean()),
               "train_balanced_accuracy": float(np.nanmean([(train_pred[train.labels[seen] == c] == c).mean()
                                                            for c in np.unique(train.labels[seen])])),
               "val_loss": val_metrics["nll"], "val_accuracy": val_metrics["accuracy"],
               "val_balanced_accuracy": val_metrics["balanced_accuracy"], "val_macro_auc": val_metrics["macro_auc"]}
        progress["history"].append(row)
        progress["epoch"] = epoch

        # --- checkpoint: best first, then latest, so a crash in between never loses the best ---
        if val_metrics["balanced_accuracy"] > progress["best_balanced_accuracy"]:
            progress["best_balanced_accuracy"] = val_metrics["balanced_accuracy"]
            progress["best_epoch"] = epoch
            checkpoint.save(workdir / "best", epoch, served, {**metadata, "metrics": {"epoch": epoch, "val": val_metrics}})
        checkpoint.save(workdir / "latest", epoch, model, metadata, optimizer=optimizer, progress=progress,
                        ema=ema_model)
        # Logged after the checkpoint: a run killed in between redoes this epoch and logs it once.
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        report.plot_learning_curves(progress["history"], workdir / "learning_curves.png")

    return finalize(cfg, workdir, train, val, classes)


def finalize(cfg: TrainConfig, workdir: Path, train: Split, val: Split, classes) -> dict:
    """Fit the optional clinical fusion, calibrate the best model on validation, evaluate external sets."""
    from .calibration import calibrate, fit_clinical_fusion  # noqa: PLC0415
    from .evaluate import record_external  # noqa: PLC0415 (evaluate builds on this module)
    predictor = Predictor.load(workdir / "best")
    if cfg.clinical_fusion:
        fit_clinical_fusion(predictor, train, class_weights(train.labels, len(classes), cfg.class_weighting))
    result = calibrate(predictor, val, classes)
    result["external"] = record_external(predictor, cfg.external_eval)
    (workdir / "results.json").write_text(json.dumps(metrics.to_jsonable(result), indent=2))
    return result
