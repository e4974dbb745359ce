"""Ground-truth encoding: assigns every default box a class and a box, exactly as NVIDIA's ``Encoder.encode``.

The matching rule (SSD's, as NVIDIA implements it):

* every truth claims the default box it overlaps most; when two truths claim the same box, the later truth wins it,
  and a claimed box counts as matched whatever its IoU (NVIDIA forces that IoU to 2.0);
* every other default box is matched to the truth it overlaps most when that IoU is strictly above the threshold;
* unmatched boxes get label 0 (background) and their own default box as the box.

Boxes come out as (centre x, centre y, width, height), converted from left-top-right-bottom with NVIDIA's float32
arithmetic, so the result is bit-identical to the reference (the unmatched default boxes included, which therefore
differ from ``default_boxes("xywh")`` in the last bit for most boxes).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..anchors import default_boxes
from ..models.ssd300_resnet50 import NVIDIA_SSD300

__all__ = ["box_iou_ltrb", "encode_batch", "encode_targets", "ltrb_to_xywh"]

BoxesLike = torch.Tensor | np.ndarray


@functools.lru_cache(maxsize=1)
def _default_anchors_ltrb() -> torch.Tensor:
    return default_boxes(NVIDIA_SSD300.anchors, "ltrb")


def ltrb_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) -> (centre x, centre y, width, height), in NVIDIA's operation order."""
    return torch.stack(
        [
            0.5 * (boxes[..., 0] + boxes[..., 2]),
            0.5 * (boxes[..., 1] + boxes[..., 3]),
            boxes[..., 2] - boxes[..., 0],
            boxes[..., 3] - boxes[..., 1],
        ],
        dim=-1,
    )


def box_iou_ltrb(truths: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of ``truths`` (... x T x 4) against ``anchors`` (A x 4), both ltrb: ... x T x A.

    Computed with the same float32 operations as NVIDIA's ``calc_iou_tensor``, so that comparisons against the
    threshold (and the ties between exactly equal IoUs) come out the same.
    """
    t = truths.unsqueeze(-2)
    left_top = torch.maximum(t[..., :2], anchors[:, :2])
    right_bottom = torch.minimum(t[..., 2:], anchors[:, 2:])
    delta = (right_bottom - left_top).clamp(min=0)
    intersect = delta[..., 0] * delta[..., 1]
    truth_wh = t[..., 2:] - t[..., :2]
    anchor_wh = anchors[:, 2:] - anchors[:, :2]
    truth_area = truth_wh[..., 0] * truth_wh[..., 1]
    anchor_area = anchor_wh[:, 0] * anchor_wh[:, 1]
    return intersect / (truth_area + anchor_area - intersect)


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _check_boxes(boxes: BoxesLike, name: str) -> torch.Tensor:
    tensor = _as_tensor(boxes, name)
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.ndim != 2 or tensor.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (n, 4), got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: expected finite coordinates, got NaN or infinity")
    # A zero-area truth has IoU 0 with everything, and its log-size target would be -inf in the loss.
    if bool(((tensor[:, 2] <= tensor[:, 0]) | (tensor[:, 3] <= tensor[:, 1])).any()):
        raise ValueError(f"{name}: expected ltrb boxes with right > left and bottom > top, got an empty box")
    return tensor.to(torch.float32)


def _check_labels(labels: BoxesLike, count: int, name: str) -> torch.Tensor:
    tensor = _as_tensor(labels, name)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {tensor.dtype}")
    if tensor.ndim != 1 or tensor.shape[0] != count:
        raise ValueError(f"{name}: expected shape ({count},) to match the boxes, got {tuple(tensor.shape)}")
    if count and int(tensor.min()) < 1:
        raise ValueError(f"{name}: expected labels >= 1 (0 is background), got {int(tensor.min())}")
    return tensor.to(torch.int64)


def _check_threshold(iou_threshold: float) -> float:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)):
        raise TypeError(f"iou_threshold: expected a float, got {type(iou_threshold).__name__}")
    if not (math.isfinite(iou_threshold) and 0.0 <= iou_threshold <= 1.0):
        raise ValueError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold}")
    return float(iou_threshold)


def _check_anchors(anchors: BoxesLike | None) -> torch.Tensor:
    if anchors is None:
        return _default_anchors_ltrb()
    tensor = _check_boxes(anchors, "anchors")
    if tensor.shape[0] == 0:
        raise ValueError("anchors: expected at least one anchor box, got 0")
    return tensor


def encode_batch(
    boxes: Sequence[BoxesLike],
    labels: Sequence[BoxesLike],
    iou_threshold: float = 0.5,
    anchors: BoxesLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the truths of a batch of images against the default boxes.

    Args:
        boxes: one (n_i x 4) float tensor or array per image: ltrb, relative to the image (0..1). n_i may be 0.
        labels: one (n_i,) integer tensor or array per image, classes >= 1.
        iou_threshold: a default box not claimed as a truth's best match is matched when its IoU is above this.
        anchors: A x 4 ltrb default boxes; NVIDIA's 8732 SSD300 boxes when None.

    Returns:
        ``(boxes, labels)``: N x A x 4 float32 xywh and N x A int64, each image identical to
        :func:`encode_targets` (and to NVIDIA's ``Encoder.encode``).
    """
    if isinstance(boxes, (torch.Tensor, np.ndarray)) or not isinstance(boxes, Sequence):
        raise TypeError(f"boxes: expected a list with one box tensor per image, got {type(boxes).__name__}")
    if isinstance(labels, (torch.Tensor, np.ndarray)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels: expected a list with one label tensor per image, got {type(labels).__name__}")
    if len(boxes) != len(labels):
        raise ValueError(f"labels: expected one entry per image ({len(boxes)}), got {len(labels)}")
    threshold = _check_threshold(iou_threshold)
    anchors_ltrb = _check_anchors(anchors)
    num_anchors = anchors_ltrb.shape[0]
    truths = [_check_boxes(b, f"boxes[{i}]") for i, b in enumerate(boxes)]
    classes = [_check_labels(lab, t.shape[0], f"labels[{i}]") for i, (lab, t) in enumerate(zip(labels, truths))]
    num_images = len(truths)
    if num_images == 0:
        return torch.zeros(0, num_anchors, 4), torch.zeros(0, num_anchors, dtype=torch.int64)

    # Images have different numbers of truths: pad to the longest, with padding that can never win a match.
    most = max(1, max(t.shape[0] for t in truths))
    padded = torch.zeros(num_images, most, 4)
    padded[..., 2:] = 1.0
    padded_labels = torch.zeros(num_images, most, dtype=torch.int64)
    valid = torch.zeros(num_images, most, dtype=torch.bool)
    for i, (t, c) in enumerate(zip(truths, classes)):
        padded[i, : t.shape[0]] = t
        padded_labels[i, : t.shape[0]] = c
        valid[i, : t.shape[0]] = True

    ious = box_iou_ltrb(padded, anchors_ltrb)  # N x T x A
    ious = ious.masked_fill(~valid.unsqueeze(-1), -1.0)
    best_truth_iou, best_truth = ious.max(dim=1)  # per anchor, over truths (first truth on ties)
    best_anchor = ious.argmax(dim=2)  # per truth, over anchors

    # Each truth claims its best anchor. Scatter with amax so the later truth deterministically wins a shared
    # anchor (NVIDIA's indexed assignment does this on CPU); padding scatters into a spare column that is dropped.
    target_column = torch.where(valid, best_anchor, torch.full_like(best_anchor, num_anchors))
    owner = torch.full((num_images, num_anchors + 1), -1, dtype=torch.int64)
    truth_index = torch.arange(most).expand(num_images, most)
    owner.scatter_reduce_(1, target_column, truth_index, reduce="amax")
    owner = owner[:, :num_anchors]
    claimed = owner >= 0
    best_truth_iou = best_truth_iou.masked_fill(claimed, 2.0)
    best_truth = torch.where(claimed, owner, best_truth)

    matched = best_truth_iou > threshold
    out_labels = torch.where(matched, padded_labels.gather(1, best_truth), 0)
    gathered = padded.gather(1, best_truth.unsqueeze(-1).expand(-1, -1, 4))
    out_ltrb = torch.where(matched.unsqueeze(-1), gathered, anchors_ltrb.unsqueeze(0))
    return ltrb_to_xywh(out_ltrb), out_labels


def encode_targets(
    boxes_ltrb: BoxesLike,
    labels: BoxesLike,
    iou_threshold: float = 0.5,
    anchors: BoxesLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one image's truths against the default boxes, exactly as NVIDIA's ``Encoder.encode``.

    Args:
        boxes_ltrb: n x 4 float tensor or array, ltrb relative to the image (0..1); n may be 0 (all background).
        labels: (n,) integer tensor or array, classes >= 1.
        iou_threshold: NVIDIA's ``criteria``; a box is matched to its best truth when the IoU is strictly above it.
        anchors: A x 4 ltrb default boxes; NVIDIA's 8732 SSD300 boxes when None.

    Returns:
        ``(boxes, labels)``: A x 4 float32 xywh (the matched truth's box, or the default box itself) and
        (A,) int64 labels (0 for background).
    """
    out_boxes, out_labels = encode_batch([boxes_ltrb], [labels], iou_threshold, anchors)
    return out_boxes[0], out_labels[0]
