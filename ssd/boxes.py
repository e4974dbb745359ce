"""Box geometry: the three box formats and the IoU, with the float32 arithmetic NVIDIA's reference uses.

Formats, named as :func:`torchvision.ops.box_convert` names them, coordinates on the last axis:

* ``"xyxy"``: (left, top, right, bottom), the corners; what detections and the training truths are.
* ``"cxcywh"``: (centre x, centre y, width, height); SSD's default boxes and box-coder inputs.
* ``"xywh"``: (left, top, width, height); COCO's ``bbox``.

The conversions compute ``0.5 * (x1 + x2)`` and ``c - w / 2``, NVIDIA's operations, on which the training targets
depend bit for bit (NVIDIA's unmatched default boxes go through both). torchvision's ``box_convert`` and ``box_iou``
give the same values (halving is exact in binary floating point, and its IoU takes the same steps), which the tests
check; they are not called here because importing ``torchvision.ops`` costs seconds on paths that need no
torchvision otherwise (an ONNX model's post-processing), and because ``box_iou`` of torchvision's oldest supported
release takes no batch dimensions.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BOX_FORMATS", "box_iou", "convert_boxes"]

BOX_FORMATS = ("xyxy", "cxcywh", "xywh")


def _check_boxes(boxes: object, name: str) -> Tensor:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected a tensor of shape ... x 4, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    return boxes


def _check_format(fmt: object, name: str) -> str:
    if fmt not in BOX_FORMATS:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, BOX_FORMATS))}, got {fmt!r}")
    return fmt


def _xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1], dim=-1)


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def _xywh_to_xyxy(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def _xyxy_to_xywh(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


_TO_XYXY = {"cxcywh": _cxcywh_to_xyxy, "xywh": _xywh_to_xyxy}
_FROM_XYXY = {"cxcywh": _xyxy_to_cxcywh, "xywh": _xyxy_to_xywh}


def convert_boxes(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """``boxes`` (... x 4, floating point) from ``in_fmt`` to ``out_fmt``, as a new tensor of the same dtype and
    device; formats as :data:`BOX_FORMATS` (torchvision's names: "xywh" is COCO's top-left box, not a centre box).

    Between "xywh" and "cxcywh" the boxes go through "xyxy", as torchvision's ``box_convert`` does.
    """
    boxes = _check_boxes(boxes, "boxes")
    in_fmt = _check_format(in_fmt, "in_fmt")
    out_fmt = _check_format(out_fmt, "out_fmt")
    if in_fmt == out_fmt:
        return boxes.clone()
    xyxy = boxes if in_fmt == "xyxy" else _TO_XYXY[in_fmt](boxes)
    return xyxy if out_fmt == "xyxy" else _FROM_XYXY[out_fmt](xyxy)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: ``boxes1`` ... x N x 4 against ``boxes2`` ... x M x 4 gives ... x N x M.

    The leading dimensions broadcast (N x T x 4 against A x 4 gives N x T x A). Computed in the inputs' dtype with
    the operations of NVIDIA's ``calc_iou_tensor``: ``inter / (area1 + area2 - inter)`` with the intersection
    clamped at 0. So the matching threshold and the NMS test decide as NVIDIA's code does, ties included, and two
    empty boxes give 0 / 0 = NaN, as there (NVIDIA's ``iou < criteria`` then counts them as overlapping).
    """
    boxes1 = _check_boxes(boxes1, "boxes1")
    boxes2 = _check_boxes(boxes2, "boxes2")
    # Width and height apart, each from two ... x N x 1 and ... x 1 x M coordinate columns: the same elementwise
    # operations as on the x/y pairs at once, several times faster than working on strided ... x N x M x 2 slices.
    a = boxes1.unsqueeze(-2)  # ... x N x 1 x 4
    b = boxes2.unsqueeze(-3)  # ... x 1 x M x 4
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    inter = w.mul_(h)
    del h  # NMS calls this on chunks sized to a memory budget
    return inter / (_area(boxes1).unsqueeze(-1) + _area(boxes2).unsqueeze(-2) - inter)
