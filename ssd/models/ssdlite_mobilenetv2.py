"""mmdetection's SSDLite (MobileNetV2 trunk at 320 x 320, depthwise-separable extra layers and heads)."""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .entry import ModelEntry
from .mmdet_common import (
    MMDET_MEAN,
    MMDET_POSTPROCESS,
    MMDET_STD,
    MMDetSSD,
    init_heads,
    mmdet_classes,
    mmdet_entry,
    mmdet_weights,
    resolve_spec,
)
from .spec import AnchorSpec, BoxCoderSpec, DetectorSpec, InputSpec

__all__ = ["MMDET_SSDLITE320", "MODELS", "SSDLiteMobileNetV2"]

MMDET_SSDLITE320 = DetectorSpec(
    name="ssdlite320_mobilenet_v2",
    description="SSDLite 320, MobileNetV2 backbone trained from scratch (mmdetection), COCO",
    anchors=AnchorSpec(
        image_size=320,
        feature_sizes=(20, 10, 5, 3, 2, 1),
        # 320 / 3 is not whole: mmdetection uses 107 at the 3 x 3 map (centres 53.5 + 107 j).
        steps=(16, 32, 64, 107, 160, 320),
        min_sizes=(48, 100, 150, 202, 253, 304),
        max_sizes=(100, 150, 202, 253, 304, 320),
        aspect_ratios=((2, 3),) * 6,
        order="location_major",
        clamp=False,
    ),
    box_coder=BoxCoderSpec(center_variance=0.1, size_variance=0.2, max_log_size=abs(math.log(16 / 1000))),
    classes=mmdet_classes(),
    input=InputSpec(size=320, mean=MMDET_MEAN, std=MMDET_STD, value_range=255.0, resize="bilinear"),
    postprocess=MMDET_POSTPROCESS,
    detect_postprocess=MMDET_POSTPROCESS,
    meta={"gflops": 1.49},
)

# torchvision's MobileNetV2 feature index after which the two trunk outputs are taken (96 ch at /16, 1280 at /32).
_STAGE4_END = 14
_TRUNK_CHANNELS = (96, 1280)
_EXTRA_CHANNELS = (512, 256, 256, 128)
# mmdetection's SSDLite uses BN eps 1e-3 everywhere.
_BatchNorm = partial(nn.BatchNorm2d, eps=1e-3)


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        _BatchNorm(out_channels),
        nn.ReLU6(inplace=True),
    )


def _extra_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    mid = out_channels // 2
    return nn.Sequential(
        _conv_bn_relu6(in_channels, mid),
        _conv_bn_relu6(mid, mid, 3, stride=2, padding=1, groups=mid),
        _conv_bn_relu6(mid, out_channels),
    )


def _head(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_relu6(in_channels, in_channels, 3, padding=1, groups=in_channels),
                         nn.Conv2d(in_channels, out_channels, 1))


class SSDLiteMobileNetV2(MMDetSSD):
    """mmdetection's SSDLite-MobileNetV2 at 320 x 320 (spec default :data:`MMDET_SSDLITE320`).

    ``forward(x)`` takes N x 3 x 320 x 320 (RGB 0..255 minus the mean, over the std) and returns the raw
    ``(locs N x 4 x 3234, confs N x C x 3234)``, class 0 being background, default boxes in mmdetection's order.
    ``num_classes`` (background included) gives new, freshly initialised heads.
    """

    def __init__(self, spec: DetectorSpec | None = None, num_classes: int | None = None) -> None:
        spec = resolve_spec(MMDET_SSDLITE320, spec, num_classes)
        super().__init__(spec)
        if len(spec.anchors.feature_sizes) != 6:
            raise ValueError(f"spec.anchors.feature_sizes: expected 6 levels for SSDLite, "
                             f"got {len(spec.anchors.feature_sizes)}")
        from torchvision.models import mobilenet_v2

        # weights=None: never fetch ImageNet weights; mmdetection's model is trained from scratch anyway.
        self.features = mobilenet_v2(weights=None, norm_layer=_BatchNorm).features
        channels = list(_TRUNK_CHANNELS)
        layers = []
        for out_channels in _EXTRA_CHANNELS:
            layers.append(_extra_layer(channels[-1], out_channels))
            channels.append(out_channels)
        self.extra_layers = nn.ModuleList(layers)
        self.num_classes = spec.num_classes
        per_cell = spec.anchors.boxes_per_location
        self.loc = nn.ModuleList(_head(c, n * 4) for c, n in zip(channels, per_cell))
        self.conf = nn.ModuleList(_head(c, n * self.num_classes) for c, n in zip(channels, per_cell))
        init_heads([self.extra_layers, self.loc, self.conf])

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps the heads read: the end of MobileNetV2's stage 4, its last 1x1 conv, then the extra layers."""
        stage4 = self.features[:_STAGE4_END](x)
        x = self.features[_STAGE4_END:](stage4)
        maps = [stage4, x]
        for layer in self.extra_layers:
            x = layer(x)
            maps.append(x)
        return maps


MODELS: dict[str, ModelEntry] = {
    MMDET_SSDLITE320.name: mmdet_entry(
        MMDET_SSDLITE320, SSDLiteMobileNetV2,
        mmdet_weights("ssdlite_mobilenetv2_scratch_600e_coco",
                      "ssdlite_mobilenetv2_scratch_600e_coco_20210629_110627-974d9307.pth", 0.213),
        # The class predictor is the 1 x 1 conv after each head's depthwise block (which is class-independent).
        class_predictor="conf.{level}.1.{param}"),
}
