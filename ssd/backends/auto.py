"""``backend="auto"``: the fastest installed way to run a model whose detections agree with fp32's.

The candidates, fastest first on a CPU: OpenVINO at its default precision (bf16 on CPUs with AMX or AVX-512 BF16,
else f32), then PyTorch bf16 autocast (only on CPUs with native bf16: elsewhere it is emulated and slower than fp32),
then PyTorch fp32. Each candidate runs the check image; the first whose detections agree with fp32's on it wins
(fp32 itself always qualifies). The decision (:func:`auto_order`) and the agreement test
(:func:`detections_disagree`) are plain functions of their inputs.
"""
from __future__ import annotations

import importlib.util
import pathlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["AUTO_CANDIDATES", "AutoChoice", "auto_order", "choose_backend", "detections_disagree", "native_bf16"]

AUTO_CANDIDATES = ("openvino", "bf16", "fp32")
# Agreement on the check image: every detection scoring this much above the threshold in one run must be in the
# other with the same class, a box overlapping it this much and a score this close. bf16 keeps 8 significant bits,
# so logits move by ~0.4% of their size: scores by a few hundredths, boxes by well under a pixel in 300.
SCORE_MARGIN = 0.1
MIN_IOU = 0.8
_CPUINFO = pathlib.Path("/proc/cpuinfo")


def native_bf16(capability: str | None = None, cpu_flags: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: torch's vector capability is AVX-512 (or newer) and the CPU has the
    AVX-512 BF16 or AMX BF16 instructions (read from /proc/cpuinfo, where there is one; elsewhere False)."""
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    if cpu_flags is None:
        try:
            cpu_flags = _CPUINFO.read_text()
        except OSError:
            return False
    return capability.startswith(("AVX512", "AMX")) and ("avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags)


def auto_order(device_type: str, openvino_installed: bool, has_native_bf16: bool) -> list[str]:
    """The candidates to try, fastest first (names of :data:`AUTO_CANDIDATES`): on the CPU OpenVINO where installed,
    bf16 autocast where the CPU has native bf16, then fp32; on another device fp32 (the other runtimes run on the
    CPU here, and the GPU choices are not made automatically)."""
    if device_type != "cpu":
        return ["fp32"]
    order = ["openvino"] if openvino_installed else []
    if has_native_bf16:
        order.append("bf16")
    return [*order, "fp32"]


def detections_disagree(reference: Any, candidate: Any, threshold: float, score_margin: float = SCORE_MARGIN,
                        min_iou: float = MIN_IOU) -> str | None:
    """Why ``candidate``'s detections (a ``Detections``) differ from ``reference``'s on the same image, or None when
    they agree: each detection scoring at least ``threshold + score_margin`` in either must have a partner in the
    other (same label, IoU >= ``min_iou``, score within ``score_margin``). Detections near the threshold may come
    and go with rounding, so they are not asked for."""
    for first, second, what in ((reference, candidate, "fp32"), (candidate, reference, "the candidate")):
        for box, label, score in zip(first.boxes, first.labels, first.scores):
            if score < threshold + score_margin:
                continue
            same = second.labels == label
            if not same.any():
                return f"{what} found a {first.class_names[int(label) - 1]} ({score:.2f}) that the other did not"
            ious = _iou(box, second.boxes[same])
            best = int(np.argmax(ious))
            if ious[best] < min_iou or abs(float(second.scores[same][best]) - float(score)) > score_margin:
                name = first.class_names[int(label) - 1]
                return (f"{what}'s {name} ({score:.2f}) is matched at IoU {ious[best]:.2f}, score "
                        f"{float(second.scores[same][best]):.2f}")
    return None


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float32).tiny)


@dataclass
class AutoChoice:
    """The backend ``auto`` picked (``name`` among :data:`AUTO_CANDIDATES`) and why the faster ones were passed
    over (``passed``: (name, reason) pairs)."""

    backend: Any
    name: str
    passed: list[tuple[str, str]]
    detections: int  # fp32's detections on the check image: 0 makes the agreement check vacuous

    def describe(self) -> str:
        what = {"openvino": "OpenVINO (its default precision for this CPU)", "bf16": "PyTorch bf16 autocast",
                "fp32": "PyTorch fp32"}[self.name]
        text = f"backend auto: {what}"
        if self.name != "fp32":
            text += f", agreeing with fp32 on the check image ({self.detections} detection(s))"
        if self.passed:
            text += "; passed over: " + "; ".join(f"{name} ({reason})" for name, reason in self.passed)
        return text


def _check_image() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # a person, a flag, a rocket: boxes of several classes and sizes


def _openvino_backend(model: torch.nn.Module, threads: int | None) -> Any:
    from ..export.onnx import build_onnx
    from .exported import OpenVinoBackend

    # OpenVINO reads the ONNX graph into memory when it compiles, so the file is not needed afterwards.
    with tempfile.TemporaryDirectory(prefix="ssd-auto-") as folder:
        path = pathlib.Path(folder) / f"{model.spec.name}.onnx"
        path.write_bytes(build_onnx(model).SerializeToString())
        return OpenVinoBackend(path, precision="default", threads=threads)


def choose_backend(model: torch.nn.Module, *, threshold: float | None = None, threads: int | None = None,
                   check_image: np.ndarray | None = None, order: list[str] | None = None,
                   log: Callable[[str], None] | None = None) -> AutoChoice:
    """Try the candidates of :func:`auto_order` for this machine (or ``order``) on ``model`` (a float32 detector
    network, on its device) and return the first whose detections on ``check_image`` (default: scikit-image's
    astronaut) agree with fp32's at ``threshold`` (default: the model's detect threshold). A candidate that cannot
    be made (a runtime error, a missing package) is passed over with its reason."""
    from ..inference.detect import detect
    from .plan import channels_last_copy
    from .pytorch import PyTorchBackend

    weight = next(model.parameters())
    if weight.dtype != torch.float32:
        raise ValueError(f"model: expected a float32 network for backend auto (it compares with fp32), got "
                         f"{weight.dtype}")
    if order is None:
        openvino = importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("onnx") is not None
        order = auto_order(weight.device.type, openvino, native_bf16())
    unknown = [name for name in order if name not in AUTO_CANDIDATES]
    if unknown or not order:
        raise ValueError(f"order: expected names among {', '.join(AUTO_CANDIDATES)}, got {order!r}")
    fp32 = PyTorchBackend(model, "fp32", threads=threads)
    if order == ["fp32"]:
        return AutoChoice(fp32, "fp32", [], 0)
    image = _check_image() if check_image is None else check_image
    threshold = model.spec.detect_postprocess.score_threshold if threshold is None else threshold
    [reference] = detect(fp32, image, threshold=threshold, keep_images=False)
    passed: list[tuple[str, str]] = []
    for name in order:
        if name == "fp32":
            return AutoChoice(fp32, "fp32", passed, len(reference))
        try:
            # bf16 runs a channels_last copy (the layout its speed needs, benchmarks/RESULTS.md); the caller's model
            # is not converted.
            backend = (_openvino_backend(model, threads) if name == "openvino"
                       else PyTorchBackend(channels_last_copy(model), "bf16", threads=threads))
            [found] = detect(backend, image, threshold=threshold, keep_images=False)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            passed.append((name, f"could not run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
            continue
        problem = detections_disagree(reference, found, threshold)
        if problem is None:
            return AutoChoice(backend, name, passed, len(reference))
        passed.append((name, f"disagrees with fp32: {problem}"))
        if log is not None:
            log(f"backend auto: {name} passed over ({problem})")
    return AutoChoice(fp32, "fp32", passed, len(reference))
