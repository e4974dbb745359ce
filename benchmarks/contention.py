"""Decode, forward and ``detect`` speed with and without a competing busy process, at 1 and 2 intra-op threads.

    python -m benchmarks.contention [--threads 1 2] [--repeats 5]

The competitor is a subprocess spinning on one core. Small tensors split over OpenMP threads wait at every
barrier for the thread whose core the competitor holds; ``ssd.postprocess`` therefore runs its CPU work on one
intra-op thread. The "unscoped" decode rows disable that to show what it saves. The ``detect`` column runs the
whole call on 8 photos with ``SSD_NUM_THREADS`` set to the row's thread count (on 2 cores the default plan is 1).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from unittest import mock

import torch
from skimage import data

from benchmarks.decode import synthetic_predictions
from benchmarks.timing import median_seconds
from benchmarks.weights import detecting_model
from ssd import postprocess as postprocess_module
from ssd.models import NVIDIA_SSD300


@contextlib.contextmanager
def busy_process() -> Iterator[subprocess.Popen]:
    """A child process spinning on one core for the duration; stopped (by its own pid) afterwards."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach the run queue
        yield child
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def _unscoped() -> Iterator[None]:
    """The decode as before the one-thread scoping: every intra-op thread on the small tensors."""
    original = postprocess_module._one_thread
    postprocess_module._one_thread = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        postprocess_module._one_thread = original


def measure_contention(threads: tuple[int, ...] = (1, 2), repeats: int = 5, decode_batch: int = 8,
                       forward_batch: int = 1) -> list[dict]:
    """Rows ``{"threads", "competitor", "decode_ms", "decode_unscoped_ms", "forward_ms", "detect_ms"}``: decode is
    one ``postprocess`` of a ``decode_batch`` of synthetic predictions (NVIDIA's evaluation recipe), forward one
    ``forward_batch`` pass of SSD300 fp32, detect one fp32 ``detect`` call on 8 in-memory photos (per image);
    milliseconds, medians."""
    predictions = synthetic_predictions(decode_batch)
    model = detecting_model()
    x = torch.rand(forward_batch, 3, 300, 300)
    photos = [make() for make in (data.astronaut, data.coffee, data.chelsea, data.rocket)] * 2
    before = torch.get_num_threads()
    rows = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            for competitor in (False, True):
                with busy_process() if competitor else contextlib.nullcontext():
                    decode = 1000 * median_seconds(lambda: postprocess_module.postprocess(predictions,
                                                                                          NVIDIA_SSD300), repeats)
                    with _unscoped():
                        unscoped = 1000 * median_seconds(
                            lambda: postprocess_module.postprocess(predictions, NVIDIA_SSD300), repeats)

                    def forward() -> None:
                        with torch.inference_mode():
                            model(x)

                    forward_ms = 1000 * median_seconds(forward, max(2, repeats // 2), warmup=1)
                    with mock.patch.dict(os.environ, {"SSD_NUM_THREADS": str(count)}):
                        detect_ms = 1000 * median_seconds(lambda: model.detect(photos, batch_size=len(photos)),
                                                          max(2, repeats // 2), warmup=1) / len(photos)
                rows.append({"threads": count, "competitor": competitor, "decode_ms": decode,
                             "decode_unscoped_ms": unscoped, "forward_ms": forward_ms, "detect_ms": detect_ms})
                print(rows[-1], flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| intra-op threads | busy competitor | decode ms (one-thread scoped) | decode ms (unscoped) | "
             "forward ms | detect ms per image |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['threads']} | {'yes' if r['competitor'] else 'no'} | {r['decode_ms']:.1f} | "
              f"{r['decode_unscoped_ms']:.1f} | {r['forward_ms']:.0f} | {r['detect_ms']:.0f} |" for r in rows]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (other processes count too)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(render(measure_contention(tuple(args.threads), args.repeats)))


if __name__ == "__main__":
    main()
