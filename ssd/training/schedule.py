"""The learning-rate schedule of ``ssd train``: a linear warmup that multiplies a step or a cosine decay.

NVIDIA's recipe is the step schedule: the rate divided by 10 at epochs 43 and 54 of 65, scaled to the run's
length. This module applies the *intended* schedule, which NVIDIA's code misses in two ways (see docs/training.md):
its ``warmup()`` writes ``base * i / W`` into the optimizer at iterations ``i < W`` and then stops, and PyTorch's
``MultiStepLR`` (stepped per epoch) only multiplies the rate it finds, so the run goes on at (W - 1) / W of the base
rate; and a milestone that falls inside the warmup is overwritten by it. Here the warmup multiplies the decay.

The warmup defaults to a fraction of the run (:func:`default_warmup`): NVIDIA's 300 iterations, or 10% of all
iterations when that is fewer, so that a short run (a demo of 80 iterations) reaches its base rate. A run's schedule
is fixed when it starts (:class:`SchedulePlan`, saved in its checkpoints): a resumed run continues it, whatever
epoch count it is resumed with.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..models.spec import check_real

__all__ = ["DEFAULT_WARMUP_FRACTION", "REFERENCE_EPOCHS", "REFERENCE_MILESTONES", "REFERENCE_WARMUP", "SCHEDULES",
           "SchedulePlan", "default_warmup", "lr_factor", "milestones_from_fractions", "reference_milestones"]

# NVIDIA's schedule: 65 epochs with the rate divided by 10 after epochs 43 and 54.
REFERENCE_EPOCHS = 65
REFERENCE_MILESTONES = (43, 54)
SCHEDULES = ("step", "cosine")
# NVIDIA's warmup length, and the share of a run the default warmup takes at most.
REFERENCE_WARMUP = 300
DEFAULT_WARMUP_FRACTION = 0.1


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


def default_warmup(total_iters: int) -> int:
    """The default warmup of a run of ``total_iters`` iterations: the smaller of NVIDIA's 300 iterations and 10% of
    the run (rounded down), so that every run spends at least 90% of its iterations past the warmup."""
    return min(REFERENCE_WARMUP, int(total_iters * DEFAULT_WARMUP_FRACTION))


@dataclass(frozen=True)
class SchedulePlan:
    """The learning-rate schedule of one run, fixed when it starts and saved in its checkpoints.

    ``epochs`` and ``iters_per_epoch`` are the run's length as planned (the cosine decay spans
    ``epochs * iters_per_epoch`` iterations); ``milestones`` are epochs (step schedule).
    """

    epochs: int
    iters_per_epoch: int
    warmup_iters: int
    milestones: tuple[int, ...]
    schedule: str = "step"
    gamma: float = 0.1

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    def factor(self, iteration: int) -> float:
        """The multiplier of the base rate at ``iteration`` (see :func:`lr_factor`)."""
        return lr_factor(iteration, self.iters_per_epoch, self.warmup_iters, self.milestones, self.gamma,
                         self.schedule, self.total_iters)

    def describe(self) -> str:
        """One phrase for the log, e.g. ``step schedule of 10 epochs (x0.1 at epochs 7, 8), warmup 8 iterations``."""
        if self.schedule == "step":
            shape = (f"x{self.gamma:g} at epoch(s) {', '.join(map(str, self.milestones))}" if self.milestones
                     else "no milestone")
        else:
            shape = "cosine down to 0"
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        return f"{self.schedule} schedule of {epochs} ({shape}), warmup {self.warmup_iters} iterations"

    def as_dict(self) -> dict[str, Any]:
        """Plain values (a checkpoint loads with ``weights_only=True``)."""
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str) -> SchedulePlan:
        """The plan saved by :meth:`as_dict`; ``source`` names the file in errors."""
        try:
            plan = cls(int(record["epochs"]), int(record["iters_per_epoch"]), int(record["warmup_iters"]),
                       tuple(int(m) for m in record["milestones"]), str(record["schedule"]), float(record["gamma"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: expected a schedule with epochs, iters_per_epoch, warmup_iters, milestones, "
                             f"schedule and gamma, got {dict(record)!r} ({exc})") from None
        if plan.schedule not in SCHEDULES or plan.epochs < 1 or plan.iters_per_epoch < 1 or plan.warmup_iters < 0:
            raise ValueError(f"{source}: expected a valid schedule, got {dict(record)!r}")
        return plan
