"""Time one network's jitted train step, batch inference and batch-1 latency on this machine.

  python bench/profile_step.py --arch efficientnet_lite0 --size 224 --batch 32
  python bench/profile_step.py --peer          # then run the PyTorch peer in the same window

The train step is the bare update (forward, backward, AdamW), on synthetic normalised images,
exactly what `../shared/bench/peer_torch.py throughput` times for PyTorch; augmentation and the
input pipeline are left out of both. Inference and batch-1 latency run the predictor's own jitted
forward pass (`model.inference.forward`, plain view) on uint8 images, as the app and evaluation do.

Run as a script, it restarts once with glibc's huge-page malloc settings as train.py does
(model/runtime.py); the peer runs with the environment it was started with, less those settings,
unless --peer-huge-pages gives it them too. Prints one JSON object as its last line, with the
load average before the run (the machine's state: a ratio taken beside other work means little).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import runtime  # noqa: E402
from model.networks import build  # noqa: E402
from model.inference import forward  # noqa: E402
from model.preprocess import Normalisation  # noqa: E402

PEER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peer_torch.py"


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def seconds_per_call(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(arch: str, size: int, batch: int, steps: int, num_classes: int = 7) -> dict:
    model = build(arch, num_classes)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-4), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
    y = jnp.asarray(rng.integers(0, num_classes, batch))

    model.train()
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, x, y))
    compile_s = time.perf_counter() - t0
    train_s = seconds_per_call(lambda: train_step(model, optimizer, x, y), steps)

    model.eval()
    graphdef, state = nnx.split(model)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    norm = Normalisation()
    infer_s = seconds_per_call(lambda: forward(graphdef, state, images, norm, False), steps)
    one = images[:1]
    latency_s = seconds_per_call(lambda: forward(graphdef, state, one, norm, False), 20)
    return {"arch": arch, "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "size": size,
            "batch": batch, "train_img_per_s": batch / train_s, "infer_img_per_s": batch / infer_s,
            "latency_ms_batch1": latency_s * 1000, "first_step_compile_s": compile_s,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def huge_page_mode() -> str:
    """The kernel's transparent-huge-page mode ("[madvise]" style: the bracketed one is in force): the peer's
    speed depends on it, so every ratio is reported with it."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def run_peer(size: int, batch: int, steps: int, huge_pages: bool) -> dict:
    env = dict(os.environ)
    if huge_pages:
        env["GLIBC_TUNABLES"] = runtime.TUNABLES
    elif env.get("GLIBC_TUNABLES") == runtime.TUNABLES:   # ours, not the user's: the peer runs as it would
        del env["GLIBC_TUNABLES"]
    out = subprocess.run([sys.executable, str(PEER), "throughput", "--size", str(size), "--batch", str(batch),
                          "--steps", str(steps)], check=True, capture_output=True, text=True, env=env).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "glibc_tunables": env.get("GLIBC_TUNABLES")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peer", action="store_true", help=f"also run {PEER.name} now and report ratios")
    ap.add_argument("--peer-huge-pages", action="store_true", help="give the peer the same malloc settings")
    a = ap.parse_args()
    load = os.getloadavg()
    result = {"load_average_before": [round(v, 2) for v in load], "transparent_huge_pages": huge_page_mode(),
              "jax": measure(a.arch, a.size, a.batch, a.steps)}
    print(json.dumps(result["jax"]), flush=True)
    if a.peer:
        peer = result["peer"] = run_peer(a.size, a.batch, a.steps, a.peer_huge_pages)
        print(json.dumps(peer), flush=True)
        jx = result["jax"]
        result["ratio_jax_over_peer"] = {
            "train": jx["train_img_per_s"] / peer["train_img_per_s"],
            "infer": jx["infer_img_per_s"] / peer["infer_img_per_s"],
            "latency_speedup": peer["latency_ms_batch1"] / jx["latency_ms_batch1"]}
    print(json.dumps(result))


if __name__ == "__main__":
    runtime.use_huge_pages()   # as train.py does: the step is timed as training runs it
    main()
