"""The SSD300 training loop, following NVIDIA's recipe (DeepLearningExamples, PyTorch/Detection/SSD).

Recipe: SGD with momentum 0.9; learning rate ``2.6e-3 * batch_size / 32`` (NVIDIA's linear scaling rule); a linear
warmup from 0 over the first 300 iterations; weight decay 5e-4 on the weights of convolutions only (none on
BatchNorm parameters or biases); the rate divided by 10 at epochs 43 and 54 of 65, scaled to the run's length.
Mixed precision with autocast (bf16, or fp16 with a GradScaler), channels_last memory format.

Outputs in ``out_dir``: ``last.pt`` written atomically after every epoch (loadable with ``weights_only=True``; it
holds the model state dict, the class names and category ids, the preprocessing, and the optimizer, scheduler,
scaler, epoch and iteration for resuming); ``best.pt`` (the same without the optimizer state) whenever validation
mAP improves; and ``metrics.jsonl``, one JSON object per line, each with a ``type``: ``start`` (once per call: world
size, global batch, base rate, how many tensors came from the starting checkpoint), ``iteration`` (every
``log_every`` iterations, and always the first and the last: epoch, iteration, loss, lr, images_per_second),
``epoch`` (one per epoch) and ``validation`` (mAP and the 12 COCO stats). A non-finite loss stops the run with
:class:`NonFiniteLossError`; the last checkpoint on disk is then the last good epoch's.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA), each process reads its share of the images through a DistributedSampler, the default rate follows the
global batch (``2.6e-3 * batch_size * world_size / 32``), and only rank 0 writes files; checkpoints hold the
unwrapped model's state dict, so they load like single-process ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data.coco_format import CocoDetectionDataset, DetectionCollate
from ..io.files import atomic_path
from ..models.spec import DetectorSpec, check_int, check_real
from ..models.ssd300_resnet50 import NVIDIA_SSD300, SSD300, nvidia_spec
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
from .augment import SSDAugmentation
from .loss import SSDLoss
from .targets import encode_targets

__all__ = [
    "EncodingCollate",
    "NonFiniteLossError",
    "TrainConfig",
    "build_optimizer",
    "lr_factor",
    "train",
]

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
        batch_size: images per iteration and process, at least 2 (BatchNorm on the 1 x 1 feature map); epochs
            use full batches only (the last partial one is dropped) unless the data is smaller than one batch.
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
        resume: True: continue from ``out_dir/last.pt`` when it exists; a path: continue from that checkpoint
            (it must exist); False: start afresh (an old ``metrics.jsonl`` and ``best.pt`` are removed).
        init_checkpoint: weights to start from: a checkpoint file of the model (read as ``build_model`` reads
            one: ``ssd train``'s, NVIDIA's), or a state dict under this package's key names. The classification
            heads stay at their initialisation (Xavier weights, as NVIDIA's training) when the checkpoint's classes
            differ from the dataset's (by number, or by name where the file records names; files without names
            hold the published classes, COCO's); every other tensor must fit.
        init_source: how to name ``init_checkpoint`` in the log (default: its path, or "state dict").
        max_iters_per_epoch: cut epochs short (smoke tests); None for full epochs.
        skip_bad_images: skip unreadable images (counted in the metrics) instead of stopping; a batch left
            with one readable image is skipped whole (BatchNorm needs two).
        log_every: write an ``iteration`` line to the metrics every this many iterations.
        validate: called after every epoch on rank 0 with the (unwrapped, eval-mode) model; returns a mapping
            with ``mAP`` and optionally ``stats`` (COCOeval's 12 numbers). An improved mAP writes ``best.pt``.
        sync_bn: SyncBatchNorm across processes (CUDA, several processes; a no-op in one process).
        log: receives one-line progress messages on rank 0 (e.g. ``print``); None for silence.
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
    resume: bool | str | os.PathLike[str] = True
    init_checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None
    init_source: str | None = None
    max_iters_per_epoch: int | None = None
    skip_bad_images: bool = False
    log_every: int = 20
    validate: Callable[[nn.Module], Mapping[str, Any]] | None = None
    sync_bn: bool = False
    log: Callable[[str], None] | None = None

    def base_lr(self, world_size: int = 1) -> float:
        """The given rate, else NVIDIA's linear scaling by the global batch (all processes together)."""
        return self.lr if self.lr is not None else 2.6e-3 * self.batch_size * world_size / 32

    def epoch_milestones(self) -> tuple[int, ...]:
        if self.milestones is not None:
            return tuple(self.milestones)
        return tuple(round(self.epochs * m / _REFERENCE_EPOCHS) for m in _REFERENCE_MILESTONES)


def _check_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
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
    for key in ("warmup_iters", "num_workers", "seed"):
        checked[key] = check_int(key, getattr(config, key), 0)
    checked["log_every"] = check_int("log_every", config.log_every, 1)
    if config.validate is not None and not callable(config.validate):
        raise TypeError(f"validate: expected a callable or None, got {type(config.validate).__name__}")
    if config.log is not None and not callable(config.log):
        raise TypeError(f"log: expected a callable or None, got {type(config.log).__name__}")
    if config.max_iters_per_epoch is not None:
        checked["max_iters_per_epoch"] = check_int("max_iters_per_epoch", config.max_iters_per_epoch, 1)
    if config.lr is not None:
        checked["lr"] = check_real("lr", config.lr, 0.0)
    for key in ("momentum", "weight_decay", "gamma"):
        checked[key] = check_real(key, getattr(config, key), 0.0)
    if config.precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {config.precision!r}")
    if config.milestones is not None:
        checked["milestones"] = tuple(check_int("milestones", m, 1) for m in config.milestones)
    return dataclasses.replace(config, **checked)


def _device(config: TrainConfig) -> torch.device:
    device = distributed.resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: 'fp16' needs a CUDA device, got {device.type!r}; use 'bf16' or 'fp32'")
    return device


class EncodingCollate:
    """Collate that also encodes the targets against ``spec`` (the model's), so that the matching runs in the
    DataLoader's workers.

    Returns ``(images N x 3 x S x S, gloc N x 4 x A, glabel N x A, targets)`` or None when every item was
    dropped (see :class:`ssd.data.coco_format.DetectionCollate`).
    """

    def __init__(self, spec: DetectorSpec) -> None:
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec: expected a DetectorSpec (model.spec), got {type(spec).__name__}")
        self._collate = DetectionCollate()
        self.spec = spec

    def __call__(
        self, batch: list[tuple[torch.Tensor, dict[str, Any]] | None]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, Any]]] | None:
        collated = self._collate(batch)
        if collated is None:
            return None
        images, targets = collated
        # One image at a time: the batched matcher pads every image to the most crowded one and holds
        # N x T x 8732 IoUs, which for COCO's crowded images is gigabytes per worker; the results are identical.
        encoded = [encode_targets(t["boxes"], t["labels"], self.spec) for t in targets]
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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _plain_config(config: TrainConfig) -> dict[str, Any]:
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


def _initialise_from(model: SSD300, init: str | os.PathLike[str] | Mapping[str, torch.Tensor],
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


def _finite(value: float) -> float | None:
    # metrics.jsonl is strict JSON (allow_nan=False): a value that does not exist is null, not NaN.
    return value if math.isfinite(value) else None


def _validation_record(result: object) -> dict[str, Any]:
    """``mAP`` and ``stats`` from what ``validate`` returned: a mapping, or an object with ``stats``."""
    if isinstance(result, Mapping):
        stats = result.get("stats")
        mean_ap = result.get("mAP", stats[0] if stats is not None and len(stats) else None)
    else:
        stats = getattr(result, "stats", None)
        mean_ap = stats[0] if stats is not None and len(stats) else None
    if mean_ap is None:
        raise TypeError(f"validate: expected a mapping with 'mAP' or a result with 'stats', got {result!r}")
    record: dict[str, Any] = {"mAP": _finite(float(mean_ap))}
    if stats is not None:
        record["stats"] = [_finite(float(v)) for v in stats]
    return record


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    # A disabled autocast still validates its dtype (and warns on CPU for float32), so fp32 gets no context at all.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _grad_scaler(device: torch.device, enabled: bool) -> Any:
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _write_metrics(path: pathlib.Path, record: dict[str, Any]) -> None:
    # A diverged run logs a NaN loss; NaN is not JSON (readers choke on it), so non-finite numbers become null.
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a", encoding="utf-8") as fp:
        fp.write(json.dumps(clean, allow_nan=False) + "\n")
        fp.flush()
        os.fsync(fp.fileno())


def _resume_path(config: TrainConfig, checkpoint_path: pathlib.Path) -> pathlib.Path | None:
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


def _reduce(values: list[float], device: torch.device, world: int) -> list[float]:
    """Sums over the processes (the values themselves in one process)."""
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train SSD300 on a COCO-format dataset; see :class:`TrainConfig` and the module docstring.

    Under torchrun the process group is joined here (see :func:`ssd.distributed.init_from_env`) and left to the
    caller to destroy (:func:`ssd.distributed.cleanup`), so that a caller can run checks across ranks around it.

    Returns:
        A summary: ``epochs_run`` (this call), ``epoch`` (last finished, 0-based), ``iterations`` (in total),
        ``final_loss`` (mean over the last epoch), ``checkpoint`` and ``metrics`` (paths), ``num_classes``,
        ``class_names``, ``skipped_images``, ``dataset_stats``, ``resumed_from_epoch`` (None when fresh),
        ``init`` (source and loaded/skipped tensor counts, or None), ``best_map`` (None without validation) and
        ``world_size``.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (``last.pt`` keeps the last good epoch).
        ValueError / TypeError: a bad configuration; AnnotationFileError: a bad annotation file.
    """
    config = _check_config(config)
    device = _device(config)
    rank, world, device = distributed.setup(device)
    main = rank == 0
    if config.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError(f"sync_bn: SyncBatchNorm needs CUDA devices, got {device.type!r}")

    def say(message: str) -> None:
        if main and config.log is not None:
            config.log(message)

    out_dir = pathlib.Path(config.out_dir)
    checkpoint_path = out_dir / "last.pt"
    best_path = out_dir / "best.pt"
    metrics_path = out_dir / "metrics.jsonl"
    resume_from = _resume_path(config, checkpoint_path)

    torch.manual_seed(config.seed)
    dataset = CocoDetectionDataset(
        config.annotations,
        config.images,
        transform=None,  # set below from the model's input spec, before the loader's workers start
        skip_bad_images=config.skip_bad_images,
    )
    if len(dataset) == 0:
        raise ValueError(f"annotations: expected at least one image in {os.fspath(config.annotations)!r}, got none")
    # The dataset's names and category ids travel with the model, so detect and evaluate speak them.
    model = SSD300(nvidia_spec(class_names=tuple(dataset.class_names), category_ids=tuple(dataset.category_ids)))
    dataset.transform = SSDAugmentation(model.spec.input, augment=config.augment)
    sampler = None
    if world > 1:
        # Each process reads its own share; the sampler's seed makes the shares a partition of one permutation.
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
        )
    images_per_rank = len(sampler) if sampler is not None else len(dataset)
    if images_per_rank < 2:
        raise ValueError(f"annotations: expected at least 2 images per process (BatchNorm needs two per batch), "
                         f"got {images_per_rank}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        # Full batches only (unless the data is smaller than one): a last batch of one image breaks BatchNorm.
        drop_last=images_per_rank >= config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=EncodingCollate(model.spec),
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    iters_per_epoch = len(loader)
    if config.max_iters_per_epoch is not None:
        iters_per_epoch = min(iters_per_epoch, config.max_iters_per_epoch)

    init = None
    if config.init_checkpoint is not None and resume_from is None:
        init = _initialise_from(model, config.init_checkpoint, config.init_source)
        say(f"weights from {init['source']}: {init['loaded']} tensors loaded, {init['skipped']} skipped "
            f"(new classification heads)" if init["skipped"] else
            f"weights from {init['source']}: all {init['loaded']} tensors loaded")
    if world > 1:
        # Identical weights everywhere (DDP also broadcasts rank 0's), but each rank its own crops and flips.
        torch.manual_seed(config.seed + rank)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    loss_fn = SSDLoss(model.spec).to(device)
    base_lr = config.base_lr(world)
    optimizer = build_optimizer(model, base_lr, config.momentum, config.weight_decay)
    milestones = config.epoch_milestones()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, config.warmup_iters, milestones, config.gamma)
    )
    scaler = _grad_scaler(device, enabled=config.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    start_epoch, iteration, resumed_from, best_map = 0, 0, None, None
    if resume_from is not None:
        state = read_training_state(resume_from, model.spec.name)
        if state["class_names"] != dataset.class_names or state["category_ids"] != dataset.category_ids:
            raise ValueError(
                f"{resume_from}: its classes {state['class_names']} differ from the dataset's "
                f"{dataset.class_names}; use another out_dir or resume=False"
            )
        load_weights(model, state["state_dict"], str(resume_from), get_entry(model.spec.name), new_heads=False)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            why = " ".join(str(exc).split())[:200]
            raise InvalidCheckpointError(f"checkpoint {str(resume_from)!r}: its optimizer state does not fit this "
                                         f"run ({type(exc).__name__}: {why})") from None
        # The saved rate was computed with the saved run's milestones, which follow its epoch count; a resumed run
        # with more epochs has other milestones, so the rate of the next iteration is recomputed from this run's
        # base rate and schedule at the saved iteration.
        scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * lr_factor(scheduler.last_epoch, iters_per_epoch, config.warmup_iters,
                                              milestones, config.gamma)
        start_epoch, iteration, resumed_from = state["epoch"] + 1, state["iteration"], state["epoch"]
        best_map = state.get("best_map")
        # Resuming re-seeds from the epoch so a resumed run does not replay the first epochs' order and crops.
        torch.manual_seed(config.seed + start_epoch + (rank if world > 1 else 0))
        loader.generator.manual_seed(config.seed + start_epoch)
        say(f"resumed from {resume_from}: epoch {start_epoch}, iteration {iteration}")

    network: nn.Module = model
    if world > 1:
        if config.sync_bn:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        network = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )

    if main and start_epoch < config.epochs:  # a finished run resumed with the same epochs adds nothing
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            # A fresh run's metrics and best model must not mix with an earlier run's.
            metrics_path.unlink(missing_ok=True)
            best_path.unlink(missing_ok=True)
        _write_metrics(metrics_path, {
            "type": "start", "epoch": start_epoch, "iteration": iteration, "world_size": world,
            "batch_size": config.batch_size, "global_batch_size": config.batch_size * world, "base_lr": base_lr,
            "iterations_per_epoch": iters_per_epoch, "resumed_from_epoch": resumed_from,
            "init": init, "precision": config.precision, "device": str(device),
        })
    say(f"training on {world} x {device}, global batch {config.batch_size * world}, base lr {base_lr:.3g}, "
        f"{iters_per_epoch} iterations per epoch, epochs {start_epoch}..{config.epochs - 1}")

    preprocessing = {
        "size": [300, 300],
        "resize": "stretch",
        "mean": list(NVIDIA_SSD300.input.mean),
        "std": list(NVIDIA_SSD300.input.std),
        "scale": 1 / 255,
    }
    skipped_total, last_epoch_loss, epoch = 0, float("nan"), start_epoch - 1
    first_iteration = iteration + 1
    final_iteration = iteration + iters_per_epoch * max(0, config.epochs - start_epoch)
    network.train()
    for epoch in range(start_epoch, config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        started = window_start = time.perf_counter()
        loss_sum, batches, images_seen, skipped, lr_used, window_images = 0.0, 0, 0, 0, float("nan"), 0
        for step, batch in enumerate(loader):
            if step >= iters_per_epoch:
                break
            # Unreadable images (skip_bad_images) are dropped by the collate, in the workers: count them here.
            expected = min(config.batch_size, images_per_rank - step * config.batch_size)
            if batch is None or len(batch[3]) < 2:
                # Under DDP every rank must still take part in the step, so a batch cannot be skipped there.
                if world > 1:
                    raise RuntimeError(f"epoch {epoch}, step {step}: fewer than 2 images of rank {rank}'s batch "
                                       "were readable; distributed training cannot skip a batch")
                # A lone image cannot be trained on either (BatchNorm): it is counted with the skipped ones.
                skipped += expected
                continue
            images, gloc, glabels, targets = batch
            skipped += expected - len(targets)
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            gloc = gloc.to(device, non_blocking=True)
            glabels = glabels.to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                locs, confs = network(images)
            loss = loss_fn(locs, confs, gloc, glabels)
            # The mean over the processes: every rank sees the same value, so a NaN stops them all together.
            value = _reduce([float(loss.detach())], device, world)[0] / world
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
            window_images += len(targets) * world
            if main and (iteration % config.log_every == 0 or iteration in (first_iteration, final_iteration)):
                now = time.perf_counter()
                _write_metrics(metrics_path, {
                    "type": "iteration", "epoch": epoch, "iteration": iteration, "loss": value, "lr": lr_used,
                    "images_per_second": round(window_images / (now - window_start), 3),
                })
                say(f"epoch {epoch} iteration {iteration}: loss {value:.4f}, lr {lr_used:.3g}")
                window_start, window_images = now, 0
        elapsed = time.perf_counter() - started
        images_seen, skipped = (int(v) for v in _reduce([images_seen, skipped], device, world))
        skipped_total += skipped
        last_epoch_loss = loss_sum / batches if batches else float("nan")

        validation = None
        if config.validate is not None:
            if main:
                network.eval()
                with torch.no_grad():
                    validation = _validation_record(config.validate(model))
                network.train()
            distributed.barrier()  # the other ranks wait here, not inside DDP's next collective
        improved = validation is not None and validation["mAP"] is not None and (
            best_map is None or validation["mAP"] > best_map
        )
        if improved:
            best_map = validation["mAP"]
        if main:
            state = {
                "format": TRAIN_FORMAT,
                "model": model.spec.name,
                "state_dict": model.state_dict(),
                "num_classes": dataset.num_classes,
                "class_names": list(dataset.class_names),
                "category_ids": list(dataset.category_ids),
                "preprocessing": preprocessing,
                "epoch": epoch,
                "iteration": iteration,
                "best_map": best_map,
                "config": _plain_config(config),
            }
            if improved:
                # Written before last.pt, so that a last.pt naming a best mAP always has its best.pt on disk.
                _atomic_save(state, best_path)
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict())
            _atomic_save(state, checkpoint_path)
            _write_metrics(metrics_path, {
                "type": "epoch",
                "epoch": epoch,
                "iteration": iteration,
                "loss": _finite(last_epoch_loss),
                "lr": _finite(lr_used),  # the rate of the epoch's last iteration
                "images": images_seen,
                "skipped_images": skipped,
                "seconds": round(elapsed, 3),
                "images_per_second": round(images_seen / elapsed, 3) if elapsed > 0 else None,
            })
            if validation is not None:
                _write_metrics(metrics_path, {"type": "validation", "epoch": epoch, "iteration": iteration,
                                              **validation, "best": improved})
                say(f"epoch {epoch} validation: mAP {validation['mAP']}" + (" (best so far)" if improved else ""))
        distributed.barrier()  # nobody starts the next epoch (or returns) before the checkpoint is on disk
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
        "init": init,
        "best_map": best_map,
        "world_size": world,
    }
