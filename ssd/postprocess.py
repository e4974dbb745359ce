"""Raw predictions to detections: one implementation, parameterized by a :class:`PostProcessSpec` recipe.

NVIDIA's recipe (``decode_results``) is reproduced exactly: boxes decoded with variances 0.1 / 0.2, softmax over
the classes, per image and class the scores above a threshold, at most the 200 highest, greedy NMS dropping a box
whose IoU with a kept one is >= the IoU threshold, then the highest over all classes. Every float operation that
decides which box survives is done in float32 in NVIDIA's order, so the detections are NVIDIA's, bit for bit on the
same machine. mmdetection's recipe differs only in where candidates are capped (per feature map, over (anchor,
class) pairs), in clipping and dropping empty boxes before NMS, and in suppressing only IoU > threshold.

Everything runs on the device of the predictions, without a Python loop over images, classes or candidates; the
only host synchronisations are a few per batch (the group sizes, which fix the NMS loop's shapes).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .box_coder import BoxCoder
from .boxes import box_iou
from .models.spec import DetectorSpec, PostProcessSpec, from_any_copy

__all__ = ["OUTPUT_KINDS", "Decoded", "check_predictions", "class_scores", "postprocess", "postprocess_decoded",
           "postprocess_outputs", "select_padded", "split_detections"]

# What a backend's raw outputs are (ssd.backends): the network's offsets and logits, an exported graph's decoded
# boxes and probabilities, or an exported graph's own padded detections (post-processing in the graph).
OUTPUT_KINDS = ("offsets", "decoded", "nms")

# Softmax gives p_c = exp(x_c - max) / s with s >= 1, so p_c > t needs x_c - max > log(t). Boxes failing that by
# this margin (far more than float32 rounding) cannot hold a candidate, and their softmax is never computed.
_LOGIT_MARGIN = 1e-2
# Candidates (groups x padded size) of one NMS chunk: each step's float32 temporaries stay under ~32 MB.
_CHUNK_ELEMENTS = 1 << 21
_MIN_GROUP_PAD = 8


class Decoded(NamedTuple):
    """Detections of a batch, padded to ``K = max_detections`` rows per image, on the predictions' device.

    Row ``k < counts[i]`` of image ``i`` is a detection; rows are sorted by descending score. Padding rows hold
    zeros (label 0 is background, never a detection).
    """

    boxes: Tensor  # N x K x 4 float32, (left, top, right, bottom) relative to the input
    labels: Tensor  # N x K int64, 1..C-1
    scores: Tensor  # N x K float32
    counts: Tensor  # N int64


def _shape(x: object) -> str:
    if isinstance(x, Tensor):
        return " x ".join(str(d) for d in x.shape) or "a scalar"
    return type(x).__name__


def check_predictions(predictions: Sequence[Tensor], spec: DetectorSpec) -> tuple[Tensor, Tensor]:
    """Validate a model's output ``(locs, confs)`` against ``spec`` and return it as a tuple, unchanged.

    Raises:
        ValueError: unless ``predictions`` is a pair of floating-point tensors on one device with shapes
            N x 4 x A and N x C x A (A anchors and C classes of ``spec``).
    """
    boxes, classes = spec.anchors.num_anchors, spec.num_classes
    expected = f"the model's output (locs, confs) with shapes N x 4 x {boxes} and N x {classes} x {boxes}"
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
        or tuple(locs.shape[1:]) != (4, boxes)
        or tuple(confs.shape[1:]) != (classes, boxes)
        or locs.shape[0] != confs.shape[0]
    ):
        raise ValueError(f"predictions: expected {expected}, got shapes {_shape(locs)} and {_shape(confs)}")
    if not locs.is_floating_point() or not confs.is_floating_point():
        raise ValueError(f"predictions: expected floating-point tensors, got {locs.dtype} and {confs.dtype}")
    if locs.device != confs.device:
        raise ValueError(f"predictions: expected locs and confs on one device, got {locs.device} and {confs.device}")
    return locs, confs


def class_scores(confs: Tensor) -> Tensor:
    """Softmax of N x C x A logits over the classes, as N x A x C float32. The input is not modified."""
    if not isinstance(confs, Tensor) or confs.dim() != 3 or not confs.is_floating_point():
        raise ValueError(f"confs: expected a floating-point tensor of shape N x C x A, got {_shape(confs)}")
    # Softmax over the last axis of the permuted view: the exact call NVIDIA makes, hence identical roundings.
    return confs.float().permute(0, 2, 1).softmax(dim=-1)


def _empty(n_images: int, max_output: int, device: torch.device) -> Decoded:
    return Decoded(
        boxes=torch.zeros(n_images, max_output, 4, device=device),
        labels=torch.zeros(n_images, max_output, dtype=torch.int64, device=device),
        scores=torch.zeros(n_images, max_output, device=device),
        counts=torch.zeros(n_images, dtype=torch.int64, device=device),
    )


class _Candidates(NamedTuple):
    """Candidates sorted by (image, class) group, then in pick order: score desc, box index desc."""

    image: Tensor  # M int64
    box: Tensor  # M int64, 0..A-1
    label: Tensor  # M int64, 1..C-1
    score: Tensor  # M float32
    group_start: Tensor  # N * (C-1) int64: first candidate of each (image, class) group
    group_size: Tensor  # N * (C-1) int64


class _Hits(NamedTuple):
    """Unsorted candidates in (image, box, class) descending order: NVIDIA's tie order read from the end."""

    image: Tensor
    box: Tensor
    cls: Tensor  # 0-based foreground class
    score: Tensor

    def subset(self, index: Tensor) -> _Hits:
        return _Hits(self.image[index], self.box[index], self.cls[index], self.score[index])


def _hits_where(mask: Tensor, probs: Tensor, rows: Tensor | None = None) -> _Hits | None:
    """The (image, box, class) triples where ``mask`` is set, with their foreground probabilities.

    ``mask`` and ``probs`` are N x A x (C-1), or R x (C-1) for the boxes listed in ``rows`` (R x 2: image, box).
    """
    hits = mask.nonzero()
    if hits.shape[0] == 0:
        return None
    # nonzero runs by (image, box, class); reversed, equal scores keep the higher box index first, like NVIDIA's
    # ascending sort read from the end.
    hits = hits.flip(0)
    score = probs[hits.unbind(1)]
    image, box = hits[:, :2].unbind(1) if rows is None else rows[hits[:, 0]].unbind(1)
    return _Hits(image, box, hits[:, -1], score)


def _rows_that_can_pass(logits: Tensor, threshold: float) -> Tensor:
    """(image, box) pairs, R x 2, whose softmax could put a foreground class above ``threshold``."""
    fg_top = logits[:, 1:].amax(dim=1)
    top = torch.maximum(fg_top, logits[:, 0])
    floor = math.log(threshold) - _LOGIT_MARGIN if threshold > 0 else -math.inf
    # NaN rows fail this test, and their softmax would be NaN everywhere, never above the threshold anyway.
    return (fg_top - top >= floor).nonzero()


def _hits_per_class(scores: Tensor, threshold: float, logits: bool = True) -> _Hits | None:
    """Every (image, box, class) whose foreground probability is above ``threshold``.

    ``scores`` is N x C x A, the model's layout: logits (softmax taken here), or probabilities with
    ``logits=False``. From logits, softmax is computed only for the boxes that can hold a candidate.
    """
    if not logits:
        probs = scores.permute(0, 2, 1)[..., 1:]
        return _hits_where(probs > threshold, probs)
    rows = _rows_that_can_pass(scores, threshold)
    if rows.shape[0] == 0:
        return None
    # Softmax works row by row, so the rows that can matter give exactly the values of the full softmax.
    probs = scores.permute(0, 2, 1)[rows[:, 0], rows[:, 1]].softmax(dim=-1)[:, 1:]
    return _hits_where(probs > threshold, probs, rows)


def _hits_per_level(scores: Tensor, threshold: float, per_level: int, level_sizes: Sequence[int],
                    logits: bool = True) -> _Hits | None:
    """Per feature map and image, the ``per_level`` best (anchor, class) pairs scoring above ``threshold``.

    ``scores`` as for :func:`_hits_per_class`. The top-k runs over dense N x A x (C-1) probabilities, so from
    logits the softmax is taken for every box.
    """
    probs = scores.permute(0, 2, 1)
    if logits:
        probs = probs.softmax(dim=-1)
    probs = probs[..., 1:]
    n_images, _, n_fg = probs.shape
    chosen = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    start = 0
    for size in level_sizes:
        flat = probs[:, start : start + size].reshape(n_images, -1)
        k = min(per_level, flat.shape[1])
        top = flat.masked_fill(~(flat > threshold), -1.0).topk(k, dim=1)
        picked = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top.indices, top.values > threshold)
        chosen[:, start : start + size] = picked.reshape(n_images, size, n_fg)
        start += size
    return _hits_where(chosen, probs)


def _find_hits(scores: Tensor, logits: bool, spec: DetectorSpec, recipe: PostProcessSpec) -> _Hits | None:
    """The recipe's candidates (per class or per feature map) in ``scores``, N x C x A as for the finders."""
    if recipe.candidates_per_class is not None:
        return _hits_per_class(scores, recipe.score_threshold, logits)
    return _hits_per_level(scores, recipe.score_threshold, recipe.candidates_per_level, spec.anchors.level_sizes,
                           logits)


def _group(hits: _Hits, n_groups: int, n_fg: int, cap: int | None) -> tuple[_Candidates, Tensor]:
    """Sort hits into (image, class) groups by score desc (ties: box desc), keep ``cap`` per group.

    Returns the candidates and, for each, its index into ``hits``.
    """
    # Two stable sorts give (group, score desc, box desc) from the reversed (image, box, class) order.
    order = torch.sort(hits.score, descending=True, stable=True).indices
    group = hits.image * n_fg + hits.cls
    order = order[torch.sort(group[order], stable=True).indices]
    group = group[order]
    counts = torch.bincount(group, minlength=n_groups)
    if cap is not None:
        rank = torch.arange(group.shape[0], device=group.device) - (counts.cumsum(0) - counts)[group]
        order = order[(rank < cap).nonzero().squeeze(1)]
        counts = counts.clamp(max=cap)
    cands = _Candidates(hits.image[order], hits.box[order], hits.cls[order] + 1, hits.score[order],
                        counts.cumsum(0) - counts, counts)
    return cands, order


def _plan_chunks(sizes: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Split the groups that need NMS into chunks of similar size: (group ids, padded size P) each, P being the
    largest group of the chunk."""
    groups = np.flatnonzero(sizes > 1)
    if groups.size == 0:
        return []
    # Chunks by power-of-two size class: a chunk's groups differ at most 2x in size, so padding wastes little,
    # and there are only a few chunks (each one a Python loop over its P ranks).
    size_class = np.maximum(_MIN_GROUP_PAD, 1 << np.ceil(np.log2(sizes[groups])).astype(np.int64))
    chunks = []
    for p in np.unique(size_class)[::-1]:
        members = groups[size_class == p]
        per_chunk = max(1, _CHUNK_ELEMENTS // int(p))
        for i in range(0, members.size, per_chunk):
            part = members[i : i + per_chunk]
            chunks.append((part, int(sizes[part].max())))
    return chunks


def _suppresses(iou: Tensor, recipe: PostProcessSpec) -> Tensor:
    # NVIDIA keeps iou < criteria, so a NaN IoU (two degenerate boxes) suppresses too; mmdetection and torchvision
    # suppress only IoU > threshold.
    return ~(iou < recipe.iou_threshold) if recipe.suppress_equal else iou > recipe.iou_threshold


def _suppression(boxes: Tensor, pos: Tensor, valid: Tensor, recipe: PostProcessSpec) -> Tensor:
    """S[g, i, j]: candidate i ranks above j in group g and j is dropped once i is kept (the whole matrix; NMS
    itself computes it one row at a time, with the same operations)."""
    b = boxes[pos]  # groups x P x 4
    # NVIDIA's calc_iou_tensor, operation for operation, in float32; IoU and the test are symmetric in i and j.
    suppress = _suppresses(box_iou(b, b), recipe)
    # Boxes with NaN/inf coordinates take no part: they would suppress or be suppressed by everything.
    usable = valid & torch.isfinite(b).all(dim=-1)
    size = pos.shape[1]
    above = torch.ones(size, size, dtype=torch.bool, device=pos.device).triu_(diagonal=1)
    return suppress & above & usable[:, :, None] & usable[:, None, :]


def _greedy_chunk(cands: _Candidates, boxes: Tensor, members: np.ndarray, size: int, recipe: PostProcessSpec
                  ) -> tuple[Tensor, Tensor]:
    """Greedy NMS of the groups ``members`` (padded to ``size``), all at once: candidate i of every group, in rank
    order, drops the later ones it suppresses unless it was dropped itself. Returns (positions of the candidates,
    G x P; which of them are dropped, G x P).

    Row i of the suppression matrix is computed at step i, only against the candidates after i: the same float32
    operations as the whole matrix (:func:`_suppression`, elementwise, so bit for bit the same IoU), half the work
    and G x P memory instead of G x P x P. No step reads anything back to the host.
    """
    device = boxes.device
    groups = torch.from_numpy(members).to(device)
    offsets = torch.arange(size, device=device)
    valid = offsets < cands.group_size[groups, None]
    pos = torch.where(valid, cands.group_start[groups, None] + offsets, 0)
    b = boxes[pos]  # G x P x 4
    # Boxes with NaN/inf coordinates take no part: they would suppress or be suppressed by everything.
    usable = valid & torch.isfinite(b).all(dim=-1)
    dropped = torch.zeros_like(valid)
    for i in range(size - 1):
        active = usable[:, i] & ~dropped[:, i]
        iou = box_iou(b[:, i : i + 1], b[:, i + 1 :])[:, 0]
        dropped[:, i + 1 :] |= _suppresses(iou, recipe) & usable[:, i + 1 :] & active[:, None]
    return pos, valid & dropped


def _nms(cands: _Candidates, boxes: Tensor, recipe: PostProcessSpec) -> Tensor:
    """Greedy NMS of every (image, class) group at once; returns the kept mask over the candidates."""
    n_cands = cands.score.shape[0]
    # One spare slot receives the writes for padding, so no data-dependent (host-syncing) selection is needed.
    keep = torch.ones(n_cands + 1, dtype=torch.bool, device=boxes.device)
    # The group sizes are the one read back to the host: they fix the chunks' shapes and step counts.
    for members, size in _plan_chunks(cands.group_size.cpu().numpy()):
        pos, dropped = _greedy_chunk(cands, boxes, members, size, recipe)
        keep[torch.where(dropped, pos, n_cands)] = False
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
def postprocess(predictions: Sequence[Tensor], spec: DetectorSpec, recipe: PostProcessSpec | None = None) -> Decoded:
    """Detections for a batch of raw predictions, as the recipe (default ``spec.postprocess``) finds them.

    Args:
        predictions: the model's ``(locs N x 4 x A, confs N x C x A)``, any floating dtype (computed in float32);
            not modified.
        spec: the model's spec (``model.spec``): its anchors, box coder and class count.
        recipe: thresholds and caps; ``spec.postprocess`` (the published evaluation protocol) when None.

    Equal scores are ordered as NVIDIA's sorts order them when stable (higher box index first within a class,
    higher class first across classes). Boxes with NaN or infinite coordinates take no part in NMS (they are kept
    or dropped only by score).

    Returns:
        A :class:`Decoded` of padded N x K tensors on the predictions' device, rows by descending score; boxes are
        (left, top, right, bottom) relative to the network input.
    """
    spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"spec: expected a DetectorSpec (model.spec), got {type(spec).__name__}")
    recipe = spec.postprocess if recipe is None else from_any_copy(recipe)
    if not isinstance(recipe, PostProcessSpec):
        raise TypeError(f"recipe: expected a PostProcessSpec, got {type(recipe).__name__}")
    locs, confs = check_predictions(predictions, spec)
    with _one_thread(locs.device):
        return _finish(confs.float(), True, lambda: BoxCoder.from_spec(spec).decode(locs), spec, recipe)


def _finish(scores: Tensor, logits: bool, all_boxes: Callable[[], Tensor], spec: DetectorSpec,
            recipe: PostProcessSpec) -> Decoded:
    """Detections from float32 N x C x A ``scores`` (logits or probabilities), shared by both entries: find the
    candidates, group and cap, take their boxes from ``all_boxes()`` (N x A x 4, called only when there are
    candidates), clip, drop empty boxes, NMS, select."""
    n_images, device, n_fg = scores.shape[0], scores.device, spec.num_classes - 1
    hits = _find_hits(scores, logits, spec, recipe)
    if hits is None:
        return _empty(n_images, recipe.max_detections, device)
    n_groups = n_images * n_fg
    cands, _ = _group(hits, n_groups, n_fg, recipe.candidates_per_class)
    boxes = all_boxes()[cands.image, cands.box]
    if recipe.clip_boxes:
        boxes = boxes.clamp(0.0, 1.0)
    if recipe.drop_empty:
        nonempty = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().squeeze(1)
        if nonempty.shape[0] < boxes.shape[0]:
            # The survivors keep their order; regrouping them only recomputes the group extents.
            kept = _Hits(cands.image, cands.box, cands.label - 1, cands.score).subset(nonempty)
            cands, order = _group(kept, n_groups, n_fg, None)
            boxes = boxes[nonempty][order]
            if cands.score.shape[0] == 0:
                return _empty(n_images, recipe.max_detections, device)
    kept_mask = _nms(cands, boxes, recipe)
    return _select(cands, kept_mask, boxes, n_images, recipe.max_detections)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for small CPU work: with a busy process beside us, each extra OpenMP thread is a
    barrier waiting on a descheduled core, and these tensors are too small to gain from splitting anyway.
    (OpenMP's thread count is per calling thread, so other threads' forward passes keep theirs.)"""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def postprocess_decoded(boxes: Tensor, scores: Tensor, spec: DetectorSpec, recipe: PostProcessSpec | None = None
                        ) -> Decoded:
    """:func:`postprocess` for outputs already decoded, as an exported graph gives them.

    Args:
        boxes: N x A x 4 (left, top, right, bottom) relative to the input, unclipped (``BoxCoder.decode``'s output).
        scores: N x A x C class probabilities (softmax over the classes, background at 0).
        spec, recipe: as for :func:`postprocess`.

    The same candidate, NMS and selection code runs; only the softmax and the decoding were done elsewhere, so
    the detections agree with :func:`postprocess` up to those outputs' rounding.
    """
    spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"spec: expected a DetectorSpec, got {type(spec).__name__}")
    recipe = spec.postprocess if recipe is None else from_any_copy(recipe)
    if not isinstance(recipe, PostProcessSpec):
        raise TypeError(f"recipe: expected a PostProcessSpec, got {type(recipe).__name__}")
    n_anchors, n_classes = spec.anchors.num_anchors, spec.num_classes
    for name, value, width in (("boxes", boxes, 4), ("scores", scores, n_classes)):
        if (not isinstance(value, Tensor) or value.dim() != 3 or tuple(value.shape[1:]) != (n_anchors, width)
                or not value.is_floating_point()):
            raise ValueError(f"{name}: expected a floating-point tensor of shape N x {n_anchors} x {width}, "
                             f"got {_shape(value)}")
    if boxes.shape[0] != scores.shape[0] or boxes.device != scores.device:
        raise ValueError(f"boxes, scores: expected one batch on one device, got {_shape(boxes)} on {boxes.device} "
                         f"and {_shape(scores)} on {scores.device}")
    with _one_thread(boxes.device):
        # The finders take the model's N x C x A layout; this is a view, and they permute it straight back.
        return _finish(scores.float().permute(0, 2, 1), False, boxes.float, spec, recipe)


@torch.no_grad()
def select_padded(boxes: Tensor, scores: Tensor, labels: Tensor, counts: Tensor, recipe: PostProcessSpec) -> Decoded:
    """Detections from padded ones that a graph's own post-processing gave (``--nms`` exports): per image, rows by
    descending score, ``counts`` of them valid. ``recipe`` can only tighten them: rows scoring at most
    ``recipe.score_threshold`` and rows beyond ``recipe.max_detections`` are dropped (the IoU threshold and the
    candidate caps were the graph's)."""
    if not isinstance(recipe, PostProcessSpec):
        raise TypeError(f"recipe: expected a PostProcessSpec, got {type(recipe).__name__}")
    k = min(recipe.max_detections, boxes.shape[1])
    # Rows are by descending score: a stricter threshold or a smaller K only shortens each image's list.
    counts = torch.minimum(counts, (scores > recipe.score_threshold).sum(dim=1)).clamp(max=k)
    keep = torch.arange(k, device=counts.device)[None, :] < counts[:, None]
    return Decoded(torch.where(keep[..., None], boxes[:, :k], 0.0), torch.where(keep, labels[:, :k], 0),
                   torch.where(keep, scores[:, :k], 0.0), counts)


def postprocess_outputs(outputs: Sequence[Tensor], kind: str, spec: DetectorSpec,
                        recipe: PostProcessSpec | None = None) -> Decoded:
    """Detections from a backend's raw ``outputs`` of ``kind`` (:data:`OUTPUT_KINDS`): the one dispatch.

    ``"offsets"`` (``(locs, confs)``) go through :func:`postprocess`, ``"decoded"`` (``(boxes, scores)``) through
    :func:`postprocess_decoded`, ``"nms"`` (``(det_boxes, det_scores, det_labels, num_detections)``) through
    :func:`select_padded`; ``recipe`` defaults to ``spec.postprocess``.
    """
    recipe = spec.postprocess if recipe is None else from_any_copy(recipe)
    if kind == "offsets":
        return postprocess(outputs, spec, recipe)
    if kind == "decoded":
        boxes, scores = outputs
        return postprocess_decoded(boxes, scores, spec, recipe)
    if kind == "nms":
        return select_padded(*outputs, recipe)
    raise ValueError(f"kind: expected one of {', '.join(map(repr, OUTPUT_KINDS))}, got {kind!r}")


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
