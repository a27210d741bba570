"""The training input pipeline: each epoch's order, this process's rows of each global batch read from
the memmap cache and placed on the devices, and a thread that readies the next batches while a step runs.

`bench/pipeline.py` measures it alone against the train step.
"""
import queue
import threading
from collections.abc import Iterator

import numpy as np

from .errors import UserError
from .train_step import process_rows, shard_batch


def epoch_order(rng: np.random.Generator, labels: np.ndarray, sampling: str, sources: np.ndarray | None = None,
                malignant: list[int] | None = None) -> np.ndarray:
    """Indices for one epoch: a permutation, or a weighted draw of the same length.

    "balanced": each class equally often. "sources": each training source equally often.
    "sources_balanced": each source equally often, and each of its classes equally often within it.
    "sources_malignancy": each source equally often, within it its malignant and benign lesions
    equally often (the classes in `malignant`), and within those each class equally often.
    """
    if sampling == "uniform":
        return rng.permutation(len(labels))
    if sampling not in SAMPLING_LEVELS:
        raise UserError(f"unknown sampling {sampling!r}; choose uniform, {', '.join(SAMPLING_LEVELS)}")
    levels = {"source": sources, "class": labels, "malignancy": np.isin(labels, malignant or [])}
    weight = nested_equal_shares([np.asarray(levels[name]) for name in SAMPLING_LEVELS[sampling]])
    return rng.choice(len(labels), size=len(labels), replace=True, p=weight / weight.sum())


# What each weighted draw balances, outermost first.
SAMPLING_LEVELS = {"balanced": ("class",), "sources": ("source",), "sources_balanced": ("source", "class"),
                   "sources_malignancy": ("source", "malignancy", "class")}


def balances_classes(sampling: str) -> bool:
    """Whether the draw evens out the classes (within sources or malignancy groups) instead of following
    their training frequency, so class weights or a prior correction from that frequency count rarity twice."""
    return "class" in SAMPLING_LEVELS.get(sampling, ())


def nested_equal_shares(levels: list[np.ndarray]) -> np.ndarray:
    """Each item's weight when every value of levels[0] gets an equal share of the draw, every value of
    levels[1] an equal share of its levels[0] group, and so on; items within the innermost group equally."""
    weight = np.ones(len(levels[0]))
    group = np.zeros(len(levels[0]), dtype=np.int64)
    for level in levels:
        _, codes = np.unique(level, return_inverse=True)
        _, child = np.unique(np.stack([group, codes.ravel()], axis=1), axis=0, return_inverse=True)
        child = child.ravel()
        parent_of_child = np.zeros(child.max() + 1, dtype=np.int64)
        parent_of_child[child] = group
        weight /= np.bincount(parent_of_child)[group]   # the group's share splits among its children
        group = child
    return weight / np.bincount(group)[group]


def global_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch: int, steps: int,
                   mesh) -> Iterator[tuple[np.ndarray, object, object]]:
    """(indices of the global batch, images, labels) per step, the arrays global and on the devices.

    Every process walks the same `order` (same seed) and reads only its own rows of each batch from the
    cache. Indices are sorted within a batch: the memmap is read front to back, and the batch's content
    does not depend on how many processes share it. The last partial batch is dropped, on every process.
    """
    rows = process_rows(mesh, batch)
    for step in range(steps):
        idx = np.sort(order[step * batch:(step + 1) * batch])
        mine = idx[rows]
        yield (idx, *shard_batch(mesh, images[mine], labels[mine]))


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Yield `items` while a thread readies the next `depth` of them: reading the cache and copying to the
    devices overlap the step that runs (double buffering). An error in the thread is raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():          # a consumer that stopped early must not leave the thread blocked
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def fill():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
            put(_Failed(e))

    threading.Thread(target=fill, name="prefetch", daemon=True).start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
