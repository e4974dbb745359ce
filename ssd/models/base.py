"""The base class of every network here: an ``nn.Module`` that carries its :class:`DetectorSpec`."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .spec import DetectorSpec


class Detector(nn.Module):
    """An SSD network: ``forward(x)`` gives raw ``(locs N x 4 x A, confs N x C x A)``; ``spec`` says the rest.

    Subclasses build their layers from ``spec``; they know nothing of images, files or threads. ``detect`` is
    the one-call pipeline of :mod:`ssd.inference`, looked up when called so that this module never imports it.
    """

    spec: DetectorSpec

    def __init__(self, spec: DetectorSpec) -> None:
        super().__init__()
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec: expected a DetectorSpec, got {type(spec).__name__}")
        self.spec = spec
        self.checkpoint_source: str | None = None

    @property
    def names(self) -> list[str]:
        """The class names: label ``k`` is ``names[k - 1]`` (label 0 is background)."""
        return list(self.spec.classes.names)

    @property
    def meta(self) -> dict[str, Any]:
        """What this model is: family, input size, classes, parameter count, checkpoint and published accuracy."""
        return {
            "model": self.spec.name,
            "description": self.spec.description,
            "input_size": self.spec.input.size,
            "num_classes": self.spec.num_classes,
            "parameters": sum(p.numel() for p in self.parameters()),
            "checkpoint": self.checkpoint_source,
            **self.spec.meta,
        }

    def detect(self, images: Any, **kwargs: Any):
        """Detect objects in ``images``; see :func:`ssd.inference.detect` for the arguments."""
        from ..inference.detect import detect

        return detect(self, images, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
