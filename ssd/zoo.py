"""The one builder behind the ``nvidia_ssd`` entrypoint: model, precision and weights, with validated options."""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .models.spec import DetectorSpec
from .models.ssd300_resnet50 import NVIDIA_SSD300, SSD300, nvidia_spec
from .weights.checkpoints import VARIANTS, cache_dir, is_url, load_into, resolve_state_dict, url_file_name
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
        state_dict, source = resolve_state_dict(
            weights or model_math, checkpoint, force_download=force_download, progress=progress
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
    path = cache_dir() / url_file_name(source) if is_url(source) else source
    return read_checkpoint_classes(path)


def _head_misfit(spec: DetectorSpec, state_dict: dict[str, torch.Tensor]) -> bool:
    weight = state_dict.get("conf.0.weight")
    return weight is None or weight.shape[0] != spec.anchors.boxes_per_location[0] * spec.num_classes
