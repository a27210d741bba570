"""Can the input pipeline keep the train step busy? Images/s of each alone, and of the loop with and
without prefetching, on this machine.

    python bench/pipeline.py                     # the bundled recipe's sizes on a synthetic memmap cache
    python bench/pipeline.py --cache ~/.cache/lesionlens/images/KEY_10015x160_squash.npy   # a real cache
    python bench/pipeline.py --recipe smoke --steps 5                                      # a quick look

pipeline: `model.pipeline.global_batches` alone: each global batch's rows read from the memmap cache and
          placed on the devices (waited for), as training feeds them.
step:     the run's jitted train step (augmentation, forward, backward, AdamW) on a batch already there.
loop:     both, as an epoch runs them, with `prefetch` (the next batches are read while a step runs) and
          without.
The cache is read warm (from the page cache, as every epoch after the first). The load average is
printed beside the numbers: on a busy machine both are slower than they can be. Last line: JSON.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.config import DEFAULT_RECIPE, RECIPES, make_config  # noqa: E402
from model.networks import build  # noqa: E402
from model.pipeline import global_batches, prefetch  # noqa: E402
from model.train import arch_config, config_train_step  # noqa: E402
from model.train_step import data_mesh, make_optimizer, replicate  # noqa: E402

NUM_CLASSES = 7


def synthetic_cache(directory: Path, n: int, size: int) -> np.ndarray:
    """A uint8 (n, size, size, 3) .npy opened read-only as a memmap, as `build_cache` returns it."""
    path = directory / f"bench_{n}x{size}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    out[:] = np.random.default_rng(0).integers(0, 256, out.shape, dtype=np.uint8)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def images_per_s(run, images: int) -> float:
    t0 = time.perf_counter()
    run()
    return images / (time.perf_counter() - t0)


def measure(cache: np.ndarray, cfg, steps: int) -> dict:
    mesh = data_mesh()
    batch = max(mesh.devices.size, cfg.batch_size - cfg.batch_size % mesh.devices.size)
    labels = np.random.default_rng(1).integers(0, NUM_CLASSES, len(cache)).astype(np.int32)
    order = np.random.default_rng(2).permutation(len(cache))
    model = build(cfg.arch, NUM_CLASSES, seed=0, **arch_config(cfg))
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=steps, warmup_steps=1)
    replicate((model, optimizer), mesh)
    model.train()
    train_step = config_train_step(cfg, NUM_CLASSES)
    weights = np.ones(NUM_CLASSES, np.float32)
    key = jax.random.key(0)

    def batches():
        return global_batches(cache, labels, order, batch, steps, mesh)

    def read_only():
        for _, images, y in batches():
            jax.block_until_ready((images, y))

    def loop(source):
        loss = None
        for step, (_, images, y) in enumerate(source):
            loss, _ = train_step(model, optimizer, images, y, weights, jax.random.fold_in(key, step))
        jax.block_until_ready(loss)

    _, images, y = next(iter(batches()))

    def step_only():
        loss = None
        for step in range(steps):
            loss, _ = train_step(model, optimizer, images, y, weights, jax.random.fold_in(key, step))
        jax.block_until_ready(loss)

    jax.block_until_ready(train_step(model, optimizer, images, y, weights, key))   # compile
    read_only()                                                                       # page the cache in
    n = steps * batch
    return {"pipeline_img_per_s": images_per_s(read_only, n), "step_img_per_s": images_per_s(step_only, n),
            "loop_img_per_s": images_per_s(lambda: loop(batches()), n),
            "loop_prefetch_img_per_s": images_per_s(lambda: loop(prefetch(batches())), n),
            "batch": batch, "steps": steps}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES), help="sizes, arch and augmentation")
    parser.add_argument("--cache", default="", help="an image cache .npy (build_cache's); default: synthetic")
    parser.add_argument("--steps", type=int, default=10, help="batches per measurement")
    args = parser.parse_args(argv)
    cfg = make_config(args.recipe, pretrained=False)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            cache = np.load(args.cache, mmap_mode="r")
        else:
            cache = synthetic_cache(Path(tmp), max(cfg.batch_size * args.steps, 256), cfg.image_size)
        cfg = make_config(args.recipe, pretrained=False, image_size=cache.shape[1])   # a real cache's size rules
        result = measure(cache, cfg, args.steps)
    cpus = os.cpu_count()
    load = max(load_before[0], os.getloadavg()[0])
    result.update(recipe=args.recipe, arch=cfg.arch, image_size=cfg.image_size, cache=args.cache or "synthetic",
                  backend=jax.default_backend(), devices=jax.device_count(), cpu_count=cpus,
                  load_average_1min=round(load, 2), under_load=load > 0.5 * cpus)
    state = (f"UNDER LOAD: 1-minute load average {load:.2f} on {cpus} CPUs; re-run on an idle machine"
             if result["under_load"] else f"idle enough: load average {load:.2f} on {cpus} CPUs")
    print(f"{args.recipe} ({cfg.arch}, {cfg.image_size} px, global batch {result['batch']}) on "
          f"{result['devices']} {result['backend']} device(s); {state}")
    for name in ("pipeline", "step", "loop", "loop_prefetch"):
        print(f"  {name:<14} {result[name + '_img_per_s']:10.1f} images/s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
