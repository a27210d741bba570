"""app/batching.py: concurrent requests share model calls, each gets its own row, errors reach every waiter."""
import threading
import time

import numpy as np
import pytest

from app.batching import ModelQueue, batch_limit


class SlowModel:
    """Sums each image's pixels, 50 ms per call whatever the batch: requests queue up behind it."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, images, people):
        self.calls.append(len(images))
        time.sleep(0.05)
        if self.fail_on is not None and self.fail_on in images[:, 0, 0, 0]:
            raise RuntimeError("the model failed")
        return {"total": images.reshape(len(images), -1).sum(1), "who": np.asarray(people)}


def submit_all(queue, n):
    results, errors = [None] * n, [None] * n

    def one(i):
        try:
            results[i] = queue.submit(np.full((4, 4, 3), i, np.uint8), f"person{i}")
        except RuntimeError as e:
            errors[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, errors


def test_concurrent_requests_are_batched_and_each_gets_its_own_row():
    model = SlowModel()
    results, errors = submit_all(ModelQueue(model, max_batch=4), 9)
    assert errors == [None] * 9
    for i, row in enumerate(results):
        assert row["total"] == i * 48 and row["who"] == f"person{i}"
    assert sum(model.calls) == 9 and max(model.calls) <= 4
    assert len(model.calls) < 9          # some requests shared a call


def test_a_failed_call_fails_its_requests_and_the_queue_serves_on():
    model = SlowModel(fail_on=0)
    queue = ModelQueue(model, max_batch=1)
    _, errors = submit_all(queue, 1)
    assert isinstance(errors[0], RuntimeError)
    assert queue.submit(np.full((4, 4, 3), 5, np.uint8))["total"] == 5 * 48


@pytest.mark.parametrize("views, limit", [(8, 1), (1, 8)])
def test_a_tta_model_takes_one_image_per_call(views, limit):
    class Predictor:
        views_per_image = views
    assert batch_limit(Predictor()) == limit


def test_one_off_calls_take_turns_with_the_batches():
    """`call` (a follow-up's occlusion map, a Compare panel) never runs while a batch or another call
    runs: eight of them at once run one after another."""
    running, overlaps, lock = [0], [], threading.Lock()

    def busy(tag):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return tag

    def model(images, people):
        busy("batch")
        return {"n": np.zeros(len(images))}

    queue = ModelQueue(model, max_batch=2)
    results = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, queue.call(busy, i))) for i in range(8)]
    threads += [threading.Thread(target=queue.submit, args=(np.zeros((4, 4, 3), np.uint8),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == list(range(8))
    assert len(overlaps) >= 8 + 2 and max(overlaps) == 1
