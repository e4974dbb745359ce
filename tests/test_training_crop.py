"""NVIDIA's SSD crop sampling: the distribution of crop outcomes against counts made with NVIDIA's own code.

``tests/data/crop/nvidia_crop_counts.json`` holds, for four box sets, how many of 4000 calls of NVIDIA's
``SSDCropping`` (run once outside this repository, Python's ``random`` seeded with 0) ended on each option. NVIDIA
draws with Python's ``random`` and we with torch's generator, so the same seed gives other draws: the comparison is
statistical.

Tolerance. Each call ends on one of seven outcomes, so our count ``a`` of an outcome is Binomial(N1, p) and NVIDIA's
``b`` is Binomial(N2, p'), independent of ours. If the samplers share the distribution (p = p'), the difference of
the shares ``d = a / N1 - b / N2`` has mean 0 and standard deviation ``sigma = sqrt(p (1 - p) (1 / N1 + 1 / N2))``,
with p estimated by the pooled share ``(a + b) / (N1 + N2)``. A cell passes when ``|d| <= 4 sigma + 1 / N1 + 1 / N2``:
four standard deviations (a two-sided normal tail of 6.3e-5, so a false alarm over the 28 cells has a probability
below 0.2%), plus one count on each side as a continuity margin for cells whose pooled share is 0 or tiny, where the
normal approximation says nothing. Our draws are seeded, so the test is deterministic for a given torch.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from ssd.models import NVIDIA_SSD300
from ssd.training.augment import CROP_MIN_IOUS, SSDAugmentation

from helpers import REPO

REFERENCE = json.loads((REPO / "tests" / "data" / "crop" / "nvidia_crop_counts.json").read_text())
OPTIONS = REFERENCE["options"]  # "none", "0.1", ..., "0.9", "any": CROP_MIN_IOUS's order
SIGMAS = 4.0


def _our_counts(boxes: list[list[float]], draws: int, seed: int = 0) -> dict[str, int]:
    aug = SSDAugmentation(NVIDIA_SSD300.input, generator=torch.Generator().manual_seed(seed))
    relative = torch.tensor(boxes, dtype=torch.float32)
    counts = dict.fromkeys(OPTIONS, 0)
    for _ in range(draws):
        option, patch = aug._sample_crop(relative)
        assert (patch is None) == (CROP_MIN_IOUS[option] is None)
        counts[OPTIONS[option]] += 1
    return counts


def _tolerance(a: int, n1: int, b: int, n2: int) -> float:
    pooled = (a + b) / (n1 + n2)
    return SIGMAS * math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)) + 1 / n1 + 1 / n2


def test_options_are_nvidias_in_its_order():
    assert len(CROP_MIN_IOUS) == len(OPTIONS) == 7
    assert CROP_MIN_IOUS[0] is None and CROP_MIN_IOUS[-1] == -math.inf
    assert [f"{v}" for v in CROP_MIN_IOUS[1:-1]] == OPTIONS[1:-1]


@pytest.mark.parametrize("box_set", sorted(REFERENCE["box_sets"]))
def test_crop_outcomes_follow_nvidias_distribution(box_set):
    n2 = REFERENCE["draws"]
    theirs = REFERENCE["counts"][box_set]
    n1 = n2
    ours = _our_counts(REFERENCE["box_sets"][box_set], n1)
    assert sum(ours.values()) == n1
    for option in OPTIONS:
        a, b = ours[option], theirs[option]
        difference = abs(a / n1 - b / n2)
        assert difference <= _tolerance(a, n1, b, n2), (box_set, option, ours, theirs)


def test_the_tolerance_tells_the_old_sampler_apart():
    """Before, the image was kept whole after 50 failed patches of one option draw. From NVIDIA's counts, a patch of
    option k is accepted with probability p_k = count_k / count_none (a draw ends on k with probability p_k / 7 and
    on "none" with 1 / 7), so the old rule kept the image with probability (1 + sum_k (1 - p_k) ** 50) / 7. That is
    outside the tolerance wherever an option mostly fails (all sets but "large", where every option but 0.9
    succeeds within 50 tries) and over the sets pooled, so these tests would have caught the old sampler."""
    n = REFERENCE["draws"]
    caught, old_total, nvidia_total = [], 0.0, 0
    for box_set, theirs in REFERENCE["counts"].items():
        accept = [theirs[o] / theirs["none"] for o in OPTIONS[1:]]
        old_share = (1 + sum((1 - p) ** 50 for p in accept)) / 7
        if abs(old_share - theirs["none"] / n) > _tolerance(round(old_share * n), n, theirs["none"], n):
            caught.append(box_set)
        old_total += old_share * n
        nvidia_total += theirs["none"]
    assert caught == ["centre", "small", "three"]
    total = n * len(REFERENCE["counts"])
    assert abs(old_total - nvidia_total) / total > _tolerance(round(old_total), total, nvidia_total, total)


def test_uncropped_share_over_all_box_sets():
    n = REFERENCE["draws"]
    sets = REFERENCE["box_sets"]
    ours = sum(_our_counts(boxes, n, seed=1)["none"] for boxes in sets.values())
    theirs = sum(REFERENCE["counts"][name]["none"] for name in sets)
    total = n * len(sets)
    assert abs(ours - theirs) / total <= _tolerance(ours, total, theirs, total)


def test_no_boxes_and_options_without_keeping_the_image():
    aug = SSDAugmentation(NVIDIA_SSD300.input, generator=torch.Generator().manual_seed(0))
    assert aug._sample_crop(torch.zeros(0, 4)) is None
    # An option that can never succeed (IoU above 0.9 with two far-apart boxes) and no keep-the-image option: the
    # draws stop (MAX_CROP_ROUNDS) and the image is kept whole.
    impossible = SSDAugmentation(NVIDIA_SSD300.input, crop_min_ious=(0.9,),
                                 generator=torch.Generator().manual_seed(0))
    assert impossible._sample_crop(torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.9, 0.9, 1.0, 1.0]])) is None
    with pytest.raises(ValueError, match="max_trials: expected a positive int, got 0"):
        SSDAugmentation(NVIDIA_SSD300.input, max_trials=0)
