"""The checkpoints of a training run: what ``last.pt`` and ``best.pt`` hold (format ``ssd-train/2``), starting
weights, and resuming.

A resumed run continues the schedule it was started with (its :class:`~ssd.training.schedule.SchedulePlan` is saved
in every ``last.pt``): ``epochs`` given to the resumed run only moves where it stops. Past the planned end a step
schedule stays at its last rate; a cosine schedule, which ends at rate 0, cannot be continued past its end (refused
with one line naming both epoch counts).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..data.coco_format import CocoDetectionDataset
from ..models.base import Detector
from ..models.spec import DetectorSpec
from ..registry import get_entry
from ..weights.formats import (
    TRAIN_FORMAT,
    Checkpoint,
    checkpoint_of,
    load_weights,
    read_checkpoint,
    read_training_state,
    stored_classes,
    tensors,
)
from ..weights.loader import InvalidCheckpointError
from .outputs import save_checkpoint
from .schedule import SchedulePlan, reference_milestones

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["RunState", "initialise_from", "plain_config", "planned_schedule", "preprocessing", "read_resume_state",
           "restore", "resume_path", "save_epoch"]


@dataclass
class RunState:
    """What the epochs share: the iteration counter, the best mAP and its epoch, the validations since it, the last
    saved checkpoint and the skipped images."""

    iteration: int = 0
    best_map: float | None = None
    best_epoch: int | None = None
    stale_validations: int = 0  # validations in a row without a better mAP (for patience)
    saved: tuple[str, int] | None = None  # (path, epoch) of the last checkpoint on disk this run continues
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> reason, in the order seen


def plain_config(config: TrainConfig) -> dict[str, Any]:
    # Only str/int/float/bool/None/list in the checkpoint, so weights_only loading accepts it.
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        key, value = field.name, getattr(config, field.name)
        if callable(value):
            value = getattr(value, "__qualname__", type(value).__name__)
        elif isinstance(value, Mapping):  # a state dict given as init_checkpoint: name it, never copy it
            value = config.init_source or "state dict"
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def preprocessing(spec: DetectorSpec) -> dict[str, Any]:
    """What the model's input is, from its spec (as detect and export preprocess): saved with the checkpoint."""
    return {
        "size": [spec.input.size, spec.input.size],
        "resize": spec.input.resize,
        "mean": list(spec.input.mean),
        "std": list(spec.input.std),
        "value_range": spec.input.value_range,
        "scale": spec.input.value_range / 255,
    }


def initialise_from(model: Detector, init: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                     label: str | None) -> dict[str, Any]:
    entry = get_entry(model.spec.name)
    if isinstance(init, Mapping):
        source = label or "state dict"
        checkpoint: Checkpoint = checkpoint_of(tensors(init, source), None, entry, source)
    else:
        checkpoint = read_checkpoint(init, entry, name=label)
    # Files without class metadata (NVIDIA's) hold the published classes: reusing their heads for other classes of
    # the same count would start each class from an unrelated one.
    new_heads = stored_classes(checkpoint, entry).names != model.spec.classes.names
    counts = load_weights(model, checkpoint.state_dict, checkpoint.source, entry, new_heads=new_heads)
    return {"source": checkpoint.source, **counts}


def resume_path(config: TrainConfig, checkpoint_path: pathlib.Path) -> pathlib.Path | None:
    if config.resume is True:
        return checkpoint_path if checkpoint_path.exists() else None
    if config.resume is False:
        return None
    if not isinstance(config.resume, (str, os.PathLike)):
        raise TypeError(f"resume: expected True, False or a checkpoint path, got {type(config.resume).__name__}")
    path = pathlib.Path(config.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: expected an existing checkpoint file, got {os.fspath(path)!r}")
    return path


def read_resume_state(path: pathlib.Path, model: Detector, dataset: CocoDetectionDataset) -> dict[str, Any]:
    """The checked contents of the ``last.pt`` to continue from (its model and classes those of this run)."""
    state = read_training_state(path, model.spec.name)
    if state["class_names"] != dataset.class_names or state["category_ids"] != dataset.category_ids:
        raise ValueError(f"{path}: its classes {state['class_names']} differ from the dataset's "
                         f"{dataset.class_names}; use another out_dir or resume=False")
    return state


def planned_schedule(state: Mapping[str, Any], path: pathlib.Path, current: SchedulePlan) -> SchedulePlan:
    """The schedule the run in ``state`` was started with: saved with it, or (files written before plans were
    saved) rebuilt from its configuration, with ``current``'s iterations per epoch."""
    source = os.fspath(path)
    saved = state.get("schedule")
    if saved is not None:
        if not isinstance(saved, Mapping):
            raise InvalidCheckpointError(f"checkpoint {source!r}: key 'schedule': expected a mapping, got "
                                         f"{type(saved).__name__}")
        try:
            return SchedulePlan.from_dict(saved, f"checkpoint {source!r}: key 'schedule'")
        except ValueError as exc:
            raise InvalidCheckpointError(str(exc)) from None
    config = state.get("config")
    if not isinstance(config, Mapping):
        return current
    try:
        epochs = int(config.get("epochs", current.epochs))
        milestones = config.get("milestones")
        milestones = tuple(int(m) for m in milestones) if milestones is not None else reference_milestones(epochs)
        warmup = config.get("warmup_iters")
        return SchedulePlan(epochs, current.iters_per_epoch,
                            int(warmup) if warmup is not None else current.warmup_iters, milestones,
                            str(config.get("schedule", current.schedule)), float(config.get("gamma", current.gamma)))
    except (TypeError, ValueError) as exc:
        raise InvalidCheckpointError(f"checkpoint {source!r}: key 'config': its schedule cannot be read ({exc})") \
            from None


def restore(state: Mapping[str, Any], path: pathlib.Path, model: Detector, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: Any, base_lr: float, plan: SchedulePlan, progress: RunState) -> int:
    """Load the state of ``last.pt`` (read by :func:`read_resume_state`) to continue from it; returns the epoch to
    start at and fills ``progress``."""
    load_weights(model, state["state_dict"], str(path), get_entry(model.spec.name), new_heads=False)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise InvalidCheckpointError(f"checkpoint {str(path)!r}: its optimizer state does not fit this run "
                                     f"({type(exc).__name__}: {why})") from None
    # The rate of the next iteration comes from the run's plan (saved with it) at the saved iteration, with this
    # call's base rate; the scheduler's saved lambdas are not restored (they are not saved: functions).
    scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    scheduler.lr_lambdas = [plan.factor for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * plan.factor(scheduler.last_epoch)
    progress.iteration, progress.best_map = state["iteration"], state.get("best_map")
    best_epoch, stale = state.get("best_epoch"), state.get("stale_validations", 0)
    progress.best_epoch = best_epoch if isinstance(best_epoch, int) and not isinstance(best_epoch, bool) else None
    progress.stale_validations = stale if isinstance(stale, int) and not isinstance(stale, bool) else 0
    progress.saved = (str(path), state["epoch"])
    return state["epoch"] + 1


def save_epoch(config: TrainConfig, model: Detector, dataset: CocoDetectionDataset, optimizer: Any, scheduler: Any,
               scaler: Any, epoch: int, progress: RunState, plan: SchedulePlan, improved: bool,
               checkpoint_path: pathlib.Path, best_path: pathlib.Path) -> None:
    """Write ``last.pt`` (and ``best.pt`` first when ``improved``) atomically, format ``ssd-train/2``."""
    state = {
        "format": TRAIN_FORMAT,
        "model": model.spec.name,
        "state_dict": model.state_dict(),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "category_ids": list(dataset.category_ids),
        "preprocessing": preprocessing(model.spec),
        "epoch": epoch,
        "iteration": progress.iteration,
        "best_map": progress.best_map,
        "best_epoch": progress.best_epoch,
        "stale_validations": progress.stale_validations,
        "schedule": plan.as_dict(),
        "config": plain_config(config),
    }
    if improved:
        # Written before last.pt, so that a last.pt naming a best mAP always has its best.pt on disk.
        save_checkpoint(state, best_path)
    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict())
    save_checkpoint(state, checkpoint_path)

