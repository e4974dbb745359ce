"""The backend protocol, and how every consumer recognises detectors and backends.

A backend runs a detector: a preprocessed batch in (N x 3 x S x S, as ``spec.input`` says), raw outputs out, of the
kind it declares in ``outputs`` (:data:`ssd.postprocess.OUTPUT_KINDS`):

- ``"offsets"``: the PyTorch network's ``(locs N x 4 x A, confs N x C x A)``;
- ``"decoded"``: an exported graph's ``(boxes N x A x 4, scores N x A x C)``;
- ``"nms"``: an exported ``--nms`` graph's padded ``(det_boxes N x K x 4, det_scores N x K, det_labels N x K,
  num_detections N)``, its post-processing recipe in ``nms_recipe``.

:func:`ssd.postprocess.postprocess_outputs` turns any of them into detections, so ``detect``, ``evaluate`` and the
command line's writers work the same over every backend.

Detectors are recognised by what they are, not by ``isinstance`` of this copy's classes: an ``nn.Module`` whose
``spec`` is a ``DetectorSpec`` of any copy of this package (torch.hub loads a private copy next to a caller's own
``ssd``). Such a spec is rebuilt as this copy's from its field values.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..copies import error_bases
from ..models.spec import DetectorSpec, PostProcessSpec, looks_like, rebuilt
from ..postprocess import OUTPUT_KINDS

__all__ = ["OUTPUT_KINDS", "Backend", "BackendError", "as_backend", "default_recipe", "input_format", "is_backend",
           "is_detector", "local_spec", "nms_mismatch", "spec_of"]


class BackendError(*error_bases("backends.base.BackendError", RuntimeError)):
    """A runtime failed while running a model (an allocation, a kernel, outputs of the wrong shape); the message
    names the model's file."""


@runtime_checkable
class Backend(Protocol):
    """What every runtime of a detector offers.

    Attributes:
        spec: the :class:`DetectorSpec` (classes, input, recipes). names: the class names (label ``k`` is
            ``names[k - 1]``). device: where batches go and outputs come from. outputs: the kind of the raw
            outputs (``"offsets"``, ``"decoded"`` or ``"nms"``).

    Optional, with these defaults when absent: ``input_dtype`` (float32) and ``memory_format`` (contiguous) of the
    batches; ``load_workers`` (threads loading images meanwhile; the library's default); ``nms_recipe`` (None: the
    recipe baked into an ``"nms"`` graph); ``precision`` (None); ``source`` (the checkpoint or file, for reports);
    ``runtime`` (a name: ``"pytorch"``, ``"onnxruntime"``, ``"openvino"``).
    """

    spec: DetectorSpec
    device: torch.device
    outputs: str

    @property
    def names(self) -> list[str]: ...

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


def local_spec(spec: Any, name: str = "spec") -> DetectorSpec:
    """``spec`` as this copy's :class:`DetectorSpec`: itself, or rebuilt from the field values of another copy's."""
    if isinstance(spec, DetectorSpec):
        return spec
    if not looks_like(spec, DetectorSpec):
        raise TypeError(f"{name}: expected a DetectorSpec, got {type(spec).__name__}")
    try:
        return rebuilt(spec, DetectorSpec)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a DetectorSpec this version can read, got one that does not convert "
                        f"({exc})") from exc


def is_detector(obj: Any) -> bool:
    """Whether ``obj`` is a detector network of this library (of any copy): an ``nn.Module`` with a DetectorSpec."""
    return isinstance(obj, torch.nn.Module) and looks_like(getattr(obj, "spec", None), DetectorSpec)


def is_backend(obj: Any) -> bool:
    """Whether ``obj`` implements the backend protocol (a spec, a declared output kind, callable)."""
    return (not isinstance(obj, torch.nn.Module) and callable(obj) and getattr(obj, "outputs", None) in OUTPUT_KINDS
            and looks_like(getattr(obj, "spec", None), DetectorSpec) and hasattr(obj, "device"))


def _expected(name: str, obj: Any) -> TypeError:
    return TypeError(f"{name}: expected a detector of this library (an nn.Module with a .spec) or a backend "
                     f"(ssd.load(...)), got {type(obj).__name__}")


def spec_of(model: Any, name: str = "model") -> DetectorSpec:
    """The spec of a detector or backend, as this copy's :class:`DetectorSpec`; TypeError for anything else."""
    if not (is_detector(model) or is_backend(model)):
        raise _expected(name, model)
    return local_spec(model.spec, f"{name}.spec")


def as_backend(model: Any, precision: str | None = None, *, threads: int | None = None) -> Any:
    """A backend for ``model``: a detector network is wrapped in a :class:`~ssd.backends.PyTorchBackend` (with
    ``precision`` and ``threads``); a backend is returned as it is, ``precision`` then being None or its own."""
    if is_backend(model):
        own = getattr(model, "precision", None)
        if precision is not None and precision != own:
            allowed = "None" if own is None else f"None or {own!r}"
            raise ValueError(f"precision: expected {allowed} for a backend, whose precision is chosen when it is made "
                             f"(ssd.load(..., precision=...)), got {precision!r}")
        return model
    if is_detector(model):
        from .pytorch import PyTorchBackend

        return PyTorchBackend(model, precision, threads=threads)
    raise _expected("model", model)


def input_format(backend: Any) -> tuple[torch.dtype, torch.memory_format]:
    """The dtype and memory format ``backend`` wants its batches in (float32, contiguous unless it says)."""
    return (getattr(backend, "input_dtype", torch.float32),
            getattr(backend, "memory_format", torch.contiguous_format))


def _baked(backend: Any) -> PostProcessSpec | None:
    """The recipe in an ``"nms"`` graph (as this copy's PostProcessSpec), or None."""
    baked = getattr(backend, "nms_recipe", None)
    if baked is None or isinstance(baked, PostProcessSpec):
        return baked
    return rebuilt(baked, PostProcessSpec)


def default_recipe(backend: Any) -> PostProcessSpec:
    """What ``detect`` uses by default: the recipe in an ``"nms"`` graph, else the spec's ``detect_postprocess``."""
    baked = _baked(backend)
    return baked if baked is not None else local_spec(backend.spec).detect_postprocess


def nms_mismatch(backend: Any, recipe: PostProcessSpec, names: tuple[str, str, str] = (
        "iou_threshold", "threshold", "max_detections")) -> str | None:
    """Why ``recipe`` cannot be had from ``backend``'s outputs, or None. Only an ``"nms"`` graph limits it: its IoU
    threshold is fixed, and a score threshold or detection count can only be stricter than its own. ``names``
    words the message with the caller's argument names."""
    baked = _baked(backend)
    if getattr(backend, "outputs", None) != "nms" or baked is None:
        return None
    where = f"fixed in {getattr(backend, 'source', None) or 'the graph'}, exported with --nms"
    iou, threshold, count = names
    if recipe.iou_threshold != baked.iou_threshold:
        return f"{iou}: expected {baked.iou_threshold} ({where}) or None, got {recipe.iou_threshold}"
    if recipe.score_threshold < baked.score_threshold or recipe.max_detections > baked.max_detections:
        return (f"{threshold}, {count}: expected at least {baked.score_threshold} and at most "
                f"{baked.max_detections} ({where}), got {recipe.score_threshold} and {recipe.max_detections}")
    return None
