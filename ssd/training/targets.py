"""Ground-truth encoding: assigns every default box a class and a box, exactly as NVIDIA's ``Encoder.encode``.

The matching rule (SSD's, as NVIDIA implements it):

* every truth claims the default box it overlaps most; when two truths claim the same box, the later truth wins it,
  and a claimed box counts as matched whatever its IoU (NVIDIA forces that IoU to 2.0);
* every other default box is matched to the truth it overlaps most when that IoU is strictly above the threshold;
* unmatched boxes get label 0 (background) and their own default box as the box.

Truths are xyxy boxes; the assigned boxes come out as cxcywh (see :mod:`ssd.boxes`), converted with NVIDIA's
float32 arithmetic, so the result is bit-identical to the reference (the unmatched default boxes included, which
therefore differ from ``default_boxes(spec.anchors, "cxcywh")`` in the last bit for most boxes).

The default boxes and the threshold come from the model's :class:`~ssd.models.spec.DetectorSpec` (``anchors`` and
``matching_iou``); ``NVIDIA_SSD300`` gives NVIDIA's.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..anchors import default_boxes
from ..boxes import box_iou, convert_boxes
from ..models.spec import DetectorSpec, check_real, from_any_copy

__all__ = ["encode_batch", "encode_targets"]

BoxesLike = torch.Tensor | np.ndarray


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
        raise ValueError(f"{name}: expected xyxy boxes with right > left and bottom > top, got an empty box")
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


def _check_spec(spec: object) -> tuple[torch.Tensor, float]:
    """The spec's default boxes (A x 4 xyxy) and matching threshold."""
    spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"spec: expected a DetectorSpec (model.spec, or NVIDIA_SSD300 for NVIDIA's), "
                        f"got {type(spec).__name__}")
    threshold = check_real("spec.matching_iou", spec.matching_iou, 0.0, 1.0)
    return default_boxes(spec.anchors, "xyxy"), threshold


def encode_batch(
    boxes: Sequence[BoxesLike],
    labels: Sequence[BoxesLike],
    spec: DetectorSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the truths of a batch of images against the default boxes of ``spec``.

    Args:
        boxes: one (n_i x 4) float tensor or array per image: xyxy, relative to the image (0..1). n_i may be 0.
        labels: one (n_i,) integer tensor or array per image, classes >= 1.
        spec: the model's spec (``model.spec``): its default boxes, and ``matching_iou``, the IoU above which a
            default box not claimed as a truth's best match is matched to its best truth.

    Returns:
        ``(boxes, labels)``: N x A x 4 float32 cxcywh and N x A int64, each image identical to
        :func:`encode_targets` (and to NVIDIA's ``Encoder.encode``).
    """
    if isinstance(boxes, (torch.Tensor, np.ndarray)) or not isinstance(boxes, Sequence):
        raise TypeError(f"boxes: expected a list with one box tensor per image, got {type(boxes).__name__}")
    if isinstance(labels, (torch.Tensor, np.ndarray)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels: expected a list with one label tensor per image, got {type(labels).__name__}")
    if len(boxes) != len(labels):
        raise ValueError(f"labels: expected one entry per image ({len(boxes)}), got {len(labels)}")
    anchors_xyxy, threshold = _check_spec(spec)
    num_anchors = anchors_xyxy.shape[0]
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

    ious = box_iou(padded, anchors_xyxy)  # N x T x A
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
    out_xyxy = torch.where(matched.unsqueeze(-1), gathered, anchors_xyxy.unsqueeze(0))
    return convert_boxes(out_xyxy, "xyxy", "cxcywh"), out_labels


def encode_targets(
    boxes: BoxesLike,
    labels: BoxesLike,
    spec: DetectorSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one image's truths against the default boxes of ``spec``, exactly as NVIDIA's ``Encoder.encode``.

    Args:
        boxes: n x 4 float tensor or array, xyxy relative to the image (0..1); n may be 0 (all background).
        labels: (n,) integer tensor or array, classes >= 1.
        spec: the model's spec (``model.spec``; ``NVIDIA_SSD300`` for NVIDIA's 8732 boxes): its default boxes and
            ``matching_iou`` (NVIDIA's ``criteria``: a box is matched to its best truth when the IoU is strictly
            above it).

    Returns:
        ``(boxes, labels)``: A x 4 float32 cxcywh (the matched truth's box, or the default box itself) and
        (A,) int64 labels (0 for background).
    """
    out_boxes, out_labels = encode_batch([boxes], [labels], spec)
    return out_boxes[0], out_labels[0]
