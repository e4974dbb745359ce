"""THE registry of models: one row per model name, and :func:`build_model`, which builds any of them.

A row names the family module that declares the model (``MODELS[name]``: network, spec, published weights; see
:class:`ssd.models.entry.ModelEntry`). Rows are dotted paths, imported only when a model is built or inspected, so
that :func:`list_models` (``ssd --help``) needs no torch. Adding a family: its file(s), one row here per model, and
one entrypoint line in ``hubconf.py``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models.base import Detector
    from .models.entry import ModelEntry
    from .models.spec import ClassSpec, DetectorSpec

__all__ = ["Row", "build_model", "get_entry", "list_models"]


@dataclass(frozen=True)
class Row:
    """A model name and the family module (relative to this package) whose ``MODELS`` declares it."""

    name: str
    family: str


ROWS: tuple[Row, ...] = (
    Row("nvidia_ssd", ".models.ssd300_resnet50"),
    Row("ssd300_vgg16", ".models.ssd_vgg16"),
    Row("ssd512_vgg16", ".models.ssd_vgg16"),
    Row("ssdlite320_mobilenet_v2", ".models.ssdlite_mobilenetv2"),
    Row("tv_ssd300_vgg16", ".models.tv_ssd"),
    Row("tv_ssdlite320_mobilenet_v3_large", ".models.tv_ssd"),
)
_BY_NAME = {row.name: row for row in ROWS}
_MODEL_MATHS = ("fp32", "fp16")


def list_models() -> list[str]:
    """Every model name, in registry order (what ``--model`` and the hub entrypoints take)."""
    return [row.name for row in ROWS]


def get_entry(name: str) -> ModelEntry:
    """The :class:`~ssd.models.entry.ModelEntry` of a model name (its family module is imported here)."""
    if not isinstance(name, str):
        raise TypeError(f"model: expected a model name (str), got {type(name).__name__}")
    row = _BY_NAME.get(name)
    if row is None:
        raise ValueError(f"model: expected one of {', '.join(map(repr, list_models()))}, got {name!r}")
    # Relative to this package: loaded by torch.hub beside a caller's own `ssd`, ours has a private name.
    return importlib.import_module(row.family, __package__).MODELS[name]


def build_model(
    name: str,
    pretrained: bool = True,
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    half: bool = False,
    model_math: str | None = None,
    force_download: bool = False,
    progress: bool = True,
) -> Detector:
    """Build the model ``name`` (see :func:`list_models`) with its weights, in eval mode.

    Args:
        name: the model.
        pretrained: load weights (default True): ``checkpoint``, else the ``SSD_CHECKPOINT`` environment variable,
            else the published ``weights`` (downloaded once into ``torch.hub.get_dir()/checkpoints``). False gives
            the untrained network and downloads nothing.
        weights: which published weights (default the model's first; NVIDIA's: 'fp32', 'fp16', 'amp').
        checkpoint: a local file, an http(s) URL or a file:// URL: a checkpoint written by ``ssd train`` for this
            model, or one of the family's own formats (NVIDIA's training files, mmdetection's ``.pth``, plain state
            dicts).
        num_classes, class_names: the classes (``num_classes`` counts the background). When they differ from the
            checkpoint's, the class predictors are new (for fine-tuning) and everything else is loaded; without
            them, the model speaks the checkpoint's classes.
        half: float16 weights with BatchNorm kept in float32 (for CUDA); ``model_math='fp16'`` (NVIDIA's name)
            says the same, and picks the published ``'fp16'`` weights where there are such.
        force_download: fetch the weights again even if cached.
        progress: show a download progress bar.

    ``model.meta["accuracy"]`` is the published accuracy of the weights, present only when the model runs
    published weights with their own classes.

    Raises:
        ValueError, TypeError: a bad argument. FileNotFoundError: a missing checkpoint file.
        ssd.weights.InvalidCheckpointError: the checkpoint is unsafe, damaged or not this model's (an ``ssd train``
            checkpoint of another model is refused, naming both).
        ssd.weights.CheckpointUnavailableError: nothing could be downloaded or found in the cache.
    """
    entry = get_entry(name)
    pretrained = _expect_bool("pretrained", pretrained)
    force_download = _expect_bool("force_download", force_download)
    progress = _expect_bool("progress", progress)
    half = _half(_expect_bool("half", half), model_math)
    if weights is not None and weights not in entry.weights:
        raise ValueError(f"weights: expected one of {', '.join(map(repr, entry.weights))}, got {weights!r}")
    class_names = _checked_class_names(class_names, num_classes)
    if pretrained:
        if weights is None and half and "fp16" in entry.weights:
            weights = "fp16"  # NVIDIA's model_math='fp16' picks its published fp16 file
        model = _pretrained(entry, weights, checkpoint, num_classes, class_names, force_download, progress)
    else:
        if weights is not None or checkpoint is not None:
            warnings.warn("pretrained=False: the weights/checkpoint argument is ignored", UserWarning, stacklevel=2)
        model = entry.network(_spec_for(entry, _target_classes(entry.spec.classes, num_classes, class_names)))
    if half:
        _to_half(model)
    return model.eval()


def _pretrained(entry: ModelEntry, weights: str | None, checkpoint: str | os.PathLike[str] | None,
                num_classes: int | None, class_names: tuple[str, ...] | None, force_download: bool,
                progress: bool) -> Detector:
    from .weights import checkpoints, formats

    def read(path: os.PathLike[str], source: str) -> formats.Checkpoint:
        # Everything is checked here, before any model is built: a download enters the cache only if it passes.
        return formats.read_checkpoint(path, entry, name=source)

    found = checkpoints.resolve(entry, read, weights=weights, checkpoint=checkpoint, force_download=force_download,
                                progress=progress)
    stored = formats.stored_classes(found.value, entry)
    classes = _target_classes(stored, num_classes, class_names)
    model = formats.build_network(entry, found.value, _spec_for(entry, classes))
    if found.weights is not None and classes == found.weights.classes:
        model.published_weights = found.weights
    return model


def _expect_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def _half(half: bool, model_math: str | None) -> bool:
    if model_math is None:
        return half
    if model_math not in _MODEL_MATHS:
        raise ValueError(f"model_math: expected one of {', '.join(map(repr, _MODEL_MATHS))}, got {model_math!r}")
    if half and model_math == "fp32":
        raise ValueError("half/model_math: expected one precision, got half=True and model_math='fp32'")
    return half or model_math == "fp16"


def _checked_class_names(class_names: object, num_classes: object) -> tuple[str, ...] | None:
    from .models.spec import check_int

    if num_classes is not None:
        check_int("num_classes", num_classes, 2)
    if class_names is None:
        return None
    if isinstance(class_names, str) or not isinstance(class_names, list | tuple) or not all(
            isinstance(n, str) for n in class_names):
        raise TypeError(f"class_names: expected a list of strings, got {class_names!r:.80}")
    if not class_names:
        raise ValueError("class_names: expected at least one class name, got none")
    if num_classes is not None and num_classes != len(class_names) + 1:
        raise ValueError(f"num_classes: expected {len(class_names) + 1} (the {len(class_names)} class names plus "
                         f"background), got {num_classes}")
    return tuple(class_names)


def _target_classes(stored: ClassSpec, num_classes: int | None, class_names: tuple[str, ...] | None) -> ClassSpec:
    """The classes to build: the checkpoint's (``stored``) unless the caller names or counts others."""
    from .models.spec import ClassSpec

    if class_names is not None:
        return stored if class_names == stored.names else ClassSpec(class_names, tuple(range(1, len(class_names) + 1)))
    if num_classes is not None and num_classes != stored.num_classes:
        return ClassSpec.numbered(num_classes - 1)
    return stored


def _spec_for(entry: ModelEntry, classes: ClassSpec) -> DetectorSpec:
    return entry.spec if classes == entry.spec.classes else entry.spec.with_classes(classes)


def _to_half(model: Detector) -> None:
    import torch

    from .models.base import half_with_float_batchnorm

    if not torch.cuda.is_available():
        warnings.warn(
            "half precision (model_math='fp16') without CUDA: half-precision convolutions on the CPU are very slow "
            "(about 100x slower than fp32); use fp32 on CPU (and detect(..., precision='bf16') where the CPU "
            "supports bfloat16)",
            UserWarning,
            stacklevel=3,
        )
    half_with_float_batchnorm(model)
