"""torchvision's two COCO SSDs as the tests make them: torchvision's own model code (``weights=None,
weights_backbone=None``: nothing is downloaded) with key-seeded weights that see objects in the sample photos.

torchvision's own initialisation is no test of anything: its SSDLite scores every box ~1e-14 (N(0, 0.03) weights
through a dozen layers), and its SSD300 sees nothing either. So every tensor is drawn from a generator seeded by its
key (He-normal convolutions, BatchNorm statistics near 1), the last convolution of each predictor is rescaled so
that its outputs have unit spread on a sample photo, and then, as the other families' tests do, class biases are
raised: the background's everywhere (most boxes score below torchvision's thresholds) and a few classes' on a few
feature maps (those boxes are detections).
"""
from __future__ import annotations

import functools
import math
import zlib

import torch

from . import photo

# Our model name -> torchvision's builder in torchvision.models.detection.
TORCHVISION_BUILDERS = {
    "tv_ssd300_vgg16": "ssd300_vgg16",
    "tv_ssdlite320_mobilenet_v3_large": "ssdlite320_mobilenet_v3_large",
}
# Per feature map: (label, bias) raised at every cell, the box shapes of a cell 2 apart so that no two nearly tie.
DETECTING_BIASES = {5: (1, 9.0), 4: (17, 8.0), 3: (47, 7.0)}  # person, cat and cup (COCO ids 1, 17, 47)
BACKGROUND_BIAS = 6.0


def torchvision_model(name: str, state_dict: dict[str, torch.Tensor] | None = None,
                      num_classes: int | None = None) -> torch.nn.Module:
    """torchvision's model for our ``name``, in eval mode, with ``state_dict`` if given."""
    from torchvision.models import detection

    builder = getattr(detection, TORCHVISION_BUILDERS[name])
    extra = {} if num_classes is None else {"num_classes": num_classes}
    model = builder(weights=None, weights_backbone=None, **extra)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def _seeded(key: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if not dtype.is_floating_point:  # BatchNorm's num_batches_tracked
        return torch.zeros(shape, dtype=dtype)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=generator) + 0.5
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=generator) * 0.1
    if len(shape) == 4:
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / math.prod(shape[1:]))
    if key == "backbone.scale_weight":  # SSD300's L2 scale, 20 in torchvision's initialisation
        return 20.0 + torch.randn(shape, generator=generator)
    if key.endswith(".weight"):  # BatchNorm's scale
        return torch.rand(shape, generator=generator) + 0.5
    return torch.randn(shape, generator=generator) * 0.05


def _predictor_key(name: str, head: str, level: int, param: str) -> str:
    last = ".1" if name == "tv_ssdlite320_mobilenet_v3_large" else ""
    return f"head.{head}.module_list.{level}{last}.{param}"


@torch.no_grad()
def _calibrate(name: str, state: dict[str, torch.Tensor]) -> None:
    """Scale each predictor's last (linear) convolution so that its outputs have unit spread on a sample photo."""
    model = torchvision_model(name, state)
    image = torch.from_numpy(photo("astronaut")).permute(2, 0, 1).float() / 255
    features = list(model.backbone(model.transform([image])[0].tensors).values())
    for head in ("classification_head", "regression_head"):
        for level, (predictor, feature) in enumerate(zip(getattr(model.head, head).module_list, features)):
            spread = float(predictor(feature).std())
            for param in ("weight", "bias"):
                key = _predictor_key(name, head, level, param)
                state[key] = state[key] / spread


@functools.lru_cache(maxsize=2)
def _detecting(name: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = torchvision_model(name).state_dict()
    state = {key: _seeded(key, value.shape, value.dtype, seed) for key, value in shapes.items()}
    _calibrate(name, state)
    classes = 91
    for level in range(6):
        key = _predictor_key(name, "classification_head", level, "bias")
        bias = state[key].clone()
        per_cell = bias.numel() // classes
        # Channel a * 91 + c scores class c at box shape a (torchvision's layout, and ours).
        by_class = bias.view(per_cell, classes)
        by_class[:, 0] += BACKGROUND_BIAS
        if level in DETECTING_BIASES:
            label, raise_by = DETECTING_BIASES[level]
            by_class[:, label] += raise_by - 2.0 * torch.arange(per_cell)
        state[key] = bias
    return state


def detecting_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's state dict of model ``name`` (our name) with the weights the module docstring describes.

    Cached: a new dict each call, over shared tensors that callers must not modify in place.
    """
    return dict(_detecting(name, seed))
