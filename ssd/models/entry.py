"""What a family module declares for each model it holds: the network, the spec and the published weights.

A family module (``ssd/models/<family>.py``) exposes ``MODELS: dict[str, ModelEntry]``; ``ssd.registry`` names
the models and finds their entries there. Nothing here imports torch: an entry is data.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .spec import ClassSpec, DetectorSpec

__all__ = ["ModelEntry", "Weights"]


@dataclass(frozen=True)
class Weights:
    """One published file of weights, as torchvision's ``Weights``: where it is and what it was measured to do.

    ``sha256`` is the file's digest or its first hex digits (checked on download, before the file is unpickled);
    ``meta`` holds what belongs to these weights and not to the architecture: the published ``accuracy``.
    """

    name: str  # what users pick it by: weights="fp32"
    file_name: str  # its name in the cache folder
    urls: tuple[str, ...]  # tried in order
    classes: ClassSpec
    sha256: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.sha256 is not None and (not self.sha256 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ValueError(f"Weights.sha256: expected lowercase hex digits, got {self.sha256!r}")


@dataclass(frozen=True, eq=False)
class ModelEntry:
    """One model of the registry.

    Attributes:
        spec: the published spec (its classes are those of the published weights).
        network: the ``Detector`` subclass, built as ``network(spec)``.
        weights: the published weights by name; :attr:`default_weights` is used unless the caller names another.
            A table entry named ``"fp16"`` is the default of a half-precision build (NVIDIA's ``model_math``).
        default_weights: the name of the weights a plain ``pretrained=True`` loads.
        fallback_weights: tried, with a warning, when every URL of the chosen weights fails.
        converter: the module (relative to the ``ssd`` package, e.g. ``".weights.mmdet"``) that reads this family's
            foreign files: ``to_state_dict(obj, source, spec) -> (state_dict, ClassSpec | None)`` and
            ``LOAD_GLOBALS``, the plain-data classes its files may hold beyond tensors.
        class_predictor: our key of a class predictor, with ``{level}`` and ``{param}`` (``weight``/``bias``)
            fields: its output channels are boxes per cell x classes (background included), so the class count of
            a checkpoint is read from the shape of level 0's weight.
        formats: what files this family loads, for error messages (``checkpoint=... (formats)``).
    """

    spec: DetectorSpec
    network: type
    weights: dict[str, Weights]
    default_weights: str | None
    converter: str
    class_predictor: str
    formats: str
    fallback_weights: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def class_predictor_keys(self) -> tuple[str, ...]:
        """Our keys of every class predictor tensor: the only ones whose shape depends on the classes."""
        return tuple(self.class_predictor.format(level=level, param=param)
                     for level in range(len(self.spec.anchors.feature_sizes)) for param in ("weight", "bias"))
