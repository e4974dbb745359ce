"""SSD object detectors: NVIDIA's SSD300 (ResNet-50) and mmdetection's SSD300, SSD512 and SSDLite, with the
pipelines around them (detection, evaluation, training, checkpoints, the command line).

The public API is small and loaded lazily, so that ``import ssd`` does not import torch (``ssd --version`` stays
fast): :func:`build_model` and :func:`list_models` (the registry), :func:`load` (a model name, an exported file or a
network in, a backend out), :func:`detect`, :func:`evaluate`, :func:`train`, :class:`Detections` /
:class:`DetectionBatch` (results), :class:`DetectorSpec` and :class:`DownloadError`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"  # read by pyproject.toml (setuptools' attr:), so the package and `ssd --version` agree

# Public name -> (module relative to this package, attribute).
_LAZY = {
    "build_model": (".registry", "build_model"),
    "list_models": (".registry", "list_models"),
    "load": (".backends", "load"),
    "detect": (".inference.detect", "detect"),
    "evaluate": (".evaluation", "evaluate"),
    "train": (".training.loop", "train"),
    "Detections": (".inference.detections", "Detections"),
    "DetectionBatch": (".inference.detections", "DetectionBatch"),
    "DetectorSpec": (".models.spec", "DetectorSpec"),
    "DownloadError": (".io.http", "DownloadError"),
}

__all__ = ["DetectionBatch", "Detections", "DetectorSpec", "DownloadError", "__version__", "build_model", "detect",
           "evaluate", "list_models", "load", "train"]


def __getattr__(name: str) -> Any:
    # PEP 562: the module is imported at first use of the name, then the value is kept like any global.
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
