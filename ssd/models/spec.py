"""What a detector is, as data: its default boxes, box coder, classes, input and post-processing recipe.

Every family-specific number lives in a :class:`DetectorSpec` that the network carries (``model.spec``); the
pipelines (anchors, decoding, ``detect``, evaluation, export) read it from there and hold no constants of their own.
The specs are frozen and hashable, so derived tensors (the default boxes) can be cached per spec.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

__all__ = [
    "from_any_copy",
    "looks_like",
    "rebuilt",
    "AnchorSpec",
    "BoxCoderSpec",
    "ClassSpec",
    "DetectorSpec",
    "InputSpec",
    "PostProcessSpec",
    "check_int",
    "check_real",
]

# A detection list longer than this is no longer a result but an allocation: every image gets a padded
# max_detections x 4 tensor, so an absurd value would be an out-of-memory error far from its cause.
MAX_DETECTIONS_LIMIT = 100_000


def _scalar(value: Any) -> Any:
    """A Python number from a numpy scalar or a 0-d tensor, so ``np.float32(0.5)`` works like ``0.5``."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0 and not isinstance(value, bool):
        return value.item()
    return value


def check_real(name: str, value: Any, low: float, high: float | None = None, *, open_low: bool = False,
               open_high: bool = False) -> float:
    """``value`` as a finite float in the interval (no upper bound when ``high`` is None), or a
    TypeError/ValueError naming ``name``."""
    given, value = value, _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {given!r}")
    value = float(value)
    bad_low = value <= low if open_low else value < low
    bad_high = high is not None and (value >= high if open_high else value > high)
    if not math.isfinite(value) or bad_low or bad_high:
        if high is None:
            wanted = f"a finite number {'>' if open_low else '>='} {low:g}"
        else:
            wanted = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name}: expected {wanted}, got {given!r}")
    return value


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or a TypeError/ValueError naming ``name``."""
    given, value = value, _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {given!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" (at most {high})"
        raise ValueError(f"{name}: expected an integer >= {low}{upper}, got {given!r}")
    return value


@dataclass(frozen=True)
class AnchorSpec:
    """SSD default boxes: per feature map, boxes of a few shapes centred on every cell.

    At level ``k`` the shapes are ``(min, min)``, ``(sqrt(min * max),) * 2`` and, per aspect ratio ``a``, the
    wide box ``(min * sqrt(a), min / sqrt(a))`` and its tall twin; centres are ``(j + 0.5) * step`` by
    ``(i + 0.5) * step`` pixels. ``order`` is how the heads lay them out: ``"shape_major"`` (NVIDIA: each shape
    over rows then columns) or ``"location_major"`` (mmdetection, torchvision: rows, columns, then shapes).
    ``clamp`` is what is clamped to [0, 1] (relative to the image): ``True`` the whole ``(cx, cy, w, h)`` (NVIDIA),
    ``"sizes"`` only ``(w, h)`` (torchvision's ``DefaultBoxGenerator``, whose centres may pass the edge), ``False``
    nothing (mmdetection).
    """

    image_size: int
    feature_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]
    order: str = "shape_major"
    clamp: bool | str = True

    def __post_init__(self) -> None:
        levels = len(self.feature_sizes)
        for name in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"AnchorSpec.{name}: expected {levels} levels, got {len(getattr(self, name))}")
        if self.order not in ("shape_major", "location_major"):
            raise ValueError(f"AnchorSpec.order: expected 'shape_major' or 'location_major', got {self.order!r}")
        if not (isinstance(self.clamp, bool) or self.clamp == "sizes"):
            raise ValueError(f"AnchorSpec.clamp: expected True, False or 'sizes', got {self.clamp!r}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """How many default boxes each feature map contributes, in order."""
        return tuple(n * f * f for n, f in zip(self.boxes_per_location, self.feature_sizes))

    @property
    def num_anchors(self) -> int:
        return sum(self.level_sizes)


@dataclass(frozen=True)
class BoxCoderSpec:
    """Offsets to boxes: ``centre = anchor_centre + d_xy * center_variance * anchor_size``,
    ``size = anchor_size * exp(d_wh * size_variance)``, the scaled log-size clamped at ``max_log_size`` if set."""

    center_variance: float = 0.1
    size_variance: float = 0.2
    max_log_size: float | None = None


@dataclass(frozen=True)
class ClassSpec:
    """The foreground classes: label ``k`` (1..K) is ``names[k - 1]``, dataset category id ``category_ids[k - 1]``.

    Label 0 is background, so the network scores ``K + 1`` classes.
    """

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("classes: expected at least one class name, got none")
        if len(self.names) != len(self.category_ids):
            raise ValueError(f"classes: expected one category id per name, got {len(self.names)} names and "
                             f"{len(self.category_ids)} ids")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError("classes: expected distinct category ids, got duplicates")

    @property
    def num_classes(self) -> int:
        return len(self.names) + 1

    @classmethod
    def numbered(cls, count: int) -> ClassSpec:
        """``count`` classes named ``class_1`` ... with ids 1..count, for a model built with only ``num_classes``."""
        return cls(tuple(f"class_{i}" for i in range(1, count + 1)), tuple(range(1, count + 1)))


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: the whole image resized to ``size`` x ``size`` (aspect ratio not kept), RGB
    values scaled to [0, ``value_range``], then ``(x - mean) / std`` per channel.

    ``resize`` names the interpolation the weights were evaluated with (:mod:`ssd.transforms` implements each):
    ``"antialias"`` (PIL's bilinear on uint8, NVIDIA), ``"bilinear"`` (cv2's INTER_LINEAR without antialiasing,
    mmdetection) or ``"torch_bilinear"`` (``F.interpolate`` bilinear on float pixels after the normalisation,
    torchvision's ``GeneralizedRCNNTransform`` with a fixed size).
    """

    RESIZE_RULES: ClassVar[tuple[str, ...]] = ("antialias", "bilinear", "torch_bilinear")

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    value_range: float = 1.0
    resize: str = "antialias"

    def __post_init__(self) -> None:
        if self.resize not in self.RESIZE_RULES:
            raise ValueError(f"InputSpec.resize: expected one of {', '.join(map(repr, self.RESIZE_RULES))}, "
                             f"got {self.resize!r}")


@dataclass(frozen=True)
class PostProcessSpec:
    """From scores and offsets to detections.

    ``score_threshold``: a class score must exceed it. Candidates before NMS: at most ``candidates_per_class``
    per (image, class) (NVIDIA), or at most ``candidates_per_level`` (anchor, class) pairs per feature map
    (mmdetection). ``clip_boxes``: clip decoded boxes to the image before NMS; ``drop_empty``: then drop boxes
    of no width or height. NMS per class drops a box whose IoU with a kept one is ``>= iou_threshold``
    (``suppress_equal``, NVIDIA) or ``> iou_threshold`` (mmdetection). Finally the ``max_detections`` highest.
    """

    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_detections: int = 200
    candidates_per_class: int | None = 200
    candidates_per_level: int | None = None
    clip_boxes: bool = False
    drop_empty: bool = False
    suppress_equal: bool = True

    def __post_init__(self) -> None:
        self.checked()

    def checked(self, names: dict[str, str] | None = None) -> PostProcessSpec:
        """Validate every value; errors name the argument as the caller knows it (``names`` maps field names)."""
        names = names or {}

        def name(field_name: str) -> str:
            return names.get(field_name, field_name)

        values = {
            "score_threshold": check_real(name("score_threshold"), self.score_threshold, 0.0, 1.0, open_high=True),
            "iou_threshold": check_real(name("iou_threshold"), self.iou_threshold, 0.0, 1.0, open_low=True),
            "max_detections": check_int(name("max_detections"), self.max_detections, 1, MAX_DETECTIONS_LIMIT),
        }
        for key in ("candidates_per_class", "candidates_per_level"):
            if getattr(self, key) is not None:
                values[key] = check_int(name(key), getattr(self, key), 1, MAX_DETECTIONS_LIMIT)
        if (self.candidates_per_class is None) == (self.candidates_per_level is None):
            raise ValueError("PostProcessSpec: expected exactly one of candidates_per_class and candidates_per_level")
        # Frozen: write the normalised Python numbers (numpy and torch scalars are accepted) back in place.
        for key, value in values.items():
            object.__setattr__(self, key, value)
        return self

    def updated(self, names: dict[str, str] | None = None, **changes: Any) -> PostProcessSpec:
        """A copy with ``changes`` (None values ignored), validated with errors that use ``names``."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        new = object.__new__(PostProcessSpec)
        for key, value in {**self.__dict__, **changes}.items():
            object.__setattr__(new, key, value)
        return new.checked(names)


@dataclass(frozen=True)
class DetectorSpec:
    """Everything one detector family needs outside its layers.

    ``postprocess`` is the published evaluation protocol; ``detect_postprocess`` is what ``model.detect`` uses
    by default (a higher score threshold and clipped boxes for pictures, where the family's authors show one).
    ``matching_iou`` is training's matching threshold: a default box takes a truth whose IoU with it is above it
    (0.5 for NVIDIA's, mmdetection's and torchvision's SSDs).
    """

    name: str
    anchors: AnchorSpec
    box_coder: BoxCoderSpec
    classes: ClassSpec
    input: InputSpec
    postprocess: PostProcessSpec
    detect_postprocess: PostProcessSpec
    description: str = ""
    matching_iou: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    def with_classes(self, classes: ClassSpec) -> DetectorSpec:
        return replace(self, classes=classes)


# ---------------------------------------------------------------------------------------------------------------
# Specs of another copy of this package (torch.hub loads a private copy next to a caller's own ``ssd``): recognised
# by class name and rebuilt as this copy's from their field values, so every function takes either copy's.

# DetectorSpec's parts, by field name: the dataclass each is rebuilt as.
_PARTS: dict[str, type] = {"anchors": AnchorSpec, "box_coder": BoxCoderSpec, "classes": ClassSpec,
                           "input": InputSpec, "postprocess": PostProcessSpec, "detect_postprocess": PostProcessSpec}
_SPEC_CLASSES = (DetectorSpec, AnchorSpec, BoxCoderSpec, ClassSpec, InputSpec, PostProcessSpec)


def looks_like(obj: Any, cls: type) -> bool:
    """``obj`` is an instance of ``cls`` of some copy of this package: a dataclass of the same name."""
    return type(obj).__name__ == cls.__name__ and dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def rebuilt(obj: Any, cls: type) -> Any:
    """Another copy's ``cls`` instance ``obj`` as this copy's, field by field (parts of a DetectorSpec too); a field
    the other copy lacks (an older release) takes this copy's default."""
    parts = _PARTS if cls is DetectorSpec else {}
    values = {}
    for item in dataclasses.fields(cls):
        if not item.init or not hasattr(obj, item.name):
            continue
        value = getattr(obj, item.name)
        part = parts.get(item.name)
        values[item.name] = rebuilt(value, part) if part is not None and not isinstance(value, part) else value
    return cls(**values)


def from_any_copy(obj: Any) -> Any:
    """``obj`` as this copy's spec class when it is a spec of another copy of this package; otherwise ``obj`` itself
    (the caller's own checks then say what is wrong). A spec that does not convert is returned as it is too."""
    if isinstance(obj, _SPEC_CLASSES):
        return obj
    for cls in _SPEC_CLASSES:
        if looks_like(obj, cls):
            try:
                return rebuilt(obj, cls)
            except (TypeError, ValueError):
                return obj
    return obj
