"""torchvision's two COCO SSDs: SSD300 (VGG-16) and SSDLite320 (MobileNetV3-Large), as torchvision trains them.

The layers carry torchvision's own key names (``backbone.*``, ``head.classification_head.module_list.*``), so
torchvision's state dicts (its published ``.pth`` files, or ``torch.save(model.state_dict())`` of
``torchvision.models.detection.ssd300_vgg16`` / ``ssdlite320_mobilenet_v3_large``) load as they are:
:mod:`ssd.weights.torchvision` only checks that a file is one of these. The heads' outputs are returned in this
package's layout, ``(locs N x 4 x A, confs N x C x A)``, the A default boxes in torchvision's order (feature map,
row, column, box shape), which :class:`~ssd.models.spec.AnchorSpec` ``order="location_major"`` generates.

Facts from torchvision (``models/detection/ssd.py``, ``ssdlite.py``, ``anchor_utils.py``, ``_utils.py``):

* classes: 91 outputs, background 0, then label ``k`` = COCO category id ``k`` for k = 1..90, ten of which
  (12, 26, 29, 30, 45, 66, 68, 69, 71, 83) are no COCO category ("N/A" in torchvision's list);
* box coder weights (10, 10, 5, 5), i.e. variances 0.1 / 0.2, the scaled log-size clamped at log(1000 / 16)
  (from above; the coder here clamps both ways, see ``_BOX_CODER``);
* input: ``GeneralizedRCNNTransform`` with a fixed square size: pixels in [0, 1], ``(x - mean) / std``, then a
  bilinear resize of the float image (``InputSpec.resize="torch_bilinear"``);
* test recipe: softmax, per class the scores above the threshold, at most ``topk_candidates`` of them, boxes
  clipped to the image, NMS per class dropping IoU > threshold, the best ``detections_per_img``.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..data.coco import COCO_CATEGORY_IDS, COCO_NAMES
from .base import Detector
from .entry import ModelEntry, Weights
from .mmdet_common import head_outputs, resolve_spec
from .spec import AnchorSpec, BoxCoderSpec, ClassSpec, DetectorSpec, InputSpec, PostProcessSpec

__all__ = ["MODELS", "TV_COCO_CLASSES", "TV_SSD300", "TV_SSDLITE320", "TVSSD300VGG16", "TVSSDLite320MobileNetV3",
           "tv_coco_classes"]


def tv_coco_classes() -> ClassSpec:
    """torchvision's 90 COCO labels: label ``k`` is COCO category id ``k`` (1..90).

    The ten ids COCO left unused get placeholder names ``"N/A-<id>"`` (torchvision calls them all ``"N/A"``):
    distinct, so that ``detect(classes=...)``, folders per class and evaluation's name checks never confuse
    them, and never the name of a real class. Their category ids appear in no COCO annotation file, so evaluation
    leaves their detections unscored.
    """
    names = dict(zip(COCO_CATEGORY_IDS, COCO_NAMES))
    ids = tuple(range(1, max(COCO_CATEGORY_IDS) + 1))
    return ClassSpec(tuple(names.get(i, f"N/A-{i}") for i in ids), ids)


TV_COCO_CLASSES = tv_coco_classes()

# torchvision's BoxCoder(weights=(10, 10, 5, 5)) divides the offsets by the weights: variances 0.1 and 0.2, and it
# clamps dw, dh (after that division) at log(1000 / 16). From above only: the coder here clamps at -log(1000 / 16)
# too, so a box predicted below 1/62.5 of its default box (about a third of a pixel for SSD300's smallest, 21 pixels)
# keeps that size instead of shrinking further. Such a box is no object; the family keeps the one coder rule.
_BOX_CODER = BoxCoderSpec(center_variance=0.1, size_variance=0.2, max_log_size=math.log(1000.0 / 16))
_PROTOCOL = ("COCO val2017 box AP, IoU 0.50:0.95, torchvision's detection reference (references/detection): "
             "the whole image resized by the model, its own test recipe")
_DOWNLOADS = "https://download.pytorch.org/models"


def _postprocess(score: float, candidates: int, iou: float, per_image: int) -> PostProcessSpec:
    # SSD.postprocess_detections: score > thresh, topk per class, clip_boxes_to_image, batched_nms (IoU > thresh
    # suppresses), keep[:detections_per_img]. Empty boxes are not dropped (remove_small_boxes is not called).
    return PostProcessSpec(score_threshold=score, iou_threshold=iou, max_detections=per_image,
                           candidates_per_class=candidates, candidates_per_level=None, clip_boxes=True,
                           drop_empty=False, suppress_equal=False)


def _weights(file_name: str, box_ap: float) -> dict[str, Weights]:
    """torchvision's ``COCO_V1`` weights: the name ends in the first hex digits of the file's sha256 (torch.hub's
    convention, checked on download); ``box_ap`` is torchvision's published ``box_map``, as a fraction."""
    prefix = file_name.removesuffix(".pth").rsplit("-", 1)[-1]
    coco = Weights("coco", file_name, (f"{_DOWNLOADS}/{file_name}",), TV_COCO_CLASSES, sha256=prefix,
                   meta={"accuracy": {"mAP": box_ap, "protocol": _PROTOCOL}})
    return {coco.name: coco}


# ssd300_vgg16: DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]], scales=[0.07, 0.15, 0.33, 0.51, 0.69,
# 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300]) with clip=True. Its scales in pixels of 300 are mmdetection's
# SSD300 sizes. Unlike mmdetection it clips the box sizes to [0, 1], and unlike NVIDIA only the sizes: the last
# column of the 10 x 10 map (step 32, so 320 pixels for 300) is centred at 9.5 / 9.375 = 1.013.
TV_SSD300 = DetectorSpec(
    name="tv_ssd300_vgg16",
    description="SSD300, VGG-16 backbone (torchvision), COCO",
    anchors=AnchorSpec(
        image_size=300,
        feature_sizes=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(21, 45, 99, 153, 207, 261),
        max_sizes=(45, 99, 153, 207, 261, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
        order="location_major",
        clamp="sizes",
    ),
    box_coder=_BOX_CODER,
    classes=TV_COCO_CLASSES,
    # "undo the 0-1 scaling of toTensor": (x - mean) / (1 / 255) is 0..255 pixels minus the mean in 0..255 units.
    input=InputSpec(size=300, mean=(0.48235, 0.45882, 0.40784), std=(1 / 255, 1 / 255, 1 / 255), value_range=1.0,
                    resize="torch_bilinear"),
    postprocess=_postprocess(0.01, 400, 0.45, 200),
    # For pictures: the same recipe, scores above 0.4 (as NVIDIA's SSD300 here), at most 100 boxes.
    detect_postprocess=_postprocess(0.4, 400, 0.45, 100),
    meta={"gflops": 69.7},
)

# ssdlite320_mobilenet_v3_large: DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95), steps None:
# scales 0.2 + 0.75 k / 5 then 1.0 (64, 112, ..., 304, 320 pixels of 320), and each map's centres at (j + 0.5) / f
# for its f x f cells, which is a step of 320 / f pixels (107 would misplace the 3 x 3 map's centres: 320 / 3 it is).
TV_SSDLITE320 = DetectorSpec(
    name="tv_ssdlite320_mobilenet_v3_large",
    description="SSDLite320, MobileNetV3-Large backbone (torchvision), COCO",
    anchors=AnchorSpec(
        image_size=320,
        feature_sizes=(20, 10, 5, 3, 2, 1),
        steps=(16, 32, 64, 320 / 3, 160, 320),
        min_sizes=(64, 112, 160, 208, 256, 304),
        max_sizes=(112, 160, 208, 256, 304, 320),
        aspect_ratios=((2, 3),) * 6,
        order="location_major",
        clamp="sizes",
    ),
    box_coder=_BOX_CODER,
    classes=TV_COCO_CLASSES,
    input=InputSpec(size=320, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), value_range=1.0, resize="torch_bilinear"),
    postprocess=_postprocess(0.001, 300, 0.55, 300),
    detect_postprocess=_postprocess(0.4, 300, 0.55, 100),
    meta={"gflops": 1.17},
)


# ---------------------------------------------------------------------------------------------------------------
# Layers: torchvision's structure (so its key names), built here.


def _xavier_init(modules: list[nn.Module]) -> None:
    """torchvision's SSD300 initialisation of its extra layers and heads: Xavier-uniform weights, zero biases."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _normal_init(modules: list[nn.Module]) -> None:
    """torchvision's SSDLite initialisation (backbone, extra layers, heads): N(0, 0.03) weights, zero biases."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.03)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class _Predictors(nn.Module):
    """One predictor per feature map, under torchvision's name ``module_list``."""

    def __init__(self, predictors: list[nn.Module]) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(predictors)


class _Head(nn.Module):
    """torchvision's ``SSDHead`` / ``SSDLiteHead`` layout: a classification and a regression predictor per map."""

    def __init__(self, classification: list[nn.Module], regression: list[nn.Module]) -> None:
        super().__init__()
        self.classification_head = _Predictors(classification)
        self.regression_head = _Predictors(regression)


class _TorchvisionSSD(Detector):
    """What both share: ``backbone(x)`` gives the feature maps, ``head`` predicts on each."""

    backbone: nn.Module
    head: _Head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.backbone(x)
        # torchvision's SSDScoringHead reads a map's channels as (box, value) and orders boxes (row, column, box):
        # mmdetection's layout too, so the one permutation serves both.
        locs = [p(m) for p, m in zip(self.head.regression_head.module_list, maps)]
        confs = [p(m) for p, m in zip(self.head.classification_head.module_list, maps)]
        return head_outputs(locs, confs, self.spec.num_classes)


def _check_levels(spec: DetectorSpec, expected: int, family: str) -> None:
    if len(spec.anchors.feature_sizes) != expected:
        raise ValueError(f"spec.anchors.feature_sizes: expected {expected} levels for {family}, "
                         f"got {len(spec.anchors.feature_sizes)}")


# VGG-16's convolutions (torchvision's vgg16().features: conv 3x3 + ReLU, a 2x2 max pool after each block).
_VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# SSD300's extra layers after fc7: (input, middle, output channels, stride and padding of the 3 x 3 conv).
_VGG_EXTRAS = ((1024, 256, 512, 2, 1), (512, 128, 256, 2, 1), (256, 128, 256, 1, 0), (256, 128, 256, 1, 0))
_VGG_CHANNELS = (512, 1024, 512, 256, 256, 256)


def _vgg16_layers() -> list[nn.Module]:
    """torchvision's ``vgg16().features`` (indices 0-30), with the third pool in ceil mode as its SSD sets it
    (75 -> 38 at 300 x 300; the other pools see even sizes)."""
    layers: list[nn.Module] = []
    channels = 3
    for block, (width, convs) in enumerate(_VGG_BLOCKS):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=block == 2))
    return layers


class _VGGFeatures(nn.Module):
    """torchvision's ``SSDFeatureExtractorVGG`` for 300 x 300: conv4_3 (L2-normalised, scaled by ``scale_weight``),
    then ``extra[0]`` (pool4, conv5, pool5 3x3/1, fc6 dilated, fc7) and four extra blocks."""

    def __init__(self) -> None:
        super().__init__()
        vgg = _vgg16_layers()
        self.scale_weight = nn.Parameter(torch.ones(512) * 20)
        self.features = nn.Sequential(*vgg[:23])  # up to conv4_3's ReLU; vgg[23] is pool4
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),
            nn.ReLU(inplace=True),
        )
        extra = [nn.Sequential(*vgg[23:-1], fc)]  # pool4 and conv5, not pool5
        for in_channels, mid, out_channels, stride, padding in _VGG_EXTRAS:
            extra.append(nn.Sequential(
                nn.Conv2d(in_channels, mid, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, out_channels, kernel_size=3, stride=stride, padding=padding),
                nn.ReLU(inplace=True),
            ))
        self.extra = nn.ModuleList(extra)
        _xavier_init([fc, *extra[1:]])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.features(x)
        # F.normalize divides by max(||x||, 1e-12): torchvision's exact operation, so the same roundings.
        maps = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            maps.append(x)
        return maps


class TVSSD300VGG16(_TorchvisionSSD):
    """torchvision's SSD300 with a VGG-16 backbone (spec default :data:`TV_SSD300`).

    ``forward(x)`` takes N x 3 x 300 x 300 (RGB in 0..255 minus torchvision's mean in 0..255 units) and returns the
    raw ``(locs N x 4 x 8732, confs N x C x 8732)``, class 0 being background, label k COCO category id k.
    """

    def __init__(self, spec: DetectorSpec | None = None, num_classes: int | None = None) -> None:
        spec = resolve_spec(TV_SSD300, spec, num_classes)
        super().__init__(spec)
        _check_levels(spec, len(_VGG_CHANNELS), "torchvision's SSD300")
        self.backbone = _VGGFeatures()
        per_cell = spec.anchors.boxes_per_location
        self.head = _Head(
            [nn.Conv2d(c, n * spec.num_classes, 3, padding=1) for c, n in zip(_VGG_CHANNELS, per_cell)],
            [nn.Conv2d(c, n * 4, 3, padding=1) for c, n in zip(_VGG_CHANNELS, per_cell)],
        )
        _xavier_init([self.head])


# torchvision's SSDLite: BatchNorm eps 0.001, momentum 0.03 everywhere; MobileNetV3-Large with the reduced tail
# (torchvision builds it so whenever no ImageNet backbone is given, as for its COCO weights).
_BatchNorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
# The first block of stride 2 among MobileNetV3-Large's last ones (C5): the SSDLite trunk splits it after its
# 1 x 1 expansion (672 channels at /16), then runs to the end of the trunk (480 channels at /32).
_C4_BLOCK = 13
_LITE_EXTRAS = (512, 256, 256, 128)


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                  bias=False),
        _BatchNorm(out_channels),
        nn.ReLU6(inplace=True),
    )


def _lite_extra(in_channels: int, out_channels: int) -> nn.Sequential:
    mid = out_channels // 2
    return nn.Sequential(_conv_bn_relu6(in_channels, mid), _conv_bn_relu6(mid, mid, 3, stride=2, groups=mid),
                         _conv_bn_relu6(mid, out_channels))


def _lite_predictor(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_relu6(in_channels, in_channels, 3, groups=in_channels),
                         nn.Conv2d(in_channels, out_channels, 1))


class _MobileNetV3Features(nn.Module):
    """torchvision's ``SSDLiteFeatureExtractorMobileNet``: the trunk in two parts (to C4's expansion, then to the
    end), then four extra blocks of 1x1, depthwise 3x3 stride 2, 1x1."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_large

        # weights=None: never fetch ImageNet weights; the published model was trained without them anyway.
        trunk = mobilenet_v3_large(weights=None, norm_layer=_BatchNorm, reduced_tail=True).features
        c4 = trunk[_C4_BLOCK]
        # Slicing a Sequential keeps its keys: block[1:] is "1", "2", "3", as in torchvision's state dicts.
        self.features = nn.Sequential(
            nn.Sequential(*trunk[:_C4_BLOCK], c4.block[0]),
            nn.Sequential(c4.block[1:], *trunk[_C4_BLOCK + 1:]),
        )
        channels = [trunk[-1].out_channels, *_LITE_EXTRAS]
        self.extra = nn.ModuleList(_lite_extra(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.out_channels = (c4.block[0].out_channels, *channels)
        _normal_init([self.features, self.extra])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for block in (*self.features, *self.extra):
            x = block(x)
            maps.append(x)
        return maps


class TVSSDLite320MobileNetV3(_TorchvisionSSD):
    """torchvision's SSDLite320 with a MobileNetV3-Large backbone (spec default :data:`TV_SSDLITE320`).

    ``forward(x)`` takes N x 3 x 320 x 320 (RGB in [0, 1] mapped to [-1, 1]) and returns the raw
    ``(locs N x 4 x 3234, confs N x C x 3234)``, class 0 being background, label k COCO category id k.
    """

    def __init__(self, spec: DetectorSpec | None = None, num_classes: int | None = None) -> None:
        spec = resolve_spec(TV_SSDLITE320, spec, num_classes)
        super().__init__(spec)
        _check_levels(spec, 2 + len(_LITE_EXTRAS), "torchvision's SSDLite320")
        self.backbone = _MobileNetV3Features()
        per_cell = spec.anchors.boxes_per_location
        channels = self.backbone.out_channels
        self.head = _Head(
            [_lite_predictor(c, n * spec.num_classes) for c, n in zip(channels, per_cell)],
            [_lite_predictor(c, n * 4) for c, n in zip(channels, per_cell)],
        )
        _normal_init([self.head])


def _entry(spec: DetectorSpec, network: type, weights: dict[str, Weights], class_predictor: str) -> ModelEntry:
    return ModelEntry(spec=spec, network=network, weights=weights, default_weights="coco",
                      converter=".weights.torchvision", class_predictor=class_predictor,
                      formats="a torchvision state dict (torch.save(model.state_dict()) of torchvision's model, "
                              "or its published .pth), or a file saved by ssd train")


MODELS: dict[str, ModelEntry] = {
    TV_SSD300.name: _entry(TV_SSD300, TVSSD300VGG16, _weights("ssd300_vgg16_coco-b556d3b4.pth", 0.251),
                           class_predictor="head.classification_head.module_list.{level}.{param}"),
    # The class predictor is the 1 x 1 conv after each head's depthwise block (which is class-independent).
    TV_SSDLITE320.name: _entry(TV_SSDLITE320, TVSSDLite320MobileNetV3,
                               _weights("ssdlite320_mobilenet_v3_large_coco-a79551df.pth", 0.213),
                               class_predictor="head.classification_head.module_list.{level}.1.{param}"),
}
