"""NVIDIA's SSD300 checkpoints: their training files (``{'model': ..., 'optimizer': ..., 'epoch': ...}``, with or
without DistributedDataParallel's ``module.`` prefixes) and bare state dicts, already under this package's key names.

The published table is in :mod:`ssd.models.ssd300_resnet50` (``NVIDIA_WEIGHTS``); files are read through
:func:`ssd.weights.formats.read_checkpoint`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.spec import ClassSpec, DetectorSpec
from .formats import describe, tensors
from .loader import InvalidCheckpointError

__all__ = ["LOAD_GLOBALS", "to_state_dict"]

# NVIDIA's training checkpoints carry a MultiStepLR state whose milestones are a Counter, which the safe loader
# always accepts: nothing else is needed.
LOAD_GLOBALS: tuple = ()


def to_state_dict(obj: object, source: str, spec: DetectorSpec) -> tuple[dict[str, torch.Tensor], ClassSpec | None]:
    """The tensors of an NVIDIA SSD300 checkpoint object; such files record no class names."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected a state dict of {spec.name} (bare, or under 'model' as NVIDIA's "
            f"training saves it), got {describe(obj)}"
        )
    return tensors(obj, source), None
