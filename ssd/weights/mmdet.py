"""mmdetection's SSD checkpoints (SSD300, SSD512, SSDLite-MobileNetV2): the published files and key conversion.

An mmdetection checkpoint is ``{'meta': {...}, 'state_dict': {...}}`` with keys under ``backbone.``, ``neck.`` and
``bbox_head.``; its class channels put background LAST. :func:`convert_mmdet_state_dict` renames the keys to this
package's modules and moves background to channel 0 of every anchor's block, which is what every model here
expects. Files are read with ``torch.load(weights_only=True)`` (see :mod:`ssd.weights.checkpoints`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..models.spec import DetectorSpec
from .checkpoints import (
    CheckpointUnavailableError,
    InvalidCheckpointError,
    cache_dir,
    download,
    is_url,
    load_checkpoint_object,
    strip_distributed_prefix,
    url_cache_name,
)

__all__ = [
    "MMDET_CHECKPOINTS",
    "MMDetCheckpoint",
    "MMDetCheckpointInfo",
    "convert_mmdet_state_dict",
    "extract_mmdet",
    "identify_mmdet",
    "load_mmdet_state_dict",
    "load_mmdet_weights",
    "resolve_mmdet_state_dict",
]

_BASE_URL = "https://download.openmmlab.com/mmdetection/v2.0/ssd"


@dataclass(frozen=True)
class MMDetCheckpointInfo:
    """One published mmdetection checkpoint: the model it fits, its file, URL and published accuracy."""

    name: str  # the model name (``ssd.models.NETWORKS`` key)
    file_name: str
    url: str
    sha256_prefix: str  # the 8 hex digits in the file name (torch.hub's check_hash convention)
    num_classes: int  # foreground classes (COCO's 80)
    box_ap: float  # COCO val2017 box AP as published by mmdetection, in percent


def _info(name: str, folder: str, file_name: str, box_ap: float) -> MMDetCheckpointInfo:
    prefix = re.search(r"-([0-9a-f]{8})\.pth$", file_name)
    if prefix is None:  # pragma: no cover - a typo in the table below
        raise ValueError(f"file_name: expected a name ending in -<8 hex digits>.pth, got {file_name!r}")
    return MMDetCheckpointInfo(name, file_name, f"{_BASE_URL}/{folder}/{file_name}", prefix.group(1), 80, box_ap)


MMDET_CHECKPOINTS: dict[str, MMDetCheckpointInfo] = {
    info.name: info
    for info in (
        _info("ssd300_vgg16", "ssd300_coco", "ssd300_coco_20210803_015428-d231a06e.pth", 25.5),
        _info("ssd512_vgg16", "ssd512_coco", "ssd512_coco_20210803_022849-0a47a1ca.pth", 29.5),
        _info("ssdlite320_mobilenet_v2", "ssdlite_mobilenetv2_scratch_600e_coco",
              "ssdlite_mobilenetv2_scratch_600e_coco_20210629_110627-974d9307.pth", 21.3),
    )
}

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
_NUMPY_GLOBALS: tuple = (
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(kind)) for kind in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                        "uint64", "float16", "float32", "float64")),
)

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


def _upgrade_pre_v2_14(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys of checkpoints saved before mmdetection 2.14 (SSD neck/head refactor) to the current names."""
    out = {}
    for key, value in state_dict.items():
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
        out[key] = value
    return out


def _describe(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(k.startswith(("feature_extractor.", "additional_blocks.")) for k in keys):
        return "an NVIDIA SSD300 (ResNet-50) state dict"
    if any(k.startswith("head.classification_head.") for k in keys):
        return "a torchvision SSD state dict"
    return f"a state dict with keys such as {keys[:3]!r}"


def identify_mmdet(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """``(model name, foreground classes)`` of an mmdetection SSD state dict (current or pre-2.14 keys), else None."""
    state_dict = _upgrade_pre_v2_14(state_dict)
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
    cls = state_dict.get(f"bbox_head.cls_convs.0{last}weight")
    reg = state_dict.get(f"bbox_head.reg_convs.0{last}weight")
    if cls is None or reg is None or reg.shape[0] % 4 or cls.shape[0] % (reg.shape[0] // 4):
        return None
    return names[0], cls.shape[0] // (reg.shape[0] // 4) - 1


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


def _background_first(tensor: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class channels a * C + c with background at c = C - 1 (mmdetection) moved to c = 0, per anchor a."""
    blocks = tensor.reshape(tensor.shape[0] // num_classes, num_classes, *tensor.shape[1:])
    return torch.cat([blocks[:, -1:], blocks[:, :-1]], dim=1).reshape(tensor.shape).contiguous()


def convert_mmdet_state_dict(state_dict: Mapping[str, torch.Tensor], spec_or_family: DetectorSpec | str,
                             source: str = "state_dict") -> dict[str, torch.Tensor]:
    """mmdetection SSD tensors (current or pre-2.14 key names) renamed for this package's model of that name.

    Args:
        state_dict: ``checkpoint['state_dict']`` of an mmdetection SSD300, SSD512 or SSDLite checkpoint.
        spec_or_family: the spec of the model to load into, or its name (``"ssd300_vgg16"``, ``"ssd512_vgg16"``,
            ``"ssdlite320_mobilenet_v2"``); with a spec, the class count must match the checkpoint's.
        source: what to call the input in errors (the file name).

    Returns:
        A new dict for ``model.load_state_dict(strict=True)``; class channels reordered to background first.

    Raises:
        InvalidCheckpointError: the tensors belong to another model or class count, or have unknown keys.
    """
    expected = _model_name(spec_or_family)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of tensors, got {type(state_dict).__name__}")
    state_dict = _upgrade_pre_v2_14({strip_distributed_prefix(k): v for k, v in state_dict.items()})
    found = identify_mmdet(state_dict)
    if found is None:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected an mmdetection {expected} checkpoint, got {_describe(state_dict)}")
    name, classes = found
    if name != expected:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected an mmdetection {expected} checkpoint, got one of {name}")
    if isinstance(spec_or_family, DetectorSpec) and classes + 1 != spec_or_family.num_classes:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected {spec_or_family.num_classes - 1} classes for {expected}, got "
            f"{classes} (build the model with num_classes={classes + 1} to load it)")
    family = _MODELS[name][0]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new_key = _rename(key, family)
        if new_key is None:
            unknown.append(key)
            continue
        if _CLS_PREDICTOR.match(key):
            value = _background_first(value, classes + 1)
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
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"meta classes: expected a sequence of class names, got {names!r:.80}")
    return tuple(names)


def extract_mmdet(obj: object, source: str) -> MMDetCheckpoint:
    """The tensors and class names of a loaded mmdetection checkpoint ``{'meta': ..., 'state_dict': ...}``.

    A bare state dict (no meta) is accepted too. ``source`` names the file in errors.

    Raises:
        InvalidCheckpointError: ``obj`` holds no state dict of tensors, or its meta contradicts its weights.
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
            f"got {what} with keys {list(obj)[:5]!r}")
    if bad:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected a state dict of tensors, got non-tensor entries such as {bad[:3]!r}")
    try:
        names = _class_names(meta)
    except TypeError as exc:
        raise InvalidCheckpointError(f"checkpoint {source!r}: {exc}") from None
    state_dict = dict(obj)
    found = identify_mmdet(_upgrade_pre_v2_14(state_dict))
    if names is not None and found is not None and len(names) != found[1]:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected its meta to list the {found[1]} classes its weights predict, "
            f"got {len(names)} class names")
    return MMDetCheckpoint(state_dict, names, meta)


def load_mmdet_state_dict(path: str | os.PathLike, spec_or_family: DetectorSpec | str) -> dict[str, torch.Tensor]:
    """Read an mmdetection SSD checkpoint file safely and return its tensors under this package's key names.

    The file is loaded with ``torch.load(weights_only=True)``; besides tensors and plain Python data only numpy
    scalars are accepted in its meta. A file that needs any other code to unpickle is refused before it runs.

    Raises:
        FileNotFoundError: no such file.
        InvalidCheckpointError: unsafe or unreadable, or not a checkpoint of this model and class count.
    """
    obj = load_checkpoint_object(path, _NUMPY_GLOBALS)
    try:
        checkpoint = extract_mmdet(obj, str(path))
    except InvalidCheckpointError as exc:
        # Say which model the file was meant for: the message already names the file and what it holds.
        raise InvalidCheckpointError(f"{exc} (loading it into {_model_name(spec_or_family)})") from None
    return convert_mmdet_state_dict(checkpoint.state_dict, spec_or_family, str(path))


def _sha256_prefix(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def _read_published(path: pathlib.Path, spec: DetectorSpec, info: MMDetCheckpointInfo) -> dict[str, torch.Tensor]:
    # The hash is checked on the downloaded bytes before anything is unpickled, as torch.hub's check_hash does.
    found = _sha256_prefix(path)
    if found != info.sha256_prefix:
        raise InvalidCheckpointError(
            f"checkpoint {str(path)!r}: expected sha256 starting {info.sha256_prefix} ({info.file_name}), got {found}")
    return load_mmdet_state_dict(path, spec)


def resolve_mmdet_state_dict(spec: DetectorSpec, checkpoint: str | os.PathLike | None = None, *,
                             force_download: bool = False, progress: bool = True
                             ) -> tuple[dict[str, torch.Tensor], str]:
    """The converted weights for ``spec`` and where they came from: ``(state_dict, source)``.

    ``checkpoint``: a local file or a URL of an mmdetection checkpoint; None takes the published file of
    :data:`MMDET_CHECKPOINTS` from the torch.hub cache, downloading it (sha256 prefix checked) when absent.

    Raises:
        FileNotFoundError: a local ``checkpoint`` does not exist.
        CheckpointUnavailableError: the download failed.
        InvalidCheckpointError: the file is unsafe, corrupt, or of another model or class count.
    """
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"spec: expected a DetectorSpec, got {type(spec).__name__}")
    if checkpoint is not None:
        if not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"checkpoint: expected a path or URL string, got {type(checkpoint).__name__}")
        if not is_url(checkpoint):
            path = pathlib.Path(checkpoint).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"checkpoint: file {str(path)!r} does not exist")
            return load_mmdet_state_dict(path, spec), str(path)
        destination = cache_dir() / url_cache_name(str(checkpoint))
        if destination.is_file() and not force_download:
            return load_mmdet_state_dict(destination, spec), str(destination)
        reader = functools.partial(load_mmdet_state_dict, spec_or_family=spec)
        return download(str(checkpoint), destination, progress=progress, reader=reader), str(checkpoint)
    info = MMDET_CHECKPOINTS.get(spec.name)
    if info is None:
        raise ValueError(f"spec.name: expected one of {sorted(MMDET_CHECKPOINTS)} (no published checkpoint for "
                         f"it), got {spec.name!r}")
    destination = cache_dir() / info.file_name
    if destination.is_file() and not force_download:
        return load_mmdet_state_dict(destination, spec), str(destination)
    reader = functools.partial(_read_published, spec=spec, info=info)
    try:
        return download(info.url, destination, progress=progress, reader=reader), info.url
    except CheckpointUnavailableError as exc:
        raise CheckpointUnavailableError(exc.url, exc.reason, exc.detail, status=exc.status,
                                         message=f"{exc} Or copy {info.file_name} into {cache_dir()} under that "
                                                 "name.") from None


def load_mmdet_weights(model: torch.nn.Module, checkpoint: str | os.PathLike | None = None, *,
                       force_download: bool = False, progress: bool = True) -> str:
    """Load an mmdetection checkpoint into ``model`` (strictly) and return where it came from.

    See :func:`resolve_mmdet_state_dict` for ``checkpoint`` (None: the published weights of ``model.spec``).
    """
    spec = getattr(model, "spec", None)
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"model: expected a network of ssd.models (with a spec), got {type(model).__name__}")
    state_dict, source = resolve_mmdet_state_dict(spec, checkpoint, force_download=force_download,
                                                  progress=progress)
    model.load_state_dict(state_dict, strict=True)
    model.checkpoint_source = source
    return source
