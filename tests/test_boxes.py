"""Box geometry (ssd.boxes) and the box coder (ssd.box_coder) against torchvision.ops and NVIDIA's arithmetic."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision import ops

from ssd.anchors import default_boxes
from ssd.box_coder import BoxCoder
from ssd.boxes import BOX_FORMATS, box_iou, convert_boxes
from ssd.models import MMDET_SSD300, MMDET_SSD512, MMDET_SSDLITE320, NVIDIA_SSD300
from ssd.registry import get_entry, list_models

SPECS = [get_entry(name).spec for name in list_models()]  # every registered family
EPS = torch.finfo(torch.float32).eps


def random_xyxy(*shape: int, seed: int = 0) -> torch.Tensor:
    """Boxes with corners in [0, 1) and sides in [0.01, 1): coordinates below 2."""
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(*shape, 2, generator=generator)
    size = 0.01 + 0.99 * torch.rand(*shape, 2, generator=generator)
    return torch.cat([corner, corner + size], dim=-1)


# --- conversions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_fmt", "out_fmt"), list(itertools.permutations(BOX_FORMATS, 2)))
def test_conversions_agree_with_torchvision_and_round_trip(in_fmt, out_fmt):
    boxes = ops.box_convert(random_xyxy(3, 50), "xyxy", in_fmt)
    converted = convert_boxes(boxes, in_fmt, out_fmt)
    assert converted.shape == boxes.shape and converted.dtype == torch.float32
    # Coordinates are below 2: one rounding each way is at most 2 * EPS / 2, and a conversion takes at most two.
    torch.testing.assert_close(converted, ops.box_convert(boxes, in_fmt, out_fmt), rtol=0, atol=2 * EPS)
    torch.testing.assert_close(convert_boxes(converted, out_fmt, in_fmt), boxes, rtol=0, atol=4 * 2 * EPS)


def test_centre_conversions_use_nvidias_operations():
    # NVIDIA's Encoder: 0.5 * (l + r) and r - l one way, its DefaultBoxes: c - w / 2 and c + w / 2 the other; the
    # training targets depend on these bits.
    xyxy = random_xyxy(1000, seed=1)
    left, top, right, bottom = xyxy.unbind(-1)
    expected = torch.stack([0.5 * (left + right), 0.5 * (top + bottom), right - left, bottom - top], dim=-1)
    assert torch.equal(convert_boxes(xyxy, "xyxy", "cxcywh"), expected)
    cx, cy, w, h = expected.unbind(-1)
    expected_back = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    assert torch.equal(convert_boxes(expected, "cxcywh", "xyxy"), expected_back)


def test_coco_xywh_is_the_top_left_corner():
    coco = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert convert_boxes(coco, "xywh", "xyxy").tolist() == [[10.0, 20.0, 40.0, 60.0]]
    assert convert_boxes(coco, "xywh", "cxcywh").tolist() == [[25.0, 40.0, 30.0, 40.0]]


def test_conversion_keeps_dtype_and_returns_a_new_tensor():
    boxes = random_xyxy(4).double()
    same = convert_boxes(boxes, "xyxy", "xyxy")
    assert torch.equal(same, boxes) and same.data_ptr() != boxes.data_ptr()
    assert convert_boxes(boxes, "xyxy", "cxcywh").dtype == torch.float64
    assert convert_boxes(boxes.half(), "xyxy", "xywh").dtype == torch.float16


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (([[0.0, 0.0, 1.0, 1.0]], "xyxy", "cxcywh"), TypeError, "boxes: expected a torch.Tensor, got list"),
        ((torch.zeros(2, 3), "xyxy", "cxcywh"), ValueError, r"boxes: expected a tensor of shape ... x 4, got \(2, 3\)"),
        ((torch.zeros(2, 4, dtype=torch.int64), "xyxy", "cxcywh"), TypeError, "floating-point"),
        ((torch.zeros(2, 4), "ltrb", "xyxy"), ValueError,
         "in_fmt: expected one of 'xyxy', 'cxcywh', 'xywh', got 'ltrb'"),
        ((torch.zeros(2, 4), "xyxy", "XYXY"), ValueError, "out_fmt"),
    ],
)
def test_conversion_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        convert_boxes(*args)


# --- IoU ----------------------------------------------------------------------------------------------------------


def nvidia_order_iou(truths: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """NVIDIA's calc_iou_tensor, written out: the overlap's corners from the expanded T x A x 4 pairs, its size
    with negatives set to 0, the two areas as width * height, then inter / (truth area + anchor area - inter)."""
    pairs_t = truths[:, None, :].expand(-1, anchors.shape[0], -1)
    pairs_a = anchors[None, :, :].expand(truths.shape[0], -1, -1)
    overlap = torch.min(pairs_t[..., 2:], pairs_a[..., 2:]) - torch.max(pairs_t[..., :2], pairs_a[..., :2])
    overlap[overlap < 0] = 0
    inter = overlap[..., 0] * overlap[..., 1]
    size_t = pairs_t[..., 2:] - pairs_t[..., :2]
    size_a = pairs_a[..., 2:] - pairs_a[..., :2]
    return inter / (size_t[..., 0] * size_t[..., 1] + size_a[..., 0] * size_a[..., 1] - inter)


def test_iou_is_bit_equal_to_nvidias_on_the_golden_targets(golden_dir):
    golden = np.load(golden_dir / "train_targets.npz")
    anchors = default_boxes(NVIDIA_SSD300.anchors, "xyxy")
    for i in range(6):
        truths = torch.from_numpy(golden[f"boxes_{i}"])
        ours = box_iou(truths, anchors)
        assert ours.shape == (truths.shape[0], 8732)
        assert torch.equal(ours, nvidia_order_iou(truths, anchors))


def test_iou_agrees_with_torchvision_and_broadcasts():
    a, b = random_xyxy(40, seed=2), random_xyxy(70, seed=3)
    ours = box_iou(a, b)
    # IoU <= 1 from a handful of float32 roundings of numbers below 4: a few EPS.
    torch.testing.assert_close(ours, ops.box_iou(a, b), rtol=0, atol=4 * EPS)
    assert ((ours > 0) & (ours < 1)).any() and (ours == 0).any()
    # Leading dimensions broadcast: per image against one anchor set, and group against group.
    batch = random_xyxy(3, 40, seed=4)
    assert box_iou(batch, b).shape == (3, 40, 70)
    assert all(torch.equal(box_iou(batch, b)[i], box_iou(batch[i], b)) for i in range(3))
    assert all(torch.equal(box_iou(batch, batch)[i], box_iou(batch[i], batch[i])) for i in range(3))


def test_iou_special_values():
    unit = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert box_iou(unit, unit).item() == 1.0
    assert box_iou(unit, torch.tensor([[2.0, 2.0, 3.0, 3.0]])).item() == 0.0
    assert box_iou(unit, torch.tensor([[0.0, 0.0, 1.0, 0.5]])).item() == 0.5
    # Two empty boxes: 0 / 0, NaN, as in NVIDIA's code (whose NMS then counts them as overlapping).
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert box_iou(point, point).isnan().all()
    assert box_iou(unit.double(), unit.double()).dtype == torch.float64


def test_iou_rejects_bad_input():
    with pytest.raises(ValueError, match=r"boxes2: expected a tensor of shape ... x 4, got \(3,\)"):
        box_iou(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(TypeError, match="boxes1: expected a torch.Tensor, got ndarray"):
        box_iou(np.zeros((2, 4)), torch.zeros(3, 4))


# --- BoxCoder -----------------------------------------------------------------------------------------------------


def truths_near_anchors(spec, seed: int, max_log_ratio: float = 1.5) -> torch.Tensor:
    """1 x 4 x A cxcywh boxes: each default box moved by up to its size and scaled by up to e^max_log_ratio."""
    generator = torch.Generator().manual_seed(seed)
    anchors = default_boxes(spec.anchors, "cxcywh")
    shift = (2 * torch.rand(anchors.shape[0], 2, generator=generator) - 1) * anchors[:, 2:]
    log_ratio = (2 * torch.rand(anchors.shape[0], 2, generator=generator) - 1) * max_log_ratio
    boxes = torch.cat([anchors[:, :2] + shift, anchors[:, 2:] * log_ratio.exp()], dim=1)
    return boxes.t().unsqueeze(0).contiguous()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_decode_inverts_encode_for_every_family(spec):
    coder = BoxCoder.from_spec(spec)
    truths = truths_near_anchors(spec, seed=5)
    offsets = coder.encode(truths)
    assert offsets.shape == truths.shape and offsets.dtype == torch.float32
    decoded = coder.decode(offsets)
    expected = convert_boxes(truths.transpose(1, 2), "cxcywh", "xyxy")
    assert decoded.shape == (1, spec.anchors.num_anchors, 4)
    # Each coordinate goes through about ten float32 roundings (log and exp amplify theirs by at most the log
    # ratio, 1.5), each at most EPS / 2 relative to the box's largest coordinate or size.
    scale = float(expected.abs().max())
    torch.testing.assert_close(decoded, expected, rtol=0, atol=16 * EPS * scale)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_default_boxes_encode_to_zero_and_decode_from_it_exactly(spec):
    coder = BoxCoder.from_spec(spec)
    anchors = default_boxes(spec.anchors, "cxcywh").t().unsqueeze(0)
    assert torch.equal(coder.encode(anchors), torch.zeros_like(anchors))
    zeros = torch.zeros(2, 4, spec.anchors.num_anchors)
    assert torch.equal(coder.decode(zeros), default_boxes(spec.anchors, "xyxy").expand(2, -1, -1))


@pytest.mark.parametrize("spec", [MMDET_SSD300, MMDET_SSD512, MMDET_SSDLITE320], ids=lambda s: s.name)
def test_mmdetection_clamps_the_decoded_size_ratio(spec):
    # wh_ratio_clip = 16 / 1000: a box is at most 1000 / 16 = 62.5 times its default box and at least 0.016 times.
    coder = BoxCoder.from_spec(spec)
    anchors = default_boxes(spec.anchors, "cxcywh")
    for sign, ratio in ((1, 1000 / 16), (-1, 16 / 1000)):
        offsets = torch.zeros(1, 4, anchors.shape[0])
        offsets[:, 2:] = sign * 1e4
        expected = convert_boxes(torch.cat([anchors[:, :2], anchors[:, 2:] * ratio], dim=1), "cxcywh", "xyxy")
        got = coder.decode(offsets)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=16 * EPS * float(expected.abs().max()))
    # Within the clamp the round trip holds; beyond it the decoded box is the clamped one.
    beyond = truths_near_anchors(spec, seed=6, max_log_ratio=6.0)
    log_ratio = (beyond[0, 2:].t() / anchors[:, 2:]).log().clamp(-spec.box_coder.max_log_size,
                                                                  spec.box_coder.max_log_size)
    clamped = torch.cat([beyond[0, :2].t(), anchors[:, 2:] * log_ratio.exp()], dim=1)
    expected = convert_boxes(clamped, "cxcywh", "xyxy")
    got = coder.decode(coder.encode(beyond))[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=64 * EPS * float(expected.abs().max()))


def test_nvidia_does_not_clamp():
    coder = BoxCoder.from_spec(NVIDIA_SSD300)
    offsets = torch.zeros(1, 4, 8732)
    offsets[:, 2:] = 1e3  # exp(200) overflows float32
    boxes = coder.decode(offsets)
    assert torch.isinf(boxes).all()


def test_decode_with_given_default_boxes_equals_the_cached_ones():
    coder = BoxCoder.from_spec(MMDET_SSDLITE320)
    offsets = torch.randn(2, 4, 3234, generator=torch.Generator().manual_seed(7))
    centres, sizes = coder.default_boxes()
    assert torch.equal(coder.decode(offsets, (centres.clone(), sizes.clone())), coder.decode(offsets))
    with pytest.raises(ValueError, match="default_boxes: expected .centres, sizes., each of shape 2 x 3234"):
        coder.decode(offsets, (centres[:, :10], sizes))


def test_coder_precision_and_gradients():
    coder = BoxCoder.from_spec(NVIDIA_SSD300)
    offsets = torch.randn(1, 4, 8732, generator=torch.Generator().manual_seed(8))
    assert coder.decode(offsets.half()).dtype == torch.float32
    assert coder.encode(truths_near_anchors(NVIDIA_SSD300, 9).double()).dtype == torch.float32
    offsets.requires_grad_(True)
    coder.decode(offsets).sum().backward()
    assert offsets.grad is not None and torch.isfinite(offsets.grad).all()


def test_coder_rejects_bad_input():
    coder = BoxCoder.from_spec(NVIDIA_SSD300)
    with pytest.raises(ValueError, match=r"boxes: expected cxcywh boxes of shape N x 4 x 8732, got \(1, 8732, 4\)"):
        coder.encode(torch.zeros(1, 8732, 4))
    with pytest.raises(ValueError, match=r"offsets: expected a tensor of shape N x 4 x 8732, got \(4, 8732\)"):
        coder.decode(torch.zeros(4, 8732))
    with pytest.raises(ValueError, match="floating-point"):
        coder.decode(torch.zeros(1, 4, 8732, dtype=torch.int32))
    with pytest.raises(TypeError, match="spec: expected a DetectorSpec"):
        BoxCoder.from_spec(NVIDIA_SSD300.anchors)
    with pytest.raises(TypeError, match="coder: expected a BoxCoderSpec"):
        BoxCoder(NVIDIA_SSD300.anchors, (0.1, 0.2))
