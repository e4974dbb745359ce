"""SSD object detectors: NVIDIA's SSD300 (ResNet-50), mmdetection's SSD300, SSD512 and SSDLite, and torchvision's
SSD300 and SSDLite, with the
pipelines around them (detection, evaluation, training, checkpoints, the command line).

The public API is small and loaded lazily, so that ``import ssd`` does not import torch (``ssd --version`` stays
fast): :func:`build_model` and :func:`list_models` (the registry), :func:`load` (a model name, an exported file or a
network in, a backend out), :func:`detect`, :func:`evaluate`, :func:`train`, :mod:`export` (the subpackage of
writers: ``ssd.export.export_onnx(model, "model.onnx")``; a package, not a function, because the name is taken by
it), :class:`Detections` /
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
           "evaluate", "export", "list_models", "load", "train"]


def __getattr__(name: str) -> Any:
    # PEP 562: the module is imported at first use of the name, then the value is kept like any global.
    if name == "export":  # the subpackage itself; importing it binds the name here
        return importlib.import_module(".export", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "export"})
