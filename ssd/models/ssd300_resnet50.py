"""NVIDIA's SSD300 with a truncated ResNet-50 trunk, laid out so their published checkpoints load with strict=True."""
from __future__ import annotations

import torch
from torch import nn

from ..data.coco import COCO_CATEGORY_IDS, COCO_NAMES
from .base import Detector, with_num_classes
from .entry import ModelEntry, Weights
from .spec import AnchorSpec, BoxCoderSpec, ClassSpec, DetectorSpec, InputSpec, PostProcessSpec

__all__ = ["MODELS", "NVIDIA_SSD300", "NVIDIA_WEIGHTS", "SSD300", "ResNetTrunk", "nvidia_spec"]

NVIDIA_SSD300 = DetectorSpec(
    name="nvidia_ssd",
    description="SSD300, ResNet-50 backbone (NVIDIA DeepLearningExamples), COCO",
    anchors=AnchorSpec(
        image_size=300,
        feature_sizes=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(21, 45, 99, 153, 207, 261),
        max_sizes=(45, 99, 153, 207, 261, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
        order="shape_major",
        clamp=True,
    ),
    box_coder=BoxCoderSpec(center_variance=0.1, size_variance=0.2),
    classes=ClassSpec(COCO_NAMES, COCO_CATEGORY_IDS),
    input=InputSpec(size=300, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), value_range=1.0,
                    resize="antialias"),
    # NVIDIA's evaluation: score > 0.05, 200 per class, NMS 0.5, 200 per image, boxes as decoded.
    postprocess=PostProcessSpec(score_threshold=0.05, iou_threshold=0.5, max_detections=200, candidates_per_class=200),
    # The notebook's pick_best(0.40) on decode_results, with at most 100 boxes per picture.
    detect_postprocess=PostProcessSpec(score_threshold=0.4, iou_threshold=0.5, max_detections=100,
                                       candidates_per_class=200),
    meta={"gflops": 40.3},
)

# NVIDIA's published checkpoints (NGC). They have moved several times, so the newest upload ("amp") is the fallback
# when the chosen file's URLs all fail. The three were trained the same way and score the same.
_NGC = "https://api.ngc.nvidia.com/v2/models/nvidia"
_ACCURACY = {"accuracy": {"mAP": 0.25, "protocol": "COCO val2017, IoU 0.50:0.95, NVIDIA's evaluation"}}
NVIDIA_WEIGHTS: dict[str, Weights] = {
    w.name: w
    for w in (
        Weights("fp32", "nvidia_ssdpyt_fp32_190826.pt",
                (f"{_NGC}/ssdpyt_fp32/versions/2/files/nvidia_ssdpyt_fp32_190826.pt",),
                NVIDIA_SSD300.classes, meta=_ACCURACY),
        Weights("fp16", "nvidia_ssdpyt_fp16_190826.pt",
                (f"{_NGC}/ssd_pyt_ckpt_amp/versions/19.09.0/files/nvidia_ssdpyt_fp16_190826.pt",),
                NVIDIA_SSD300.classes, meta=_ACCURACY),
        Weights("amp", "nvidia_ssdpyt_amp_200703.pt",
                (f"{_NGC}/ssd_pyt_ckpt_amp/versions/20.06.0/files/nvidia_ssdpyt_amp_200703.pt",
                 f"{_NGC}/dle/ssd__pyt_ckpt/versions/20.06.0_amp/files/nvidia_ssdpyt_amp_200703.pt"),
                NVIDIA_SSD300.classes, meta=_ACCURACY),
    )
}

# Channels of the six feature maps the heads read: layer3 of the trunk, then the five additional blocks.
FEATURE_CHANNELS = (1024, 512, 512, 256, 256, 256)
_BOTTLENECK_CHANNELS = (256, 256, 128, 128, 128)


class ResNetTrunk(nn.Module):
    """ResNet-50 up to layer3, with layer3 kept at stride 8 so it yields a 38 x 38 map for a 300 x 300 input."""

    def __init__(self) -> None:
        super().__init__()
        # weights=None: never fetch ImageNet weights, a full SSD checkpoint (or nothing, for an untrained model)
        # always follows.
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


def nvidia_spec(num_classes: int | None = None, class_names: tuple[str, ...] | None = None,
                category_ids: tuple[int, ...] | None = None) -> DetectorSpec:
    """NVIDIA's spec, with other classes when fine-tuning: ``num_classes`` counts the background too."""
    if class_names is None:
        return with_num_classes(NVIDIA_SSD300, num_classes)
    class_names = tuple(class_names)
    ids = tuple(category_ids) if category_ids is not None else tuple(range(1, len(class_names) + 1))
    classes = ClassSpec(class_names, ids)
    if num_classes is not None and num_classes != classes.num_classes:
        raise ValueError(f"num_classes: expected {classes.num_classes} (the {len(class_names)} class names plus "
                         f"background), got {num_classes}")
    return NVIDIA_SSD300.with_classes(classes)


class SSD300(Detector):
    """SSD300 object detector (ResNet-50 backbone; COCO's 80 classes plus background unless told otherwise).

    ``forward(x)`` takes N x 3 x 300 x 300 and returns the raw ``(locs, confs)``: N x 4 x 8732 box offsets and
    N x C x 8732 class logits (no softmax, C = 81 for COCO), exactly as NVIDIA's model does.
    ``detect(images)`` runs the whole pipeline and returns boxes in original image pixels.

    Args:
        spec: the detector spec (default NVIDIA's COCO one); ``num_classes`` (background included) or a spec
            with other classes gives new classification heads, for fine-tuning.
    """

    def __init__(self, spec: DetectorSpec | None = None, num_classes: int | None = None) -> None:
        if spec is None:
            spec = nvidia_spec(num_classes)
        elif num_classes is not None and num_classes != spec.num_classes:
            raise ValueError(f"num_classes: expected {spec.num_classes} to match spec, got {num_classes}")
        super().__init__(spec)
        self.feature_extractor = ResNetTrunk()
        self.additional_blocks = nn.ModuleList(
            _additional_block(cin, mid, cout, downsample=i < 3)
            for i, (cin, mid, cout) in enumerate(
                zip(FEATURE_CHANNELS[:-1], _BOTTLENECK_CHANNELS, FEATURE_CHANNELS[1:])
            )
        )
        per_cell = spec.anchors.boxes_per_location
        self.num_classes = spec.num_classes
        self.loc = nn.ModuleList(
            nn.Conv2d(c, n * 4, kernel_size=3, padding=1) for n, c in zip(per_cell, FEATURE_CHANNELS)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, n * self.num_classes, kernel_size=3, padding=1) for n, c in zip(per_cell, FEATURE_CHANNELS)
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


MODELS: dict[str, ModelEntry] = {
    NVIDIA_SSD300.name: ModelEntry(
        spec=NVIDIA_SSD300,
        network=SSD300,
        weights=NVIDIA_WEIGHTS,
        default_weights="fp32",
        fallback_weights="amp",
        converter=".weights.nvidia",
        class_predictor="conf.{level}.{param}",
        formats="a file saved by NVIDIA's training or by ssd train, or a plain state dict",
    ),
}
