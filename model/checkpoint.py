"""Checkpoints with orbax: weights + JSON metadata that makes each checkpoint self-describing.

A checkpoint directory is an orbax CheckpointManager directory (one numbered step inside) with items
  model     : Param and BatchStat arrays (nnx.state), restored into a model rebuilt from metadata
  metadata  : JSON: format, arch + its config, classes, task, image size, resize, normalisation,
              temperature, training data summary, split file, validation metrics, versions, and the
              unusual-image gate's reference features (one float16 array, `pack_array`)
  optimizer : (training runs only) optimiser state, for --resume
  ema       : (training runs with --ema_decay only) the averaged weights, for --resume
  rngs      : (training runs only) how far each dropout stream has drawn, so --resume draws the
              masks the uninterrupted run would have drawn
  progress  : (training runs only) epoch, history, best score, for --resume
A training workdir holds `latest/` (for --resume) and `best/` (by validation balanced accuracy);
`best/` is what the predictor, `evaluate` and the app load.

Trained on several processes, every process calls `save` and `restore_training` (orbax writes each
array once, process 0 the JSON items); `load_model` restores onto one local device, whatever mesh wrote it.
"""
import base64
import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from . import distributed
from .errors import UserError
from .networks import WEIGHTS, build

FORMAT = "lesionlens-checkpoint/1"


def _manager(directory) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(directory, step: int, model, metadata: dict, *, optimizer=None, progress: dict | None = None,
         ema=None):
    """Write one step atomically (orbax writes to a temporary folder, then renames) and drop older ones."""
    items = {"model": ocp.args.StandardSave(nnx.state(model, WEIGHTS)),
             "metadata": ocp.args.JsonSave({"format": FORMAT, **metadata})}
    if optimizer is not None:
        items["optimizer"] = ocp.args.StandardSave(nnx.state(optimizer))
        items["rngs"] = ocp.args.StandardSave(nnx.state(model, nnx.RngCount))
    if ema is not None:
        items["ema"] = ocp.args.StandardSave(nnx.state(ema, WEIGHTS))
    if progress is not None:
        items["progress"] = ocp.args.JsonSave(progress)
    with _manager(directory) as manager:
        for stale in [s for s in manager.all_steps() if s >= step]:   # a run restarted after a kill: its best/
            manager.delete(stale)                                      # may be ahead of its latest/
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()


def resolve(path) -> Path:
    """Accept a training workdir (use its best/), or a checkpoint directory itself."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint folder not found. Train one with `python train.py`, "
                        f"or pass --checkpoint checkpoints/default (the bundled model).")
    if (path / "best").is_dir():
        path = path / "best"
    return path


def latest_step(directory) -> int | None:
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def _step_dir(path) -> tuple[Path, int]:
    path = resolve(path)
    step = latest_step(path)
    if step is None or not (path / str(step) / "metadata").is_dir():
        raise UserError(f"{path}: not a lesionlens checkpoint (expected a numbered step folder with "
                        f"'model' and 'metadata' inside). It may be partial: re-run training with --resume, "
                        f"or point --checkpoint at a complete checkpoint.")
    return path, step


def read_metadata(path) -> dict:
    """The checkpoint's JSON metadata, without touching the weights."""
    directory, step = _step_dir(path)
    try:
        metadata = json.loads((directory / str(step) / "metadata" / "metadata").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{directory}: checkpoint metadata is unreadable ({e}); the checkpoint is damaged.")
    if metadata.get("format") != FORMAT:
        raise UserError(f"{directory}: unknown checkpoint format {metadata.get('format')!r} (expected {FORMAT}).")
    return metadata


def build_from_metadata(metadata: dict):
    return build(metadata["arch"], len(metadata["classes"]), **metadata.get("arch_config", {}))


def load_model(path):
    """Rebuild the network from metadata alone and restore its weights: (model in eval mode, metadata)."""
    metadata = read_metadata(path)
    directory, step = _step_dir(path)
    # Shapes only: running the initialisers of a real network would cost seconds for nothing.
    graphdef, target, rest = nnx.split(nnx.eval_shape(lambda: build_from_metadata(metadata)), WEIGHTS, ...)
    # Onto this process's first device: left to itself orbax would restore the sharding it saved, and
    # refuse a checkpoint written by more devices or processes than this one has ("Topology mismatch").
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
    try:
        with _manager(directory) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{directory}: weights do not match architecture {metadata['arch']!r} from its "
                        f"metadata, or are incomplete ({type(e).__name__}: {str(e)[:200]}).")
    model = nnx.merge(graphdef, restored["model"], jax.tree.map(_materialize, rest))
    model.eval()
    metadata["checkpoint_id"] = checkpoint_id(directory, step, restored["model"])
    metadata["checkpoint_path"] = str(directory)
    return model, metadata


def _materialize(abstract):
    """Concrete values for the non-weight state (dropout RNG keys, counters) of an abstract model."""
    if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), abstract.shape) if abstract.shape else jax.random.key(0)
    return jax.numpy.zeros(abstract.shape, abstract.dtype)


def restore_training(directory, model, optimizer, ema=None) -> dict | None:
    """Resume: load weights, optimiser state (and averaged weights) in place; return the saved progress,
    or None if no checkpoint."""
    step = latest_step(directory)
    if step is None:
        return None
    items = {"model": ocp.args.StandardRestore(nnx.state(model, WEIGHTS)),
             "optimizer": ocp.args.StandardRestore(nnx.state(optimizer)),
             "progress": ocp.args.JsonRestore()}
    if ema is not None:
        items["ema"] = ocp.args.StandardRestore(nnx.state(ema, WEIGHTS))
    has_rngs = (Path(directory) / str(step) / "rngs").exists()  # absent in checkpoints written before it was
    if has_rngs:
        items["rngs"] = ocp.args.StandardRestore(nnx.state(model, nnx.RngCount))
    try:
        with _manager(directory) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{directory}: cannot resume from this checkpoint with the current settings "
                        f"(architecture, --ema_decay or --body_lr_mult changed?): {type(e).__name__}: "
                        f"{str(e)[:200]}. Resume with the run's own config.json, or train into a new --workdir.")
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    if ema is not None:
        nnx.update(ema, restored["ema"])
    if has_rngs:
        nnx.update(model, restored["rngs"])
    return restored["progress"]


def checkpoint_id(directory: Path, step: int, weights) -> str:
    """Stable identity for history records: folder name, step and a short hash of the weights."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(weights):
        digest.update(np.asarray(leaf).tobytes())
    name = directory.parent.name if directory.name == "best" else directory.name
    return f"{name}@{step}:{digest.hexdigest()[:10]}"


def update_metadata(path, metadata: dict):
    """Rewrite a checkpoint's metadata in place (after calibration); atomic by rename. Process 0 writes;
    the others of a multi-process run compute the same metadata and leave the file to it."""
    if not distributed.is_main():
        return
    directory, step = _step_dir(path)
    target = directory / str(step) / "metadata" / "metadata"
    keep = {k: v for k, v in metadata.items() if k not in ("checkpoint_id", "checkpoint_path")}
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({**keep, "format": FORMAT}))
    os.replace(tmp, target)


def pack_array(array: np.ndarray) -> dict:
    """A float16 array as JSON metadata: the gate's reference features travel in the one file that
    `update_metadata` rewrites atomically, and base64 takes ~2.7 bytes a number where a JSON list takes ~7."""
    array = np.ascontiguousarray(array, np.float16)
    return {"shape": list(array.shape), "float16_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def unpack_array(packed: dict) -> np.ndarray:
    """`pack_array`'s array as float32 (decoded once per packed string: the app scores every upload)."""
    try:
        return _decode(packed["float16_base64"], tuple(packed["shape"]))
    except (KeyError, TypeError, ValueError) as e:   # binascii.Error is a ValueError
        raise UserError(f"an array in the checkpoint's metadata is damaged ({type(e).__name__}: {str(e)[:100]}); "
                        "recalibrate the checkpoint with `python -m model calibrate`, or copy it again.")


@functools.lru_cache(maxsize=4)
def _decode(data: str, shape: tuple) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(data), np.float16).reshape(shape).astype(np.float32)
    array.flags.writeable = False
    return array
