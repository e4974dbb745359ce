"""mmdetection's SSD300 and SSD512: a VGG-16 trunk (no BN), an L2-normalised conv4_3, extra layers and 3x3 heads.

The layers are this package's own; :mod:`ssd.weights.mmdet` converts mmdetection's checkpoints to them (and
reorders the class channels to put background first, as every model here does).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .entry import ModelEntry
from .mmdet_common import (
    MMDET_MEAN,
    MMDET_POSTPROCESS,
    MMDetSSD,
    init_heads,
    mmdet_classes,
    mmdet_entry,
    mmdet_weights,
    resolve_spec,
)
from .spec import AnchorSpec, BoxCoderSpec, DetectorSpec, InputSpec

__all__ = ["MMDET_SSD300", "MMDET_SSD512", "MODELS", "L2Norm", "SSDVGG16", "vgg16_trunk"]

# mmdetection's DeltaXYWHBBoxCoder clamps the scaled log-size at |log(16 / 1000)|.
_MAX_LOG_SIZE = abs(math.log(16 / 1000))


def _vgg_spec(name: str, size: int, feature_sizes: tuple[int, ...], steps: tuple[int, ...],
              min_sizes: tuple[int, ...], max_sizes: tuple[int, ...], ratios: tuple[tuple[int, ...], ...],
              gflops: float) -> DetectorSpec:
    return DetectorSpec(
        name=name,
        description=f"SSD{size}, VGG-16 backbone (mmdetection), COCO",
        anchors=AnchorSpec(image_size=size, feature_sizes=feature_sizes, steps=steps, min_sizes=min_sizes,
                           max_sizes=max_sizes, aspect_ratios=ratios, order="location_major", clamp=False),
        box_coder=BoxCoderSpec(center_variance=0.1, size_variance=0.2, max_log_size=_MAX_LOG_SIZE),
        classes=mmdet_classes(),
        input=InputSpec(size=size, mean=MMDET_MEAN, std=(1.0, 1.0, 1.0), value_range=255.0, resize="bilinear"),
        postprocess=MMDET_POSTPROCESS,
        detect_postprocess=MMDET_POSTPROCESS,
        meta={"gflops": gflops},
    )


MMDET_SSD300 = _vgg_spec(
    "ssd300_vgg16", 300, (38, 19, 10, 5, 3, 1), (8, 16, 32, 64, 100, 300),
    (21, 45, 99, 153, 207, 261), (45, 99, 153, 207, 261, 315),
    ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), gflops=68.7,
)
MMDET_SSD512 = _vgg_spec(
    "ssd512_vgg16", 512, (64, 32, 16, 8, 4, 2, 1), (8, 16, 32, 64, 128, 256, 512),
    (20, 51, 133, 215, 296, 378, 460), (51, 133, 215, 296, 378, 460, 542),
    ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)), gflops=197.3,
)

# Extra layers per model: (output channels, stride, padding, kernel of the second conv); the first conv of each
# is a 1 x 1 to half the output channels.
_EXTRAS = {
    300: ((512, 2, 1, 3), (256, 2, 1, 3), (256, 1, 0, 3), (256, 1, 0, 3)),
    512: ((512, 2, 1, 3), (256, 2, 1, 3), (256, 2, 1, 3), (256, 2, 1, 3), (256, 1, 1, 4)),
}
# Output of the trunk: conv4_3 (index 22, its ReLU) then fc7.
_CONV4_3 = 23


def vgg16_trunk() -> nn.Sequential:
    """VGG-16's conv layers with ceil-mode pools, then pool5 3x3/1, fc6 (dilation 6) and fc7 as convolutions.

    Indices are torchvision's ``vgg16().features`` (0-29), then 30 pool5, 31 fc6, 32 ReLU, 33 fc7, 34 ReLU.
    """
    layers: list[nn.Module] = []
    channels = 3
    for block, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        if block < 4:
            # ceil_mode: 75 -> 38 at 300 (floor would give 37 and misplace every default box).
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    layers += [
        nn.MaxPool2d(3, 1, padding=1),
        nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
        nn.ReLU(inplace=True),
        nn.Conv2d(1024, 1024, 1),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers)


class L2Norm(nn.Module):
    """``weight[c] * x / (||x||_2 over channels + eps)``: the eps is added after the square root, as mmdetection."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 even under autocast: squaring 512 activations overflows or loses the sum in half precision.
        xf = x.float()
        norm = xf.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return (self.weight.float()[None, :, None, None] * xf / norm).to(x.dtype)


def _extra_layer(in_channels: int, out_channels: int, stride: int, padding: int, kernel: int) -> nn.Sequential:
    mid = out_channels // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, kernel, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


class SSDVGG16(MMDetSSD):
    """mmdetection's SSD300 or SSD512 (VGG-16), picked by ``spec`` (default :data:`MMDET_SSD300`).

    ``forward(x)`` takes N x 3 x S x S (RGB 0..255 minus the mean) and returns the raw ``(locs N x 4 x A,
    confs N x C x A)``, class 0 being background and the A default boxes in mmdetection's order (feature map,
    row, column, box). ``num_classes`` (background included) gives new, freshly initialised heads.
    """

    def __init__(self, spec: DetectorSpec | None = None, num_classes: int | None = None) -> None:
        spec = resolve_spec(MMDET_SSD300, spec, num_classes)
        super().__init__(spec)
        size = spec.anchors.image_size
        if size not in _EXTRAS:
            raise ValueError(f"spec.anchors.image_size: expected 300 or 512 for SSDVGG16, got {size}")
        extras = _EXTRAS[size]
        if len(spec.anchors.feature_sizes) != 2 + len(extras):
            raise ValueError(f"spec.anchors.feature_sizes: expected {2 + len(extras)} levels for SSD{size}, "
                             f"got {len(spec.anchors.feature_sizes)}")
        self.features = vgg16_trunk()
        self.l2_norm = L2Norm(512)
        channels = [512, 1024]
        layers = []
        for out_channels, stride, padding, kernel in extras:
            layers.append(_extra_layer(channels[-1], out_channels, stride, padding, kernel))
            channels.append(out_channels)
        self.extra_layers = nn.ModuleList(layers)
        self.num_classes = spec.num_classes
        per_cell = spec.anchors.boxes_per_location
        self.loc = nn.ModuleList(nn.Conv2d(c, n * 4, 3, padding=1) for c, n in zip(channels, per_cell))
        self.conf = nn.ModuleList(nn.Conv2d(c, n * self.num_classes, 3, padding=1) for c, n in zip(channels, per_cell))
        init_heads([self.extra_layers, self.loc, self.conf])

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps the heads read: L2-normalised conv4_3, fc7, then each extra layer's output."""
        conv4_3 = self.features[:_CONV4_3](x)
        x = self.features[_CONV4_3:](conv4_3)
        maps = [self.l2_norm(conv4_3), x]
        for layer in self.extra_layers:
            x = layer(x)
            maps.append(x)
        return maps


MODELS: dict[str, ModelEntry] = {
    MMDET_SSD300.name: mmdet_entry(
        MMDET_SSD300, SSDVGG16, mmdet_weights("ssd300_coco", "ssd300_coco_20210803_015428-d231a06e.pth", 0.255),
        class_predictor="conf.{level}.{param}"),
    MMDET_SSD512.name: mmdet_entry(
        MMDET_SSD512, SSDVGG16, mmdet_weights("ssd512_coco", "ssd512_coco_20210803_022849-0a47a1ca.pth", 0.295),
        class_predictor="conf.{level}.{param}"),
}
