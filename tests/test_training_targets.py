"""Target encoding and the multibox loss against NVIDIA's Encoder and Loss (golden train_targets.npz)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ssd.anchors import default_boxes as spec_default_boxes
from ssd.box_coder import BoxCoder
from ssd.boxes import box_iou
from ssd.models import MMDET_SSD300, MMDET_SSD512, MMDET_SSDLITE320, NVIDIA_SSD300
from ssd.models.spec import AnchorSpec
from ssd.training import SSDLoss, encode_batch, encode_targets

NUM_BOXES = NVIDIA_SSD300.anchors.num_anchors


def default_boxes(fmt):
    return spec_default_boxes(NVIDIA_SSD300.anchors, fmt)

NUM_GOLDEN_IMAGES = 6


@pytest.fixture(scope="module")
def golden(golden_dir):
    return dict(np.load(golden_dir / "train_targets.npz"))


def _truths(golden):
    boxes = [golden[f"boxes_{i}"] for i in range(NUM_GOLDEN_IMAGES)]
    labels = [golden[f"labels_{i}"] for i in range(NUM_GOLDEN_IMAGES)]
    return boxes, labels


def _predictions(golden):
    # The golden README's recipe for the predictions behind the stored loss and gradients.
    rs = np.random.RandomState(3000 + int(golden["prediction_seed"]))
    ploc = (rs.standard_normal((7, 4, NUM_BOXES)) * 0.5).astype(np.float32)
    plabel = (rs.standard_normal((7, 81, NUM_BOXES)) * 2.0).astype(np.float32)
    return torch.from_numpy(ploc).requires_grad_(), torch.from_numpy(plabel).requires_grad_()


@pytest.mark.parametrize("index", range(NUM_GOLDEN_IMAGES))
def test_encode_targets_matches_nvidia_exactly(golden, index):
    boxes, labels = encode_targets(golden[f"boxes_{index}"], golden[f"labels_{index}"], NVIDIA_SSD300)
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(boxes, torch.from_numpy(golden[f"encoded_boxes_{index}"]))
    assert torch.equal(labels, torch.from_numpy(golden[f"encoded_labels_{index}"]))


def test_encode_batch_matches_single_and_golden_gloc(golden):
    boxes, labels = _truths(golden)
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    batch_boxes, batch_labels = encode_batch([*boxes, empty_boxes], [*labels, empty_labels], NVIDIA_SSD300)
    assert batch_boxes.shape == (7, NUM_BOXES, 4) and batch_labels.shape == (7, NUM_BOXES)
    for i in range(NUM_GOLDEN_IMAGES):
        single_boxes, single_labels = encode_targets(boxes[i], labels[i], NVIDIA_SSD300)
        assert torch.equal(batch_boxes[i], single_boxes)
        assert torch.equal(batch_labels[i], single_labels)
    assert torch.equal(batch_boxes[:6].transpose(1, 2), torch.from_numpy(golden["gloc"][:6]))
    assert torch.equal(batch_labels, torch.from_numpy(golden["glabel"]))
    # No truths: everything is background, the boxes are the default boxes.
    assert not batch_labels[6].any()
    torch.testing.assert_close(batch_boxes[6], default_boxes("cxcywh"), rtol=0, atol=1e-6)


def test_shared_best_box_goes_to_the_later_truth(golden):
    boxes = torch.from_numpy(golden["boxes_2"])
    labels = torch.from_numpy(golden["labels_2"])
    best = box_iou(boxes, default_boxes("xyxy")).argmax(dim=1)
    shared = [(i, j) for i in range(len(best)) for j in range(i + 1, len(best)) if best[i] == best[j]]
    assert shared, "golden image 2 should have two truths sharing their best default box"
    _, encoded = encode_targets(boxes, labels, NVIDIA_SSD300)
    for _, later in shared:
        assert encoded[best[later]] == labels[later]


def test_claimed_box_is_matched_below_threshold():
    # A small truth overlaps no default box by more than 0.5, yet still claims its best one.
    truth = torch.tensor([[0.50, 0.50, 0.51, 0.52]])
    boxes, labels = encode_targets(truth, torch.tensor([7]), NVIDIA_SSD300)
    assert int((labels == 7).sum()) == 1
    index = int(labels.argmax())
    torch.testing.assert_close(boxes[index], torch.tensor([0.505, 0.51, 0.01, 0.02]))


def test_threshold_is_strict():
    # Default boxes of 0.5 x 0.5 on a 2 x 2 grid, each twice (the level's two square shapes coincide): x0 y0 x1 y1
    # in the order 0-0-.5-.5, .5-0-1-.5, 0-.5-.5-1, .5-.5-1-1, then again.
    anchors = AnchorSpec(image_size=4, feature_sizes=(2,), steps=(2,), min_sizes=(2,), max_sizes=(2,),
                         aspect_ratios=((),))
    truth = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    # The truth covers the left column: IoU exactly 0.5 with four boxes. It claims the first; the others are
    # matched only when the spec's threshold is below 0.5.
    spec = dataclasses.replace(NVIDIA_SSD300, anchors=anchors, matching_iou=0.5)
    _, labels = encode_targets(truth, torch.tensor([3]), spec)
    assert labels.tolist() == [3, 0, 0, 0, 0, 0, 0, 0]
    _, labels = encode_targets(truth, torch.tensor([3]), dataclasses.replace(spec, matching_iou=0.49))
    assert labels.tolist() == [3, 0, 3, 0, 3, 0, 3, 0]


@pytest.mark.parametrize(
    ("boxes", "labels", "error", "message"),
    [
        ([[0.1, 0.1, 0.2, 0.2]], torch.tensor([1]), TypeError, "boxes"),
        (torch.zeros(1, 3), torch.tensor([1]), ValueError, r"expected shape \(n, 4\)"),
        (torch.tensor([[0, 0, 1, 1]]), torch.tensor([1]), TypeError, "floating-point"),
        (torch.tensor([[0.1, 0.1, float("nan"), 0.2]]), torch.tensor([1]), ValueError, "finite"),
        (torch.tensor([[0.3, 0.1, 0.2, 0.2]]), torch.tensor([1]), ValueError, "right > left"),
        (torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([0]), ValueError, "labels >= 1"),
        (torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([1.0]), TypeError, "integer"),
        (torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([1, 2]), ValueError, r"shape \(1,\)"),
    ],
)
def test_encode_rejects_bad_input(boxes, labels, error, message):
    with pytest.raises(error, match=message):
        encode_targets(boxes, labels, NVIDIA_SSD300)


def test_encode_rejects_bad_spec_and_batch():
    box, label = torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([1])
    with pytest.raises(ValueError, match=r"spec.matching_iou: expected a number in \[0, 1\], got 1.5"):
        encode_targets(box, label, dataclasses.replace(NVIDIA_SSD300, matching_iou=1.5))
    with pytest.raises(TypeError, match="spec: expected a DetectorSpec"):
        encode_targets(box, label, NVIDIA_SSD300.anchors)
    with pytest.raises(TypeError, match="boxes: expected a list"):
        encode_batch(box, [label], NVIDIA_SSD300)
    with pytest.raises(ValueError, match="one entry per image"):
        encode_batch([box, box], [label], NVIDIA_SSD300)


def test_loss_value_and_gradients_match_nvidia(golden):
    ploc, plabel = _predictions(golden)
    loss = SSDLoss(NVIDIA_SSD300)(ploc, plabel, torch.from_numpy(golden["gloc"]), torch.from_numpy(golden["glabel"]))
    expected = float(golden["loss"])
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected)
    loss.backward()
    torch.testing.assert_close(ploc.grad, torch.from_numpy(golden["grad_ploc"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(plabel.grad, torch.from_numpy(golden["grad_plabel"]), rtol=0, atol=1e-6)


def test_loss_from_encode_batch_matches_golden(golden):
    # End to end: our encoding fed to our loss gives NVIDIA's number (gloc of image 7 is the default boxes).
    boxes, labels = _truths(golden)
    gboxes, glabels = encode_batch([*boxes, np.zeros((0, 4), np.float32)], [*labels, np.zeros(0, np.int64)],
                                   NVIDIA_SSD300)
    ploc, plabel = _predictions(golden)
    loss = SSDLoss(NVIDIA_SSD300)(ploc, plabel, gboxes.transpose(1, 2), glabels)
    assert abs(loss.item() - float(golden["loss"])) <= 1e-5 * abs(float(golden["loss"]))


def test_loss_is_zero_without_positives_and_finite_under_bf16():
    loss_fn = SSDLoss(NVIDIA_SSD300)
    gloc = default_boxes("cxcywh").t().unsqueeze(0).repeat(2, 1, 1)
    glabel = torch.zeros(2, NUM_BOXES, dtype=torch.int64)
    ploc = torch.randn(2, 4, NUM_BOXES, requires_grad=True)
    plabel = torch.randn(2, 5, NUM_BOXES, requires_grad=True)
    loss = loss_fn(ploc, plabel, gloc, glabel)
    assert loss.item() == 0.0
    glabel[0, :10] = 2
    loss = loss_fn(ploc.bfloat16(), plabel.bfloat16(), gloc, glabel)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("spec", [NVIDIA_SSD300, MMDET_SSD300, MMDET_SSD512, MMDET_SSDLITE320], ids=lambda s: s.name)
def test_loss_regresses_to_the_specs_encoding(spec):
    # Truths from the spec's own matcher; at the offsets its BoxCoder encodes them to, the localisation loss is at
    # its minimum (0): moving the positives' offsets either way raises the loss, moving the negatives' does not.
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(2, 3, 2, generator=generator) * 0.5
    truths = torch.cat([corner, corner + 0.1 + 0.4 * torch.rand(2, 3, 2, generator=generator)], dim=-1)
    gboxes, glabels = encode_batch(list(truths), [torch.tensor([1, 2, 3])] * 2, spec)
    gloc = gboxes.transpose(1, 2)
    positive = (glabels > 0).unsqueeze(1)
    assert positive.any()
    target = BoxCoder.from_spec(spec).encode(gloc)
    plabel = torch.randn(2, 4, spec.anchors.num_anchors, generator=generator)
    loss_fn = SSDLoss(spec)
    at_target = loss_fn(target, plabel, gloc, glabels)
    noise = torch.randn(target.shape, generator=generator)
    assert loss_fn(torch.where(positive, target, target + noise), plabel, gloc, glabels) == at_target
    for step in (0.1, -0.1):
        assert loss_fn(torch.where(positive, target + step, target), plabel, gloc, glabels) > at_target


@pytest.mark.parametrize(
    ("which", "error", "message"),
    [
        ("ploc", ValueError, r"ploc: expected shape \(N, 4, 8732\)"),
        ("plabel", ValueError, "plabel: expected shape"),
        ("gloc", ValueError, "gloc: expected shape"),
        ("glabel", TypeError, "glabel: expected dtype torch.int64"),
    ],
)
def test_loss_rejects_bad_shapes(which, error, message):
    args = {
        "ploc": torch.zeros(2, 4, NUM_BOXES),
        "plabel": torch.zeros(2, 81, NUM_BOXES),
        "gloc": default_boxes("cxcywh").t().unsqueeze(0).repeat(2, 1, 1),
        "glabel": torch.zeros(2, NUM_BOXES, dtype=torch.int64),
    }
    bad = {
        "ploc": torch.zeros(2, 4, 100),
        "plabel": torch.zeros(3, 81, NUM_BOXES),
        "gloc": torch.zeros(2, 4, 100),
        "glabel": torch.zeros(2, NUM_BOXES, dtype=torch.int32),
    }
    args[which] = bad[which]
    with pytest.raises(error, match=message):
        SSDLoss(NVIDIA_SSD300)(**args)


def test_training_package_exports_the_documented_names():
    import ssd.training
    from ssd.training.augment import SSDAugmentation
    from ssd.training.loop import train

    assert sorted(ssd.training.__all__) == ["SSDAugmentation", "SSDLoss", "encode_batch", "encode_targets", "train"]
    assert (ssd.training.SSDAugmentation, ssd.training.train) == (SSDAugmentation, train)
    assert (ssd.training.SSDLoss, ssd.training.encode_batch) == (SSDLoss, encode_batch)
    with pytest.raises(AttributeError, match="has no attribute 'box_iou_ltrb'"):
        ssd.training.box_iou_ltrb  # noqa: B018
    with pytest.raises(TypeError, match="spec: expected a DetectorSpec"):
        SSDLoss(NVIDIA_SSD300.anchors)
