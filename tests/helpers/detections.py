"""Comparing two detectors' detections when their raw outputs differ by float32 rounding.

Two runs of the same network agree bit for bit only when they run the same kernels: a channels_last copy, another
batch composition, another thread count or another CPU's SIMD width changes the order in which a convolution sums
its K = C_in * k * k products, and each output moves by a few ulps of its largest partial sums. The tests measure
that difference on the raw outputs (``raw_delta``: the only machine-dependent quantity) and carry it through the
post-processing by arithmetic (``score_tolerance``, ``box_tolerance``); ``assert_same_detections`` then compares the
two lists as a matching, since detections whose scores are that close may trade places.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

EPS32 = float(torch.finfo(torch.float32).eps)


def raw_delta(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> tuple[float, float]:
    """The largest absolute difference of the box offsets and of the class logits of two ``(locs, confs)``."""
    (loc_a, conf_a), (loc_b, conf_b) = ours, theirs
    return float((loc_a - loc_b).abs().max()), float((conf_a - conf_b).abs().max())


def score_tolerance(logit_delta: float) -> float:
    """How far a softmax probability moves when every logit moves by at most ``logit_delta``.

    dp_i = p_i * (dz_i - sum_j p_j dz_j), and |dz_i - sum_j p_j dz_j| = |(1 - p_i) dz_i - sum_{j != i} p_j dz_j|
    <= 2 (1 - p_i) delta, so |dp_i| <= 2 p_i (1 - p_i) delta <= delta / 2 (p (1 - p) <= 1/4). The softmax itself
    (the max subtraction, exp, the sum over C classes and the division) rounds the same way in both runs except for
    its sum, whose order may be vectorised differently: a few float32 ulps of a value <= 1, so 4 * eps more.
    """
    return logit_delta / 2 + 4 * EPS32


def box_tolerance(offset_delta: float, max_offset: float, coder, side: float) -> float:
    """How far a decoded box edge moves, in pixels of an image whose larger side is ``side``, when every offset
    moves by at most ``offset_delta`` (``coder``: the spec's BoxCoderSpec; centre = a_c + cv * d_c * a_s, size =
    a_s * exp(min(sv * d_s, max_log_size))).

    The centre moves by cv * delta * a_s (a_s <= 1 of the input) and the half-size by (sv / 2) * delta * size, to
    first order, where size <= growth * a_s, growth = exp(sv * max_offset) (or the clamp's exp(max_log_size));
    clipping to the image moves no edge further. Each way, about 8 float32 roundings of values below the image's
    side: 8 * eps * side.
    """
    cv, sv = coder.center_variance, coder.size_variance
    log_growth = sv * max_offset if coder.max_log_size is None else min(sv * max_offset, coder.max_log_size)
    # e^x - 1 <= x e^x bounds the exponential's step beyond first order.
    size_step = sv / 2 * offset_delta * math.exp(log_growth + sv * offset_delta)
    return (cv * offset_delta + size_step) * side + 8 * EPS32 * side


def raw_outputs_recorder(module: torch.nn.Module, convert=None):
    """Record what ``module`` returns on each call (converted by ``convert``) in a list; returns (list, handle).

    The outputs are recorded where the detector computes them, with the threads and batches it chose: a second
    forward pass outside it may pick other kernels and differ by as much as what is measured.
    """
    seen: list = []

    def hook(_module, _inputs, output) -> None:
        seen.append(convert(output) if convert is not None else tuple(t.detach().clone() for t in output))

    return seen, module.register_forward_hook(hook)


def assert_same_detections(ours, theirs, *, score_tol: float, box_tol: float, cut: int | None = None,
                           threshold: float | None = None, label: str = "") -> tuple[list, list, list]:
    """``ours`` and ``theirs`` (each with ``boxes`` N x 4, ``scores`` N descending, ``labels`` N; objects or dicts)
    are the same detections, found by a one-to-one matching rather than position by position:

    * every detection of ours matches one of theirs with the same label, every box coordinate within ``box_tol``
      and the score within ``score_tol`` (so both lists have the same length);
    * both are in descending score order, so the order may differ only between detections whose scores are within
      2 * ``score_tol`` (a near-tie that either run may sort either way);
    * at a cut (``cut``: the lists hold ``max_detections``; ``threshold``: the score threshold), a near-tie may let
      a different detection in: one left unmatched on each side is allowed only with a score within ``score_tol``
      of the cut's score.

    Returns the matched pairs ``(i, j)`` (ours' index, theirs') and the indices left unmatched on each side.
    """
    from scipy.optimize import linear_sum_assignment

    a, b = _arrays(ours), _arrays(theirs)
    n, m = len(a["scores"]), len(b["scores"])
    score_gap = np.abs(a["scores"][:, None] - b["scores"][None, :])
    box_gap = np.abs(a["boxes"][:, None, :] - b["boxes"][None, :, :]).max(axis=2, initial=0.0)
    fits = (a["labels"][:, None] == b["labels"][None, :]) & (score_gap <= score_tol) & (box_gap <= box_tol)
    # The largest matching (a pair that does not fit costs more than leaving both unmatched).
    rows, cols = linear_sum_assignment(np.where(fits, 0.0, 1.0)) if n and m else (np.zeros(0, int),) * 2
    pairs = [(i, j) for i, j in zip(rows.tolist(), cols.tolist()) if fits[i, j]]
    left_a = sorted(set(range(n)) - {i for i, _ in pairs})
    left_b = sorted(set(range(m)) - {j for _, j in pairs})
    edges = []
    at_cut = cut is not None and n == m == cut
    if at_cut:
        edges.append(float(min(a["scores"][-1], b["scores"][-1])))
    if threshold is not None:
        edges.append(float(threshold))

    def at_an_edge(score: float) -> bool:
        return any(abs(score - edge) <= score_tol for edge in edges)

    unexplained = [f"ours #{i} (label {a['labels'][i]}, score {a['scores'][i]:.9g})" for i in left_a
                   if not at_an_edge(float(a["scores"][i]))]
    unexplained += [f"theirs #{j} (label {b['labels'][j]}, score {b['scores'][j]:.9g})" for j in left_b
                    if not at_an_edge(float(b["scores"][j]))]
    assert not unexplained, (f"{label}: {len(pairs)} of {n} / {m} detections match within score {score_tol:.3g} and "
                             f"box {box_tol:.3g}; unmatched: {', '.join(unexplained[:6])}")
    if at_cut and threshold is None:
        assert len(left_a) == len(left_b) <= 1, f"{label}: {len(left_a)} / {len(left_b)} exchanged at the cut"
    # Order: both lists descending. With every matched pair within score_tol, two pairs in opposite orders on the
    # two sides then have scores within 2 * score_tol (s_a1 - s_a2 <= (s_b1 + t) - (s_b2 - t) <= 2t when s_b1 <= s_b2):
    # the only reordering allowed is a near-tie's, with no further check.
    for side, found in (("ours", a), ("theirs", b)):
        assert np.all(np.diff(found["scores"]) <= 0), f"{label}: {side} are not in descending score order"
    return pairs, left_a, left_b


def _arrays(found) -> dict[str, np.ndarray]:
    get = found.__getitem__ if isinstance(found, dict) else lambda k: getattr(found, k)
    return {"boxes": np.asarray(get("boxes"), dtype=np.float64).reshape(-1, 4),
            "scores": np.asarray(get("scores"), dtype=np.float64).reshape(-1),
            "labels": np.asarray(get("labels")).reshape(-1)}


def per_image_deltas(recorded: list, reference: list | None = None, rows: Sequence[int] | None = None) -> list:
    """Per image, ``(offset delta, logit delta)`` between two recordings of detect's forward passes (each a list of
    per-batch ``(locs, confs)``, in image order); with one recording, each image against row ``rows[i]`` of it."""
    def stacked(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    locs, confs = stacked(recorded)
    ref_locs, ref_confs = (locs, confs) if reference is None else stacked(reference)
    rows = list(range(len(locs))) if rows is None else list(rows)
    return [raw_delta((locs[i:i + 1], confs[i:i + 1]), (ref_locs[r:r + 1], ref_confs[r:r + 1]))
            for i, r in enumerate(rows)]


def assert_detect_results_agree(found: Sequence, expected: Sequence, deltas: Sequence, coder, *, max_offset: float,
                                top: int | None = None, cut: int | None = None, threshold: float | None = None,
                                label: str = "") -> None:
    """Two detect results, image by image, to the tolerance their raw outputs' ``deltas`` allow; ``top`` compares
    only the best ``top`` of each (a cut there when both have that many)."""
    assert len(found) == len(expected) == len(deltas)
    for k, (a, b, (loc_delta, conf_delta)) in enumerate(zip(found, expected, deltas)):
        assert a.image_size == b.image_size
        side = max(b.image_size)
        image_cut = cut
        if top is not None:
            a, b = _first(a, top), _first(b, top)
            image_cut = top if len(a["scores"]) == len(b["scores"]) == top else cut
        assert_same_detections(a, b, score_tol=score_tolerance(conf_delta),
                               box_tol=box_tolerance(loc_delta, max_offset, coder, side), cut=image_cut,
                               threshold=threshold, label=f"{label} image {k}")


def _first(found, n: int) -> dict[str, np.ndarray]:
    arrays = _arrays(found)
    return {key: value[:n] for key, value in arrays.items()}


def float32_error(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    """How far ``model``'s float32 raw outputs ``(locs, confs)`` are from its float64 ones on ``batch``.

    Rounding differences grow through the layers by the network's own gain. Random test weights can make it large:
    the MobileNet SSDLites' move their logits by ~1e-4 to ~1e-2 for a 1-ulp change of the input, NVIDIA's SSD300 by
    ~5e-7. Two float32 runs of the same network on other kernels differ by about the sum of their errors, so a
    difference within a few times this error is rounding; a wrong layer is far more.
    """
    import copy

    with torch.inference_mode():
        single = model(batch)
        double = copy.deepcopy(model).double()(batch.double())
    return tuple(float((a.double() - b).abs().max()) for a, b in zip(single, double))


def rounding_bound(error: float, scale: float) -> float:
    """What two float32 runs may differ by, given one run's error against float64: 4 x the error (the other
    kernels may round up to 3 x worse), and at least 64 float32 ulps of the outputs' ``scale`` for a network so
    well conditioned that its error is near zero."""
    return 4 * error + 64 * EPS32 * scale


# Exported graphs compute the same float32 operations in another order: their outputs agree with PyTorch's to ~1e-6,
# and the decoded boxes (relative to the image) and scores of the tests' NVIDIA weights to well within this.
EXPORT_TOL = 1e-4


def assert_same_exported_detections(got, expected, tol: float = EXPORT_TOL) -> None:
    """Two runs of one network through two backends: the same detections in the same order, boxes relative to the
    image and scores within ``tol``."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert len(a) == len(b) > 0
        height, width = b.image_size
        scale = np.array([width, height, width, height], dtype=np.float32)
        np.testing.assert_allclose(a.boxes / scale, b.boxes / scale, atol=tol, rtol=0)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.scores, b.scores, atol=tol, rtol=0)
        assert a.names == b.names and a.to_dict()["detections"][0]["name"] == b.to_dict()["detections"][0]["name"]
