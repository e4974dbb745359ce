"""The PyTorch backend: a detector network run as its inference plan says."""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from .base import is_detector, local_spec
from .plan import channels_last_copy, plan_for, thread_plan, thread_tuner

__all__ = ["PyTorchBackend"]


class PyTorchBackend:
    """A detector network (``nn.Module`` with a spec, from any copy of this package) as a backend: ``outputs`` are
    ``"offsets"``, the network's ``(locs, confs)``.

    It owns the inference plan (:mod:`ssd.backends.plan`): the model's device and dtype are followed; ``precision``
    None keeps the weights' dtype, ``'fp32'`` needs a float32 model, ``'bf16'``/``'fp16'`` autocast a float32 model;
    a contiguous float32 model on the CPU runs as a cached channels_last copy (remade when its weights change). On
    the CPU the forward pass runs on ``threads`` intra-op threads (default: tuned by timing between the cores left
    by the image loaders, :func:`~ssd.backends.plan.thread_plan`, and all the cores torch may use,
    :class:`~ssd.backends.plan.ThreadTuner`; ``SSD_NUM_THREADS`` fixes it). Batches run under
    ``torch.inference_mode()``.

    The model is never modified: a model in training mode runs as an evaluation-mode copy made here. Several
    threads may call one backend.
    """

    outputs = "offsets"
    nms_recipe = None
    runtime = "pytorch"

    def __init__(self, model: torch.nn.Module, precision: str | None = None, *, threads: int | None = None) -> None:
        if not is_detector(model):
            raise TypeError(f"model: expected a detector of this library (an nn.Module with a .spec), got "
                            f"{type(model).__name__}")
        self.spec = local_spec(model.spec, "model.spec")
        if model.training:
            # Switching the caller's model to eval mode and back would race with other threads and with training.
            model = copy.deepcopy(model).eval()
        self.model = model
        self.precision = precision
        self.plan = plan_for(model, precision, stacklevel=4)
        self._threads = thread_plan(intra_op=threads) if self.plan.device.type == "cpu" else None
        # Without a thread count given, the forward pass's is tuned by timing (ThreadTuner): on a small CPU no
        # fixed count is right both when the machine is quiet and when it is shared.
        self._explicit_threads = threads is not None
        self.tuner = thread_tuner(self._threads, threads is not None) if self._threads is not None else None

    @property
    def names(self) -> list[str]:
        return list(self.spec.classes.names)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def input_dtype(self) -> torch.dtype:
        return self.plan.input_dtype

    @property
    def memory_format(self) -> torch.memory_format:
        return self.plan.memory_format

    @property
    def load_workers(self) -> int | None:
        """Image-loading threads to run beside the forward pass (None on a GPU: the library's default)."""
        return self._threads.load_workers if self._threads is not None else None

    @property
    def source(self) -> str | None:
        """The checkpoint the model's weights came from, when it was built by this library."""
        return getattr(self.model, "checkpoint_source", None)

    def __repr__(self) -> str:
        return f"PyTorchBackend({self.spec.name!r}, device={str(self.device)!r}, precision={self.precision!r})"

    def _network(self) -> torch.nn.Module:
        if self.plan.runner is None:
            return self.model
        # The copy is cached per model and remade when the weights change, so a backend never runs stale weights.
        return channels_last_copy(self.model)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(locs, confs)`` for a preprocessed batch on :attr:`device`, in :attr:`input_dtype`."""
        if self.tuner is not None:
            threads = self.tuner.forward(int(batch.shape[0]))
        elif self._threads is not None:
            threads = self._threads.forward()
        else:
            threads = contextlib.nullcontext()
        with torch.inference_mode(), self.plan.autocast(), threads:
            return self._network()(batch)

    def to(self, device: Any) -> PyTorchBackend:
        """This backend on ``device``: itself when it is there, else a backend of a copy of the model moved there
        (the caller's model is not moved)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        threads = self._threads.intra_op if self._threads is not None and self._explicit_threads else None
        return PyTorchBackend(copy.deepcopy(self.model).to(device), self.precision, threads=threads)
