"""Turn SSD300's raw predictions into detections: NVIDIA's ``decode_results``, exactly, vectorized over a batch.

The semantics are those of NVIDIA's reference (PyTorch/Detection/SSD): boxes decoded with variances 0.1 / 0.2,
softmax over the 81 classes, then per image and per class 1..80 the scores above a threshold, at most the 200
highest, greedy non-maximum suppression that drops a box when its IoU with a kept box is >= ``criteria``, and
finally the ``max_output`` highest scores over all classes. Every float operation that decides which box survives
is done in float32 in NVIDIA's order, so the detections are NVIDIA's, bit for bit on the same machine.

Everything runs on the device of the predictions, without a Python loop over images, classes or candidates; the
only host synchronisations are a few per batch (one per NMS round).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .coco import NUM_CLASSES
from .default_boxes import CENTER_VARIANCE, NUM_BOXES, SIZE_VARIANCE, default_boxes

__all__ = [
    "NUM_BOXES",
    "NUM_CLASSES",
    "Decoded",
    "check_predictions",
    "class_scores",
    "decode_batch",
    "decode_boxes",
    "split_detections",
]

_FOREGROUND = NUM_CLASSES - 1

# Softmax gives p_c = exp(x_c - max) / s with s >= 1, so p_c > t needs x_c - max > log(t). Boxes failing that by
# this margin (far more than float32 rounding) cannot hold a candidate, and their softmax is never computed.
_LOGIT_MARGIN = 1e-2
# Elements of one group x P x P IoU tensor in a chunk: a handful of such float32 temporaries stay under ~64 MB.
_CHUNK_ELEMENTS = 1 << 21
# Elements of the suppression matrices that iterate together (bool, so bytes): bounds memory for huge batches.
_WAVE_ELEMENTS = 1 << 27
_MIN_GROUP_PAD = 8

_ANCHORS: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


class Decoded(NamedTuple):
    """Detections of a batch, padded to ``K = max_output`` rows per image, on the predictions' device.

    Row ``k < counts[i]`` of image ``i`` is a detection; rows are sorted by descending score. Padding rows hold
    zeros (label 0 is background, never a detection).
    """

    boxes: Tensor  # N x K x 4 float32, (left, top, right, bottom) relative to the input
    labels: Tensor  # N x K int64, 1..80
    scores: Tensor  # N x K float32
    counts: Tensor  # N int64


def _shape(x: object) -> str:
    if isinstance(x, Tensor):
        return " x ".join(str(d) for d in x.shape) or "a scalar"
    return type(x).__name__


def check_predictions(predictions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Validate the model's output ``(locs, confs)`` and return it as a tuple, unchanged.

    Raises:
        ValueError: unless ``predictions`` is a pair of floating-point tensors on one device with shapes
            N x 4 x 8732 and N x 81 x 8732.
    """
    expected = f"the model's output (locs, confs) with shapes N x 4 x {NUM_BOXES} and N x {NUM_CLASSES} x {NUM_BOXES}"
    if isinstance(predictions, Tensor):
        raise ValueError(f"predictions: expected {expected}, got a single tensor of shape {_shape(predictions)}")
    if not isinstance(predictions, (tuple, list)) or len(predictions) != 2:
        got = f"a {type(predictions).__name__}"
        if isinstance(predictions, (tuple, list)):
            got += f" of length {len(predictions)}"
        raise ValueError(f"predictions: expected {expected}, got {got}")
    locs, confs = predictions
    if not isinstance(locs, Tensor) or not isinstance(confs, Tensor):
        raise ValueError(f"predictions: expected {expected}, got ({_shape(locs)}, {_shape(confs)})")
    if (
        locs.dim() != 3
        or confs.dim() != 3
        or tuple(locs.shape[1:]) != (4, NUM_BOXES)
        or tuple(confs.shape[1:]) != (NUM_CLASSES, NUM_BOXES)
        or locs.shape[0] != confs.shape[0]
    ):
        raise ValueError(f"predictions: expected {expected}, got shapes {_shape(locs)} and {_shape(confs)}")
    if not locs.is_floating_point() or not confs.is_floating_point():
        raise ValueError(f"predictions: expected floating-point tensors, got {locs.dtype} and {confs.dtype}")
    if locs.device != confs.device:
        raise ValueError(f"predictions: expected locs and confs on one device, got {locs.device} and {confs.device}")
    return locs, confs


def _check_locs(locs: Tensor) -> None:
    if not isinstance(locs, Tensor) or locs.dim() != 3 or tuple(locs.shape[1:]) != (4, NUM_BOXES):
        raise ValueError(f"locs: expected a tensor of shape N x 4 x {NUM_BOXES}, got {_shape(locs)}")
    if not locs.is_floating_point():
        raise ValueError(f"locs: expected a floating-point tensor, got {locs.dtype}")


def _check_confs(confs: Tensor) -> None:
    if not isinstance(confs, Tensor) or confs.dim() != 3 or tuple(confs.shape[1:]) != (NUM_CLASSES, NUM_BOXES):
        raise ValueError(f"confs: expected a tensor of shape N x {NUM_CLASSES} x {NUM_BOXES}, got {_shape(confs)}")
    if not confs.is_floating_point():
        raise ValueError(f"confs: expected a floating-point tensor, got {confs.dtype}")


def _anchors(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Default-box centres and sizes, each 2 x 8732, cached so GPU calls do not upload them every time."""
    key = (device, dtype)
    cached = _ANCHORS.get(key)
    if cached is None:
        xywh = default_boxes("xywh").to(device=device, dtype=dtype).t().contiguous()
        cached = (xywh[:2], xywh[2:])
        _ANCHORS[key] = cached
    return cached


def decode_boxes(locs: Tensor) -> Tensor:
    """Decode N x 4 x 8732 box offsets into N x 8732 x 4 float32 (left, top, right, bottom), relative, unclamped.

    The input is not modified. Gradients flow through.
    """
    _check_locs(locs)
    locs = locs.float()
    centres, sizes = _anchors(locs.device, locs.dtype)
    # NVIDIA scales by the variances first and rounds every step separately; the exp runs on a strided view of the
    # scaled N x 4 x 8732 tensor, as NVIDIA's does, so even its vectorised/scalar split over elements matches.
    scaled = torch.cat([locs[:, :2] * CENTER_VARIANCE, locs[:, 2:] * SIZE_VARIANCE], dim=1)
    xy = scaled[:, :2] * sizes + centres
    half = 0.5 * (scaled[:, 2:].exp() * sizes)
    return torch.cat([xy - half, xy + half], dim=1).transpose(1, 2).contiguous()


def class_scores(confs: Tensor) -> Tensor:
    """Softmax of N x 81 x 8732 logits over the classes, as N x 8732 x 81 float32. The input is not modified."""
    _check_confs(confs)
    # Softmax over the last axis of the permuted view: the exact call NVIDIA makes, hence identical roundings.
    return confs.float().permute(0, 2, 1).softmax(dim=-1)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_params(criteria: float, max_output: int, score_threshold: float, max_per_class: int) -> None:
    if not _is_real(criteria) or not 0 < criteria <= 1:
        raise ValueError(f"criteria: expected a number in (0, 1], got {criteria!r}")
    if not _is_int(max_output) or max_output < 1:
        raise ValueError(f"max_output: expected an integer >= 1, got {max_output!r}")
    if not _is_real(score_threshold) or not 0 <= score_threshold < 1:
        raise ValueError(f"score_threshold: expected a number in [0, 1), got {score_threshold!r}")
    if not _is_int(max_per_class) or max_per_class < 1:
        raise ValueError(f"max_per_class: expected an integer >= 1, got {max_per_class!r}")


def _empty(n_images: int, max_output: int, device: torch.device) -> Decoded:
    return Decoded(
        boxes=torch.zeros(n_images, max_output, 4, device=device),
        labels=torch.zeros(n_images, max_output, dtype=torch.int64, device=device),
        scores=torch.zeros(n_images, max_output, device=device),
        counts=torch.zeros(n_images, dtype=torch.int64, device=device),
    )


class _Candidates(NamedTuple):
    """Candidates sorted by (image, class) group, then in NVIDIA's pick order: score desc, box index desc."""

    image: Tensor  # M int64
    box: Tensor  # M int64, 0..8731
    label: Tensor  # M int64, 1..80
    score: Tensor  # M float32
    group_start: Tensor  # N * 80 int64: first candidate of each (image, class) group
    group_size: Tensor  # N * 80 int64


def _candidates(confs: Tensor, threshold: float, max_per_class: int) -> _Candidates | None:
    n_images = confs.shape[0]
    fg_top = confs[:, 1:].amax(dim=1)
    top = torch.maximum(fg_top, confs[:, 0])
    floor = math.log(threshold) - _LOGIT_MARGIN if threshold > 0 else -math.inf
    # NaN rows fail this test, and their softmax would be NaN everywhere, never above the threshold anyway.
    rows = (fg_top - top >= floor).nonzero()
    if rows.shape[0] == 0:
        return None
    # Softmax works row by row, so the rows that can matter give exactly the values of the full softmax.
    probs = confs.permute(0, 2, 1)[rows[:, 0], rows[:, 1]].softmax(dim=-1)
    hits = (probs[:, 1:] > threshold).nonzero()
    if hits.shape[0] == 0:
        return None
    # hits run by (image, box, class); reversed, equal scores keep the higher box index first, like NVIDIA's
    # ascending sort read from the end. Two stable sorts then give (group, score desc, box desc).
    hits = hits.flip(0)
    row, cls = hits[:, 0], hits[:, 1]
    image, box = rows[row, 0], rows[row, 1]
    score = probs[row, cls + 1]
    order = torch.sort(score, descending=True, stable=True).indices
    group = image * _FOREGROUND + cls
    order = order[torch.sort(group[order], stable=True).indices]
    image, box, cls, score, group = image[order], box[order], cls[order], score[order], group[order]

    counts = torch.bincount(group, minlength=n_images * _FOREGROUND)
    rank = torch.arange(group.shape[0], device=group.device) - (counts.cumsum(0) - counts)[group]
    top_k = (rank < max_per_class).nonzero().squeeze(1)
    image, box, cls, score = image[top_k], box[top_k], cls[top_k], score[top_k]
    size = counts.clamp(max=max_per_class)
    return _Candidates(image, box, cls + 1, score, size.cumsum(0) - size, size)


def _plan_chunks(sizes: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Split the groups that need NMS into chunks of similar size: (group ids, padded size P) each."""
    groups = np.flatnonzero(sizes > 1)
    if groups.size == 0:
        return []
    # Pad to powers of two: at most ~4x wasted IoU work, and only a few distinct shapes.
    pad = np.maximum(_MIN_GROUP_PAD, 1 << np.ceil(np.log2(sizes[groups])).astype(np.int64))
    chunks = []
    for p in np.unique(pad)[::-1]:
        members = groups[pad == p]
        per_chunk = max(1, _CHUNK_ELEMENTS // int(p * p))
        chunks += [(members[i : i + per_chunk], int(p)) for i in range(0, members.size, per_chunk)]
    return chunks


def _suppression(boxes: Tensor, pos: Tensor, valid: Tensor, criteria: float) -> Tensor:
    """S[g, i, j]: candidate i ranks above j in group g and NVIDIA would drop j once i is kept."""
    b = boxes[pos]  # groups x P x 4
    # NVIDIA's calc_iou_tensor, operation for operation, in float32; IoU and the test are symmetric in i and j.
    wh = torch.minimum(b[:, :, None, 2:], b[:, None, :, 2:]) - torch.maximum(b[:, :, None, :2], b[:, None, :, :2])
    wh.clamp_(min=0)
    inter = wh[..., 0] * wh[..., 1]
    del wh
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter.div_(area[:, :, None] + area[:, None, :] - inter)
    # NVIDIA keeps iou < criteria, so a NaN IoU (two degenerate boxes) suppresses too ...
    suppress = ~(iou < criteria)
    del iou
    # ... but boxes with NaN/inf coordinates take no part: they would suppress or be suppressed by everything.
    usable = valid & torch.isfinite(b).all(dim=-1)
    size = pos.shape[1]
    above = torch.ones(size, size, dtype=torch.bool, device=pos.device).triu_(diagonal=1)
    return suppress & above & usable[:, :, None] & usable[:, None, :]


class _Chunk:
    """Groups padded to one size P: their suppression matrices and the current greedy-keep estimate."""

    def __init__(self, cands: _Candidates, boxes: Tensor, members: np.ndarray, size: int, criteria: float) -> None:
        device = boxes.device
        groups = torch.from_numpy(members).to(device)
        offsets = torch.arange(size, device=device)
        self.valid = offsets < cands.group_size[groups, None]
        self.pos = torch.where(self.valid, cands.group_start[groups, None] + offsets, 0)
        self.suppress = _suppression(boxes, self.pos, self.valid, criteria)
        self.keep = torch.ones_like(self.valid)
        self.rounds_left = size + 1

    def step(self) -> Tensor:
        """One round of keep[j] = not any(keep[i] & S[i, j]); returns whether anything changed (on device)."""
        new = ~(self.keep[:, :, None] & self.suppress).any(dim=1)
        changed = (new != self.keep).any()
        self.keep = new
        self.rounds_left -= 1
        return changed


def _nms(cands: _Candidates, boxes: Tensor, criteria: float) -> Tensor:
    """Greedy NMS of every (image, class) group at once; returns the kept mask over the candidates."""
    n_cands = cands.score.shape[0]
    # One spare slot receives the writes for padding, so no data-dependent (host-syncing) selection is needed.
    keep = torch.ones(n_cands + 1, dtype=torch.bool, device=boxes.device)
    waves: list[list[tuple[np.ndarray, int]]] = []
    load = _WAVE_ELEMENTS
    for members, size in _plan_chunks(cands.group_size.cpu().numpy()):
        elements = members.size * size * size
        if load + elements > _WAVE_ELEMENTS:
            waves.append([])
            load = 0
        waves[-1].append((members, size))
        load += elements

    for wave in waves:
        chunks = [_Chunk(cands, boxes, members, size, criteria) for members, size in wave]
        # Greedy keep is the unique solution of keep[j] = not any(keep[i] & S[i, j]) in rank order; iterating
        # from all-True settles at least one more rank per round, so a chunk of padded size P is done within P
        # rounds and the round after shows no change.
        active = chunks
        while active:
            flags = torch.stack([chunk.step() for chunk in active]).tolist()  # the round's single host sync
            active = [chunk for chunk, changed in zip(active, flags) if changed and chunk.rounds_left > 0]
        for chunk in chunks:
            keep[torch.where(chunk.valid & ~chunk.keep, chunk.pos, n_cands)] = False
    return keep[:n_cands]


def _select(cands: _Candidates, kept: Tensor, boxes: Tensor, n_images: int, max_output: int) -> Decoded:
    """The max_output best kept candidates of each image, in NVIDIA's order, scattered into padded tensors."""
    device = boxes.device
    # Reversed, the candidates run (image desc, class desc, score asc, box asc); sorting by score desc, then
    # image, keeps equal scores as class desc, box asc: the reverse of NVIDIA's stable ascending sort.
    image = torch.where(kept, cands.image, n_images).flip(0)
    order = torch.sort(cands.score.flip(0), descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]
    image = image[order]
    source = (cands.score.shape[0] - 1) - order  # index into the unreversed candidates

    counts = torch.bincount(image, minlength=n_images + 1)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(image.shape[0], device=device) - starts[image]
    chosen = (image < n_images) & (rank < max_output)
    # Rows not chosen all land on one spare slot, which avoids a data-dependent (host-syncing) selection.
    slot = torch.where(chosen, image * max_output + rank, n_images * max_output)
    size = n_images * max_output + 1
    out_boxes = torch.zeros(size, 4, device=device)
    out_labels = torch.zeros(size, dtype=torch.int64, device=device)
    out_scores = torch.zeros(size, device=device)
    out_boxes[slot] = boxes[source]
    out_labels[slot] = cands.label[source]
    out_scores[slot] = cands.score[source]
    return Decoded(
        boxes=out_boxes[:-1].reshape(n_images, max_output, 4),
        labels=out_labels[:-1].reshape(n_images, max_output),
        scores=out_scores[:-1].reshape(n_images, max_output),
        counts=counts[:n_images].clamp(max=max_output),
    )


@torch.no_grad()
def decode_batch(
    locs: Tensor,
    confs: Tensor,
    *,
    criteria: float = 0.5,
    max_output: int = 20,
    score_threshold: float = 0.05,
    max_per_class: int = 200,
) -> Decoded:
    """Detections for a batch of raw predictions, exactly as NVIDIA's ``decode_results`` finds them.

    Args:
        locs: N x 4 x 8732 box offsets; any floating dtype (computed in float32); not modified.
        confs: N x 81 x 8732 class logits (no softmax); not modified.
        criteria: a box is dropped when its IoU with a kept box of its class is >= this.
        max_output: detections kept per image, over all classes (K).
        score_threshold: a class score must be strictly greater to be a candidate.
        max_per_class: the highest-scoring candidates per image and class that go through NMS.

    Equal scores are ordered as NVIDIA's sorts order them when stable (higher box index first within a class,
    higher class first across classes); NVIDIA's own unstable ``torch.sort`` leaves that order unspecified. Boxes with
    NaN or infinite coordinates take no part in NMS (they are kept or dropped only by score), where NVIDIA's loop
    would let them suppress, or be suppressed by, everything in their class.

    Returns:
        A :class:`Decoded` of padded N x K tensors on the predictions' device, rows by descending score.

    Raises:
        ValueError: for predictions of the wrong kind or shape, or parameters out of range.
    """
    locs, confs = check_predictions((locs, confs))
    _check_params(criteria, max_output, score_threshold, max_per_class)
    max_output, max_per_class = int(max_output), int(max_per_class)
    criteria, score_threshold = float(criteria), float(score_threshold)
    n_images, device = locs.shape[0], locs.device
    cands = _candidates(confs.float(), score_threshold, max_per_class)
    if cands is None:
        return _empty(n_images, max_output, device)
    boxes = decode_boxes(locs)[cands.image, cands.box]
    kept = _nms(cands, boxes, criteria)
    return _select(cands, kept, boxes, n_images, max_output)


def split_detections(decoded: Decoded, ascending: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image ``(boxes, labels, scores)`` numpy arrays: N_i x 4 float32, N_i int64, N_i float32.

    Rows are by descending score, or ascending (NVIDIA's order) with ``ascending=True``. The whole batch comes to
    the host in a single copy.
    """
    if not isinstance(decoded, Decoded):
        raise TypeError(f"decoded: expected a Decoded from decode_batch, got {type(decoded).__name__}")
    n_images, max_output = decoded.scores.shape
    # Labels (<= 80) and counts (<= K) are exact in float32, so one float32 buffer carries everything.
    packed = torch.cat(
        [
            decoded.boxes.detach().reshape(n_images, 4 * max_output).float(),
            decoded.scores.detach().float(),
            decoded.labels.detach().float(),
            decoded.counts.detach().float()[:, None],
        ],
        dim=1,
    ).cpu().numpy()
    boxes = packed[:, : 4 * max_output].reshape(n_images, max_output, 4)
    scores = packed[:, 4 * max_output : 5 * max_output]
    labels = packed[:, 5 * max_output : 6 * max_output].astype(np.int64)
    counts = packed[:, -1].astype(np.int64)
    step = -1 if ascending else 1
    return [
        (
            np.ascontiguousarray(boxes[i, : counts[i]][::step]),
            np.ascontiguousarray(labels[i, : counts[i]][::step]),
            np.ascontiguousarray(scores[i, : counts[i]][::step]),
        )
        for i in range(n_images)
    ]
