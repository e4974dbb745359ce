"""``ssd benchmark``: one model in every installed format, side by side: file size, ms per image and images/s of
the whole ``detect`` call at a batch size, and with annotations the COCO mAP of ``evaluate``.

Formats (:data:`FORMATS`): ``pytorch`` (fp32 eager), ``bf16`` (PyTorch bf16 autocast, channels_last), ``onnx``
(onnxruntime), ``openvino`` (OpenVINO IR, f32 inference), ``openvino-bf16`` (the same IR at bf16 inference) and
``int8`` (an NNCF-quantized OpenVINO IR, calibrated on ``calibration`` or the ``images`` folder). The exported files
are written into a temporary folder (or ``workdir``) by the library's own exporters, then run by the same backends
as ``detect --model FILE``.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["FORMATS", "BenchmarkRow", "default_formats", "format_table", "run_benchmark"]

FORMATS = ("pytorch", "bf16", "onnx", "openvino", "openvino-bf16", "int8")
# What each format needs beyond torch (import names).
_NEEDS = {"pytorch": (), "bf16": (), "onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"),
          "openvino-bf16": ("onnx", "openvino"), "int8": ("onnx", "openvino", "nncf")}
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's photographs, when no --images is given


@dataclass
class BenchmarkRow:
    """One format's figures; ``error`` says why it has none (a missing package, a failed export)."""

    format: str
    size_bytes: int | None = None
    ms_per_image: float | None = None
    images_per_second: float | None = None
    map: float | None = None
    error: str | None = None


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def default_formats() -> list[str]:
    """The formats whose packages are installed, INT8 and bf16 aside (INT8 needs calibration images; bf16 is worth
    timing only where it is asked for)."""
    return [f for f in ("pytorch", "onnx", "openvino") if all(_installed(n) for n in _NEEDS[f])]


def _check_formats(formats: Sequence[str] | str | None) -> list[str]:
    if formats is None:
        return default_formats()
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats: expected a comma-separated list of {', '.join(FORMATS)}, got "
                         f"{','.join(unknown) if unknown else 'none'}")
    return list(dict.fromkeys(formats))


def _sample_images(folder: pathlib.Path | None, count: int) -> list[np.ndarray]:
    """``count`` images in memory: the first of ``folder`` (sorted, repeated when it has fewer), else
    scikit-image's photographs, so that decoding files is not timed."""
    from .io.images import is_image_file, load_uint8

    if folder is None:
        from skimage import data

        pool = [getattr(data, name)() for name in _PHOTOS]
    else:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))[:count]
        if not files:
            raise ValueError(f"images: expected a folder with images, got none in {str(folder)!r}")
        pool = [load_uint8(f)[0] for f in files]
    return [pool[i % len(pool)] for i in range(count)]


def _state_size(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _file_size(path: pathlib.Path) -> int:
    size = path.stat().st_size
    if path.suffix == ".xml":
        size += path.with_suffix(".bin").stat().st_size
    return size


def _time_detect(backend: Any, photos: list[np.ndarray], batch_size: int) -> float:
    """Seconds per image of ``detect`` over ``photos``, after one warm-up batch (first-call allocations, oneDNN's
    kernel choice and OpenVINO's compilation are not what a long run sees)."""
    from .inference.detect import detect

    detect(backend, photos[:batch_size], batch_size=batch_size, keep_images=False)
    started = time.perf_counter()
    detect(backend, photos, batch_size=batch_size, keep_images=False)
    return (time.perf_counter() - started) / len(photos)


def _make_backend(fmt: str, model: torch.nn.Module, folder: pathlib.Path, threads: int | None,
                  calibration: pathlib.Path | None) -> tuple[Any, int]:
    """The backend of ``fmt`` and the size of what it runs (the file, or the serialized state dict)."""
    from .backends import OnnxBackend, OpenVinoBackend, PyTorchBackend
    from .backends.plan import channels_last_copy

    if fmt == "pytorch":
        return PyTorchBackend(model, "fp32", threads=threads), _state_size(model)
    if fmt == "bf16":
        return PyTorchBackend(channels_last_copy(model), "bf16", threads=threads), _state_size(model)
    from .export import export_onnx, export_openvino, export_openvino_int8

    if fmt == "onnx":
        path = export_onnx(model, folder / "model.onnx")
        return OnnxBackend(path, threads=threads), _file_size(path)
    if fmt == "int8":
        if calibration is None:
            raise ValueError("int8: expected calibration images (--calibration DIR, or --images DIR with at least "
                             "100 images), got none")
        path = export_openvino_int8(model, folder / "int8.xml", calibration)
        return OpenVinoBackend(path, precision="default", threads=threads), _file_size(path)
    path = folder / "model.xml"
    if not path.exists():
        export_openvino(model, path)
    precision = "bf16" if fmt == "openvino-bf16" else "fp32"
    return OpenVinoBackend(path, precision=precision, threads=threads), _file_size(path)


def run_benchmark(model: str = "nvidia_ssd", *, checkpoint: str | None = None, device: str | None = "cpu",
                  formats: Sequence[str] | str | None = None, images: str | os.PathLike | None = None,
                  annotations: str | os.PathLike | None = None, calibration: str | os.PathLike | None = None,
                  batch_size: int = 8, batches: int = 2, threads: int | None = None,
                  workdir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> list[BenchmarkRow]:
    """Benchmark ``model`` (a registered name) in each of ``formats`` (default :func:`default_formats`).

    Args:
        checkpoint: its weights (as ``build_model``'s ``checkpoint``; default: the published ones).
        device: where the PyTorch formats run (the exported ones run on the CPU).
        images: a folder whose first ``batch_size * batches`` images are timed (in memory), and, with
            ``annotations`` (a COCO file), all of them are scored. Default: scikit-image's photographs, no mAP.
        calibration: INT8's calibration folder (default: ``images``).
        batch_size, batches: images per forward pass, and how many batches are timed.
        threads: CPU intra-op threads of every backend (default: the library's thread plan).
        workdir: where the exported files go (default: a temporary folder, removed afterwards).
        log: called with a line as each format starts.

    Returns:
        One :class:`BenchmarkRow` per format, in order; a format that cannot run has its ``error`` set instead of
        stopping the others.
    """
    from .models.spec import check_int
    from .registry import build_model, list_models

    formats = _check_formats(formats)
    if model not in list_models():
        raise ValueError(f"model: expected one of {', '.join(list_models())}, got {model!r}")
    batch_size = check_int("batch_size", batch_size, 1)
    batches = check_int("batches", batches, 1)
    images_dir = None if images is None else pathlib.Path(images)
    if images_dir is not None and not images_dir.is_dir():
        raise ValueError(f"images: expected a folder of images, got {os.fspath(images)!r}")
    if annotations is not None and images_dir is None:
        raise ValueError("annotations: expected them together with images (the folder they describe), got no images")
    calibration_dir = pathlib.Path(calibration) if calibration is not None else images_dir
    network = build_model(model, checkpoint=checkpoint).eval()
    if device is not None:
        from .distributed import resolve_device

        network.to(resolve_device(device, "device"))
    photos = _sample_images(images_dir, batch_size * batches)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssd-benchmark-") as scratch:
        folder = pathlib.Path(workdir) if workdir is not None else pathlib.Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            if log is not None:
                log(f"{fmt} ...")
            rows.append(_measure(fmt, network, folder, threads, calibration_dir, photos, batch_size, images_dir,
                                 annotations))
    return rows


def _measure(fmt: str, network: torch.nn.Module, folder: pathlib.Path, threads: int | None,
             calibration: pathlib.Path | None, photos: list[np.ndarray], batch_size: int,
             images_dir: pathlib.Path | None, annotations: Any) -> BenchmarkRow:
    missing = [name for name in _NEEDS[fmt] if not _installed(name)]
    if missing:
        return BenchmarkRow(fmt, error=f"not installed: {', '.join(missing)} (pip install -r "
                                       "requirements-export.txt)")
    if fmt != "pytorch" and fmt != "bf16" and next(network.parameters()).device.type != "cpu":
        network = network.to("cpu")  # exporters trace on the CPU; the model is ours (built here)
    try:
        backend, size = _make_backend(fmt, network, folder, threads, calibration)
        seconds = _time_detect(backend, photos, batch_size)
        score = None
        if annotations is not None:
            from .evaluation import evaluate

            score = evaluate(backend, images_dir, annotations, batch_size=batch_size, progress=False,
                             verbose=False).ap
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        return BenchmarkRow(fmt, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return BenchmarkRow(fmt, size, 1000.0 * seconds, 1.0 / seconds, score)


def format_table(rows: Sequence[BenchmarkRow], batch_size: int) -> str:
    """The rows as a plain-text table (one line per format; mAP only when some row has it)."""
    with_map = any(row.map is not None for row in rows)
    header = ["format", "size (MB)", "ms/image", f"images/s (batch {batch_size})"] + (["mAP"] if with_map else [])
    lines = []
    for row in rows:
        if row.error is not None:
            lines.append([row.format, "-", "-", "-"] + (["-"] if with_map else []) + [f"({row.error})"])
            continue
        cells = [row.format, f"{row.size_bytes / 1e6:.1f}", f"{row.ms_per_image:.1f}", f"{row.images_per_second:.2f}"]
        if with_map:
            cells.append("-" if row.map is None else f"{row.map:.4f}")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in [header, *lines] if i < len(line)) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for line in lines:
        text = "  ".join(str(c).ljust(w) for c, w in zip(line, widths))
        out.append((text + "  " + line[-1]) if len(line) > len(header) else text)
    return "\n".join(s.rstrip() for s in out)
