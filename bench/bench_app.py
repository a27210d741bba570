"""Latency of the app on this machine (a benchmark, not a test; loopback only, bounded loops).

    .venv/bin/python bench/bench_app.py [--checkpoint checkpoints/default] [--n 30]
                                        [--clients 8] [--duration 60] [--url http://127.0.0.1:7860/]

Prints three blocks:
  1. in-process: predict + Grad-CAM for one 224x224 image, after warm-up (mean / p50 / p95);
  2. one client: the full chat round trip through the running app with gradio_client
     (send an image message, receive the reply with its overlay) (p50 / p95);
  3. N concurrent clients doing chat round trips for D seconds: p50 / p95, throughput, errors.
Without --url it starts `python -m app` on a free loopback port with a throw-away history
database. Without a checkpoint at --checkpoint it benchmarks a random-weight simple_cnn at
224 px (the timings then say nothing about the bundled model's architecture).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

from test_app import SAMPLE, AppProcess, make_tiny_checkpoint  # noqa: E402  (shared helpers)


def summary(times_s: list[float]) -> str:
    if not times_s:
        return "no successful calls"
    ms = np.asarray(times_s) * 1000
    return (f"n={len(ms)}  mean {ms.mean():.0f} ms  p50 {np.percentile(ms, 50):.0f} ms  "
            f"p95 {np.percentile(ms, 95):.0f} ms  max {ms.max():.0f} ms")


def bench_in_process(checkpoint: Path, n: int) -> None:
    from PIL import Image

    from model.predictor import Predictor
    p = Predictor.load(checkpoint)
    image = Image.open(SAMPLE).convert("RGB").resize((224, 224), Image.BILINEAR)
    for _ in range(3):  # JAX compiles on the first call and once more on the second
        prepared = p.prepare([image])
        p.analyse(prepared)
        p.explain(prepared[0], "gradcam", class_index=0)
    predict, both = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        prepared = p.prepare([image])
        out = p.analyse(prepared)
        t1 = time.perf_counter()
        p.explain(prepared[0], "gradcam", class_index=int(out["probs"][0].argmax()))
        t2 = time.perf_counter()
        predict.append(t1 - t0)
        both.append(t2 - t0)
    print(f"1. in-process, {p.metadata.get('arch')} at {p.image_size} px "
          f"(checkpoint {p.checkpoint_id})")
    print(f"   predict only        : {summary(predict)}")
    print(f"   predict + Grad-CAM  : {summary(both)}")


def chat_round_trip(client) -> None:
    from gradio_client import handle_file
    client.predict({"text": "bench", "files": [handle_file(str(SAMPLE))]}, api_name="/chat_add")
    history = client.predict(api_name="/chat_respond")
    if not any(m["role"] == "assistant" and "Case #" in str(m["content"]) for m in history):
        raise RuntimeError("reply without a case")


def new_client(url: str, auth=None):
    from gradio_client import Client
    return Client(url, auth=auth, verbose=False,
                  download_files=tempfile.mkdtemp(prefix="lesionlens-bench-"))


def bench_one_client(url: str, n: int) -> None:
    client = new_client(url)
    chat_round_trip(client)   # warm: first upload, first queue join
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        chat_round_trip(client)
        times.append(time.perf_counter() - t0)
    print(f"2. chat round trip, 1 client   : {summary(times)}")


def bench_concurrent(url: str, clients: int, duration: float, max_per_client: int) -> None:
    times, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + duration

    def worker():
        try:
            client = new_client(url)
        except Exception as e:  # noqa: BLE001 (counted, reported below)
            with lock:
                errors.append(f"connect: {e}")
            return
        for _ in range(max_per_client):
            if time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            try:
                chat_round_trip(client)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(str(e)[:200])
                continue
            with lock:
                times.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 300)
    wall = time.monotonic() - t0
    print(f"3. chat round trip, {clients} concurrent clients for {duration:.0f} s: "
          f"{summary(times)}")
    print(f"   throughput {len(times) / wall:.2f} replies/s, errors {len(errors)}"
          + (f" (first: {errors[0]})" if errors else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--url", help="benchmark an app already running here (loopback only)")
    ap.add_argument("--n", type=int, default=30, help="timed iterations for blocks 1 and 2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of concurrent load")
    ap.add_argument("--max-per-client", type=int, default=500, help="bound on each client's loop")
    args = ap.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        ap.error("--url must be a loopback address")

    work = Path(tempfile.mkdtemp(prefix="lesionlens-bench-"))
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        print(f"(no checkpoint at {checkpoint}: using a random-weight simple_cnn "
              "(widths 32-64-128-256) at 224 px)")
        checkpoint = make_tiny_checkpoint(work / "ckpt", size=224, widths=(32, 64, 128, 256))
    print(f"CPU cores: {os.cpu_count()}, load average: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    bench_in_process(checkpoint, args.n)

    app = None
    url = args.url
    if not url:
        app = AppProcess(checkpoint, work / "history" / "cases.db").wait_ready()
        url = app.url
    try:
        bench_one_client(url, args.n)
        bench_concurrent(url, args.clients, args.duration, args.max_per_client)
    finally:
        if app:
            app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
