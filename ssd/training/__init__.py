"""Training pieces for every detector, read from its spec: target encoding, the multibox loss, the training
augmentation and the training loop.

The names are imported on first use (PEP 562), so that ``import ssd.training`` costs nothing until a
name is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["SSDAugmentation", "SSDLoss", "encode_batch", "encode_targets", "train"]

_HOMES = {
    "SSDAugmentation": ".augment",
    "SSDLoss": ".loss",
    "encode_batch": ".targets",
    "encode_targets": ".targets",
    "train": ".loop",
}

if TYPE_CHECKING:
    from .augment import SSDAugmentation
    from .loop import train
    from .loss import SSDLoss
    from .targets import encode_batch, encode_targets


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
