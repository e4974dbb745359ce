"""Default (anchor) boxes generated from an :class:`~ssd.models.spec.AnchorSpec`, in the order the heads emit them."""
from __future__ import annotations

import functools
import itertools
import math

import torch

from .models.spec import AnchorSpec

__all__ = ["default_boxes", "xywh_to_ltrb"]


@functools.lru_cache(maxsize=16)
def _default_boxes_xywh(spec: AnchorSpec) -> torch.Tensor:
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
    xywh = torch.tensor(boxes, dtype=torch.float32)
    return xywh.clamp_(0.0, 1.0) if spec.clamp else xywh


def xywh_to_ltrb(xywh: torch.Tensor) -> torch.Tensor:
    """(centre x, centre y, width, height) to (left, top, right, bottom), on the last axis."""
    half = xywh[..., 2:] / 2
    return torch.cat([xywh[..., :2] - half, xywh[..., :2] + half], dim=-1)


def default_boxes(spec: AnchorSpec, order: str = "xywh") -> torch.Tensor:
    """The A x 4 default boxes of ``spec``, relative to the network input, as a new float32 tensor.

    Args:
        spec: the anchor layout (``model.spec.anchors``).
        order: ``"xywh"`` for (centre x, centre y, width, height), ``"ltrb"`` for (left, top, right, bottom).
    """
    if not isinstance(spec, AnchorSpec):
        raise TypeError(f"spec: expected an AnchorSpec (model.spec.anchors), got {type(spec).__name__}")
    xywh = _default_boxes_xywh(spec)
    if order == "xywh":
        return xywh.clone()
    if order == "ltrb":
        return xywh_to_ltrb(xywh)
    raise ValueError(f"order: expected 'xywh' or 'ltrb', got {order!r}")
