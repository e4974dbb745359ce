"""Forward-pass cost of every network: GFLOPs and per-image CPU time in fp32 and bf16 autocast.

    OMP_NUM_THREADS=1 python -m benchmarks --suite models            # 1 thread, batch 1 (a few minutes)
    python -m benchmarks --suite models --threads 2 --batch 4 --device cuda

GFLOPs count one multiply-add as two floating-point operations (torch.utils.flop_counter.FlopCounterMode, which
counts convolutions and matrix products only; BN, activations and pooling are excluded). Weights do not change
speed, so the networks keep their random initialisation. Times are medians after warm-up, per image: wall time and
the process's CPU time (close to the wall time on an idle machine; on a busy one the CPU time is the steadier).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from ssd.models import Detector
from ssd.registry import build_model, list_models


def count_gflops(model: Detector, size: int) -> float:
    """GFLOPs of one forward pass on one size x size image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def time_forward(model: Detector, size: int, batch: int, precision: str, device: torch.device,
                 repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per image of ``model(x)`` for a batch of ``batch`` images.

    The CPU time is what the process itself spent: on a shared machine the wall time also counts waiting for a core.
    """
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def forward() -> None:
        with torch.inference_mode(), autocast:
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        forward()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        forward()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) / batch, statistics.median(cpu) / batch


def measure(names: list[str], batch: int, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for name in names:
        model = build_model(name, pretrained=False)
        size = model.spec.input.size
        row = {"model": name, "input": size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "gflops": count_gflops(model, size)}
        model = model.to(device)
        for precision in ("fp32", "bf16"):
            wall, cpu = time_forward(model, size, batch, precision, device, repeats)
            row[f"{precision}_ms"], row[f"{precision}_cpu_ms"] = 1e3 * wall, 1e3 * cpu
        rows.append(row)
        print(f"{name:24s} {size:4d}  {row['params_m']:6.2f} M  {row['gflops']:7.2f} GFLOPs  "
              f"fp32 {row['fp32_ms']:7.1f} ms (cpu {row['fp32_cpu_ms']:7.1f})  "
              f"bf16 {row['bf16_ms']:7.1f} ms (cpu {row['bf16_cpu_ms']:7.1f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list_models(), choices=list_models())
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"median of {args.repeats}; per image; load average {load:.1f} on {os.cpu_count()} cores")
    measure(args.models, args.batch, device, args.repeats)


if __name__ == "__main__":
    main()
