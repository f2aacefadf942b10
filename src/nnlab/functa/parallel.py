"""Chunk-level parallelism for small tensors on CPU.

A functa batch is many small, independent problems. Splitting it into cache-sized chunks and
running them in Python threads, each with a single torch thread (ops release the GIL), keeps both
cores busy without the per-op synchronisation of intra-op threading, which costs more than the
op itself at these sizes (and far more on a shared, oversubscribed machine).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class ChunkRunner:
    """``map(fn, items)`` over ``workers`` threads (in order), or inline when workers <= 1."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if self.pool is None or len(items) <= 1:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


@contextmanager
def chunk_runner(workers: int = 0) -> Iterator[ChunkRunner]:
    """A :class:`ChunkRunner` with ``workers`` threads (0: torch's thread count); while it is open
    torch runs single-threaded (restored on exit)."""
    threads = torch.get_num_threads()
    workers = workers or threads
    runner = ChunkRunner(workers)
    torch.set_num_threads(1)
    try:
        yield runner
    finally:
        runner.close()
        torch.set_num_threads(threads)
