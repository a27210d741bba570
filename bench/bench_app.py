"""Latency of the app on this machine (a benchmark, not a test; loopback only, bounded loops).

    .venv/bin/python bench/bench_app.py [--checkpoint checkpoints/default] [--n 30]
                                        [--endpoint classify] [--clients 8 2] [--duration 40]
                                        [--url http://127.0.0.1:7860/]

Prints three blocks:
  1. in-process: the app's one pass (prediction + default map, `Predictor.analyse_and_explain`) for
     one 224x224 image, and for batches of 2, 4 and 8, after warm-up (mean / p50 / p95);
  2. one client: the full round trip through the running app with gradio_client (`/classify`:
     send an image, receive probabilities, overlay and summary; or `chat`: send an image message,
     receive the reply with its overlay) (p50 / p95);
  3. for each --clients N: N concurrent clients doing round trips for D seconds: p50 / p95,
     throughput, errors, and the app's memory before and after.
Without --url it starts `python -m app` on a free loopback port with a throw-away history
database.
"""
from __future__ import annotations

import argparse
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

SAMPLE = ROOT / "data" / "samples" / "mel_ISIC_0024310.jpg"


class AppServer:
    """`python -m app` on a free loopback port, for the length of the benchmark."""

    def __init__(self, checkpoint: Path, db: Path, *extra):
        import socket
        import subprocess
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        db.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "--checkpoint", str(checkpoint), "--db", str(db),
                                      "--port", str(port), "--host", "127.0.0.1", *extra], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> "AppServer":
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the app exited with {self.proc.returncode}")
            try:
                with opener.open(self.url + "config", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the app did not start in {timeout_s:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def summary(times_s: list[float]) -> str:
    if not times_s:
        return "no successful calls"
    ms = np.asarray(times_s) * 1000
    return (f"n={len(ms)}  mean {ms.mean():.0f} ms  p50 {np.percentile(ms, 50):.0f} ms  "
            f"p95 {np.percentile(ms, 95):.0f} ms  max {ms.max():.0f} ms")


def bench_in_process(checkpoint: Path, n: int) -> None:
    from PIL import Image

    from app.services import warm_up
    from model.predictor import Predictor
    p = Predictor.load(checkpoint)
    image = Image.open(SAMPLE).convert("RGB").resize((224, 224), Image.BILINEAR)
    warm_up(p)
    print(f"1. in-process, {p.metadata.get('arch')} at {p.image_size} px, test-time augmentation "
          f"{'on' if p.metadata.get('tta') else 'off'} (checkpoint {p.checkpoint_id})")
    for batch in (1, 2, 4, 8):
        p.analyse_and_explain(p.prepare([image] * batch))   # compiles this size (the app only warms its own)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            p.analyse_and_explain(p.prepare([image] * batch))
            times.append(time.perf_counter() - t0)
        print(f"   prediction + map, batch {batch}: {summary(times)}")


def chat_round_trip(client) -> None:
    from gradio_client import handle_file
    client.predict({"text": "bench", "files": [handle_file(str(SAMPLE))]}, api_name="/chat_add")
    history = client.predict(api_name="/chat_respond")
    if not any(m["role"] == "assistant" and "Case #" in str(m["content"]) for m in history):
        raise RuntimeError("reply without a case")


def classify_round_trip(client) -> None:
    from gradio_client import handle_file
    probs, overlay, summary = client.predict(handle_file(str(SAMPLE)), api_name="/classify")
    if not (probs and overlay and "case_id" in summary):
        raise RuntimeError("an answer without probabilities, overlay or case")


ROUND_TRIPS = {"classify": classify_round_trip, "chat": chat_round_trip}


# gradio_client makes a new httpx client, and so a new SSL context (reading the CA bundle), for every
# HTTP call, even to http://: 23% of the load generator's CPU, on the 2 cores the app runs on.
# One context, made once, is what a long-running API user's process would hold anyway.
SSL_CONTEXT = ssl.create_default_context()


def new_client(url: str, downloads: Path, auth=None):
    """A client whose downloaded overlays go to a folder of its own under `downloads` (removed with it)."""
    from gradio_client import Client
    return Client(url, auth=auth, verbose=False, ssl_verify=SSL_CONTEXT,   # handed on to httpx as `verify`
                  download_files=tempfile.mkdtemp(dir=downloads))


def bench_one_client(url: str, n: int, round_trip, downloads: Path) -> None:
    client = new_client(url, downloads)
    round_trip(client)   # warm: first upload, first queue join
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        round_trip(client)
        times.append(time.perf_counter() - t0)
    print(f"2. {round_trip.__name__}, 1 client: {summary(times)}")


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of process `pid` in MB (Linux), None when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError, ValueError):
        pass
    return None


def bench_concurrent(url: str, clients: int, duration: float, max_per_client: int, round_trip,
                     downloads: Path, app_pid: int | None = None) -> None:
    """`clients` users, connected first (a gradio_client connection loads the app's config, which
    is not a request), then all calling `round_trip` in a loop for `duration` seconds."""
    times, errors, lock = [], [], threading.Lock()
    connected = []
    for _ in range(clients):
        try:
            connected.append(new_client(url, downloads))
        except Exception as e:  # noqa: BLE001 (counted, reported below)
            errors.append(f"connect: {e}")
    start = threading.Barrier(len(connected) + 1)
    deadline = [0.0]

    def worker(client):
        start.wait()
        for _ in range(max_per_client):
            if time.monotonic() >= deadline[0]:
                break
            t0 = time.perf_counter()
            try:
                round_trip(client)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(str(e)[:200])
                continue
            with lock:
                times.append(time.perf_counter() - t0)

    rss_before = rss_mb(app_pid)
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in connected]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    deadline[0] = t0 + duration
    start.wait()
    for t in threads:
        t.join(duration + 300)
    wall = time.monotonic() - t0
    print(f"3. {round_trip.__name__}, {clients} concurrent clients for {duration:.0f} s: "
          f"{summary(times)}")
    print(f"   throughput {len(times) / wall:.2f} replies/s, errors {len(errors)}"
          + (f" (first: {errors[0]})" if errors else ""))
    if rss_before is not None:
        print(f"   app memory (RSS): {rss_before:.0f} MB before, {rss_mb(app_pid):.0f} MB after")


def without_tta(checkpoint: Path, copy: Path) -> Path:
    """A copy of `checkpoint` whose metadata serves the plain view only."""
    from model import checkpoint as ckpt
    shutil.copytree(ckpt.resolve(checkpoint), copy)
    ckpt.update_metadata(copy, {**ckpt.read_metadata(copy), "tta": False})
    return copy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--url", help="benchmark an app already running here (loopback only)")
    ap.add_argument("--n", type=int, default=30, help="timed iterations for blocks 1 and 2")
    ap.add_argument("--endpoint", choices=sorted(ROUND_TRIPS), default="classify",
                    help="classify: the /classify API (issue 18's bar); chat: a chat message with an image")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 2], help="concurrent clients, one run each")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of concurrent load per run")
    ap.add_argument("--no-tta", action="store_true", help="serve without test-time augmentation (a copy of the "
                    "checkpoint's metadata with tta off; the checkpoint is not changed)")
    ap.add_argument("--max-per-client", type=int, default=500, help="bound on each client's loop")
    args = ap.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        ap.error("--url must be a loopback address")
    # The throw-away history, the clients' downloads and any checkpoint copies: gone when the run ends.
    with tempfile.TemporaryDirectory(prefix="lesionlens-bench-") as work:
        return run_benchmark(args, Path(work))


def run_benchmark(args, work: Path) -> int:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise SystemExit(f"no checkpoint at {checkpoint}: pass --checkpoint (the bundled one is checkpoints/default)")
    if args.no_tta:
        checkpoint = without_tta(checkpoint, work / "plain-view")
    print(f"CPU cores: {os.cpu_count()}, load average: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    bench_in_process(checkpoint, args.n)

    app = None
    url = args.url
    if not url:
        app = AppServer(checkpoint, work / "history" / "cases.db", "--max-cases", "1000000").wait_ready()
        url = app.url
    round_trip = ROUND_TRIPS[args.endpoint]
    downloads = work / "downloads"
    downloads.mkdir()
    try:
        bench_one_client(url, args.n, round_trip, downloads)
        for clients in args.clients:
            bench_concurrent(url, clients, args.duration, args.max_per_client, round_trip, downloads,
                             app.proc.pid if app else None)
    finally:
        if app:
            app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
