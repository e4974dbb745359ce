"""INT8 OpenVINO IR: NNCF's post-training quantization of the exported graph, calibrated on the user's images.

Only the network's statistics are gathered here: the calibration images go through the model's own detect
preprocessing (:func:`ssd.transforms.preprocess_for_detection`), so the quantization ranges are those the file sees
when ``detect``/``evaluate`` run it. The written IR runs through :class:`~ssd.backends.OpenVinoBackend` like any
other (its metadata is the float model's).
"""
from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backends.base import local_spec
from ..io.images import is_image_file, load_uint8
from ..models.spec import DetectorSpec, check_int
from .metadata import require
from .onnx import export_openvino

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "MIN_CALIBRATION_IMAGES", "calibration_files", "export_openvino_int8"]

# NNCF's default statistics subset is 300 samples; fewer than 100 leaves the activation ranges of the small
# feature maps (a few dozen values per image) to a handful of outliers, so smaller sets are refused.
MIN_CALIBRATION_IMAGES = 100
DEFAULT_CALIBRATION_IMAGES = 300


def calibration_files(folder: str | os.PathLike, count: int = DEFAULT_CALIBRATION_IMAGES,
                      minimum: int = MIN_CALIBRATION_IMAGES) -> list[pathlib.Path]:
    """``count`` image files of ``folder`` (searched recursively, sorted by path), spread evenly over the sorted list
    when it holds more; all of them when it holds between ``minimum`` and ``count``.

    Raises:
        ValueError: ``folder`` is not a folder, or it holds fewer than ``minimum`` image files.
    """
    count = check_int("count", count, 1)
    minimum = check_int("minimum", minimum, 1)
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise ValueError(f"calibration: expected a folder of images, got {os.fspath(folder)!r} "
                         f"({'a file' if path.exists() else 'no such folder'})")
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
    needed = min(minimum, count)
    if len(files) < needed:
        raise ValueError(f"calibration: expected at least {needed} images for INT8 calibration (statistics from "
                         f"fewer are dominated by outliers), got {len(files)} in {os.fspath(folder)!r}")
    if len(files) > count:
        picks = np.linspace(0, len(files) - 1, count).round().astype(np.int64)
        files = [files[i] for i in picks]
    return files


def _preprocessed(files: list[pathlib.Path], spec: DetectorSpec) -> Iterator[np.ndarray]:
    from ..transforms import preprocess_for_detection

    for file in files:
        try:
            pixels, _ = load_uint8(file)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"calibration: expected readable images, got {str(file)!r}: {exc}") from exc
        batch = preprocess_for_detection([torch.from_numpy(pixels).permute(2, 0, 1)], spec.input)
        yield batch.numpy()


class _CalibrationSet:
    """A re-iterable sequence of 1 x 3 x S x S float32 inputs: NNCF walks it once per statistics pass, and images
    are decoded only as it goes (300 preprocessed SSD300 inputs would hold ~320 MB)."""

    def __init__(self, files: list[pathlib.Path], spec: DetectorSpec) -> None:
        self.files, self.spec = files, spec

    def __iter__(self) -> Iterator[np.ndarray]:
        return _preprocessed(self.files, self.spec)

    def __len__(self) -> int:
        return len(self.files)


def export_openvino_int8(model: nn.Module, path: str | os.PathLike, calibration: str | os.PathLike, *,
                         images: int = DEFAULT_CALIBRATION_IMAGES, minimum: int = MIN_CALIBRATION_IMAGES,
                         opset: int = 17, nms: bool = False, batch: int = 1,
                         dynamic_batch: bool = True, log: Callable[[str], None] | None = None) -> pathlib.Path:
    """Write ``model`` as an INT8 OpenVINO IR quantized by NNCF (post-training, symmetric "performance" preset,
    fast bias correction), with activation ranges measured on ``images`` photos of the folder ``calibration``.

    Arguments as :func:`ssd.export.export_openvino`; ``minimum`` is the smallest calibration set accepted
    (:data:`MIN_CALIBRATION_IMAGES`). The graph's box decoding and softmax stay in floating point: NNCF quantizes
    the inputs of convolutions and matrix products (the network), not the decoding arithmetic after them.

    Raises:
        ValueError: ``calibration`` is no folder, holds too few images, or holds an unreadable one.
        ImportError: nncf or openvino is not installed (``pip install -r requirements-export.txt``).
    """
    nncf = require("nncf", "INT8 quantization (--int8)")
    require("openvino", "OpenVINO export")
    spec = local_spec(getattr(model, "spec", None), "model.spec")
    files = calibration_files(calibration, images, minimum)

    def quantize(converted: Any) -> Any:
        started = time.perf_counter()
        dataset = nncf.Dataset(_CalibrationSet(files, spec))
        quantized = nncf.quantize(converted, dataset, subset_size=len(files),
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
        if log is not None:
            log(f"quantize: NNCF INT8 on {len(files)} calibration images ({time.perf_counter() - started:.1f} s)")
        return quantized

    return export_openvino(model, path, opset=opset, nms=nms, batch=batch, dynamic_batch=dynamic_batch,
                           transform=quantize, log=log)
