"""mmdetection's SSD checkpoints (SSD300, SSD512, SSDLite-MobileNetV2): reading their files and converting keys.

An mmdetection checkpoint is ``{'meta': {...}, 'state_dict': {...}}`` with keys under ``backbone.``, ``neck.`` and
``bbox_head.``; its class channels put background LAST. :func:`convert_mmdet_state_dict` renames the keys to this
package's modules and moves background to channel 0 of every anchor's block, which is what every model here
expects. mmdetection's class names (``meta['CLASSES']`` in 2.x, ``meta['dataset_meta']['classes']`` in 3.x) become
the model's. Files are read through :func:`ssd.weights.formats.read_checkpoint`, with the checks every family gets;
the published files are listed in the family modules (``ssd.models.ssd_vgg16``, ``ssd.models.ssdlite_mobilenetv2``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data.coco import COCO_NAMES
from ..models.mmdet_common import mmdet_classes
from ..models.spec import ClassSpec, DetectorSpec
from .formats import tensors
from .loader import InvalidCheckpointError

__all__ = [
    "LOAD_GLOBALS",
    "MMDetCheckpoint",
    "convert_mmdet_state_dict",
    "extract_mmdet",
    "identify_mmdet",
    "to_state_dict",
]

# Model name -> (family, number of feature maps): how a checkpoint's keys identify the model it belongs to.
_MODELS = {
    "ssd300_vgg16": ("vgg16", 6),
    "ssd512_vgg16": ("vgg16", 7),
    "ssdlite320_mobilenet_v2": ("mobilenetv2", 6),
}

# numpy scalars (and their dtypes) in a meta are plain data, but torch's safe loader needs them allow-listed.
# numpy 1.x wrote the reconstructor as numpy.core.multiarray.scalar, numpy 2 as numpy._core.multiarray.scalar.
# (The alias lets numpy 2 read what numpy 1.x wrote; torch 2.5 cannot take aliases, so the loader skips it there.)
_NUMPY_SCALAR = np.dtype("int64").type(0).__reduce__()[0]
LOAD_GLOBALS: tuple = (
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(kind)) for kind in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                        "uint64", "float16", "float32", "float64")),
)

_MMDET_PREFIXES = ("backbone.", "neck.", "bbox_head.")
_HEAD_KEY = re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.")
# The plain Conv2d that predicts class logits (not the depthwise ConvModule before it in SSDLite).
_CLS_PREDICTOR = re.compile(r"^bbox_head\.cls_convs\.\d+\.\d+\.(weight|bias)$")
_OLD_HEAD_KEY = re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(weight|bias)$")
_OLD_EXTRA_KEY = re.compile(r"^backbone\.extra\.(\d+)\.(weight|bias)$")
# MobileNetV2 stages (layer1..layer7): blocks per stage; only layer1 (t = 1) has no expansion conv.
_MBV2_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
_MBV2_FIRST = tuple(1 + sum(_MBV2_BLOCKS[:i]) for i in range(len(_MBV2_BLOCKS)))  # torchvision feature index


class MMDetCheckpoint(NamedTuple):
    """What :func:`extract_mmdet` finds in a loaded file: mmdetection-keyed tensors and the class names."""

    state_dict: dict[str, torch.Tensor]
    class_names: tuple[str, ...] | None
    meta: dict[str, Any]


def _model_name(spec_or_model: DetectorSpec | str) -> str:
    name = spec_or_model.name if isinstance(spec_or_model, DetectorSpec) else spec_or_model
    if not isinstance(name, str):
        raise TypeError(f"spec_or_family: expected a DetectorSpec or a model name, got {type(name).__name__}")
    if name not in _MODELS:
        raise ValueError(f"spec_or_family: expected one of {sorted(_MODELS)}, got {name!r}")
    return name


def _upgrade_pre_v2_14(state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> dict[str, torch.Tensor]:
    """Rename keys of checkpoints saved before mmdetection 2.14 (SSD neck/head refactor) to the current names."""
    out: dict[str, torch.Tensor] = {}
    for old_key, value in state_dict.items():
        key = old_key
        m = _OLD_EXTRA_KEY.match(key)
        if m:
            i = int(m.group(1))
            key = f"neck.extra_layers.{i // 2}.{i % 2}.conv.{m.group(2)}"
        elif key == "backbone.l2_norm.weight":
            key = "neck.l2_norm.weight"
        else:
            m = _OLD_HEAD_KEY.match(key)
            if m:
                key = f"bbox_head.{m.group(1)}_convs.{m.group(2)}.0.{m.group(3)}"
        if key in out:
            # An old and a current name of one weight: loading either would silently drop the other.
            raise InvalidCheckpointError(f"checkpoint {source!r}: key {old_key!r} and another key both name {key!r} "
                                         "(mmdetection's names before and after 2.14); refusing to guess")
        out[key] = value
    return out


def _describe(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """What another family's state dict is, or None when its keys say nothing."""
    keys = list(state_dict)
    if any(k.startswith(("feature_extractor.", "additional_blocks.")) for k in keys):
        return "an NVIDIA SSD300 (ResNet-50) state dict"
    if any(k.startswith("head.classification_head.") for k in keys):
        return "a torchvision SSD state dict"
    return None


def identify_mmdet(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """``(model name, foreground classes)`` of an mmdetection SSD state dict (current or pre-2.14 keys), else None."""
    try:
        return _identify(state_dict, "state_dict")
    except InvalidCheckpointError:
        return None


def _identify(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[str, int] | None:
    """:func:`identify_mmdet`, raising :class:`InvalidCheckpointError` naming the key when the heads are malformed."""
    state_dict = _upgrade_pre_v2_14(state_dict, source)
    if "backbone.features.0.weight" in state_dict and "neck.l2_norm.weight" in state_dict:
        family = "vgg16"
    elif "backbone.conv1.conv.weight" in state_dict and "backbone.conv2.conv.weight" in state_dict:
        family = "mobilenetv2"
    else:
        return None
    levels = {int(m.group(2)) for m in map(_HEAD_KEY.match, state_dict) if m}
    names = [n for n, (fam, count) in _MODELS.items() if fam == family and count == len(levels)]
    if not names or levels != set(range(len(levels))):
        return None
    # The last conv of a level's head predicts: cls has anchors x (classes + 1) channels, reg anchors x 4.
    last = ".0." if family == "vgg16" else ".1."
    cls_key, reg_key = f"bbox_head.cls_convs.0{last}weight", f"bbox_head.reg_convs.0{last}weight"
    for key in (cls_key, reg_key):
        if key not in state_dict:
            raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r} (a head's predictor) is missing")
        if state_dict[key].ndim < 2:
            raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r}: expected a convolution weight, got "
                                         f"shape {tuple(state_dict[key].shape)}")
    cls, reg = state_dict[cls_key], state_dict[reg_key]
    anchors, rest = divmod(reg.shape[0], 4)
    if anchors == 0 or rest:
        raise InvalidCheckpointError(f"checkpoint {source!r}: key {reg_key!r}: expected anchors x 4 output channels, "
                                     f"got shape {tuple(reg.shape)}")
    if cls.shape[0] % anchors or cls.shape[0] // anchors < 2:
        raise InvalidCheckpointError(f"checkpoint {source!r}: key {cls_key!r}: expected {anchors} x (classes + 1) "
                                     f"output channels with at least one class, got shape {tuple(cls.shape)}")
    return names[0], cls.shape[0] // anchors - 1


def _mbv2_key(key: str) -> str | None:
    """A MobileNetV2 backbone key of mmdetection as torchvision's ``mobilenet_v2().features`` names it."""
    m = re.match(r"^conv([12])\.(conv|bn)\.(.+)$", key)
    if m:
        index = 0 if m.group(1) == "1" else 18
        return f"features.{index}.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
    m = re.match(r"^layer([1-7])\.(\d+)\.(expand_conv|depthwise_conv|linear_conv)\.(conv|bn)\.(.+)$", key)
    if not m:
        return None
    stage, block, part, kind, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3), m.group(4), m.group(5)
    if block >= _MBV2_BLOCKS[stage]:
        return None
    # torchvision's block: [expand (conv, bn, relu6)], depthwise (conv, bn, relu6), linear conv, bn; the first
    # stage (t = 1) has no expansion, which shifts everything down by one.
    shift = 0 if stage == 0 else 1
    if part == "expand_conv":
        if stage == 0:
            return None
        inner = f"0.{0 if kind == 'conv' else 1}"
    elif part == "depthwise_conv":
        inner = f"{shift}.{0 if kind == 'conv' else 1}"
    else:
        inner = str(shift + 1 + (kind == "bn"))
    return f"features.{_MBV2_FIRST[stage] + block}.conv.{inner}.{rest}"


def _rename(key: str, family: str) -> str | None:
    if family == "vgg16":
        rules = (
            (r"^backbone\.features\.(\d+)\.(weight|bias)$", r"features.\1.\2"),
            (r"^neck\.l2_norm\.weight$", "l2_norm.weight"),
            (r"^neck\.extra_layers\.(\d+)\.0\.conv\.(weight|bias)$", r"extra_layers.\1.0.\2"),
            (r"^neck\.extra_layers\.(\d+)\.1\.conv\.(weight|bias)$", r"extra_layers.\1.2.\2"),
            (r"^bbox_head\.reg_convs\.(\d+)\.0\.(weight|bias)$", r"loc.\1.\2"),
            (r"^bbox_head\.cls_convs\.(\d+)\.0\.(weight|bias)$", r"conf.\1.\2"),
        )
    else:
        if key.startswith("backbone."):
            return _mbv2_key(key[len("backbone."):])
        rules = (
            (r"^neck\.extra_layers\.(\d+)\.0\.conv\.(.+)$", r"extra_layers.\1.0.0.\2"),
            (r"^neck\.extra_layers\.(\d+)\.0\.bn\.(.+)$", r"extra_layers.\1.0.1.\2"),
            (r"^neck\.extra_layers\.(\d+)\.1\.depthwise_conv\.conv\.(.+)$", r"extra_layers.\1.1.0.\2"),
            (r"^neck\.extra_layers\.(\d+)\.1\.depthwise_conv\.bn\.(.+)$", r"extra_layers.\1.1.1.\2"),
            (r"^neck\.extra_layers\.(\d+)\.1\.pointwise_conv\.conv\.(.+)$", r"extra_layers.\1.2.0.\2"),
            (r"^neck\.extra_layers\.(\d+)\.1\.pointwise_conv\.bn\.(.+)$", r"extra_layers.\1.2.1.\2"),
            (r"^bbox_head\.reg_convs\.(\d+)\.0\.conv\.(.+)$", r"loc.\1.0.0.\2"),
            (r"^bbox_head\.reg_convs\.(\d+)\.0\.bn\.(.+)$", r"loc.\1.0.1.\2"),
            (r"^bbox_head\.reg_convs\.(\d+)\.1\.(weight|bias)$", r"loc.\1.1.\2"),
            (r"^bbox_head\.cls_convs\.(\d+)\.0\.conv\.(.+)$", r"conf.\1.0.0.\2"),
            (r"^bbox_head\.cls_convs\.(\d+)\.0\.bn\.(.+)$", r"conf.\1.0.1.\2"),
            (r"^bbox_head\.cls_convs\.(\d+)\.1\.(weight|bias)$", r"conf.\1.1.\2"),
        )
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _background_first(tensor: torch.Tensor, num_classes: int, key: str, source: str) -> torch.Tensor:
    """Class channels a * C + c with background at c = C - 1 (mmdetection) moved to c = 0, per anchor a."""
    if tensor.ndim == 0 or tensor.shape[0] % num_classes:
        raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r}: expected anchors x {num_classes} output "
                                     f"channels (classes + 1), got shape {tuple(tensor.shape)}")
    blocks = tensor.reshape(tensor.shape[0] // num_classes, num_classes, *tensor.shape[1:])
    return torch.cat([blocks[:, -1:], blocks[:, :-1]], dim=1).reshape(tensor.shape).contiguous()


def convert_mmdet_state_dict(state_dict: Mapping[str, torch.Tensor], spec_or_family: DetectorSpec | str,
                             source: str = "state_dict") -> dict[str, torch.Tensor]:
    """mmdetection SSD tensors (current or pre-2.14 key names) renamed for this package's model of that name.

    Args:
        state_dict: ``checkpoint['state_dict']`` of an mmdetection SSD300, SSD512 or SSDLite checkpoint, for any
            number of classes (read from its class predictors).
        spec_or_family: the spec of the model to load into, or its name (``"ssd300_vgg16"``, ``"ssd512_vgg16"``,
            ``"ssdlite320_mobilenet_v2"``).
        source: what to call the input in errors (the file name).

    Returns:
        A new dict of checked tensors for ``model.load_state_dict``; class channels reordered to background first.

    Raises:
        InvalidCheckpointError: the tensors belong to another model, have unknown keys or malformed heads, or are
            not weights (NaN, integers, meta tensors, both ``module.x`` and ``x``).
    """
    expected = _model_name(spec_or_family)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of tensors, got {type(state_dict).__name__}")
    return _convert(tensors(state_dict, source), expected, source)


def _convert(state_dict: dict[str, torch.Tensor], expected: str, source: str) -> dict[str, torch.Tensor]:
    """:func:`convert_mmdet_state_dict` of tensors already checked (:func:`ssd.weights.formats.tensors`)."""
    state_dict = _upgrade_pre_v2_14(state_dict, source)
    found = _identify(state_dict, source)
    if found is None:
        what = _describe(state_dict) or f"a state dict with keys such as {list(state_dict)[:3]!r}"
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected an mmdetection {expected} checkpoint, got {what}")
    name, classes = found
    if name != expected:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected an mmdetection {expected} checkpoint, got one of {name}")
    family = _MODELS[name][0]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new_key = _rename(key, family)
        if new_key is None:
            unknown.append(key)
            continue
        if _CLS_PREDICTOR.match(key):
            value = _background_first(value, classes + 1, key, source)
        out[new_key] = value
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: unexpected keys for mmdetection {expected}: {', '.join(unknown[:5])}{more}")
    return out


def _class_names(meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    # mmdetection 2.x writes meta['CLASSES']; 3.x writes meta['dataset_meta']['classes'].
    names = meta.get("CLASSES")
    dataset_meta = meta.get("dataset_meta")
    if names is None and isinstance(dataset_meta, Mapping):
        names = dataset_meta.get("classes")
    if names is None:
        return None
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"meta classes: expected a sequence of class names, got {names!r:.80}")
    return tuple(names)


def _class_spec(names: tuple[str, ...] | None) -> ClassSpec | None:
    """mmdetection's class names as ours: COCO's keep COCO's category ids, others are numbered 1..K."""
    if names is None:
        return None
    if names == COCO_NAMES:
        return mmdet_classes()
    return ClassSpec(names, tuple(range(1, len(names) + 1)))


def extract_mmdet(obj: object, source: str) -> MMDetCheckpoint:
    """The checked tensors and the class names of a loaded mmdetection checkpoint ``{'meta': ..., 'state_dict': ...}``.

    A bare state dict (no meta) is accepted too. ``source`` names the file in errors.

    Raises:
        InvalidCheckpointError: ``obj`` holds no state dict of weights, or its meta's class names are malformed.
    """
    meta: dict[str, Any] = {}
    wrapped = isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
    if wrapped:
        if isinstance(obj.get("meta"), Mapping):
            meta = dict(obj["meta"])
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected an mmdetection checkpoint (a dict with 'meta' and 'state_dict'), "
            f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad and not wrapped:
        # Not mmdetection's layout at all: say what it looks like (NVIDIA's training files keep weights in 'model').
        what = "NVIDIA's training checkpoint layout" if isinstance(obj.get("model"), Mapping) else "a dict"
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected an mmdetection checkpoint (a dict with 'meta' and 'state_dict'), "
            f"got {what} with keys {[str(k)[:40] for k in list(obj)[:5]]!r}")
    try:
        names = _class_names(meta)
    except TypeError as exc:
        raise InvalidCheckpointError(f"checkpoint {source!r}: {exc}") from None
    return MMDetCheckpoint(tensors(obj, source), names, meta)


def to_state_dict(obj: object, source: str, spec: DetectorSpec) -> tuple[dict[str, torch.Tensor], ClassSpec | None]:
    """The converter of this family (see :mod:`ssd.weights.formats`): our tensors and the classes of an mmdetection
    checkpoint object of ``spec``'s model. A bare state dict already under our key names (``torch.save(
    model.state_dict())``) passes as it is."""
    try:
        found = extract_mmdet(obj, source)
    except InvalidCheckpointError as exc:
        # Say which model the file was meant for: the message already names the file and what it holds.
        raise InvalidCheckpointError(f"{exc} (loading it into {spec.name})") from None
    classes = _class_spec(found.class_names)
    if not any(k.startswith(_MMDET_PREFIXES) for k in found.state_dict):
        what = _describe(found.state_dict)
        if what is not None:
            raise InvalidCheckpointError(
                f"checkpoint {source!r}: expected an mmdetection {spec.name} checkpoint, got {what}")
        return found.state_dict, classes
    return _convert(found.state_dict, spec.name, source), classes
