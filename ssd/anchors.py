"""Default (anchor) boxes generated from an :class:`~ssd.models.spec.AnchorSpec`, in the order the heads emit them."""
from __future__ import annotations

import functools
import itertools
import math

import torch

from .boxes import convert_boxes
from .models.spec import AnchorSpec

__all__ = ["default_boxes"]


@functools.lru_cache(maxsize=16)
def _default_boxes_cxcywh(spec: AnchorSpec) -> torch.Tensor:
    boxes = []
    for k, cells in enumerate(spec.feature_sizes):
        small = spec.min_sizes[k] / spec.image_size
        large = spec.max_sizes[k] / spec.image_size
        shapes = [(small, small), (math.sqrt(small * large),) * 2]
        for ratio in spec.aspect_ratios[k]:
            w, h = small * math.sqrt(ratio), small / math.sqrt(ratio)
            shapes += [(w, h), (h, w)]
        # NVIDIA writes the centre as (j + 0.5) / (image_size / step); kept in that form for bit-exact boxes.
        cell = spec.image_size / spec.steps[k]
        grid = list(itertools.product(range(cells), repeat=2))
        if spec.order == "shape_major":
            pairs = itertools.product(shapes, grid)
        else:
            pairs = ((shape, ij) for ij, shape in itertools.product(grid, shapes))
        boxes += [((j + 0.5) / cell, (i + 0.5) / cell, w, h) for (w, h), (i, j) in pairs]
    cxcywh = torch.tensor(boxes, dtype=torch.float32)
    if spec.clamp == "sizes":
        cxcywh[:, 2:].clamp_(0.0, 1.0)
    elif spec.clamp:
        cxcywh.clamp_(0.0, 1.0)
    return cxcywh


@functools.lru_cache(maxsize=16)
def _default_boxes_xyxy(spec: AnchorSpec) -> torch.Tensor:
    # From the clamped centre boxes, in NVIDIA's arithmetic (its dboxes_ltrb): the training targets rely on it.
    return convert_boxes(_default_boxes_cxcywh(spec), "cxcywh", "xyxy")


def default_boxes(spec: AnchorSpec, fmt: str = "cxcywh") -> torch.Tensor:
    """The A x 4 default boxes of ``spec``, relative to the network input, as a new float32 tensor.

    Args:
        spec: the anchor layout (``model.spec.anchors``).
        fmt: ``"cxcywh"`` for (centre x, centre y, width, height), ``"xyxy"`` for (left, top, right, bottom);
            see :mod:`ssd.boxes`.
    """
    if not isinstance(spec, AnchorSpec):
        raise TypeError(f"spec: expected an AnchorSpec (model.spec.anchors), got {type(spec).__name__}")
    if fmt == "cxcywh":
        return _default_boxes_cxcywh(spec).clone()
    if fmt == "xyxy":
        return _default_boxes_xyxy(spec).clone()
    # "xywh" is refused rather than converted: it named centre boxes here before, COCO's top-left boxes now.
    raise ValueError(f"fmt: expected 'cxcywh' or 'xyxy', got {fmt!r}")
