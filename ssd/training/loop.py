"""The training loop of every registered model, following NVIDIA's recipe (DeepLearningExamples,
PyTorch/Detection/SSD) by default.

Recipe: SGD with momentum 0.9; learning rate ``2.6e-3 * batch_size / 32`` (NVIDIA's linear scaling rule); a linear
warmup from 0 over the first 300 iterations; weight decay 5e-4 on the weights of convolutions only (none on
BatchNorm parameters or biases); the rate divided by 10 at epochs 43 and 54 of 65, scaled to the run's length (or a
cosine decay, :mod:`ssd.training.schedule`). Mixed precision with autocast (bf16, or fp16 with a GradScaler),
channels_last memory format. The model is built from the registry (``TrainConfig.model``, any name of
:func:`ssd.registry.list_models`) for the dataset's classes; targets, loss and augmentation read its spec (default
boxes, box coder variances, matching threshold, input size, resize rule and normalisation). mmdetection's models
train with this recipe too, not with mmdetection's own schedule and augmentation.

Before the first iteration the data is checked (:mod:`ssd.training.checks`): the training annotations and images,
and the validation set (annotations, images, and its categories against the model's classes), each summarised in
one line; a bad validation set stops the run before it starts. Unreadable images travel from the DataLoader's
workers as :class:`ssd.data.coco_format.BadImage` markers: skipped and reported (``skip_bad_images``), or one error
naming the file, raised in the main process.

Outputs in ``out_dir`` (held by one run at a time; see :mod:`ssd.training.outputs`): ``last.pt`` written
atomically after every epoch (loadable with ``weights_only=True``; format ``ssd-train/2``: the model's name, its
state dict, the class names and category ids, the preprocessing of its spec, and the optimizer, scheduler, scaler,
epoch and iteration for resuming); ``best.pt`` (the same without the optimizer state) whenever validation mAP
improves; and ``metrics.jsonl``, one JSON object per line, each with a ``type``: ``start`` (once per call: world
size, global batch, base rate, how many tensors came from the starting checkpoint, the data summaries),
``iteration`` (every ``log_every`` iterations, and always the first and the last: epoch, iteration, loss, lr,
images_per_second), ``epoch`` (one per epoch) and ``validation`` (mAP and the 12 COCO stats). A resumed run first
drops the lines a killed run wrote after its last ``last.pt``, so no iteration appears twice. A non-finite loss
stops the run with :class:`NonFiniteLossError`, naming the last checkpoint on disk (if any); a full disk stops it
with :class:`~ssd.training.outputs.RunOutputError`, the previous ``last.pt`` intact; Ctrl-C finishes the files
being written and raises :class:`TrainingInterrupted`.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA), each process reads its share of the images through a DistributedSampler, the default rate follows the
global batch (``2.6e-3 * batch_size * world_size / 32``), every process validates its share of the validation
images (:func:`ssd.evaluation.evaluate` shards them), and only rank 0 writes files; checkpoints hold the unwrapped
model's state dict, so they load like single-process ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import distributed
from ..data.coco_format import BadImage, CocoDetectionDataset, DetectionCollate
from ..io.images import ImageLoadError
from ..models.base import Detector
from ..models.spec import DetectorSpec, check_int, check_real, from_any_copy
from ..registry import get_entry, list_models
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
from .checks import ValidationSet, check_training_images, load_validation_set, training_summary
from .loss import SSDLoss
from .outputs import RunFolder, deferred_interrupt, save_checkpoint, trim_metrics, write_metrics
from .schedule import SCHEDULES, lr_factor, reference_milestones
from .targets import encode_targets

__all__ = [
    "EncodingCollate",
    "NonFiniteLossError",
    "TrainBatch",
    "TrainConfig",
    "TrainingInterrupted",
    "build_optimizer",
    "default_workers",
    "lr_factor",
    "train",
]

_PRECISIONS = ("fp32", "bf16", "fp16")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says where and which checkpoint is the last good one."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`train` after it finished writing the files it was writing.

    ``checkpoint`` is the last ``last.pt`` on disk (None if no epoch was saved) and ``epoch`` its epoch.
    """

    def __init__(self, checkpoint: str | None, epoch: int | None) -> None:
        super().__init__(checkpoint, epoch)
        self.checkpoint = checkpoint
        self.epoch = epoch


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
        warmup_iters: linear warmup length in iterations (from a rate of 0); it multiplies the schedule.
        schedule: "step" (the rate times ``gamma`` at each milestone) or "cosine" (from the base rate down to 0 over
            the run, per iteration).
        milestones: epochs at which the step schedule multiplies the rate by ``gamma``; None scales NVIDIA's 43 and
            54 of 65 (see :func:`ssd.training.schedule.milestones_from_fractions` for fractions of the run).
        gamma: the factor at each milestone.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast and GradScaler; CUDA only).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        channels_last: use the channels_last memory format for the model and its inputs.
        augment: NVIDIA's training augmentation; False only resizes and normalises.
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
    warmup_iters: int = 300
    schedule: str = "step"
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = True
    augment: bool = True
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

    def base_lr(self, world_size: int = 1) -> float:
        """The given rate, else NVIDIA's linear scaling by the global batch (all processes together)."""
        return self.lr if self.lr is not None else 2.6e-3 * self.batch_size * world_size / 32

    def epoch_milestones(self) -> tuple[int, ...]:
        if self.milestones is not None:
            return tuple(self.milestones)
        return reference_milestones(self.epochs)


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
    if config.model not in list_models():
        raise ValueError(f"model: expected one of {', '.join(map(repr, list_models()))}, got {config.model!r}")
    for key in ("warmup_iters", "seed"):
        checked[key] = check_int(key, getattr(config, key), 0)
    for key in ("log_every", "val_every"):
        checked[key] = check_int(key, getattr(config, key), 1)
    for key, low in (("num_workers", 0), ("max_iters_per_epoch", 1), ("eval_batch_size", 1)):
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
    if config.lr is not None:
        checked["lr"] = check_real("lr", config.lr, 0.0)
    for key in ("momentum", "weight_decay", "gamma"):
        checked[key] = check_real(key, getattr(config, key), 0.0)
    if config.precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {config.precision!r}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {config.schedule!r}")
    if config.milestones is not None:
        checked["milestones"] = tuple(check_int("milestones", m, 1) for m in config.milestones)
    out_dir = pathlib.Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir: expected a folder (created if missing), got the file {str(out_dir)!r}")
    return dataclasses.replace(config, **checked)


def _device(config: TrainConfig) -> torch.device:
    device = distributed.resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: 'fp16' needs a CUDA device, got {device.type!r}; use 'bf16' or 'fp32'")
    return device


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(device: torch.device | str) -> int:
    """DataLoader workers that feed ``device`` without starving it.

    CUDA: up to 8 per process (NVIDIA's default), within this process's share of the cores (``LOCAL_WORLD_SIZE``
    processes of torchrun share a node). CPU: the network already uses every core, so a few workers (a quarter of
    the cores' share, at least 1, at most 4) keep decoding and augmenting out of the training process. With 0,
    augmentation runs inside the training process on all of torch's threads, and a CPU shared with another job
    slows it many times over (see benchmarks/training.py).
    """
    device = torch.device(device)
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    share = max(1, usable_cores() // local_world)
    if device.type == "cuda":
        return min(8, share)
    return max(1, min(4, share // 4))


class TrainBatch(NamedTuple):
    """One collated batch: ``images`` N x 3 x S x S (None when no item was usable), ``gloc`` N x 4 x A and
    ``glabels`` N x A encoded against the model's spec, the ``targets`` of the N images, and the ``bad`` images
    (:class:`~ssd.data.coco_format.BadImage`) that were left out."""

    images: torch.Tensor | None
    gloc: torch.Tensor | None
    glabels: torch.Tensor | None
    targets: list[dict[str, Any]]
    bad: list[BadImage]


class EncodingCollate:
    """Collate that also encodes the targets against ``spec`` (the model's), so that the matching runs in the
    DataLoader's workers. Returns a :class:`TrainBatch`; items that are None or :class:`BadImage` are left out of
    the tensors (the latter listed in ``bad``)."""

    def __init__(self, spec: DetectorSpec) -> None:
        spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec: expected a DetectorSpec (model.spec), got {type(spec).__name__}")
        self._collate = DetectionCollate()
        self.spec = spec

    def __call__(self, batch: list[tuple[torch.Tensor, dict[str, Any]] | BadImage | None]) -> TrainBatch:
        bad = [item for item in batch if isinstance(item, BadImage)]
        collated = self._collate([item for item in batch if not isinstance(item, BadImage)])
        if collated is None:
            return TrainBatch(None, None, None, [], bad)
        images, targets = collated
        # One image at a time: the batched matcher pads every image to the most crowded one and holds
        # N x T x 8732 IoUs, which for COCO's crowded images is gigabytes per worker; the results are identical.
        encoded = [encode_targets(t["boxes"], t["labels"], self.spec) for t in targets]
        boxes = torch.stack([b for b, _ in encoded])
        labels = torch.stack([lab for _, lab in encoded])
        return TrainBatch(images, boxes.transpose(1, 2).contiguous(), labels, targets, bad)


class _Reported(torch.utils.data.Dataset):
    """The training set as the loop reads it: an unusable image comes out as a :class:`BadImage` marker (from a
    worker process too), never as an exception inside the DataLoader."""

    def __init__(self, dataset: CocoDetectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | BadImage:
        return self.dataset.load_item(index)


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


def _preprocessing(spec: DetectorSpec) -> dict[str, Any]:
    """What the model's input is, from its spec (as detect and export preprocess): saved with the checkpoint."""
    return {
        "size": [spec.input.size, spec.input.size],
        "resize": spec.input.resize,
        "mean": list(spec.input.mean),
        "std": list(spec.input.std),
        "value_range": spec.input.value_range,
        "scale": spec.input.value_range / 255,
    }


def _initialise_from(model: Detector, init: str | os.PathLike[str] | Mapping[str, torch.Tensor],
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


def _evaluator(validation: ValidationSet, batch_size: int, workers: int,
               precision: str) -> Callable[[nn.Module], dict[str, Any]]:
    """A ``validate`` callable scoring the model on the checked validation set with the sharded evaluation."""

    def validate(model: nn.Module) -> dict[str, Any]:
        from ..evaluation import evaluate

        device = next(model.parameters()).device
        result = evaluate(model, validation.images, validation.coco, batch_size=batch_size, workers=workers,
                          device=device, precision=precision, progress=False, verbose=False)
        stats = [float(v) for v in result.stats]
        return {"mAP": stats[0], "stats": stats}

    return validate


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    # A disabled autocast still validates its dtype (and warns on CPU for float32), so fp32 gets no context at all.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _grad_scaler(device: torch.device, enabled: bool) -> Any:
    return torch.amp.GradScaler(device.type, enabled=enabled)


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


def _bad_image_error(bad: BadImage) -> ImageLoadError:
    return ImageLoadError(f"{bad.reason}; skip_bad_images (--skip-bad-images) trains without such images")


@dataclass
class _Progress:
    """What the epochs share: the iteration counter, the best mAP, the last saved checkpoint and the skipped
    images."""

    iteration: int = 0
    best_map: float | None = None
    saved: tuple[str, int] | None = None  # (path, epoch) of the last checkpoint on disk this run continues
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> reason, in the order seen


def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train a registered model on a COCO-format dataset; see :class:`TrainConfig` and the module docstring.

    Under torchrun the process group is joined here (see :func:`ssd.distributed.init_from_env`) and left to the
    caller to destroy (:func:`ssd.distributed.cleanup`), so that a caller can run checks across ranks around it.

    Returns:
        A summary: ``model``, ``epochs_run`` (this call), ``epoch`` (last finished, 0-based), ``iterations`` (in
        total), ``final_loss`` (mean over the last epoch), ``checkpoint`` and ``metrics`` (paths), ``num_classes``,
        ``class_names``, ``skipped_images`` (count) and ``skipped_files`` (path and reason of each, on rank 0),
        ``dataset_stats``, ``resumed_from_epoch`` (None when fresh), ``init`` (source and loaded/skipped tensor
        counts, or None), ``best_map`` (None without validation), ``world_size`` and ``swept`` (temporary files of
        killed runs removed from ``out_dir``).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the last checkpoint on disk keeps the last good epoch).
        TrainingInterrupted: Ctrl-C, once the files being written were finished.
        ssd.training.outputs.RunOutputError: ``out_dir`` is held by another run, or a file could not be written
            (a full disk; the previous ``last.pt`` stays intact).
        ssd.io.images.ImageLoadError: an unusable training image, unless ``skip_bad_images``.
        ValueError / TypeError / FileNotFoundError: a bad configuration or data (annotation files, missing images,
            validation categories the model does not know), found before the first iteration.
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

    entry = get_entry(config.model)
    out_dir = pathlib.Path(config.out_dir)
    checkpoint_path = out_dir / "last.pt"
    resume_from = _resume_path(config, checkpoint_path)

    torch.manual_seed(config.seed)
    # The data first: every problem of the training and validation sets is found before anything is written.
    dataset = CocoDetectionDataset(config.annotations, config.images, skip_bad_images=config.skip_bad_images)
    if len(dataset) == 0:
        raise ValueError(f"annotations: expected at least one image in {os.fspath(config.annotations)!r}, got none")
    missing = check_training_images(dataset, config.skip_bad_images)
    # The dataset's names and category ids travel with the model, so detect and evaluate speak them.
    model = entry.network(entry.spec.with_classes(dataset.classes))
    dataset.transform = SSDAugmentation(model.spec.input, augment=config.augment)
    workers = config.num_workers if config.num_workers is not None else default_workers(device)
    validate = config.validate
    validation = None
    if config.val_annotations is not None:
        validation = load_validation_set(config.val_annotations, config.val_images, model.spec.classes)
        validate = _evaluator(validation, config.eval_batch_size or config.batch_size, workers, config.precision)
    summaries = [training_summary(dataset, missing)] + ([validation.summary] if validation is not None else [])
    for line in summaries:
        say(line)

    folder = RunFolder(out_dir)
    problem = None
    if main:
        try:
            swept = folder.open()
        except OSError as exc:
            problem = exc
    if not distributed.all_ok(problem is None, device if device.type == "cuda" else None):
        raise problem or RuntimeError("out_dir: rank 0 could not open it (see its message)")
    try:
        return _run(config, device, rank, world, model, dataset, validate, folder, swept if main else [],
                    resume_from, workers, summaries, say)
    finally:
        folder.close()


def _run(config: TrainConfig, device: torch.device, rank: int, world: int, model: Detector,
         dataset: CocoDetectionDataset, validate: Callable[[nn.Module], Any] | None, folder: RunFolder,
         swept: list[pathlib.Path], resume_from: pathlib.Path | None, workers: int, summaries: list[str],
         say: Callable[[str], None]) -> dict[str, Any]:
    main = rank == 0
    out_dir = folder.path
    checkpoint_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if swept:
        say(f"removed {len(swept)} temporary file(s) left by a killed run: {', '.join(p.name for p in swept)}")
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
        _Reported(dataset),
        batch_size=config.batch_size,
        # Full batches only (unless the data is smaller than one): a last batch of one image breaks BatchNorm.
        drop_last=images_per_rank >= config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=EncodingCollate(model.spec),
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_WorkerInit(folder) if workers > 0 else None,
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
    total_iters = iters_per_epoch * config.epochs

    def factor(it: int) -> float:
        return lr_factor(it, iters_per_epoch, config.warmup_iters, milestones, config.gamma, config.schedule,
                         total_iters)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = _grad_scaler(device, enabled=config.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    progress = _Progress()
    start_epoch, resumed_from = 0, None
    if resume_from is not None:
        start_epoch = _restore(resume_from, model, dataset, optimizer, scheduler, scaler, base_lr, factor, progress)
        resumed_from = start_epoch - 1
        # Resuming re-seeds from the epoch so a resumed run does not replay the first epochs' order and crops.
        torch.manual_seed(config.seed + start_epoch + (rank if world > 1 else 0))
        loader.generator.manual_seed(config.seed + start_epoch)
        say(f"resumed from {resume_from}: epoch {start_epoch}, iteration {progress.iteration}")

    network: nn.Module = model
    if world > 1:
        if config.sync_bn:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        network = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )

    if main and start_epoch < config.epochs:  # a finished run resumed with the same epochs adds nothing
        if resume_from is None:
            # A fresh run's metrics and best model must not mix with an earlier run's.
            metrics_path.unlink(missing_ok=True)
            best_path.unlink(missing_ok=True)
        else:
            dropped = trim_metrics(metrics_path, resumed_from)
            if dropped:
                say(f"metrics.jsonl: dropped {dropped} line(s) a killed run wrote after epoch {resumed_from}")
        write_metrics(metrics_path, {
            "type": "start", "epoch": start_epoch, "iteration": progress.iteration, "model": model.spec.name,
            "world_size": world, "batch_size": config.batch_size, "global_batch_size": config.batch_size * world,
            "base_lr": base_lr, "schedule": config.schedule, "milestones": list(milestones),
            "iterations_per_epoch": iters_per_epoch, "resumed_from_epoch": resumed_from, "init": init,
            "precision": config.precision, "device": str(device), "workers": workers, "data": summaries,
        })
    say(f"training {model.spec.name} on {world} x {device}, global batch {config.batch_size * world}, base lr "
        f"{base_lr:.3g} ({config.schedule}), {iters_per_epoch} iterations per epoch, epochs "
        f"{start_epoch}..{config.epochs - 1}, {workers} data worker(s) per process")

    epoch_run = _EpochRunner(config, device, rank, world, model, network, loader, sampler, loss_fn, optimizer,
                             scheduler, scaler, autocast_dtype, memory_format, iters_per_epoch, images_per_rank,
                             metrics_path, checkpoint_path, progress, say)
    last_epoch_loss, epoch = float("nan"), start_epoch - 1
    final_iteration = progress.iteration + iters_per_epoch * max(0, config.epochs - start_epoch)
    try:
        for epoch in range(start_epoch, config.epochs):
            last_epoch_loss, images_seen, skipped, elapsed, lr_used = epoch_run.epoch(epoch, final_iteration)
            validation = None
            if validate is not None and ((epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1):
                validation = _validate(validate, model, network, device, world)
            improved = validation is not None and validation["mAP"] is not None and (
                progress.best_map is None or validation["mAP"] > progress.best_map
            )
            if improved:
                progress.best_map = validation["mAP"]
            if main:
                with deferred_interrupt():  # Ctrl-C waits until this epoch's files are whole
                    _save_epoch(config, model, dataset, optimizer, scheduler, scaler, epoch, progress, improved,
                                checkpoint_path, best_path)
                    progress.saved = (str(checkpoint_path), epoch)
                    write_metrics(metrics_path, {
                        "type": "epoch", "epoch": epoch, "iteration": progress.iteration,
                        "loss": _finite(last_epoch_loss), "lr": _finite(lr_used),  # the epoch's last iteration's
                        "images": images_seen, "skipped_images": skipped, "seconds": round(elapsed, 3),
                        "images_per_second": round(images_seen / elapsed, 3) if elapsed > 0 else None,
                    })
                    if validation is not None:
                        write_metrics(metrics_path, {"type": "validation", "epoch": epoch,
                                                     "iteration": progress.iteration, **validation, "best": improved})
                if validation is not None:
                    say(f"epoch {epoch} validation: mAP {validation['mAP']}" + (" (best so far)" if improved else ""))
                say(f"epoch {epoch} done: mean loss {last_epoch_loss:.4f}, {images_seen} images in {elapsed:.1f} s; "
                    f"saved {checkpoint_path}" + (f" and {best_path.name}" if improved else ""))
            else:
                progress.saved = (str(checkpoint_path), epoch)
            distributed.barrier()  # nobody starts the next epoch (or returns) before the checkpoint is on disk
    except KeyboardInterrupt:
        saved = progress.saved
        raise TrainingInterrupted(saved[0] if saved else None, saved[1] if saved else None) from None
    if main and progress.skipped:
        shown = list(progress.skipped.items())[:5]
        more = f" ... and {len(progress.skipped) - 5} more" if len(progress.skipped) > 5 else ""
        say(f"skipped {len(progress.skipped)} unusable image(s): " + "; ".join(r for _, r in shown) + more)
    return {
        "model": model.spec.name,
        "epochs_run": max(0, config.epochs - start_epoch),
        "epoch": epoch,
        "iterations": progress.iteration,
        "final_loss": last_epoch_loss,
        "checkpoint": str(checkpoint_path),
        "metrics": str(metrics_path),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "skipped_images": epoch_run.skipped_total,
        "skipped_files": [{"file": f, "error": r} for f, r in progress.skipped.items()],
        "dataset_stats": dict(dataset.stats),
        "resumed_from_epoch": resumed_from,
        "init": init,
        "best_map": progress.best_map,
        "world_size": world,
        "swept": [str(p) for p in swept],
    }


class _WorkerInit:
    """DataLoader ``worker_init_fn``: a forked worker lets go of the output folder's lock (see RunFolder)."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        self.folder.forget_in_child()


def _restore(path: pathlib.Path, model: Detector, dataset: CocoDetectionDataset, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: Any, base_lr: float, factor: Callable[[int], float],
             progress: _Progress) -> int:
    """Load ``last.pt`` to continue from it; returns the epoch to start at and fills ``progress``."""
    state = read_training_state(path, model.spec.name)
    if state["class_names"] != dataset.class_names or state["category_ids"] != dataset.category_ids:
        raise ValueError(f"{path}: its classes {state['class_names']} differ from the dataset's "
                         f"{dataset.class_names}; use another out_dir or resume=False")
    load_weights(model, state["state_dict"], str(path), get_entry(model.spec.name), new_heads=False)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise InvalidCheckpointError(f"checkpoint {str(path)!r}: its optimizer state does not fit this run "
                                     f"({type(exc).__name__}: {why})") from None
    # The saved rate was computed with the saved run's schedule, which follows its epoch count; a resumed run with
    # more epochs has another, so the rate of the next iteration is recomputed from this run's base rate and
    # schedule at the saved iteration.
    scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    scheduler.lr_lambdas = [factor for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    progress.iteration, progress.best_map = state["iteration"], state.get("best_map")
    progress.saved = (str(path), state["epoch"])
    return state["epoch"] + 1


def _validate(validate: Callable[[nn.Module], Any], model: Detector, network: nn.Module, device: torch.device,
              world: int) -> dict[str, Any]:
    """Run ``validate`` on every process (the sharded evaluation needs them all); rank 0's record, on all."""
    network.eval()
    problem: BaseException | None = None
    record = None
    try:
        with torch.no_grad():
            record = _validation_record(validate(model))
    except Exception as exc:  # every rank must reach the check below, or the others would wait for it
        problem = exc
    finally:
        network.train()
    if not distributed.all_ok(problem is None, device if device.type == "cuda" else None):
        raise problem or RuntimeError("validation failed on another process (see its message)")
    return distributed.broadcast_from_main(record) if world > 1 else record


def _save_epoch(config: TrainConfig, model: Detector, dataset: CocoDetectionDataset, optimizer: Any, scheduler: Any,
                scaler: Any, epoch: int, progress: _Progress, improved: bool, checkpoint_path: pathlib.Path,
                best_path: pathlib.Path) -> None:
    state = {
        "format": TRAIN_FORMAT,
        "model": model.spec.name,
        "state_dict": model.state_dict(),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "category_ids": list(dataset.category_ids),
        "preprocessing": _preprocessing(model.spec),
        "epoch": epoch,
        "iteration": progress.iteration,
        "best_map": progress.best_map,
        "config": _plain_config(config),
    }
    if improved:
        # Written before last.pt, so that a last.pt naming a best mAP always has its best.pt on disk.
        save_checkpoint(state, best_path)
    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict())
    save_checkpoint(state, checkpoint_path)


class _EpochRunner:
    """One epoch of optimisation steps, with its logging, the NaN stop and the bad-image rule."""

    def __init__(self, config: TrainConfig, device: torch.device, rank: int, world: int, model: Detector,
                 network: nn.Module, loader: Any, sampler: Any, loss_fn: SSDLoss, optimizer: Any, scheduler: Any,
                 scaler: Any, autocast_dtype: torch.dtype | None, memory_format: torch.memory_format,
                 iters_per_epoch: int, images_per_rank: int, metrics_path: pathlib.Path,
                 checkpoint_path: pathlib.Path, progress: _Progress, say: Callable[[str], None]) -> None:
        self.config, self.device, self.rank, self.world = config, device, rank, world
        self.model, self.network, self.loader, self.sampler = model, network, loader, sampler
        self.loss_fn, self.optimizer, self.scheduler, self.scaler = loss_fn, optimizer, scheduler, scaler
        self.autocast_dtype, self.memory_format = autocast_dtype, memory_format
        self.iters_per_epoch, self.images_per_rank = iters_per_epoch, images_per_rank
        self.metrics_path, self.checkpoint_path = metrics_path, checkpoint_path
        self.progress, self.say = progress, say
        self.first_iteration = progress.iteration + 1
        self.skipped_total = 0

    def epoch(self, epoch: int, final_iteration: int) -> tuple[float, int, int, float, float]:
        """Train one epoch; returns its mean loss, images trained on and skipped (over all processes), seconds and
        the rate of its last iteration."""
        config, progress = self.config, self.progress
        main = self.rank == 0
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.network.train()
        started = window_start = time.perf_counter()
        loss_sum, batches, images_seen, skipped, lr_used, window_images = 0.0, 0, 0, 0, float("nan"), 0
        for step, batch in enumerate(self.loader):
            if step >= self.iters_per_epoch:
                break
            if batch.bad:
                if not config.skip_bad_images:
                    raise _bad_image_error(batch.bad[0])
                for bad in batch.bad:
                    progress.skipped.setdefault(bad.path, bad.reason)
                skipped += len(batch.bad)
            if len(batch.targets) < 2:
                # Under DDP every rank must still take part in the step, so a batch cannot be skipped there.
                if self.world > 1:
                    raise RuntimeError(f"epoch {epoch}, step {step}: fewer than 2 images of rank {self.rank}'s batch "
                                       "were readable; distributed training cannot skip a batch")
                # A lone image cannot be trained on either (BatchNorm): it is counted with the skipped ones.
                skipped += len(batch.targets)
                continue
            value, lr_used = self._step(batch, epoch)
            loss_sum += value
            batches += 1
            images_seen += len(batch.targets)
            window_images += len(batch.targets) * self.world
            it = progress.iteration
            if main and (it % config.log_every == 0 or it in (self.first_iteration, final_iteration)):
                now = time.perf_counter()
                write_metrics(self.metrics_path, {
                    "type": "iteration", "epoch": epoch, "iteration": it, "loss": value, "lr": lr_used,
                    "images_per_second": round(window_images / (now - window_start), 3),
                })
                self.say(f"epoch {epoch} iteration {it}: loss {value:.4f}, lr {lr_used:.3g}")
                window_start, window_images = now, 0
        elapsed = time.perf_counter() - started
        images_seen, skipped = (int(v) for v in _reduce([images_seen, skipped], self.device, self.world))
        self.skipped_total += skipped
        return (loss_sum / batches if batches else float("nan")), images_seen, skipped, elapsed, lr_used

    def _step(self, batch: TrainBatch, epoch: int) -> tuple[float, float]:
        device = self.device
        images = batch.images.to(device, non_blocking=True, memory_format=self.memory_format)
        gloc = batch.gloc.to(device, non_blocking=True)
        glabels = batch.glabels.to(device, non_blocking=True)
        with _autocast(device, self.autocast_dtype):
            locs, confs = self.network(images)
        loss = self.loss_fn(locs, confs, gloc, glabels)
        # The mean over the processes: every rank sees the same value, so a NaN stops them all together.
        value = _reduce([float(loss.detach())], device, self.world)[0] / self.world
        if not math.isfinite(value):
            saved = self.progress.saved
            last_good = f"{saved[0]} (epoch {saved[1]})" if saved is not None else "none (no epoch finished)"
            raise NonFiniteLossError(
                f"loss became {value} at epoch {epoch}, iteration {self.progress.iteration}; training stopped. Last "
                f"good checkpoint: {last_good}. Try a lower lr, a longer warmup or precision='fp32'."
            )
        lr_used = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.progress.iteration += 1
        return value, lr_used
