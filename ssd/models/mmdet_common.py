"""What mmdetection's SSD family shares: its input normalisation, test-time recipe, classes and layer helpers."""
from __future__ import annotations

import torch
from torch import nn

from ..data.coco import COCO_CATEGORY_IDS, COCO_NAMES
from .base import Detector, with_num_classes
from .entry import ModelEntry, Weights
from .spec import ClassSpec, DetectorSpec, PostProcessSpec

__all__ = ["MMDET_MEAN", "MMDET_POSTPROCESS", "MMDET_STD", "head_outputs", "mmdet_classes", "mmdet_entry",
           "mmdet_weights"]

# DetDataPreprocessor: RGB 0..255 minus the ImageNet mean; the VGG models keep std 1 (caffe-style weights).
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)

# mmdetection's test_cfg for all three SSD configs: nms_pre 1000 per level, score_thr 0.02, NMS IoU 0.45 (strict >),
# max_per_img 200, boxes clipped to the image and empty ones dropped (min_bbox_size 0) before NMS.
MMDET_POSTPROCESS = PostProcessSpec(score_threshold=0.02, iou_threshold=0.45, max_detections=200,
                                    candidates_per_class=None, candidates_per_level=1000, clip_boxes=True,
                                    drop_empty=True, suppress_equal=False)


def mmdet_classes() -> ClassSpec:
    """COCO's 80 classes: mmdetection's CocoDataset order is the sorted category-id order used here."""
    return ClassSpec(COCO_NAMES, COCO_CATEGORY_IDS)


_BASE_URL = "https://download.openmmlab.com/mmdetection/v2.0/ssd"
_PROTOCOL = "COCO val2017 box AP, IoU 0.50:0.95, mmdetection's evaluation"


def mmdet_weights(folder: str, file_name: str, box_ap: float) -> dict[str, Weights]:
    """The weights table of one of mmdetection's published COCO checkpoints: its file under ``folder`` of
    mmdetection's SSD downloads, whose name ends in the first 8 hex digits of its sha256; ``box_ap`` as a fraction."""
    prefix = file_name.removesuffix(".pth").rsplit("-", 1)[-1]
    if not file_name.endswith(".pth") or len(prefix) != 8:  # pragma: no cover - a typo in a family's table
        raise ValueError(f"file_name: expected a name ending in -<8 hex digits>.pth, got {file_name!r}")
    coco = Weights("coco", file_name, (f"{_BASE_URL}/{folder}/{file_name}",), mmdet_classes(), sha256=prefix,
                   meta={"accuracy": {"mAP": box_ap, "protocol": _PROTOCOL}})
    return {coco.name: coco}


def mmdet_entry(spec: DetectorSpec, network: type, weights: dict[str, Weights], class_predictor: str) -> ModelEntry:
    """The registry entry of one of mmdetection's SSDs: its files are converted by :mod:`ssd.weights.mmdet`."""
    return ModelEntry(spec=spec, network=network, weights=weights, default_weights="coco",
                      converter=".weights.mmdet", class_predictor=class_predictor,
                      formats="an mmdetection checkpoint (.pth), a file saved by ssd train, or a plain state dict")


def resolve_spec(default: DetectorSpec, spec: DetectorSpec | None, num_classes: int | None) -> DetectorSpec:
    """The spec a network is built from: ``spec`` (checked against ``num_classes``) or the default."""
    if spec is None:
        return with_num_classes(default, num_classes)
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"spec: expected a DetectorSpec, got {type(spec).__name__}")
    if num_classes is not None and num_classes != spec.num_classes:
        raise ValueError(f"num_classes: expected {spec.num_classes} to match spec, got {num_classes}")
    return spec


def head_outputs(locs: list[torch.Tensor], confs: list[torch.Tensor], num_classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level head maps (N x A*4 x H x W, N x A*C x H x W) to (N x 4 x total, N x C x total).

    mmdetection's channel layout is anchor-major (channel = a * 4 + coord, a * C + class), and its anchors run
    (row, column, anchor) within a level: moving channels last and splitting them gives exactly that order.
    """
    n = locs[0].shape[0]
    loc = torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, 4) for m in locs], dim=1)
    conf = torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, num_classes) for m in confs], dim=1)
    return loc.transpose(1, 2).contiguous(), conf.transpose(1, 2).contiguous()


def init_heads(modules: list[nn.Module]) -> None:
    """Xavier-uniform convolutions, zero biases: mmdetection's SSDHead initialisation, for fine-tuning."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class MMDetSSD(Detector):
    """What mmdetection's SSDs share: heads ``loc``/``conf`` over the maps of ``feature_maps`` (each family's own)."""

    loc: nn.ModuleList
    conf: nn.ModuleList
    num_classes: int

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.feature_maps(x)
        return head_outputs([h(m) for h, m in zip(self.loc, maps)], [h(m) for h, m in zip(self.conf, maps)],
                            self.num_classes)
