"""The training loop of every registered model, following NVIDIA's recipe (DeepLearningExamples,
PyTorch/Detection/SSD) by default.

Recipe: SGD with momentum 0.9; learning rate ``2.6e-3 * batch_size / 32`` (NVIDIA's linear scaling rule); a linear
warmup from 0 over the first 300 iterations (or 10% of the run when that is fewer); weight decay 5e-4 on the weights
of convolutions only (none on BatchNorm parameters or biases); the rate divided by 10 at epochs 43 and 54 of 65,
scaled to the run's length (or a cosine decay, :mod:`ssd.training.schedule`). Mixed precision with autocast (bf16,
or fp16 with a GradScaler), channels_last memory format. The model is built from the registry
(``TrainConfig.model``, any name of :func:`ssd.registry.list_models`) for the dataset's classes; targets, loss and
augmentation read its spec (default boxes, box coder variances, matching threshold, input size, resize rule and
normalisation). mmdetection's models train with this recipe too, not with mmdetection's own schedule and
augmentation.

Before the first iteration the data is checked (:mod:`ssd.training.checks`): the training annotations and images,
and the validation set (annotations, images, and its categories against the model's classes), each summarised in
one line; a bad validation set stops the run before it starts. Unreadable images travel from the DataLoader's
workers as :class:`ssd.data.coco_format.BadImage` markers: skipped and reported (``skip_bad_images``), or one error
naming the file, raised in the main process.

Outputs in ``out_dir`` (held by one run at a time; see :mod:`ssd.training.outputs`): ``last.pt`` written
atomically after every epoch (loadable with ``weights_only=True``; format ``ssd-train/2``: the model's name, its
state dict, the class names and category ids, the preprocessing of its spec, and the optimizer, scheduler, scaler,
epoch and iteration for resuming); ``best.pt`` (the same without the optimizer state) whenever validation mAP
improves; ``metrics.jsonl``, one JSON object per line, each with a ``type``: ``start`` (once per call: world
size, global batch, base rate, the schedule, how many tensors came from the starting checkpoint, the data
summaries), ``iteration`` (every ``log_every`` iterations, and always the first and the last: epoch, iteration,
loss, lr, images_per_second), ``epoch`` (one per epoch), ``validation`` (mAP, AP50, the 12 COCO stats and the AP of
each class) and ``stop`` (an early stop by ``patience``, with its reason); and the views of the metrics that
:mod:`ssd.training.reporting` rebuilds after every epoch: ``results.csv`` (one row per epoch) and ``results.png``
(loss, rate, mAP and AP50 against the epoch), with ``tensorboard/`` event files when asked. A resumed run first
drops the lines a killed run wrote after its last ``last.pt``, so no iteration appears twice. A non-finite loss
stops the run with :class:`NonFiniteLossError`, naming the last checkpoint on disk (if any); a full disk stops it
with :class:`~ssd.training.outputs.RunOutputError`, the previous ``last.pt`` intact; Ctrl-C finishes the files
being written and raises :class:`TrainingInterrupted`.

The pieces live in modules named by what they hold: :mod:`~ssd.training.config` (:class:`TrainConfig`),
:mod:`~ssd.training.batches` (the data feed), :mod:`~ssd.training.epoch` (the optimisation steps),
:mod:`~ssd.training.checkpointing` (``last.pt``/``best.pt``, starting weights, resuming),
:mod:`~ssd.training.reporting` (progress bar, epoch lines, result files) and :mod:`~ssd.training.schedule`; this
module runs them.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA), each process reads its share of the images through a DistributedSampler, the default rate follows the
global batch (``2.6e-3 * batch_size * world_size / 32``), every process validates its share of the validation
images (:func:`ssd.evaluation.evaluate` shards them), and only rank 0 writes files; checkpoints hold the unwrapped
model's state dict, so they load like single-process ones.
"""
from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data.coco_format import CocoDetectionDataset
from ..models.base import Detector
from ..registry import get_entry
from .augment import SSDAugmentation
from .batches import EncodingCollate, ReportedDataset, TrainBatch, WorkerInit, default_workers
from .checkpointing import (
    RunState,
    initialise_from,
    planned_schedule,
    read_resume_state,
    restore,
    resume_path,
    save_epoch,
)
from .checks import ValidationSet, check_training_images, load_validation_set, training_summary
from .config import TrainConfig, check_config, resolve_device
from .epoch import EpochRunner, NonFiniteLossError, grad_scaler
from .loss import SSDLoss
from .outputs import RunFolder, deferred_interrupt, trim_metrics, write_metrics
from .reporting import Reporter, epoch_line, finite, validation_record
from .schedule import SchedulePlan, default_warmup, lr_factor

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

class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`train` after it finished writing the files it was writing.

    ``checkpoint`` is the last ``last.pt`` on disk (None if no epoch was saved) and ``epoch`` its epoch.
    """

    def __init__(self, checkpoint: str | None, epoch: int | None) -> None:
        super().__init__(checkpoint, epoch)
        self.checkpoint = checkpoint
        self.epoch = epoch


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


def _evaluator(validation: ValidationSet, batch_size: int, workers: int,
               precision: str) -> Callable[[nn.Module], dict[str, Any]]:
    """A ``validate`` callable scoring the model on the checked validation set with the sharded evaluation."""

    def validate(model: nn.Module) -> dict[str, Any]:
        from ..evaluation import evaluate

        device = next(model.parameters()).device
        result = evaluate(model, validation.images, validation.coco, batch_size=batch_size, workers=workers,
                          device=device, precision=precision, progress=False, verbose=False)
        stats = [float(v) for v in result.stats]
        # Per-class AP comes from COCOeval's precision array, computed once by the evaluation (EvalResult).
        return {"mAP": stats[0], "stats": stats, "per_class_ap": dict(result.per_class_ap)}

    return validate


def _validate(validate: Callable[[nn.Module], Any], model: Detector, network: nn.Module, device: torch.device,
              world: int) -> dict[str, Any]:
    """Run ``validate`` on every process (the sharded evaluation needs them all); rank 0's record, on all."""
    network.eval()
    problem: BaseException | None = None
    record = None
    try:
        with torch.no_grad():
            record = validation_record(validate(model))
    except Exception as exc:  # every rank must reach the check below, or the others would wait for it
        problem = exc
    finally:
        network.train()
    if not distributed.all_ok(problem is None, device if device.type == "cuda" else None):
        raise problem or RuntimeError("validation failed on another process (see its message)")
    return distributed.broadcast_from_main(record) if world > 1 else record


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
    config = check_config(config)
    device = resolve_device(config)
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
    resume_from = resume_path(config, checkpoint_path)

    torch.manual_seed(config.seed)
    # The data first: every problem of the training and validation sets is found before anything is written.
    dataset = CocoDetectionDataset(config.annotations, config.images, skip_bad_images=config.skip_bad_images)
    if len(dataset) == 0:
        raise ValueError(f"annotations: expected at least one image in {os.fspath(config.annotations)!r}, got none")
    missing = check_training_images(dataset, config.skip_bad_images)
    # The dataset's names and category ids travel with the model, so detect and evaluate speak them.
    model = entry.network(entry.spec.with_classes(dataset.classes))
    dataset.transform = SSDAugmentation(model.spec.input, augment=config.augment, zoom_out=config.zoom_out,
                                        scale_jitter=config.scale_jitter)
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


def _judge(validation: Mapping[str, Any] | None, epoch: int, progress: RunState) -> bool:
    """Whether ``validation`` improved the best mAP; updates the best and the count of validations since it."""
    if validation is None:
        return False
    improved = validation["mAP"] is not None and (progress.best_map is None or validation["mAP"] > progress.best_map)
    if improved:
        progress.best_map, progress.best_epoch, progress.stale_validations = validation["mAP"], epoch, 0
    else:
        progress.stale_validations += 1
    return improved


def _early_stop(patience: int | None, validation: Mapping[str, Any] | None, epoch: int,
                progress: RunState) -> str | None:
    """The reason to stop after ``epoch`` (None: go on): ``patience`` validations in a row without a better mAP."""
    if patience is None or validation is None or progress.stale_validations < patience:
        return None
    best = "no mAP yet" if progress.best_map is None else (
        f"the best, mAP {progress.best_map:.4f} at epoch {progress.best_epoch}, is in best.pt")
    return (f"stopped early after epoch {epoch}: no better validation mAP in the last {progress.stale_validations} "
            f"validation(s) (patience {patience}); {best}")


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
        ReportedDataset(dataset),
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
        worker_init_fn=WorkerInit(folder) if workers > 0 else None,
    )
    iters_per_epoch = len(loader)
    if config.max_iters_per_epoch is not None:
        iters_per_epoch = min(iters_per_epoch, config.max_iters_per_epoch)

    init = None
    if config.init_checkpoint is not None and resume_from is None:
        init = initialise_from(model, config.init_checkpoint, config.init_source)
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
    total_iters = iters_per_epoch * config.epochs
    plan = SchedulePlan(config.epochs, iters_per_epoch,
                        config.warmup_iters if config.warmup_iters is not None else default_warmup(total_iters),
                        config.epoch_milestones(), config.schedule, config.gamma)
    state = None
    if resume_from is not None:
        # The run continues the schedule it started with (saved in its last.pt), whatever epochs it is given now.
        state = read_resume_state(resume_from, model, dataset)
        plan = planned_schedule(state, resume_from, plan)
        if plan.schedule == "cosine" and config.epochs > plan.epochs:
            raise ValueError(f"epochs: the run in {os.fspath(resume_from)!r} follows a cosine schedule planned for "
                             f"{plan.epochs} epochs, which ends at rate 0; expected epochs <= {plan.epochs} to "
                             f"resume it, got {config.epochs} (to train longer, start a new run from it with "
                             f"init_checkpoint / --checkpoint)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
    scaler = grad_scaler(device, enabled=config.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    progress = RunState()
    start_epoch, resumed_from = 0, None
    if resume_from is not None:
        start_epoch = restore(state, resume_from, model, optimizer, scheduler, scaler, base_lr, plan, progress)
        resumed_from = start_epoch - 1
        # Resuming re-seeds from the epoch so a resumed run does not replay the first epochs' order and crops.
        torch.manual_seed(config.seed + start_epoch + (rank if world > 1 else 0))
        loader.generator.manual_seed(config.seed + start_epoch)
        say(f"resumed from {resume_from}: epoch {start_epoch}, iteration {progress.iteration}")
        if plan.epochs != config.epochs:
            past = (f"; past epoch {plan.epochs - 1} the rate stays at its last value" if config.epochs > plan.epochs
                    else "")
            say(f"the resumed run continues its {plan.describe()}: epochs={config.epochs} only moves where it "
                f"stops{past}")

    network: nn.Module = model
    if world > 1:
        if config.sync_bn:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        network = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )

    reporter = Reporter(out_dir, main=main, log=config.log, progress=config.progress,
                        tensorboard=config.tensorboard and start_epoch < config.epochs, fresh=resume_from is None,
                        title=f"{model.spec.name}: {out_dir.name}")
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
            "base_lr": base_lr, "schedule": plan.schedule, "milestones": list(plan.milestones),
            "warmup_iters": plan.warmup_iters, "planned_epochs": plan.epochs,
            "iterations_per_epoch": iters_per_epoch, "resumed_from_epoch": resumed_from, "init": init,
            "precision": config.precision, "device": str(device), "workers": workers, "data": summaries,
        })
    say(f"training {model.spec.name} on {world} x {device}, global batch {config.batch_size * world}, base lr "
        f"{base_lr:.3g} ({plan.describe()}), {iters_per_epoch} iterations per epoch, epochs "
        f"{start_epoch}..{config.epochs - 1}, {workers} data worker(s) per process")

    epoch_run = EpochRunner(config, device, rank, world, model, network, loader, sampler, loss_fn, optimizer,
                            scheduler, scaler, autocast_dtype, memory_format, iters_per_epoch, images_per_rank,
                            metrics_path, checkpoint_path, progress, reporter)
    last_epoch_loss, epoch = float("nan"), start_epoch - 1
    final_iteration = progress.iteration + iters_per_epoch * max(0, config.epochs - start_epoch)
    run_started, stopped, reported = time.perf_counter(), None, 0.0
    try:
        for epoch in range(start_epoch, config.epochs):
            epoch_started = time.perf_counter()
            last_epoch_loss, images_seen, skipped, elapsed, lr_used = epoch_run.epoch(epoch, final_iteration)
            validation = None
            if validate is not None and ((epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1):
                validation = _validate(validate, model, network, device, world)
            improved = _judge(validation, epoch, progress)
            stopped = _early_stop(config.patience, validation, epoch, progress)
            if main:
                with deferred_interrupt():  # Ctrl-C waits until this epoch's files are whole
                    save_epoch(config, model, dataset, optimizer, scheduler, scaler, epoch, progress, plan, improved,
                               checkpoint_path, best_path)
                    progress.saved = (str(checkpoint_path), epoch)
                    write_metrics(metrics_path, {
                        "type": "epoch", "epoch": epoch, "iteration": progress.iteration,
                        "loss": finite(last_epoch_loss), "lr": finite(lr_used),  # the epoch's last iteration's
                        "images": images_seen, "skipped_images": skipped, "seconds": round(elapsed, 3),
                        "images_per_second": round(images_seen / elapsed, 3) if elapsed > 0 else None,
                        # What the progress bar, epoch line and result files cost since the last epoch record.
                        "reporting_seconds": round(reporter.seconds - reported, 4),
                    })
                    reported = reporter.seconds
                    if validation is not None:
                        write_metrics(metrics_path, {"type": "validation", "epoch": epoch,
                                                     "iteration": progress.iteration, **validation, "best": improved})
                    if stopped is not None:
                        write_metrics(metrics_path, {"type": "stop", "epoch": epoch, "iteration": progress.iteration,
                                                     "reason": stopped})
                    # The remaining epochs at the mean pace so far (training and validation together).
                    done_epochs = epoch - start_epoch + 1
                    eta = (time.perf_counter() - run_started) / done_epochs * (config.epochs - 1 - epoch)
                    saved = checkpoint_path.name + (f" and {best_path.name}" if improved else "")
                    line = epoch_line(epoch, config.epochs - 1 if stopped is None else epoch, last_epoch_loss,
                                      time.perf_counter() - epoch_started, validation, improved, eta, saved)
                    reporter.epoch_done(line, last_epoch_loss, validation, progress.iteration, metrics_path)
                if stopped is not None:
                    say(stopped)
            else:
                progress.saved = (str(checkpoint_path), epoch)
            distributed.barrier()  # nobody starts the next epoch (or returns) before the checkpoint is on disk
            if stopped is not None:
                break
    except KeyboardInterrupt:
        saved = progress.saved
        raise TrainingInterrupted(saved[0] if saved else None, saved[1] if saved else None) from None
    finally:
        reporter.close()
    if main and progress.skipped:
        shown = list(progress.skipped.items())[:5]
        more = f" ... and {len(progress.skipped) - 5} more" if len(progress.skipped) > 5 else ""
        say(f"skipped {len(progress.skipped)} unusable image(s): " + "; ".join(r for _, r in shown) + more)
    return {
        "model": model.spec.name,
        "epochs_run": max(0, epoch + 1 - start_epoch),
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
        "best_epoch": progress.best_epoch,
        "stopped_early": stopped,
        "reporting_seconds": reporter.seconds,
        "reporting_seconds_per_epoch": list(reporter.epoch_seconds),
        "world_size": world,
        "swept": [str(p) for p in swept],
    }

