"""SSD300 with a truncated ResNet-50 trunk, laid out so NVIDIA's published checkpoints load with strict=True."""
from __future__ import annotations

import torch
from torch import nn

from .coco import NUM_CLASSES
from .default_boxes import boxes_per_location
from .detection import detect

# Channels of the six feature maps the heads read: layer3 of the trunk, then the five additional blocks.
FEATURE_CHANNELS = (1024, 512, 512, 256, 256, 256)
_BOTTLENECK_CHANNELS = (256, 256, 128, 128, 128)


class ResNetTrunk(nn.Module):
    """ResNet-50 up to layer3, with layer3 kept at stride 8 so it yields a 38 x 38 map for a 300 x 300 input."""

    def __init__(self) -> None:
        super().__init__()
        # Imported here so that importing ssd stays cheap; weights=None: never fetch ImageNet weights, a full
        # SSD checkpoint (or nothing, for an untrained model) always follows.
        from torchvision.models import resnet50

        children = list(resnet50(weights=None).children())[:7]  # conv1 bn1 relu maxpool layer1 layer2 layer3
        first_block = children[-1][0]
        first_block.conv1.stride = (1, 1)
        first_block.conv2.stride = (1, 1)
        first_block.downsample[0].stride = (1, 1)
        self.feature_extractor = nn.Sequential(*children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(x)


def _additional_block(in_channels: int, mid: int, out_channels: int, downsample: bool) -> nn.Sequential:
    stride, padding = (2, 1) if downsample else (1, 0)
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, kernel_size=3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SSD300(nn.Module):
    """SSD300 object detector (ResNet-50 backbone, COCO's 80 classes plus background).

    ``forward(x)`` takes N x 3 x 300 x 300 and returns the raw ``(locs, confs)``: N x 4 x 8732 box offsets and
    N x 81 x 8732 class logits (no softmax), exactly as NVIDIA's model does. ``detect(images)`` runs the whole
    pipeline and returns boxes in original image pixels.

    ``num_classes`` (background included) sizes the class heads for training on another label set; ``detect``
    and the published checkpoints assume the default 81.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        # bool is an int subclass but never a class count; a background-only model has nothing to detect.
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
        if num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2 (background included), got {num_classes}")
        self.num_classes = num_classes
        self.feature_extractor = ResNetTrunk()
        self.additional_blocks = nn.ModuleList(
            _additional_block(cin, mid, cout, downsample=i < 3)
            for i, (cin, mid, cout) in enumerate(
                zip(FEATURE_CHANNELS[:-1], _BOTTLENECK_CHANNELS, FEATURE_CHANNELS[1:])
            )
        )
        per_cell = boxes_per_location()
        self.loc = nn.ModuleList(
            nn.Conv2d(c, n * 4, kernel_size=3, padding=1) for n, c in zip(per_cell, FEATURE_CHANNELS)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, n * num_classes, kernel_size=3, padding=1) for n, c in zip(per_cell, FEATURE_CHANNELS)
        )
        self._init_head_weights()

    def _init_head_weights(self) -> None:
        # The heads and extra blocks start from Xavier, as in NVIDIA's training; the trunk keeps torchvision's init.
        for module in [*self.additional_blocks.modules(), *self.loc.modules(), *self.conf.modules()]:
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.feature_extractor(x)
        features = [x]
        for block in self.additional_blocks:
            x = block(x)
            features.append(x)
        n = x.shape[0]
        # Each head's (N, boxes*C, H, W) map is read as (N, C, boxes*H*W), the layout the checkpoints were
        # trained with; the default boxes follow the same order.
        locs = torch.cat([head(f).reshape(n, 4, -1) for head, f in zip(self.loc, features)], dim=2)
        confs = torch.cat([head(f).reshape(n, self.num_classes, -1) for head, f in zip(self.conf, features)], dim=2)
        return locs.contiguous(), confs.contiguous()

    # The one-call API: ``model.detect(images, threshold=0.4, ...)``; see ``ssd.detection.detect``.
    detect = detect

