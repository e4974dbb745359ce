"""The PyTorch backend's plan: where and how a model runs (device, input dtype, memory format, autocast, the
channels_last CPU copy) and how the cores are split between the forward pass and the image loaders."""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PRECISIONS", "InferencePlan", "ThreadPlan", "ThreadTuner", "first_conv_weight", "plan_for",
           "thread_plan", "usable_cores"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class InferencePlan:
    """How to run a model: ``runner`` (when set) is the module to call instead of the caller's model, e.g. a
    channels_last copy of a contiguous float32 CPU model."""

    device: torch.device
    input_dtype: torch.dtype
    memory_format: torch.memory_format
    autocast_dtype: torch.dtype | None = None
    runner: torch.nn.Module | None = field(default=None, compare=False, repr=False)

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.runner is None else self.runner

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def first_conv_weight(model: torch.nn.Module) -> torch.Tensor:
    for p in model.parameters():
        if p.dim() == 4:
            return p
    raise TypeError(f"model: expected a convolutional network, got {type(model).__name__} with no 4-D weight")


def plan_for(model: torch.nn.Module, precision: str | None, *, stacklevel: int = 3) -> InferencePlan:
    """The plan that follows the model (device, dtype, memory format); ``precision`` None keeps its weights' dtype,
    'fp32' needs a float32 model, 'bf16' and 'fp16' autocast a float32 model (or run a model already in that dtype).
    """
    weight = first_conv_weight(model)
    device, model_dtype = weight.device, weight.dtype
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if precision is None or (precision == "fp32" and model_dtype == torch.float32):
        if precision is None and device.type == "cpu" and model_dtype == torch.float16:
            warnings.warn("this model holds float16 weights on the CPU, where half-precision convolutions are about "
                          "25x slower than fp32; use model.float() (and precision='bf16' for speed)", UserWarning,
                          stacklevel=stacklevel)
        if device.type == "cpu" and model_dtype == torch.float32 and not channels_last and CPU_CHANNELS_LAST:
            return InferencePlan(device, model_dtype, torch.channels_last,
                                 runner=channels_last_copy(model))
        return InferencePlan(device, model_dtype, memory_format)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected None or one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "fp32":
        raise ValueError(f"precision='fp32': expected a float32 model, got {model_dtype}; build it with "
                         "model_math='fp32'")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if model_dtype == dtype:
        return InferencePlan(device, dtype, memory_format)
    if model_dtype != torch.float32:
        raise ValueError(f"precision={precision!r}: expected a float32 model to autocast, got {model_dtype}")
    if device.type == "cpu" and precision == "fp16":
        warnings.warn("precision='fp16' on the CPU is very slow (about 25-100x slower than fp32); use 'bf16' or "
                      "'fp32' there", UserWarning, stacklevel=stacklevel)
    return InferencePlan(device, torch.float32, memory_format, dtype)


# fp32 on the CPU runs a channels_last copy of a contiguous model: 1.3-1.4x the throughput at batch 8 (oneDNN's
# blocked convolutions skip the reorders), the same top detections on real photos (benchmarks/export.py checks;
# boxes agree to ~5e-7). Set to False to run the caller's layout as given.
CPU_CHANNELS_LAST = True

_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]] = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def _state_signature(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (optimizer steps and
    load_state_dict bump ``_version``), so a cached copy is never stale."""
    tensors = [*model.parameters(), *model.buffers()]
    return (model.training, tuple((t.data_ptr(), t._version) for t in tensors))


def channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An evaluation-mode channels_last copy of ``model``, made once and cached while its weights stay the same.

    The caller's model is never converted, so its own ``model(x)`` stays bit-exact; the copy costs one more set
    of weights in memory (~90 MB for SSD300) while the model lives.
    """
    signature = _state_signature(model)
    with _COPIES_LOCK:
        cached = _COPIES.get(model)
        if cached is not None and cached[0] == signature:
            return cached[1]
    duplicate = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    for parameter in duplicate.parameters():
        parameter.requires_grad_(False)
    with _COPIES_LOCK:
        _COPIES[model] = (signature, duplicate)
    return duplicate


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads run the forward pass and how many load images meanwhile.

    Their sum stays within the cores (where there are at least two): an intra-op thread that shares a core with
    a loader, or with another process, stalls every OpenMP barrier of the forward pass behind it.
    """

    intra_op: int
    load_workers: int

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Run the enclosed forward pass on ``intra_op`` threads, then restore the caller's setting."""
        before = torch.get_num_threads()
        if before == self.intra_op:
            yield
            return
        torch.set_num_threads(self.intra_op)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def thread_plan(cores: int | None = None, intra_op: int | None = None, load_workers: int | None = None
                ) -> ThreadPlan:
    """The default split of ``cores`` (default: this process's) between loader threads and intra-op threads.

    One loader up to 4 cores (decoding a JPEG takes a few ms, a 300 x 300 forward pass ~100 ms per image), then a
    quarter of the cores up to 8; the forward pass gets the rest, but never more than torch is already set to
    (``OMP_NUM_THREADS``/``torch.set_num_threads`` are respected as upper bounds).

    The environment variable ``SSD_NUM_THREADS`` sets the forward pass's threads outright: the default is right for
    a machine other work shares, but on a quiet 2-core machine (Colab's CPU) 2 threads run the network up to twice
    as fast as 1.
    """
    cores = usable_cores() if cores is None else max(1, int(cores))
    if load_workers is None:
        load_workers = 1 if cores <= 4 else min(8, cores // 4)
    if intra_op is None:
        intra_op = threads_from_env()
    if intra_op is None:
        intra_op = min(torch.get_num_threads(), max(1, cores - load_workers))
    return ThreadPlan(max(1, int(intra_op)), max(1, int(load_workers)))


def threads_from_env() -> int | None:
    """``SSD_NUM_THREADS`` as a positive thread count, or None when it is unset or empty."""
    value = os.environ.get("SSD_NUM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdecimal() or int(value) < 1:  # isdigit() would pass "²", which int() refuses
        raise ValueError(f"SSD_NUM_THREADS: expected a positive whole number of threads, got {value!r}")
    return int(value)


class ThreadTuner:
    """The forward pass's thread count, chosen by timing it: no fixed rule is right on a small CPU both when it is
    quiet and when something else runs (2 cores, SSD300 fp32: 2 threads are 1.9x faster than 1 on a quiet machine
    and 2.5-3.2x slower beside a busy process; benchmarks/RESULTS.md).

    The candidates are the plan's ``low`` count (threads + loaders within the cores) and ``high`` (every core torch
    may use). The first call is a warm-up at ``low``; the next two time ``low`` and ``high``; then the faster per
    image runs, and every ``probe_every`` calls the other is timed once more, so that a change in the machine's load
    is followed (the cost of a wrong probe is one batch in ``probe_every``). Safe to share between threads.
    """

    def __init__(self, low: int, high: int, probe_every: int = 32) -> None:
        self.low, self.high, self.probe_every = low, high, probe_every
        self.seconds: dict[int, float] = {}  # threads -> latest seconds per image
        self.calls = 0
        self._lock = threading.Lock()

    def choose(self) -> tuple[int, bool]:
        """(threads for the next call, whether its time should be recorded)."""
        with self._lock:
            call = self.calls
            self.calls += 1
            if call == 0:
                return self.low, False
            if call == 1:
                return self.low, True
            if call == 2:
                return self.high, True
            best = self.best
            if call % self.probe_every == 0:
                return (self.high if best == self.low else self.low), True
            return best, True

    @property
    def best(self) -> int:
        """The faster count measured so far (``low`` until both are)."""
        if self.low not in self.seconds or self.high not in self.seconds:
            return self.low
        return self.high if self.seconds[self.high] < self.seconds[self.low] else self.low

    def record(self, threads: int, seconds_per_image: float) -> None:
        with self._lock:
            self.seconds[threads] = seconds_per_image

    @contextlib.contextmanager
    def forward(self, images: int) -> Iterator[None]:
        """Run the enclosed forward pass of ``images`` images on the chosen thread count, timing it."""
        threads, timed = self.choose()
        with ThreadPlan(threads, 1).forward():
            started = time.perf_counter()
            yield
            elapsed = time.perf_counter() - started
        if timed:
            self.record(threads, elapsed / max(1, images))


def thread_tuner(plan: ThreadPlan, explicit: bool) -> ThreadTuner | None:
    """The tuner for a CPU backend with ``plan``, or None where the count is fixed: given (``threads=``,
    ``SSD_NUM_THREADS``), or torch allowed no more threads than the plan's, or the process has one core."""
    if explicit or threads_from_env() is not None:
        return None
    high = min(torch.get_num_threads(), usable_cores())
    return ThreadTuner(plan.intra_op, high) if high > plan.intra_op else None
