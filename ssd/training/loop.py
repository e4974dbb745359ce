"""The SSD300 training loop, following NVIDIA's recipe (DeepLearningExamples, PyTorch/Detection/SSD).

Recipe: SGD with momentum 0.9; learning rate ``2.6e-3 * batch_size / 32`` (NVIDIA's linear scaling rule); a linear
warmup from 0 over the first 300 iterations; weight decay 5e-4 on the weights of convolutions only (none on
BatchNorm parameters or biases); the rate divided by 10 at epochs 43 and 54 of 65, scaled to the run's length.
Mixed precision with autocast (bf16, or fp16 with a GradScaler), channels_last memory format.

Outputs in ``out_dir``: ``last.pt`` written atomically after every epoch (loadable with ``weights_only=True``; it
holds the model state dict, the class names and category ids, the preprocessing, and the optimizer, scheduler,
scaler and epoch for resuming), and ``metrics.jsonl`` with one JSON line per epoch. A non-finite loss stops the run
with :class:`NonFiniteLossError`; the last checkpoint on disk is then the last good epoch's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.coco_format import CocoDetectionDataset, DetectionCollate
from ..models.ssd300_resnet50 import NVIDIA_SSD300, SSD300, nvidia_spec
from ..weights.checkpoints import read_state_dict
from .augment import SSDAugmentation
from .loss import SSDLoss
from .targets import encode_targets

__all__ = [
    "CHECKPOINT_FORMAT",
    "EncodingCollate",
    "NonFiniteLossError",
    "TrainConfig",
    "build_optimizer",
    "lr_factor",
    "train",
]

CHECKPOINT_FORMAT = "ssd300-train/1"
# NVIDIA's schedule: 65 epochs with the rate divided by 10 after epochs 43 and 54.
_REFERENCE_EPOCHS = 65
_REFERENCE_MILESTONES = (43, 54)
_PRECISIONS = ("fp32", "bf16", "fp16")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says where and which checkpoint is the last good one."""


@dataclass
class TrainConfig:
    """Everything :func:`train` needs. Paths may be str or Path.

    Attributes:
        annotations: COCO-format annotation file of the training set.
        images: folder its ``file_name`` entries are relative to.
        out_dir: where ``last.pt`` and ``metrics.jsonl`` go (created).
        epochs: total epochs (a resumed run continues up to this).
        batch_size: images per iteration.
        lr: base learning rate; None for ``2.6e-3 * batch_size / 32``.
        momentum, weight_decay: SGD's.
        warmup_iters: linear warmup length in iterations (from a rate of 0).
        milestones: epochs at which the rate is multiplied by ``gamma``; None scales NVIDIA's 43 and 54 of 65.
        gamma: the factor at each milestone.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast and GradScaler; CUDA only).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        channels_last: use the channels_last memory format for the model and its inputs.
        augment: NVIDIA's training augmentation; False only resizes and normalises.
        num_workers: DataLoader worker processes.
        seed: seeds the weights' initialisation, the shuffling and the augmentation.
        resume: continue from ``out_dir/last.pt`` when it exists.
        init_checkpoint: optional weights to start from (e.g. NVIDIA's COCO checkpoint); tensors whose shape does
            not fit (the class heads, for another number of classes) are left at their initialisation.
        max_iters_per_epoch: cut epochs short (smoke tests); None for full epochs.
        skip_bad_images: skip unreadable images (counted in the metrics) instead of stopping.
    """

    annotations: str | os.PathLike[str]
    images: str | os.PathLike[str]
    out_dir: str | os.PathLike[str]
    epochs: int = 65
    batch_size: int = 32
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 300
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = True
    augment: bool = True
    num_workers: int = 0
    seed: int = 0
    resume: bool = True
    init_checkpoint: str | os.PathLike[str] | None = None
    max_iters_per_epoch: int | None = None
    skip_bad_images: bool = False

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 2.6e-3 * self.batch_size / 32

    def epoch_milestones(self) -> tuple[int, ...]:
        if self.milestones is not None:
            return tuple(self.milestones)
        return tuple(round(self.epochs * m / _REFERENCE_EPOCHS) for m in _REFERENCE_MILESTONES)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_float(name: str, value: object, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name}: expected a finite number >= {minimum}, got {value}")


def _check_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config: expected keys from {sorted(known)}, got unknown {unknown}")
        config = TrainConfig(**config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig or a mapping, got {type(config).__name__}")
    _check_int("epochs", config.epochs, 1)
    _check_int("batch_size", config.batch_size, 1)
    _check_int("warmup_iters", config.warmup_iters, 0)
    _check_int("num_workers", config.num_workers, 0)
    _check_int("seed", config.seed, 0)
    if config.max_iters_per_epoch is not None:
        _check_int("max_iters_per_epoch", config.max_iters_per_epoch, 1)
    if config.lr is not None:
        _check_float("lr", config.lr, 0.0)
    _check_float("momentum", config.momentum, 0.0)
    _check_float("weight_decay", config.weight_decay, 0.0)
    _check_float("gamma", config.gamma, 0.0)
    if config.precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {config.precision!r}")
    if config.milestones is not None:
        for m in config.milestones:
            _check_int("milestones", m, 1)
    return config


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(config.device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {config.device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r} was asked for, but CUDA is not available")
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: 'fp16' needs a CUDA device, got {device.type!r}; use 'bf16' or 'fp32'")
    return device


class EncodingCollate:
    """Collate that also encodes the targets, so that the matching runs in the DataLoader's workers.

    Returns ``(images N x 3 x 300 x 300, gloc N x 4 x A, glabel N x A, targets)`` or None when every item was
    dropped (see :class:`ssd.data.coco_format.DetectionCollate`).
    """

    def __init__(self) -> None:
        self._collate = DetectionCollate()

    def __call__(
        self, batch: list[tuple[torch.Tensor, dict[str, Any]] | None]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, Any]]] | None:
        collated = self._collate(batch)
        if collated is None:
            return None
        images, targets = collated
        # One image at a time: the batched matcher pads every image to the most crowded one and holds
        # N x T x 8732 IoUs, which for COCO's crowded images is gigabytes per worker; the results are identical.
        encoded = [encode_targets(t["boxes"], t["labels"]) for t in targets]
        boxes = torch.stack([b for b, _ in encoded])
        labels = torch.stack([lab for _, lab in encoded])
        return images, boxes.transpose(1, 2).contiguous(), labels, targets


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on multi-dimensional weights only: BatchNorm scales and shifts and biases get none."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def lr_factor(iteration: int, iters_per_epoch: int, warmup_iters: int, milestones: tuple[int, ...],
              gamma: float) -> float:
    """The multiplier of the base rate at ``iteration`` (0-based): linear warmup from 0, then step decay."""
    factor = iteration / warmup_iters if iteration < warmup_iters else 1.0
    epoch = iteration // iters_per_epoch
    return factor * gamma ** sum(epoch >= m for m in milestones)


def _atomic_save(obj: object, path: pathlib.Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _plain_config(config: TrainConfig) -> dict[str, Any]:
    # Only str/int/float/bool/None/list in the checkpoint, so weights_only loading accepts it.
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def _initialise_from(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, int]:
    source = read_state_dict(path)
    own = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return {"loaded": len(fitting), "skipped": len(own) - len(fitting)}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    # A disabled autocast still validates its dtype (and warns on CPU for float32), so fp32 gets no context at all.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _grad_scaler(device: torch.device, enabled: bool) -> Any:
    # torch.amp.GradScaler appeared in torch 2.3; requirements admit 2.1, where only the CUDA one exists.
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def _write_metrics(path: pathlib.Path, record: dict[str, Any]) -> None:
    # A diverged run logs a NaN loss; NaN is not JSON (readers choke on it), so non-finite numbers become null.
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a", encoding="utf-8") as fp:
        fp.write(json.dumps(clean, allow_nan=False) + "\n")
        fp.flush()
        os.fsync(fp.fileno())


def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train SSD300 on a COCO-format dataset; see :class:`TrainConfig` and the module docstring.

    Returns:
        A summary: ``epochs_run`` (this call), ``epoch`` (last finished, 0-based), ``iterations`` (in total),
        ``final_loss`` (mean over the last epoch), ``checkpoint`` and ``metrics`` (paths), ``num_classes``,
        ``class_names``, ``skipped_images``, ``dataset_stats`` and ``resumed_from_epoch`` (None when fresh).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (``last.pt`` keeps the last good epoch).
        ValueError / TypeError: a bad configuration; AnnotationFileError: a bad annotation file.
    """
    config = _check_config(config)
    device = _device(config)
    out_dir = pathlib.Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "last.pt"
    metrics_path = out_dir / "metrics.jsonl"

    torch.manual_seed(config.seed)
    dataset = CocoDetectionDataset(
        config.annotations,
        config.images,
        transform=SSDAugmentation(augment=config.augment),
        skip_bad_images=config.skip_bad_images,
    )
    if len(dataset) == 0:
        raise ValueError(f"annotations: expected at least one image in {os.fspath(config.annotations)!r}, got none")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        collate_fn=EncodingCollate(),
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    iters_per_epoch = len(loader)
    if config.max_iters_per_epoch is not None:
        iters_per_epoch = min(iters_per_epoch, config.max_iters_per_epoch)

    # The dataset's names and category ids travel with the model, so detect and evaluate speak them.
    model = SSD300(nvidia_spec(class_names=tuple(dataset.class_names), category_ids=tuple(dataset.category_ids)))
    if config.init_checkpoint is not None:
        _initialise_from(model, config.init_checkpoint)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    loss_fn = SSDLoss().to(device)
    optimizer = build_optimizer(model, config.base_lr(), config.momentum, config.weight_decay)
    milestones = config.epoch_milestones()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, config.warmup_iters, milestones, config.gamma)
    )
    scaler = _grad_scaler(device, enabled=config.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    start_epoch, iteration, resumed_from = 0, 0, None
    if config.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{checkpoint_path}: expected a training checkpoint ({CHECKPOINT_FORMAT}), got another")
        if state["class_names"] != dataset.class_names or state["category_ids"] != dataset.category_ids:
            raise ValueError(
                f"{checkpoint_path}: its classes {state['class_names']} differ from the dataset's "
                f"{dataset.class_names}; use another out_dir or resume=False"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, iteration, resumed_from = state["epoch"] + 1, state["iteration"], state["epoch"]
        # Resuming re-seeds from the epoch so a resumed run does not replay the first epochs' order and crops.
        torch.manual_seed(config.seed + start_epoch)
        loader.generator.manual_seed(config.seed + start_epoch)

    preprocessing = {
        "size": [300, 300],
        "resize": "stretch",
        "mean": list(NVIDIA_SSD300.input.mean),
        "std": list(NVIDIA_SSD300.input.std),
        "scale": 1 / 255,
    }
    skipped_total, last_epoch_loss, epoch = 0, float("nan"), start_epoch - 1
    model.train()
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        loss_sum, batches, images_seen, skipped, lr_used = 0.0, 0, 0, 0, float("nan")
        for step, batch in enumerate(loader):
            if step >= iters_per_epoch:
                break
            # Unreadable images (skip_bad_images) are dropped by the collate, in the workers: count them here.
            expected = min(config.batch_size, len(dataset) - step * config.batch_size)
            if batch is None:
                skipped += expected
                continue
            images, gloc, glabels, targets = batch
            skipped += expected - len(targets)
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            gloc = gloc.to(device, non_blocking=True)
            glabels = glabels.to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                locs, confs = model(images)
            loss = loss_fn(locs, confs, gloc, glabels)
            value = float(loss.detach())
            if not math.isfinite(value):
                finished_one = epoch > start_epoch or resumed_from is not None
                last_good = f"{checkpoint_path} (epoch {epoch - 1})" if finished_one else "none (no epoch finished)"
                raise NonFiniteLossError(
                    f"loss became {value} at epoch {epoch}, iteration {iteration}; training stopped. Last good "
                    f"checkpoint: {last_good}. Try a lower lr, a longer warmup or precision='fp32'."
                )
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            loss_sum += value
            batches += 1
            images_seen += len(targets)
        elapsed = time.perf_counter() - started
        skipped_total += skipped
        last_epoch_loss = loss_sum / batches if batches else float("nan")
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names),
            "category_ids": list(dataset.category_ids),
            "preprocessing": preprocessing,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "config": _plain_config(config),
        }
        _atomic_save(state, checkpoint_path)
        _write_metrics(
            metrics_path,
            {
                "epoch": epoch,
                "iteration": iteration,
                "loss": last_epoch_loss,
                "lr": lr_used,  # the rate of the epoch's last iteration
                "images": images_seen,
                "skipped_images": skipped,
                "seconds": round(elapsed, 3),
                "images_per_second": round(images_seen / elapsed, 3) if elapsed > 0 else None,
            },
        )
    return {
        "epochs_run": max(0, config.epochs - start_epoch),
        "epoch": epoch,
        "iterations": iteration,
        "final_loss": last_epoch_loss,
        "checkpoint": str(checkpoint_path),
        "metrics": str(metrics_path),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "skipped_images": skipped_total,
        "dataset_stats": dict(dataset.stats),
        "resumed_from_epoch": resumed_from,
    }
