"""The batched decoder against NVIDIA's golden detections and against a plain per-class greedy loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ssd.postprocess as decode_module
from ssd.anchors import default_boxes as spec_default_boxes
from ssd.box_coder import BoxCoder
from ssd.models import NVIDIA_SSD300
from ssd.postprocess import Decoded, class_scores, postprocess, split_detections
from ssd.postprocess import check_predictions as spec_check_predictions

# NVIDIA's names for the recipe's fields, as its decode_results speaks them.
NVIDIA_NAMES = {"iou_threshold": "criteria", "max_detections": "max_output", "candidates_per_class": "max_per_class"}


def default_boxes(fmt="cxcywh"):
    return spec_default_boxes(NVIDIA_SSD300.anchors, fmt)


def decode_boxes(locs):
    return BoxCoder.from_spec(NVIDIA_SSD300).decode(locs)


def check_predictions(predictions):
    return spec_check_predictions(predictions, NVIDIA_SSD300)


def decode_batch(locs, confs, *, criteria=0.5, max_output=20, score_threshold=0.05, max_per_class=200):
    """NVIDIA's decode_results parameters as the recipe of the one post-processing implementation."""
    recipe = NVIDIA_SSD300.postprocess.updated(NVIDIA_NAMES, iou_threshold=criteria, max_detections=max_output,
                                               score_threshold=score_threshold, candidates_per_class=max_per_class)
    return postprocess((locs, confs), NVIDIA_SSD300, recipe)

B = 8732


# --- an independent reference: NVIDIA's algorithm written as plainly as possible --------------------------------


def reference_boxes(locs: torch.Tensor) -> torch.Tensor:
    d = default_boxes("cxcywh")
    loc = locs.float().permute(0, 2, 1)
    xy = (0.1 * loc[..., :2]) * d[:, 2:] + d[:, :2]
    wh = (0.2 * loc[..., 2:]).exp() * d[:, 2:]
    return torch.cat([xy - 0.5 * wh, xy + 0.5 * wh], dim=-1)


def reference_iou(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    width = (torch.minimum(others[:, 2], box[2]) - torch.maximum(others[:, 0], box[0])).clamp(min=0)
    height = (torch.minimum(others[:, 3], box[3]) - torch.maximum(others[:, 1], box[1])).clamp(min=0)
    inter = width * height
    area_others = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area_others + area_box - inter)


def reference_decode(locs, confs, criteria=0.5, max_output=20, threshold=0.05, max_per_class=200):
    """Per image, per class: threshold, sort, keep the top ones, greedy loop; then the best over all classes."""
    all_boxes = reference_boxes(locs)
    all_probs = confs.float().permute(0, 2, 1).softmax(dim=-1)
    results = []
    for boxes_in, probs in zip(all_boxes, all_probs):
        boxes_out, labels_out, scores_out = [], [], []
        for label in range(1, 81):
            mask = probs[:, label] > threshold
            boxes, scores = boxes_in[mask], probs[mask, label]
            remaining = torch.sort(scores, stable=True).indices[-max_per_class:]
            while remaining.numel() > 0:
                best = remaining[-1]
                boxes_out.append(boxes[best])
                labels_out.append(label)
                scores_out.append(scores[best])
                remaining = remaining[reference_iou(boxes[best], boxes[remaining]) < criteria]
        if not scores_out:
            results.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)))
            continue
        scores = torch.stack(scores_out)
        best = torch.sort(scores, stable=True).indices[-max_output:]
        results.append(
            (
                torch.stack(boxes_out)[best].numpy(),
                torch.tensor(labels_out, dtype=torch.int64)[best].numpy(),
                scores[best].numpy(),
            )
        )
    return results


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (boxes, labels, scores), (ref_boxes, ref_labels, ref_scores) in zip(got, expected):
        assert boxes.dtype == np.float32 and labels.dtype == np.int64 and scores.dtype == np.float32
        assert boxes.shape == (len(labels), 4) and scores.shape == labels.shape
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_array_equal(scores, ref_scores)
        np.testing.assert_array_equal(boxes, ref_boxes)


def decode_ascending(locs, confs, **kwargs):
    return split_detections(decode_batch(locs, confs, **kwargs), ascending=True)


# --- synthetic predictions ----------------------------------------------------------------------------------------


def background(n_images: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    locs = torch.randn(n_images, 4, B, generator=generator) * 0.5
    confs = torch.randn(n_images, 81, B, generator=generator) - 2
    confs[:, 0] = 8
    return locs, confs


def offsets_for(targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The 4 x len(indices) offsets that decode default boxes `indices` to the xyxy `targets`."""
    d = default_boxes("cxcywh")[indices]
    centre = (targets[:, :2] + targets[:, 2:]) / 2
    size = targets[:, 2:] - targets[:, :2]
    return torch.cat([(centre - d[:, :2]) / (0.1 * d[:, 2:]), torch.log(size / d[:, 2:]) / 0.2], dim=1).t()


def random_predictions(n_images: int, seed: int, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    locs = torch.randn(n_images, 4, B, generator=generator)
    confs = torch.randn(n_images, 81, B, generator=generator) * spread
    return locs, confs


def cluster_predictions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images with dense clusters: > 200 candidates in one class, ties in score, ties across classes."""
    generator = torch.Generator().manual_seed(seed)
    locs, confs = background(2, generator)
    for image, (label, count) in enumerate([(7, 600), (33, 260)]):
        indices = torch.randperm(B, generator=generator)[:count]
        jitter = torch.rand(count, 4, generator=generator) * 0.08
        targets = torch.tensor([0.3, 0.3, 0.6, 0.7]) + jitter
        locs[image, :, indices] = offsets_for(targets, indices)
        confs[image, 0, indices] = 0
        # Quantised logits: many exactly equal scores inside the class.
        confs[image, label, indices] = torch.randint(0, 4, (count,), generator=generator).float()
        # A second class with logits equal to the first on some boxes: equal scores across classes.
        confs[image, label + 1, indices[::3]] = confs[image, label, indices[::3]]
    return locs, confs


def chain_predictions(length: int, criteria_overlap: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """One class whose boxes overlap only their neighbours in score order: greedy keeps every other one."""
    locs, confs = background(1, torch.Generator().manual_seed(5))
    indices = torch.arange(100, 100 + length)
    width = 0.1
    x = torch.arange(length, dtype=torch.float32) * width * criteria_overlap
    targets = torch.stack([x, torch.full_like(x, 0.4), x + width, torch.full_like(x, 0.5)], dim=1)
    locs[0, :, indices] = offsets_for(targets, indices)
    confs[0, :, indices] = -10.0  # other classes equal in every box: scores follow the class-12 logits
    confs[0, 0, indices] = 0
    confs[0, 12, indices] = 4 - torch.arange(length, dtype=torch.float32) / length
    return locs, confs


# --- golden parity ------------------------------------------------------------------------------------------------


def test_golden_parity(decode_golden):
    locs = torch.from_numpy(decode_golden["locs"]).float()
    confs = torch.from_numpy(decode_golden["confs"]).float()
    got = decode_ascending(locs, confs, criteria=0.5, max_output=20)
    assert len(got) == 2
    for i, (boxes, labels, scores) in enumerate(got):
        np.testing.assert_array_equal(labels, decode_golden[f"labels_{i}"])
        np.testing.assert_allclose(boxes, decode_golden[f"boxes_{i}"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(scores, decode_golden[f"scores_{i}"], rtol=0, atol=1e-7)


def test_golden_parity_per_image_and_reference(decode_golden):
    locs = torch.from_numpy(decode_golden["locs"]).float()
    confs = torch.from_numpy(decode_golden["confs"]).float()
    both = decode_ascending(locs, confs)
    for i in range(2):
        assert_same(decode_ascending(locs[i : i + 1], confs[i : i + 1]), both[i : i + 1])
    assert_same(both, reference_decode(locs, confs))


def test_inputs_not_modified(decode_golden):
    locs = torch.from_numpy(decode_golden["locs"]).float()
    confs = torch.from_numpy(decode_golden["confs"]).float()
    locs_before, confs_before = locs.clone(), confs.clone()
    decode_batch(locs, confs)
    decode_boxes(locs)
    class_scores(confs)
    assert torch.equal(locs, locs_before) and torch.equal(confs, confs_before)


# --- against the reference loop -----------------------------------------------------------------------------------


def test_decode_boxes_and_scores_match_reference():
    locs, confs = random_predictions(2, seed=1)
    boxes = decode_boxes(locs)
    assert boxes.shape == (2, B, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, reference_boxes(locs))
    scores = class_scores(confs)
    assert scores.shape == (2, B, 81) and scores.dtype == torch.float32
    assert torch.allclose(scores.sum(-1), torch.ones(2, B))


@pytest.mark.parametrize(
    ("criteria", "max_output", "threshold"),
    [(0.5, 20, 0.05), (0.45, 200, 0.05), (0.3, 7, 0.1), (0.7, 1, 0.05), (1.0, 50, 0.2), (0.5, 10_000, 0.3)],
)
def test_random_predictions_match_reference(criteria, max_output, threshold):
    locs, confs = random_predictions(2, seed=int(criteria * 100) + max_output)
    expected = reference_decode(locs, confs, criteria, max_output, threshold)
    assert_same(decode_ascending(locs, confs, criteria=criteria, max_output=max_output, score_threshold=threshold),
                expected)


@pytest.mark.parametrize("criteria", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("max_per_class", [200, 17, 1])
def test_clusters_ties_and_caps_match_reference(criteria, max_per_class):
    locs, confs = cluster_predictions(seed=3)
    expected = reference_decode(locs, confs, criteria, 100, 0.05, max_per_class)
    got = decode_ascending(locs, confs, criteria=criteria, max_output=100, max_per_class=max_per_class)
    assert_same(got, expected)
    assert all(len(labels) > 0 for _, labels, _ in got)


@pytest.mark.parametrize("length", [2, 3, 40, 150, 260])
def test_suppression_chains_match_reference(length):
    locs, confs = chain_predictions(length)
    got = decode_ascending(locs, confs, max_output=500)
    assert_same(got, reference_decode(locs, confs, 0.5, 500))
    # Neighbours overlap with IoU 0.6, next-but-one with 1/3: greedy keeps every other box of the chain.
    kept = min(length, 200)
    assert (got[0][1] == 12).sum() == (kept + 1) // 2


def test_no_threshold_matches_reference():
    locs, confs = random_predictions(1, seed=11, spread=1.0)
    expected = reference_decode(locs, confs, 0.5, 300, 0.0)
    assert_same(decode_ascending(locs, confs, max_output=300, score_threshold=0.0), expected)


def test_scores_near_the_threshold_match_reference():
    locs, confs = background(1, torch.Generator().manual_seed(8))
    # Foreground logits swept across the threshold, in log space relative to the maximum logit.
    sweep = math.log(0.05) + torch.linspace(-0.05, 0.3, B)
    confs[0] = -math.inf
    confs[0, 0] = 0
    confs[0, 1] = sweep
    confs[0, 2, ::2] = sweep[::2] - 1e-3
    expected = reference_decode(locs, confs, 0.5, 10_000)
    assert_same(decode_ascending(locs, confs, max_output=10_000), expected)
    assert len(expected[0][1]) > 0


def test_small_chunks_give_the_same(monkeypatch):
    locs, confs = random_predictions(2, seed=4)
    expected = decode_ascending(locs, confs, max_output=500)
    monkeypatch.setattr(decode_module, "_CHUNK_ELEMENTS", 100)
    assert_same(decode_ascending(locs, confs, max_output=500), expected)


def fixed_point_nms(cands, boxes, recipe):
    """The NMS this library ran before the row-by-row loop: the whole suppression matrix of each group, then
    keep[j] = not any(keep[i] & S[i, j]) iterated from all-True until nothing changes (greedy NMS's unique
    solution). Slow with many candidates (seconds per image at threshold 0.001), plain to check."""
    keep = torch.ones(cands.score.shape[0], dtype=torch.bool)
    for start, size in zip(cands.group_start.tolist(), cands.group_size.tolist()):
        if size < 2:
            continue
        pos = torch.arange(start, start + size)[None]
        suppress = decode_module._suppression(boxes, pos, torch.ones(1, size, dtype=torch.bool), recipe)[0]
        kept = torch.ones(size, dtype=torch.bool)
        while True:
            new = ~(kept[:, None] & suppress).any(dim=0)
            if torch.equal(new, kept):
                break
            kept = new
        keep[start : start + size] = kept
    return keep


@pytest.mark.parametrize("suppress_equal", [False, True])
def test_many_candidates_match_the_fixed_point_nms(monkeypatch, suppress_equal):
    # torchvision's SSDLite recipe at its evaluation threshold 0.001 on an untrained-looking output: every class
    # of every box passes, so each of the 90 classes has its 300-candidate cap (27,000 candidates), in long
    # suppression chains. The row-by-row NMS must keep exactly what the matrix fixed point keeps.
    from ssd.models.tv_ssd import TV_SSDLITE320

    spec = TV_SSDLITE320
    recipe = spec.postprocess.updated(suppress_equal=suppress_equal)
    gen = torch.Generator().manual_seed(22)
    locs = torch.randn(1, 4, spec.anchors.num_anchors, generator=gen) * 0.5
    confs = torch.randn(1, spec.num_classes, spec.anchors.num_anchors, generator=gen) * 0.3
    fast = postprocess((locs, confs), spec, recipe)
    monkeypatch.setattr(decode_module, "_nms", fixed_point_nms)
    slow = postprocess((locs, confs), spec, recipe)
    assert fast.counts.tolist() == [recipe.max_detections]
    for got, expected in zip(fast, slow):
        assert torch.equal(got, expected)


def suppression_of(boxes: list[list[float]], criteria: float) -> torch.Tensor:
    """The decoder's suppression matrix for one group of boxes given in rank order."""
    count = len(boxes)
    pos = torch.arange(count)[None]
    return decode_module._suppression(torch.tensor(boxes), pos, torch.ones(1, count, dtype=torch.bool),
                                        NVIDIA_SSD300.postprocess.updated(iou_threshold=criteria))[0]


def test_iou_equal_to_criteria_suppresses():
    # IoU exactly 0.5 in float32: NVIDIA keeps only iou < criteria.
    boxes = [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5]]
    assert suppression_of(boxes, 0.5).tolist() == [[False, True], [False, False]]
    assert not suppression_of(boxes, 0.5000001).any()
    assert reference_iou(torch.tensor(boxes[0]), torch.tensor(boxes[1:])).item() == 0.5


def test_degenerate_and_non_finite_boxes_in_nms():
    # Two identical zero-area boxes have IoU 0/0 = NaN, which NVIDIA's `iou < criteria` treats as an overlap.
    assert suppression_of([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], 0.5)[0, 1]
    # Boxes with NaN or infinite coordinates neither suppress nor get suppressed.
    nan, inf = math.nan, math.inf
    boxes = [[0.0, 0.0, 1.0, 1.0], [nan, nan, nan, nan], [-inf, -inf, inf, inf], [0.0, 0.0, 1.0, 1.0]]
    assert suppression_of(boxes, 0.5).tolist() == [[False, False, False, True]] + [[False] * 4] * 3


# --- outputs, edge cases ------------------------------------------------------------------------------------------


def test_padded_output_layout():
    locs, confs = cluster_predictions(seed=2)
    decoded = decode_batch(locs, confs, max_output=30)
    assert isinstance(decoded, Decoded)
    assert decoded.boxes.shape == (2, 30, 4) and decoded.boxes.dtype == torch.float32
    assert decoded.labels.shape == (2, 30) and decoded.labels.dtype == torch.int64
    assert decoded.scores.shape == (2, 30) and decoded.scores.dtype == torch.float32
    assert decoded.counts.dtype == torch.int64
    descending = split_detections(decoded)
    ascending = split_detections(decoded, ascending=True)
    for i, ((boxes, labels, scores), (a_boxes, a_labels, a_scores)) in enumerate(zip(descending, ascending)):
        count = int(decoded.counts[i])
        assert len(scores) == count and np.all(np.diff(scores) <= 0)
        assert np.array_equal(a_scores, scores[::-1]) and np.array_equal(a_labels, labels[::-1])
        assert np.array_equal(a_boxes, boxes[::-1]) and a_boxes.flags.c_contiguous
        assert torch.all(decoded.labels[i, count:] == 0) and torch.all(decoded.scores[i, count:] == 0)


def test_empty_images():
    locs, confs = background(3, torch.Generator().manual_seed(0))
    locs_c, confs_c = cluster_predictions(seed=1)
    confs[1] = confs_c[0]
    locs[1] = locs_c[0]
    got = decode_ascending(locs, confs)
    assert [len(labels) for _, labels, _ in got] == [0, 20, 0]
    for boxes, labels, scores in (got[0], got[2]):
        assert boxes.shape == (0, 4) and boxes.dtype == np.float32
        assert labels.shape == (0,) and labels.dtype == np.int64
        assert scores.shape == (0,) and scores.dtype == np.float32
    all_empty = decode_batch(locs[[0, 2]], confs[[0, 2]])
    assert all_empty.counts.tolist() == [0, 0]
    assert split_detections(all_empty)[1][0].shape == (0, 4)
    nothing = decode_batch(locs[:0], confs[:0])
    assert nothing.boxes.shape == (0, 20, 4) and split_detections(nothing) == []


def test_nan_logits_do_not_crash_or_poison():
    locs, confs = cluster_predictions(seed=4)
    base = decode_batch(locs, confs, max_output=500)
    best = decode_batch(locs, confs, max_output=1)
    # The best box of image 0: its NaN offsets must neither suppress its cluster nor be suppressed.
    best_box = int((decode_boxes(locs)[0] == best.boxes[0, 0]).all(dim=1).nonzero()[0, 0])
    nan_locs = locs.clone()
    nan_locs[0, :, best_box] = math.nan
    removed = confs.clone()
    removed[0, 1:, best_box] = -math.inf
    without = split_detections(decode_batch(locs, removed, max_output=500))
    with_nan = split_detections(decode_batch(nan_locs, confs, max_output=500))
    boxes, labels, scores = with_nan[0]
    finite = np.isfinite(boxes).all(axis=1)
    assert (~finite).sum() >= 1
    assert_same([(boxes[finite], labels[finite], scores[finite])], without[:1])
    assert_same(with_nan[1:], split_detections(base)[1:])
    # NaN class logits: those boxes are never candidates, everything else is unchanged.
    nan_confs = confs.clone()
    nan_confs[0, :, best_box] = math.nan
    nan_confs[1, 5, :100] = math.nan
    got = split_detections(decode_batch(locs, nan_confs, max_output=500))
    removed[1, 1:, :100] = -math.inf
    assert_same(got, split_detections(decode_batch(locs, removed, max_output=500)))
    for boxes, _, scores in got:
        assert np.isfinite(boxes).all() and np.isfinite(scores).all()


def test_inf_logits_do_not_crash():
    locs, confs = cluster_predictions(seed=6)
    locs[0, 2:, :50] = math.inf
    locs[1, :2, :50] = -math.inf
    confs[0, 3, 50:60] = math.inf
    confs[1, 0, 60:70] = -math.inf
    for _, labels, scores in split_detections(decode_batch(locs, confs)):
        assert np.all(scores > 0.05) and np.all((labels >= 1) & (labels <= 80))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    locs, confs = cluster_predictions(seed=7)
    locs, confs = locs.to(dtype), confs.to(dtype)
    assert_same(decode_ascending(locs, confs), decode_ascending(locs.float(), confs.float()))
    assert decode_boxes(locs).dtype == torch.float32 and class_scores(confs).dtype == torch.float32


def test_creates_every_tensor_on_the_input_device():
    locs, confs = cluster_predictions(seed=8)
    expected = decode_batch(locs, confs)
    # Factory calls without an explicit device would now land on "meta" and clash with the CPU inputs.
    with torch.device("meta"):
        got = decode_batch(locs, confs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(t.device == locs.device for t in got)


def test_default_boxes_are_cached_per_device_and_dtype():
    first = BoxCoder.from_spec(NVIDIA_SSD300).default_boxes(torch.device("cpu"), torch.float32)
    # Shared by every coder of these anchors (postprocess builds one per call), keyed by device and dtype.
    assert BoxCoder.from_spec(NVIDIA_SSD300).default_boxes("cpu") is first
    assert BoxCoder.from_spec(NVIDIA_SSD300).default_boxes("cpu", torch.float64)[0].dtype == torch.float64


def test_gradients_do_not_leak_into_detections():
    locs, confs = cluster_predictions(seed=9)
    locs.requires_grad_(True)
    decoded = decode_batch(locs, confs)
    assert not decoded.boxes.requires_grad
    assert len(split_detections(decoded)) == 2


# --- validation ---------------------------------------------------------------------------------------------------


def test_check_predictions_accepts_the_model_output():
    locs, confs = torch.zeros(2, 4, B), torch.zeros(2, 81, B)
    assert check_predictions((locs, confs)) == (locs, confs)
    got = check_predictions([locs, confs])
    assert got[0] is locs and got[1] is confs


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        (torch.zeros(1, 81, B), "single tensor of shape 1 x 81 x 8732"),
        ((torch.zeros(1, 4, B),), "tuple of length 1"),
        ((torch.zeros(1, 4, B), torch.zeros(1, 81, B), torch.zeros(1)), "tuple of length 3"),
        ({"locs": 1}, "got a dict"),
        ((np.zeros((1, 4, B)), torch.zeros(1, 81, B)), "got (ndarray, 1 x 81 x 8732)"),
        ((torch.zeros(1, 81, B), torch.zeros(1, 4, B)), "got shapes 1 x 81 x 8732 and 1 x 4 x 8732"),
        ((torch.zeros(2, 4, B), torch.zeros(3, 81, B)), "got shapes 2 x 4 x 8732 and 3 x 81 x 8732"),
        ((torch.zeros(1, 4, 8000), torch.zeros(1, 81, 8000)), "got shapes 1 x 4 x 8000 and 1 x 81 x 8000"),
        ((torch.zeros(4, B), torch.zeros(81, B)), "got shapes 4 x 8732 and 81 x 8732"),
        ((torch.zeros(1, 4, B, dtype=torch.int64), torch.zeros(1, 81, B)), "floating-point"),
    ],
)
def test_bad_predictions_are_rejected(predictions, message):
    with pytest.raises(ValueError, match="N x 4 x 8732 and N x 81 x 8732|floating-point") as info:
        check_predictions(predictions)
    assert message in str(info.value)
    if isinstance(predictions, tuple) and len(predictions) == 2:
        with pytest.raises(ValueError):
            decode_batch(*predictions)


def test_bad_tensors_for_the_building_blocks():
    with pytest.raises(ValueError, match=r"N x 4 x 8732, got \(1, 81, 8732\)"):
        decode_boxes(torch.zeros(1, 81, B))
    with pytest.raises(ValueError, match="N x C x A, got 1 x 4"):
        class_scores(torch.zeros(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criteria": 0}, r"criteria: expected a number in \(0, 1\], got 0"),
        ({"criteria": 1.5}, "criteria"),
        ({"criteria": math.nan}, "criteria"),
        ({"criteria": True}, "criteria: expected a number, got True"),
        ({"criteria": "0.5"}, "criteria: expected a number, got '0.5'"),
        ({"max_output": 0}, "max_output: expected an integer >= 1"),
        ({"max_output": 10**9}, "max_output: expected an integer >= 1 .at most"),
        ({"max_output": 2.5}, "max_output: expected an integer, got 2.5"),
        ({"max_output": True}, "max_output: expected an integer, got True"),
        ({"score_threshold": -0.1}, r"score_threshold: expected a number in \[0, 1\), got -0.1"),
        ({"score_threshold": 1.0}, "score_threshold"),
        ({"max_per_class": 0}, "max_per_class: expected an integer >= 1"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, message):
    # A value of the wrong type is a TypeError, one out of range a ValueError; both name NVIDIA's argument.
    with pytest.raises((ValueError, TypeError), match=message):
        decode_batch(torch.zeros(1, 4, B), torch.zeros(1, 81, B), **kwargs)


def test_split_detections_wants_decoded():
    with pytest.raises(TypeError, match="expected a Decoded"):
        split_detections((torch.zeros(1, 20, 4), torch.zeros(1, 20), torch.zeros(1, 20), torch.zeros(1)))
