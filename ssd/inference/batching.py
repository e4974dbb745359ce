"""Batches of loaded inputs, each loaded in a thread pool while the previous batch runs through the network."""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["LOAD_WORKERS", "prefetched_batches"]

T = TypeVar("T")
# Decoding releases the GIL and URLs wait on the network; more threads than this only contend.
LOAD_WORKERS = min(8, (os.cpu_count() or 2) * 2)


def prefetched_batches(items: Iterable[Any], load: Callable[[Any], T], batch_size: int,
                       workers: int = LOAD_WORKERS) -> Iterator[list[tuple[int, T]]]:
    """Yield lists of ``(index, load(item))`` of up to ``batch_size`` items, in input order.

    ``items`` is consumed lazily (a generator of a million paths is fine): only the batch being yielded and the
    next one are in memory. ``load`` should return its errors rather than raise them.
    """
    iterator = enumerate(items)
    with ThreadPoolExecutor(max(1, workers)) as pool:

        def submit() -> list[tuple[int, Any]]:
            return [(i, pool.submit(load, item)) for i, item in itertools.islice(iterator, batch_size)]

        pending = submit()
        while pending:
            upcoming = submit()  # read the next batch while this one is consumed
            yield [(i, future.result()) for i, future in pending]
            pending = upcoming
