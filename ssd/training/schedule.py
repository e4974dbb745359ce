"""The learning-rate schedule of ``ssd train``: a linear warmup that multiplies a step or a cosine decay.

NVIDIA's recipe is the step schedule: the rate divided by 10 at epochs 43 and 54 of 65, scaled to the run's
length. This module applies the *intended* schedule, which NVIDIA's code misses in two ways (see docs/training.md):
its ``warmup()`` writes ``base * i / W`` into the optimizer at iterations ``i < W`` and then stops, and PyTorch's
``MultiStepLR`` (stepped per epoch) only multiplies the rate it finds, so the run goes on at (W - 1) / W of the base
rate; and a milestone that falls inside the warmup is overwritten by it. Here the warmup multiplies the decay.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..models.spec import check_real

__all__ = ["REFERENCE_EPOCHS", "REFERENCE_MILESTONES", "SCHEDULES", "lr_factor", "milestones_from_fractions",
           "reference_milestones"]

# NVIDIA's schedule: 65 epochs with the rate divided by 10 after epochs 43 and 54.
REFERENCE_EPOCHS = 65
REFERENCE_MILESTONES = (43, 54)
SCHEDULES = ("step", "cosine")


def lr_factor(iteration: int, iters_per_epoch: int, warmup_iters: int, milestones: Sequence[int], gamma: float,
              schedule: str = "step", total_iters: int | None = None) -> float:
    """The multiplier of the base rate at ``iteration`` (0-based).

    ``iteration / warmup_iters`` during the warmup (from 0), times the decay: ``"step"`` multiplies by ``gamma``
    at every milestone epoch reached (epoch ``iteration // iters_per_epoch``); ``"cosine"`` follows
    ``(1 + cos(pi * iteration / total_iters)) / 2`` from 1 down to 0 over the run's ``total_iters`` iterations.
    """
    factor = iteration / warmup_iters if iteration < warmup_iters else 1.0
    if schedule == "cosine":
        if total_iters is None or total_iters < 1:
            raise ValueError(f"total_iters: expected the run's iteration count (>= 1) for a cosine schedule, "
                             f"got {total_iters!r}")
        return factor * 0.5 * (1.0 + math.cos(math.pi * min(iteration / total_iters, 1.0)))
    if schedule != "step":
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    epoch = iteration // iters_per_epoch
    return factor * gamma ** sum(epoch >= m for m in milestones)


def reference_milestones(epochs: int) -> tuple[int, ...]:
    """NVIDIA's milestones (43 and 54 of 65 epochs) scaled to ``epochs``."""
    return tuple(round(epochs * m / REFERENCE_EPOCHS) for m in REFERENCE_MILESTONES)


def milestones_from_fractions(fractions: Sequence[float], epochs: int, name: str = "milestones") -> tuple[int, ...]:
    """Milestone epochs from fractions of the run: each in (0, 1), increasing, at epoch ``round(f * epochs)``
    (at least 1: a decay from the very first epoch is a lower base rate, not a schedule). Errors name ``name``."""
    checked = [check_real(name, f, 0.0, 1.0, open_low=True, open_high=True) for f in fractions]
    if any(b <= a for a, b in zip(checked, checked[1:])):
        raise ValueError(f"{name}: expected increasing fractions of the run, got {list(fractions)}")
    return tuple(max(1, round(f * epochs)) for f in checked)
