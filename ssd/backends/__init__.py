"""Backends: one protocol for every runtime of a detector (PyTorch, onnxruntime, OpenVINO), and ``ssd.load``.

A backend has a ``spec``, ``names``, a ``device`` and an ``outputs`` kind, and turns a preprocessed batch into raw
outputs of that kind (``"offsets"``, ``"decoded"`` or ``"nms"``; see :mod:`ssd.backends.base`). ``ssd.detect``,
``ssd.evaluate``, the command line's JSON and JSON Lines writers and torchrun runs take any backend (a detector
network is wrapped in a :class:`PyTorchBackend`) and return the same results.

Importing this package needs only torch; onnxruntime and openvino are imported when a file is loaded.
"""
from .base import OUTPUT_KINDS, Backend, BackendError, as_backend, is_backend, is_detector, spec_of
from .exported import EXPORTED_SUFFIXES, RUNTIMES, ExportedBackend, OnnxBackend, OpenVinoBackend, load_exported
from .loading import load
from .pytorch import PyTorchBackend

__all__ = ["EXPORTED_SUFFIXES", "OUTPUT_KINDS", "RUNTIMES", "Backend", "BackendError", "ExportedBackend",
           "OnnxBackend", "OpenVinoBackend", "PyTorchBackend", "as_backend", "is_backend", "is_detector", "load",
           "load_exported", "spec_of"]
