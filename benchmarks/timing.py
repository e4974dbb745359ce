"""The one timer of the benchmarks: median wall time of repeated calls after warm-up."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3,
                   device: torch.device | str | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls; on CUDA each call is synchronised,
    so queued GPU work counts where it is launched."""
    device = torch.device(device) if device is not None else None

    def call() -> None:
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
