"""One epoch of optimisation steps (:class:`EpochRunner`): mixed precision, the NaN stop, the bad-image rule and
the iteration records of ``metrics.jsonl``, with the progress bar of :class:`~ssd.training.reporting.Reporter`."""
from __future__ import annotations

import contextlib
import math
import pathlib
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.coco_format import BadImage
from ..io.images import ImageLoadError
from ..models.base import Detector
from .batches import TrainBatch
from .checkpointing import RunState
from .loss import SSDLoss
from .outputs import write_metrics
from .reporting import Reporter

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["EpochRunner", "NonFiniteLossError", "autocast", "bad_image_error", "grad_scaler", "reduce_sum"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says where and which checkpoint is the last good one."""


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    # A disabled autocast still validates its dtype (and warns on CPU for float32), so fp32 gets no context at all.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool) -> Any:
    return torch.amp.GradScaler(device.type, enabled=enabled)


def reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """Sums over the processes (the values themselves in one process)."""
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def bad_image_error(bad: BadImage) -> ImageLoadError:
    return ImageLoadError(f"{bad.reason}; skip_bad_images (--skip-bad-images) trains without such images")


class EpochRunner:
    """One epoch of optimisation steps, with its logging, the NaN stop and the bad-image rule."""

    def __init__(self, config: TrainConfig, device: torch.device, rank: int, world: int, model: Detector,
                 network: nn.Module, loader: Any, sampler: Any, loss_fn: SSDLoss, optimizer: Any, scheduler: Any,
                 scaler: Any, autocast_dtype: torch.dtype | None, memory_format: torch.memory_format,
                 iters_per_epoch: int, images_per_rank: int, metrics_path: pathlib.Path,
                 checkpoint_path: pathlib.Path, progress: RunState, reporter: Reporter) -> None:
        self.config, self.device, self.rank, self.world = config, device, rank, world
        self.model, self.network, self.loader, self.sampler = model, network, loader, sampler
        self.loss_fn, self.optimizer, self.scheduler, self.scaler = loss_fn, optimizer, scheduler, scaler
        self.autocast_dtype, self.memory_format = autocast_dtype, memory_format
        self.iters_per_epoch, self.images_per_rank = iters_per_epoch, images_per_rank
        self.metrics_path, self.checkpoint_path = metrics_path, checkpoint_path
        self.progress, self.reporter = progress, reporter
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
        self.reporter.start_epoch(epoch, config.epochs, self.iters_per_epoch)
        started = window_start = time.perf_counter()
        loss_sum, batches, images_seen, skipped, lr_used, window_images = 0.0, 0, 0, 0, float("nan"), 0
        for step, batch in enumerate(self.loader):
            if step >= self.iters_per_epoch:
                break
            if batch.bad:
                if not config.skip_bad_images:
                    raise bad_image_error(batch.bad[0])
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
            if not main:
                continue
            logged = it % config.log_every == 0 or it in (self.first_iteration, final_iteration)
            now = time.perf_counter()
            if logged:
                write_metrics(self.metrics_path, {
                    "type": "iteration", "epoch": epoch, "iteration": it, "loss": value, "lr": lr_used,
                    "images_per_second": round(window_images / (now - window_start), 3),
                })
                if not self.reporter.progress:  # the bar shows these; without it, a line now and then
                    self.reporter.say(f"epoch {epoch} iteration {it}: loss {value:.4f}, lr {lr_used:.3g}")
                window_start, window_images = now, 0
            self.reporter.iteration(it, value, lr_used, images_seen * self.world / (now - started), logged)
        self.reporter.end_epoch()
        elapsed = time.perf_counter() - started
        images_seen, skipped = (int(v) for v in reduce_sum([images_seen, skipped], self.device, self.world))
        self.skipped_total += skipped
        return (loss_sum / batches if batches else float("nan")), images_seen, skipped, elapsed, lr_used

    def _step(self, batch: TrainBatch, epoch: int) -> tuple[float, float]:
        device = self.device
        images = batch.images.to(device, non_blocking=True, memory_format=self.memory_format)
        gloc = batch.gloc.to(device, non_blocking=True)
        glabels = batch.glabels.to(device, non_blocking=True)
        with autocast(device, self.autocast_dtype):
            locs, confs = self.network(images)
        loss = self.loss_fn(locs, confs, gloc, glabels)
        # The mean over the processes: every rank sees the same value, so a NaN stops them all together.
        value = reduce_sum([float(loss.detach())], device, self.world)[0] / self.world
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

