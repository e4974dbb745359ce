"""The 8732 SSD300 default (anchor) boxes, in the order the model's heads emit them."""
from __future__ import annotations

import functools
import itertools
import math

import torch

FIGURE_SIZE = 300
FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
STEPS = (8, 16, 32, 64, 100, 300)
SCALES = (21, 45, 99, 153, 207, 261, 315)
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
# Box-regression variances: the network predicts offsets scaled by these.
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2


def boxes_per_location() -> list[int]:
    """How many default boxes each feature map has per cell: 4, 6, 6, 6, 4, 4."""
    return [2 + 2 * len(ratios) for ratios in ASPECT_RATIOS]


# 8732: the length of the last axis of the model's ``locs`` and ``confs``.
NUM_BOXES = sum(n * size * size for n, size in zip(boxes_per_location(), FEATURE_SIZES))


@functools.lru_cache(maxsize=1)
def _default_boxes_xywh() -> torch.Tensor:
    boxes = []
    for k, cells in enumerate(FEATURE_SIZES):
        small = SCALES[k] / FIGURE_SIZE
        large = SCALES[k + 1] / FIGURE_SIZE
        sizes = [(small, small), (math.sqrt(small * large),) * 2]
        for ratio in ASPECT_RATIOS[k]:
            w, h = small * math.sqrt(ratio), small / math.sqrt(ratio)
            sizes += [(w, h), (h, w)]
        cell = FIGURE_SIZE / STEPS[k]
        # Size-major, then rows, then columns: the order of the heads' reshape.
        for (w, h), (i, j) in itertools.product(sizes, itertools.product(range(cells), repeat=2)):
            boxes.append(((j + 0.5) / cell, (i + 0.5) / cell, w, h))
    return torch.tensor(boxes, dtype=torch.float32).clamp_(0.0, 1.0)


def default_boxes(order: str = "xywh") -> torch.Tensor:
    """Return the 8732 x 4 default boxes, relative to the 300 x 300 input.

    Args:
        order: ``"xywh"`` for (centre x, centre y, width, height), ``"ltrb"`` for (left, top, right, bottom).

    Returns:
        A new float32 tensor of shape (8732, 4); callers may modify it.
    """
    xywh = _default_boxes_xywh()
    if order == "xywh":
        return xywh.clone()
    if order == "ltrb":
        half = xywh[:, 2:] / 2
        return torch.cat([xywh[:, :2] - half, xywh[:, :2] + half], dim=1)
    raise ValueError(f"order: expected 'xywh' or 'ltrb', got {order!r}")
