"""The builders behind the hub entrypoints: network, weights and precision, with validated options."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .models.base import Detector
from .models.spec import DetectorSpec
from .models.ssd300_resnet50 import NVIDIA_SSD300, SSD300, nvidia_spec
from .weights.checkpoints import VARIANTS, cache_dir, check_fits, is_url, load_into, resolve_state_dict, url_cache_name
from .weights.metadata import load_except_heads, read_checkpoint_classes

MODEL_MATHS = ("fp32", "fp16")


def half_with_float_batchnorm(model: nn.Module) -> nn.Module:
    """Convert weights to float16 but keep BatchNorm in float32, as NVIDIA's entrypoint does.

    BatchNorm statistics lose too much in half precision, and cuDNN accepts half inputs with float32 BatchNorm.
    """
    model.half()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.float()
    return model


def _expect_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def build_ssd300(
    pretrained: bool = True,
    model_math: str = "fp32",
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    force_download: bool = False,
    progress: bool = True,
    num_classes: int | None = None,
    class_names: tuple[str, ...] | list[str] | None = None,
) -> SSD300:
    """Build SSD300 (ResNet-50), load its weights and set its precision; see ``hubconf.nvidia_ssd``.

    ``num_classes`` (background included) or ``class_names`` start a fine-tuning: the classification heads are
    new (Xavier-initialised, as NVIDIA's training does) unless the checkpoint's own classes are the same, and
    every other tensor comes from the checkpoint. Without them, a checkpoint written by ``python -m ssd train``
    gives a model with its dataset's class names and category ids.
    """
    pretrained = _expect_bool("pretrained", pretrained)
    force_download = _expect_bool("force_download", force_download)
    progress = _expect_bool("progress", progress)
    if model_math not in MODEL_MATHS:
        raise ValueError(f"model_math: expected one of {', '.join(map(repr, MODEL_MATHS))}, got {model_math!r}")
    if weights is not None and weights not in VARIANTS:
        raise ValueError(f"weights: expected one of {', '.join(map(repr, VARIANTS))}, got {weights!r}")
    if not pretrained and (weights is not None or checkpoint is not None):
        warnings.warn("pretrained=False: the weights/checkpoint argument is ignored", UserWarning, stacklevel=3)

    spec = _requested_spec(num_classes, class_names)

    if pretrained:
        # A download is checked against SSD300 (with whatever class count it holds) before it enters the cache.
        state_dict, source = resolve_state_dict(
            weights or model_math, checkpoint, force_download=force_download, progress=progress,
            validate=_fits_ssd300,
        )
        stored = _stored_classes(source)
        if spec is None and stored is not None:
            spec = nvidia_spec(class_names=stored[0], category_ids=stored[1])
        # Checkpoints without class metadata (NVIDIA's) hold COCO's heads.
        stored_names = stored[0] if stored is not None else NVIDIA_SSD300.classes.names
        new_heads = class_names is not None and tuple(class_names) != tuple(stored_names)
        if spec is not None and (new_heads or _head_misfit(spec, state_dict)):
            # Fine-tuning: the new heads need their initialisation, so this model is built for real.
            model = SSD300(spec)
            load_except_heads(model, state_dict, source, new_heads=new_heads)
        else:
            # Every value comes from the checkpoint, so skip initialising 23M random weights (a third of the load
            # time): build on the meta device and adopt the loaded tensors; float32 whatever the file stored.
            with torch.device("meta"):
                model = SSD300(spec)
            load_into(model, state_dict, source, assign=True)
        model.float()
        model.checkpoint_source = source
    else:
        model = SSD300(spec)
    if model_math == "fp16":
        if not torch.cuda.is_available():
            warnings.warn(
                "model_math='fp16' without CUDA: half-precision convolutions on the CPU are very slow (about "
                "100x slower than fp32); use model_math='fp32' on CPU (and detect(..., precision='bf16') where "
                "the CPU supports bfloat16)",
                UserWarning,
                stacklevel=3,
            )
        half_with_float_batchnorm(model)
    return model.eval()


def _requested_spec(num_classes: int | None, class_names: object) -> DetectorSpec | None:
    if num_classes is None and class_names is None:
        return None
    if class_names is not None:
        if isinstance(class_names, str) or not isinstance(class_names, (list, tuple)) or not all(
            isinstance(n, str) for n in class_names
        ):
            raise TypeError(f"class_names: expected a list of strings, got {class_names!r}")
        class_names = tuple(class_names)
    return nvidia_spec(num_classes=num_classes, class_names=class_names)


def _stored_classes(source: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    # A URL's file sits in the cache under its file name once resolve_state_dict has fetched it.
    path = cache_dir() / url_cache_name(source) if is_url(source) else source
    return read_checkpoint_classes(path)


def _head_misfit(spec: DetectorSpec, state_dict: dict[str, torch.Tensor]) -> bool:
    weight = state_dict.get("conf.0.weight")
    return weight is None or weight.shape[0] != spec.anchors.boxes_per_location[0] * spec.num_classes


def _fits_ssd300(state_dict: dict[str, torch.Tensor], source: str) -> None:
    weight = state_dict.get("conf.0.weight")
    per_cell = NVIDIA_SSD300.anchors.boxes_per_location[0]
    classes = weight.shape[0] // per_cell if isinstance(weight, torch.Tensor) and weight.ndim == 4 else 0
    with torch.device("meta"):
        model = SSD300(num_classes=classes) if classes >= 2 else SSD300()
    check_fits(model, state_dict, source)


def build_mmdet(
    name: str,
    pretrained: bool = True,
    *,
    checkpoint: str | os.PathLike | None = None,
    force_download: bool = False,
    progress: bool = True,
    num_classes: int | None = None,
) -> Detector:
    """Build one of mmdetection's SSDs (``ssd300_vgg16``, ``ssd512_vgg16``, ``ssdlite320_mobilenet_v2``).

    ``pretrained`` loads mmdetection's published COCO checkpoint (or ``checkpoint``, a path or URL of an
    mmdetection-format file); ``num_classes`` (background included) gives new classification heads for fine-tuning,
    every other tensor coming from the checkpoint.
    """
    from .models import NETWORKS
    from .weights.mmdet import resolve_mmdet_state_dict

    if name not in MMDET_MODELS:
        raise ValueError(f"name: expected one of {', '.join(map(repr, MMDET_MODELS))}, got {name!r}")
    pretrained = _expect_bool("pretrained", pretrained)
    force_download = _expect_bool("force_download", force_download)
    progress = _expect_bool("progress", progress)
    from .models.mmdet_common import with_num_classes

    network, spec = NETWORKS[name]
    if not pretrained and checkpoint is not None:
        warnings.warn("pretrained=False: the checkpoint argument is ignored", UserWarning, stacklevel=3)
    model = network(with_num_classes(spec, num_classes))
    if pretrained:
        state_dict, source = resolve_mmdet_state_dict(spec, checkpoint, force_download=force_download,
                                                      progress=progress)
        if model.spec.num_classes == spec.num_classes:
            model.load_state_dict(state_dict, strict=True)
        else:
            # Fine-tuning start: the class predictors are new (their shapes differ), everything else is kept.
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in state_dict.items() if v.shape == own[k].shape}, strict=False)
        model.checkpoint_source = source
    return model.eval()


MMDET_MODELS = ("ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v2")


def build_model(name: str = "nvidia_ssd", **kwargs: Any) -> Detector:
    """Any model of the library by name: ``nvidia_ssd`` or one of :data:`MMDET_MODELS` (what ``--model`` takes)."""
    if name == "nvidia_ssd":
        return build_ssd300(**kwargs)
    if name in MMDET_MODELS:
        kwargs.pop("model_math", None)
        return build_mmdet(name, **kwargs)
    raise ValueError(f"model: expected one of 'nvidia_ssd', {', '.join(map(repr, MMDET_MODELS))}, got {name!r}")
