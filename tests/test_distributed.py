"""`python train.py` on two processes (loopback, gloo collectives, 2 CPU devices each) against one process
with 4 devices: the same losses and validation, a checkpoint one CPU loads, and a lost process that stops
the other, after which `--resume` on both finishes the run.

One two-process run serves both tests (it is killed, then resumed: resuming is exact, tests/test_train.py);
the one-process run goes alongside, and a compilation cache shared by the runs saves most of the compiling.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from model import checkpoint
from model.predictor import Predictor

pytestmark = pytest.mark.slow   # launches apps, trains or loads real models: `make test`, not `make test-fast`

REPO = Path(__file__).resolve().parents[1]
# 3 epochs of 3 steps, a global batch of 4 (one image per device): room to lose a process after the first
# checkpoint, and the same global batch on 2 x 2 devices as on 1 x 4.
SETTINGS = ["--recipe", "smoke", "--val_frac", "0.34", "--epochs", "3", "--batch_size", "4"]
LOST_PROCESS_LIMIT_S = 60


def _env(devices: int, compile_cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": str(compile_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(data, workdir: Path, env: dict, logs: Path, *extra) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run, their output in logs/p0.out, p0.err, ..."""
    logs.mkdir(parents=True, exist_ok=True)
    cluster = ["--coordinator_address", f"127.0.0.1:{_free_port()}", "--num_processes", "2"]
    procs = []
    for i in range(2):
        with open(logs / f"p{i}.out", "w") as out, open(logs / f"p{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "train.py", *SETTINGS, "--data", str(data),
                                           "--workdir", str(workdir), *cluster, "--process_id", str(i), *extra],
                                          cwd=REPO, env=env, stdout=out, stderr=err))
    return procs


def _wait_all(procs, timeout=600) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _log(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(synthetic_data_shared, tmp_path_factory):
    """One process with 4 devices, and beside it two processes with 2 each, of which process 1 is
    SIGKILLed once the first epoch is saved; then both are resumed. The runs share a compilation cache."""
    root, data = tmp_path_factory.mktemp("distributed"), synthetic_data_shared.ham_dir
    compile_cache, workdir = root / "jax_compile_cache", root / "two"
    with open(root / "one.err", "w") as err:
        one = subprocess.Popen([sys.executable, "train.py", *SETTINGS, "--data", str(data),
                                "--workdir", str(root / "one")], cwd=REPO, env=_env(4, compile_cache),
                               stdout=subprocess.DEVNULL, stderr=err)
    procs = _start_two(data, workdir, _env(2, compile_cache), root / "first")
    try:
        deadline = time.time() + 600
        while (checkpoint.latest_step(workdir / "latest") is None and time.time() < deadline
               and all(p.poll() is None for p in procs)):
            time.sleep(0.1)
        saved = checkpoint.latest_step(workdir / "latest")
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        procs[1].wait()
        survivor = procs[0].wait(timeout=LOST_PROCESS_LIMIT_S + 60)
        survivor_s = time.time() - killed_at
        resumed = _wait_all(_start_two(data, workdir, _env(2, compile_cache), root / "resumed", "--resume"))
        assert _wait_all([one]) == [0], (root / "one.err").read_text()[-2000:]
    finally:
        _wait_all([*procs, one], timeout=1)
    return SimpleNamespace(one=root / "one", two=workdir, logs=root, saved=saved, survivor=survivor,
                           survivor_s=survivor_s, resumed=resumed)


def test_lost_process_stops_the_other_and_both_resume(runs):
    run = runs
    assert run.saved is not None and run.saved < 3, "process 1 should be lost mid-run"
    survivor_err = (run.logs / "first" / "p0.err").read_text()
    assert run.survivor != 0 and run.survivor_s < LOST_PROCESS_LIMIT_S, (run.survivor, run.survivor_s)
    # jax names the silent process: "The following tasks are unhealthy (stopped sending heartbeats):\n1"
    assert re.search(r"unhealthy \(stopped sending heartbeats\):\s*1\b", survivor_err), survivor_err[-2000:]

    assert run.resumed == [0, 0], (run.logs / "resumed" / "p1.err").read_text()[-2000:]
    out0, out1 = ((run.logs / "resumed" / f"p{i}.out").read_text() for i in range(2))
    assert f"Resuming after epoch {run.saved}" in out0
    assert '"epoch"' not in out1 and "Resuming" not in out1          # process 0 alone prints and logs
    assert "epoch 3/3" not in (run.logs / "resumed" / "p1.err").read_text()   # ... and shows the progress bar
    assert [row["epoch"] for row in _log(run.two)] == [1, 2, 3]
    assert checkpoint.latest_step(run.two / "latest") == 3 and (run.two / "results.json").is_file()


def test_two_processes_train_as_one_process_with_as_many_devices(runs, synthetic_data_shared):
    two, one = _log(runs.two), _log(runs.one)
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-3)
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-3)
        for key in ("train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_selection_score"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(a["val_macro_auc"], b["val_macro_auc"], atol=1e-6)

    # Trained on 2 processes x 2 devices, loaded here on one CPU, as the app loads it.
    predictor = Predictor.load(runs.two)
    assert predictor.metadata["training"]["mesh"] == {"processes": 2, "devices": 4, "global_batch": 4}
    images = sorted(synthetic_data_shared.ham_images.glob("*.jpg"))[:6]
    np.testing.assert_allclose(predictor.predict(images), Predictor.load(runs.one).predict(images), atol=1e-3)
