"""The configuration of :func:`ssd.training.train`: :class:`TrainConfig` and its checks."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..models.spec import check_int, check_real
from ..registry import list_models
from .augment import recipe_name
from .reporting import check_tensorboard
from .schedule import SCHEDULES, reference_milestones

__all__ = ["PRECISIONS", "TrainConfig", "check_config", "resolve_device"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything :func:`train` needs. Paths may be str or Path.

    Attributes:
        annotations: COCO-format annotation file of the training set.
        images: folder its ``file_name`` entries are relative to.
        out_dir: where ``last.pt`` and ``metrics.jsonl`` go (created; refused if it is a file).
        model: the model to train, a name of :func:`ssd.registry.list_models` (default NVIDIA's SSD300). It is built
            for the dataset's classes; targets, loss and augmentation follow its spec.
        epochs: total epochs (a resumed run continues up to this).
        batch_size: images per iteration and process, at least 2 (BatchNorm on the 1 x 1 feature map); epochs
            use full batches only (the last partial one is dropped) unless the data is smaller than one batch.
        lr: base learning rate; None for ``2.6e-3 * batch_size / 32``.
        momentum, weight_decay: SGD's.
        warmup_iters: linear warmup length in iterations (from a rate of 0); it multiplies the schedule. None: the
            smaller of NVIDIA's 300 and 10% of all the run's iterations (:func:`ssd.training.schedule.default_warmup`).
        schedule: "step" (the rate times ``gamma`` at each milestone) or "cosine" (from the base rate down to 0 over
            the run, per iteration).
        milestones: epochs at which the step schedule multiplies the rate by ``gamma``; None scales NVIDIA's 43 and
            54 of 65 (see :func:`ssd.training.schedule.milestones_from_fractions` for fractions of the run).
        gamma: the factor at each milestone.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast and GradScaler; CUDA only).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        channels_last: use the channels_last memory format for the model and its inputs.
        augment: the augmentation recipe (:mod:`ssd.training.augment`): "nvidia" (NVIDIA's, the default; True means
            it), "light" (flip and colour jitter, no crop) or "none" (only resize and normalise; False means it).
        zoom_out: add SSD's zoom-out (the image placed on a canvas up to 4 times its sides, filled with the mean
            colour, half of the time) before the crop.
        scale_jitter: add scale jitter (the image scaled to 0.5..1.5 of the input size, keeping its aspect ratio,
            then cropped or padded to the input size).
        num_workers: DataLoader worker processes; None for :func:`default_workers`.
        seed: seeds the weights' initialisation, the shuffling and the augmentation.
        resume: True: continue from ``out_dir/last.pt`` when it exists; a path: continue from that checkpoint
            (it must exist); False: start afresh (an old ``metrics.jsonl`` and ``best.pt`` are removed).
        init_checkpoint: weights to start from: a checkpoint file of the model (read as ``build_model`` reads
            one: ``ssd train``'s, NVIDIA's, mmdetection's), or a state dict under this package's key names. The
            classification heads stay at their initialisation when the checkpoint's classes differ from the
            dataset's (by number, or by name where the file records names; files without names hold the published
            classes, COCO's); every other tensor must fit.
        init_source: how to name ``init_checkpoint`` in the log (default: its path, or "state dict").
        max_iters_per_epoch: cut epochs short (smoke tests); None for full epochs.
        skip_bad_images: skip images that are missing or unreadable (reported at the end and counted in the
            metrics) instead of stopping with an error naming the file; a batch left with one readable image is
            skipped whole (BatchNorm needs two).
        log_every: write an ``iteration`` line to the metrics every this many iterations.
        val_annotations, val_images: a validation set (both or neither), checked before the first epoch and scored
            with :func:`ssd.evaluation.evaluate` (COCO's mAP); an improved mAP writes ``best.pt``.
        val_every: validate after every this many epochs (and after the last).
        eval_batch_size: images per forward pass in validation; None for ``batch_size``.
        validate: instead of a validation set, a callable given the (unwrapped, eval-mode) model after each
            validated epoch, returning a mapping with ``mAP`` and optionally ``stats`` (COCOeval's 12 numbers).
            Under torchrun it is called on every process (as :func:`ssd.evaluation.evaluate` must be).
        sync_bn: SyncBatchNorm across processes (CUDA, several processes; a no-op in one process).
        log: receives one-line progress messages on rank 0 (e.g. ``print``); None for silence.
        progress: a progress bar per epoch on stderr (rank 0): iteration, loss, rate and images/s.
        tensorboard: also write TensorBoard event files to ``out_dir/tensorboard`` (needs the ``tensorboard``
            package: ``pip install 'ssd-hub[tensorboard]'``).
        patience: stop after this many validations in a row without a better mAP (``best.pt`` keeps the best);
            None never stops early. Needs a validation set.
    """

    annotations: str | os.PathLike[str]
    images: str | os.PathLike[str]
    out_dir: str | os.PathLike[str]
    model: str = "nvidia_ssd"
    epochs: int = 65
    batch_size: int = 32
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int | None = None
    schedule: str = "step"
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = True
    augment: bool | str = True
    zoom_out: bool = False
    scale_jitter: bool = False
    num_workers: int | None = None
    seed: int = 0
    resume: bool | str | os.PathLike[str] = True
    init_checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None
    init_source: str | None = None
    max_iters_per_epoch: int | None = None
    skip_bad_images: bool = False
    log_every: int = 20
    val_annotations: str | os.PathLike[str] | None = None
    val_images: str | os.PathLike[str] | None = None
    val_every: int = 1
    eval_batch_size: int | None = None
    validate: Callable[[nn.Module], Mapping[str, Any]] | None = None
    sync_bn: bool = False
    log: Callable[[str], None] | None = None
    progress: bool = False
    tensorboard: bool = False
    patience: int | None = None

    def base_lr(self, world_size: int = 1) -> float:
        """The given rate, else NVIDIA's linear scaling by the global batch (all processes together)."""
        return self.lr if self.lr is not None else 2.6e-3 * self.batch_size * world_size / 32

    def epoch_milestones(self) -> tuple[int, ...]:
        if self.milestones is not None:
            return tuple(self.milestones)
        return reference_milestones(self.epochs)


def check_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config: expected keys from {sorted(known)}, got unknown {unknown}")
        config = TrainConfig(**config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig or a mapping, got {type(config).__name__}")
    # The checked values replace the given ones (numpy scalars become Python numbers), because the config is saved
    # in checkpoints that must load with weights_only=True.
    checked: dict[str, Any] = {"epochs": check_int("epochs", config.epochs, 1)}
    try:
        checked["batch_size"] = check_int("batch_size", config.batch_size, 2)
    except ValueError:
        if config.batch_size == 1:
            raise ValueError("batch_size: expected an integer >= 2 (BatchNorm on SSD's 1 x 1 feature map needs two "
                             "images per process in training), got 1") from None
        raise
    if config.model not in list_models():
        raise ValueError(f"model: expected one of {', '.join(map(repr, list_models()))}, got {config.model!r}")
    checked["seed"] = check_int("seed", config.seed, 0)
    for key in ("log_every", "val_every"):
        checked[key] = check_int(key, getattr(config, key), 1)
    for key, low in (("warmup_iters", 0), ("num_workers", 0), ("max_iters_per_epoch", 1), ("eval_batch_size", 1),
                     ("patience", 1)):
        if getattr(config, key) is not None:
            checked[key] = check_int(key, getattr(config, key), low)
    for key in ("validate", "log"):
        value = getattr(config, key)
        if value is not None and not callable(value):
            raise TypeError(f"{key}: expected a callable or None, got {type(value).__name__}")
    if (config.val_annotations is None) != (config.val_images is None):
        raise ValueError("val_annotations/val_images: expected both or neither, got only one")
    if config.val_annotations is not None and config.validate is not None:
        raise ValueError("validate/val_annotations: expected a validation set or a validate callable, got both")
    if config.patience is not None and config.val_annotations is None and config.validate is None:
        raise ValueError(f"patience: expected a validation set (val_annotations and val_images, or validate) to "
                         f"judge the mAP by, got patience={config.patience} without one")
    checked["augment"] = recipe_name(config.augment)
    for key in ("zoom_out", "scale_jitter", "progress", "tensorboard"):
        if not isinstance(getattr(config, key), bool):
            raise TypeError(f"{key}: expected True or False, got {getattr(config, key)!r}")
    if config.tensorboard:
        check_tensorboard()
    if config.lr is not None:
        checked["lr"] = check_real("lr", config.lr, 0.0)
    for key in ("momentum", "weight_decay", "gamma"):
        checked[key] = check_real(key, getattr(config, key), 0.0)
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {config.precision!r}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {config.schedule!r}")
    if config.milestones is not None:
        checked["milestones"] = tuple(check_int("milestones", m, 1) for m in config.milestones)
    out_dir = pathlib.Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir: expected a folder (created if missing), got the file {str(out_dir)!r}")
    return dataclasses.replace(config, **checked)


def resolve_device(config: TrainConfig) -> torch.device:
    device = distributed.resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: 'fp16' needs a CUDA device, got {device.type!r}; use 'bf16' or 'fp32'")
    return device

