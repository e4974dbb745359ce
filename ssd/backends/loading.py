"""``ssd.load``: a model name, an exported file or a network in, a backend out; and the same for the command line."""
from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from .base import is_detector
from .exported import EXPORTED_SUFFIXES, load_exported
from .pytorch import PyTorchBackend

__all__ = ["check_command_options", "command_device", "is_exported_file", "load", "load_for_command"]

# What build_model takes, plus what the PyTorch backend takes.
_BUILD_OPTIONS = ("pretrained", "weights", "checkpoint", "num_classes", "class_names", "half", "model_math",
                  "force_download", "progress")
_BACKEND_OPTIONS = ("precision", "device", "threads")


def is_exported_file(model: Any) -> bool:
    """Whether ``model`` names an exported file (by its suffix: .onnx or OpenVINO's .xml)."""
    return isinstance(model, (str, os.PathLike)) and pathlib.Path(model).suffix.lower() in EXPORTED_SUFFIXES


def load(model: Any, /, **options: Any) -> Any:
    """A backend for ``model``, which every consumer takes (``ssd.detect``, ``ssd.evaluate``, the command line).

    Args:
        model: a registered model name (``ssd.list_models()``), built with :func:`ssd.build_model`; an exported
            ``.onnx`` or OpenVINO ``.xml`` file; or a detector network (``nn.Module`` with a spec, of any copy of
            this package, torch.hub's included).
        options: for a name, :func:`ssd.build_model`'s (``pretrained``, ``weights``, ``checkpoint``,
            ``num_classes``, ``class_names``, ``half``, ``model_math``, ``force_download``, ``progress``), and
            ``device`` (default: the CPU; ``"auto"``: CUDA when available), ``precision`` (None: the weights'
            dtype, ``'fp32'``, ``'bf16'`` or ``'fp16'`` autocast; bf16 also runs the model channels_last) and
            ``threads`` (CPU intra-op threads) for the :class:`~ssd.backends.PyTorchBackend`; ``backend="auto"``:
            the fastest installed backend whose detections agree with fp32's on a check image (OpenVINO, else bf16
            autocast on CPUs with native bf16, else fp32: :mod:`ssd.backends.auto`). For a network:
            ``precision`` and ``threads``. For a file: ``backend`` (``"auto"``, ``"onnxruntime"`` or
            ``"openvino"``), ``threads``, ``device`` (None or ``"cpu"``), and ``precision`` (OpenVINO: ``"fp32"``,
            ``"bf16"``, ``"default"``), ``providers`` (onnxruntime) or ``runtime_device`` (OpenVINO).

    Raises:
        ValueError: an unknown name, a file of another kind, or a ``backend`` other than ``"auto"`` given with a
            model name (a name runs in PyTorch); the errors of :func:`ssd.build_model` and
            :func:`~ssd.backends.load_exported`.
        TypeError: an option the model's kind does not take.
    """
    if is_detector(model):
        _only(options, ("precision", "threads"), "a detector network")
        return PyTorchBackend(model, options.get("precision"), threads=options.get("threads"))
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a model name, an exported .onnx/.xml file or a detector network, got "
                        f"{type(model).__name__}")
    from .. import distributed, registry

    if isinstance(model, str) and model in registry.list_models():
        backend = options.pop("backend", None)
        if backend not in (None, "auto"):
            raise ValueError(f"backend: expected None or 'auto' for the model name {model!r}, which runs in PyTorch "
                             f"(a runtime is chosen for an exported .onnx/.xml file), got {backend!r}")
        _only(options, _BUILD_OPTIONS + _BACKEND_OPTIONS, "a model name")
        if backend == "auto":
            return _load_auto(model, options).backend
        return _load_registered(model, options)
    if is_exported_file(model):
        device = options.pop("device", None)
        if device is not None and distributed.resolve_device(device, "device").type != "cpu":
            raise ValueError(f"device: expected None or cpu for an exported file (onnxruntime and OpenVINO run on "
                             f"the CPU here), got {device!r}")
        return load_exported(model, **options)
    raise ValueError(f"model: expected one of {', '.join(registry.list_models())} or an exported .onnx / OpenVINO "
                     f".xml file, got {os.fspath(model)!r}")


def _only(options: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"load: expected options among {', '.join(allowed)} for {what}, got {', '.join(unknown)}")


def _load_registered(name: str, options: dict[str, Any]) -> PyTorchBackend:
    from .. import distributed, registry

    precision = options.pop("precision", None)
    device = options.pop("device", None)
    threads = options.pop("threads", None)
    # Looked up at call time (not imported by name), so that replacing ssd.registry.build_model reaches here.
    model = registry.build_model(name, **options)
    if device is not None:
        model.to(distributed.resolve_device(device))
    if precision == "bf16":
        # Ours to change: channels_last adds speed to bf16 (2.7x fp32 on an AVX-512 CPU, benchmarks/RESULTS.md) at
        # no further cost in agreement.
        model.to(memory_format=torch.channels_last)
    return PyTorchBackend(model, precision, threads=threads)


def _load_auto(name: str, options: dict[str, Any]) -> Any:
    """``backend="auto"`` for a model name: build it in float32, then :func:`ssd.backends.auto.choose_backend`."""
    from .. import distributed, registry
    from .auto import choose_backend

    if options.get("precision") not in (None, "fp32") or options.get("half") or options.get("model_math") == "fp16":
        raise ValueError("backend: expected no precision with 'auto', which picks the precision itself (fp32, bf16 "
                         "or OpenVINO's), got a half-precision or autocast request")
    device = options.pop("device", None)
    threads = options.pop("threads", None)
    options.pop("precision", None)
    model = registry.build_model(name, **options)
    if device is not None:
        model.to(distributed.resolve_device(device))
    return choose_backend(model, threads=threads)


def command_device(model: str, device: str | None, name: str = "--device") -> torch.device:
    """The device for a command's ``--model`` (checked: a model name or an exported file): for a model name
    ``device`` as :func:`ssd.distributed.resolve_device` gives it (default CUDA when available; under torchrun
    ``cuda:LOCAL_RANK``); for an exported file the CPU, where its runtime runs here (anything else is an error)."""
    from .. import distributed, registry

    if not is_exported_file(model):
        if model not in registry.list_models():
            raise ValueError(f"--model: expected one of {', '.join(registry.list_models())} or an exported .onnx / "
                             f"OpenVINO .xml file, got {model!r}")
        return distributed.resolve_device(device, name)
    resolved = distributed.resolve_device(device or "cpu", name)
    if resolved.type != "cpu":
        raise ValueError(f"{name}: expected cpu for an exported --model file (onnxruntime and OpenVINO run on the "
                         f"CPU here), got {device!r}")
    return resolved


def check_command_options(model: str, *, backend: str | None, checkpoint: str | None, precision: str | None,
                          half: bool = False) -> None:
    """Refuse, before anything loads, the options of a command that do not go together with ``--model``:
    ``--backend`` with a model name (it runs in PyTorch), ``--checkpoint`` with an exported file (its weights are in
    it), and a precision the file's runtime does not have. Raises ValueError naming the option."""
    if not is_exported_file(model):
        if backend == "auto":
            if half or precision not in (None, "fp32"):
                raise ValueError(f"--precision: expected fp32 (the reference) with --backend auto, which picks the "
                                 f"precision itself, got {'fp16' if half else precision}")
            return
        if backend is not None:
            raise ValueError(f"--backend: expected it only with an exported --model file (.onnx or .xml) or 'auto', "
                             f"got --backend {backend} with the model name {model!r}, which runs in PyTorch")
        return
    if checkpoint is not None:
        raise ValueError(f"--checkpoint: expected none with an exported --model file (its weights are in "
                         f"{model}), got {checkpoint!r}")
    if half:
        raise ValueError(f"--half: expected none with an exported --model file (its weights are fixed in "
                         f"{model}), got --half")
    if precision not in (None, "fp32", "bf16"):
        raise ValueError(f"--precision: expected fp32 (or bf16 with OpenVINO) for an exported --model file, got "
                         f"{precision}")
    onnxruntime = backend == "onnxruntime" or (backend is None and pathlib.Path(model).suffix.lower() == ".onnx")
    if precision == "bf16" and onnxruntime:
        raise ValueError("--precision: expected fp32 with onnxruntime (bf16 needs --backend openvino), got bf16")


def load_for_command(model: str, *, backend: str | None, checkpoint: str | None, device: torch.device,
                     precision: str | None, half: bool = False, announce: Any = None) -> Any:
    """The backend for a command's ``--model NAME_OR_FILE`` with ``--backend``, ``--checkpoint``, a device from
    :func:`command_device`, ``precision`` (autocast: None, fp32, bf16, fp16) and ``half`` (half weights). With
    ``--backend auto`` and a model name, ``announce`` (e.g. ``print``) is given the line that says what was picked.

    Raises:
        ValueError: the options do not go together (:func:`check_command_options`), and every error of
            :func:`load`.
    """
    check_command_options(model, backend=backend, checkpoint=checkpoint, precision=precision, half=half)
    if not is_exported_file(model):
        if backend == "auto":
            choice = _load_auto(model, {"checkpoint": checkpoint, "device": device})
            if announce is not None:
                announce(choice.describe())
            return choice.backend
        return load(model, checkpoint=checkpoint, device=device, precision=precision, half=half)
    if precision == "bf16":
        return load_exported(model, backend or "auto", precision="bf16")
    return load_exported(model, backend or "auto")
