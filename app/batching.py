"""Micro-batching in front of the model: requests that arrive together share one forward pass.

    queue = ModelQueue(predictor.analyse_and_explain, max_batch=batch_limit(predictor))
    row = queue.submit(prepared, clinical)   # blocks; this image's row of its batch's outputs
    heat = queue.call(predictor.explain, prepared, method="occlusion")   # in turn with the batches

One worker thread makes every model call. While it runs a batch, new requests wait in the queue,
and the next batch takes all of them (up to max_batch): a lone request starts at once, with no
timer to wait out, and under load the batches grow by themselves. One thread on the model also
keeps concurrent requests from fighting over the cores; one-off model work (a follow-up's
occlusion map, a Compare panel) takes its turn between batches through `call`.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

# Images x test-time views per model call beyond which batching stops paying on this 2-core CPU
# (bench/bench_app.py, block 1, idle machine): one plain view costs 15 ms, eight in one call 8.6 ms
# each; with 8-view TTA one image is already such a batch (37-54 ms), and 2, 4 or 8 of them cost
# 43-48 ms each, so a TTA model takes one image per call: a batch would only make requests wait.
VIEWS_PER_CALL = 8
MAX_BATCH = VIEWS_PER_CALL   # the most images the app ever batches (plain view): warm_up compiles 1, 2, 4, 8


def batch_limit(predictor) -> int:
    """How many images the queue puts in one call for this predictor."""
    return max(1, VIEWS_PER_CALL // predictor.views_per_image)


class ModelQueue:
    def __init__(self, run, max_batch: int = MAX_BATCH):
        """`run(images (B, S, S, 3) uint8, people list) -> dict of arrays with B rows`."""
        self._run = run
        self._max_batch = max_batch
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._start = threading.Lock()
        self._worker: threading.Thread | None = None
        self._busy = threading.Lock()   # held by every model call: batches and `call`s take turns

    def submit(self, image: np.ndarray, person=None) -> dict:
        """This image's outputs (one row of each array); raises what the model call raised."""
        self._ensure_worker()
        done: Future = Future()
        self._requests.put((image, person, done))
        return done.result()

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), run when no other model call is running: eight people asking for
        occlusion maps at once get them one after another, not eight at a time on two cores."""
        with self._busy:
            return fn(*args, **kwargs)

    def _ensure_worker(self) -> None:
        with self._start:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="lesionlens-model", daemon=True)
                self._worker.start()

    def _next_batch(self) -> list:
        batch = [self._requests.get()]
        while len(batch) < self._max_batch:
            try:
                batch.append(self._requests.get_nowait())
            except queue.Empty:
                break
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                with self._busy:
                    out = self._run(np.stack([image for image, _, _ in batch]), [person for _, person, _ in batch])
            except BaseException as e:   # noqa: BLE001 (each waiting request gets it; the worker lives on)
                for _, _, done in batch:
                    done.set_exception(e)
                continue
            for i, (_, _, done) in enumerate(batch):
                done.set_result({name: values[i] for name, values in out.items()})
