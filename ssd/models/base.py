"""The base class of every network here: an ``nn.Module`` that carries its :class:`DetectorSpec`."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .entry import Weights
from .spec import ClassSpec, DetectorSpec

__all__ = ["Detector", "half_with_float_batchnorm", "with_num_classes"]


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
        # The published weights this model runs, set by ssd.registry.build_model; None for any other weights.
        self.published_weights: Weights | None = None

    @property
    def names(self) -> list[str]:
        """The class names, in label order. Labels are 1-based: label ``k`` (1..K) is ``names[k - 1]``, and label 0
        is the background, never a detection. Dataset category ids (COCO's 1..90 with gaps) are
        ``spec.classes.category_ids`` in the same order."""
        return list(self.spec.classes.names)

    @property
    def meta(self) -> dict[str, Any]:
        """What this model is: family, input size, classes, parameter count, checkpoint, and the published accuracy
        of its weights when it runs published weights with their own classes (never for other weights)."""
        meta = {
            "model": self.spec.name,
            "description": self.spec.description,
            "input_size": self.spec.input.size,
            "num_classes": self.spec.num_classes,
            "parameters": sum(p.numel() for p in self.parameters()),
            "checkpoint": self.checkpoint_source,
            **self.spec.meta,
        }
        weights = self.published_weights
        if weights is not None and weights.classes == self.spec.classes:
            meta.update(weights.meta, weights=weights.name)
        return meta

    def detect(self, images: Any, **kwargs: Any):
        """Detect objects in ``images``; see :func:`ssd.inference.detect` for the arguments."""
        from ..inference.detect import detect

        return detect(self, images, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def half_with_float_batchnorm(model: nn.Module) -> nn.Module:
    """Convert weights to float16 but keep BatchNorm in float32, as NVIDIA's entrypoint does.

    BatchNorm statistics lose too much in half precision, and cuDNN accepts half inputs with float32 BatchNorm.
    """
    model.half()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.float()
    return model


def with_num_classes(base: DetectorSpec, num_classes: int | None) -> DetectorSpec:
    """``base``, or a copy with ``num_classes`` (background included) numbered classes, for new heads."""
    if num_classes is None:
        return base
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected an integer >= 2 (classes plus background), got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2 (classes plus background), got {num_classes!r}")
    if num_classes == base.num_classes:
        return base
    return base.with_classes(ClassSpec.numbered(num_classes - 1))
