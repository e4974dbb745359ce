"""mmdetection's input pipeline: cv2's INTER_LINEAR resize reproduced bit for bit, then mean/std normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from ssd.postprocess import postprocess
from ssd.registry import get_entry
from ssd.transforms import _resize_like_cv2, preprocess_for_detection, to_tensor_chw
from ssd.weights.mmdet import convert_mmdet_state_dict

from helpers.mmdet import GOLDEN, MODELS, ORIGINAL_WH, TOP_N, golden_run, iou_matrix, mmdet_state_dict


def astronaut_crop() -> np.ndarray:
    """The golden data's image: 400 x 500 RGB uint8."""
    return data.astronaut()[40:440, 6:506]


@pytest.mark.parametrize("short", sorted(MODELS))
def test_uint8_resize_is_cv2_inter_linear(short):
    size = MODELS[short].input.size
    bgr = np.ascontiguousarray(astronaut_crop()[..., ::-1])
    resized = _resize_like_cv2(torch.from_numpy(bgr).permute(2, 0, 1)[None].contiguous(), size)
    assert resized.dtype == torch.uint8 and resized.shape == (1, 3, size, size)
    expected = np.load(GOLDEN / f"{short}_golden.npz")["resized_bgr"]
    np.testing.assert_array_equal(resized[0].permute(1, 2, 0).numpy(), expected)


def test_torch_bilinear_is_not_cv2():
    """Why the fixed-point resize exists: torch's float bilinear + round misses cv2 by one level on ~10%."""
    chw = torch.from_numpy(astronaut_crop()[..., ::-1].copy()).permute(2, 0, 1)[None].float()
    plain = torch.nn.functional.interpolate(chw, size=(320, 320), mode="bilinear", antialias=False,
                                            align_corners=False).round()[0].permute(1, 2, 0).numpy()
    expected = np.load(GOLDEN / "ssdlite_golden.npz")["resized_bgr"]
    differ = plain != expected
    assert 0.05 < differ.mean() < 0.2 and np.abs(plain - expected).max() == 1


@pytest.mark.parametrize("short", sorted(MODELS))
def test_detect_from_the_raw_image_matches_mmdetection(short, tmp_path_factory):
    spec, golden, x_golden, _ = golden_run(short, tmp_path_factory)
    x = preprocess_for_detection([to_tensor_chw(astronaut_crop())], spec.input)
    # Same pixels; only the normalisation's float rounding (a fused multiply-add) may differ.
    np.testing.assert_allclose(x.numpy(), x_golden.numpy(), rtol=0, atol=1e-5)
    if short != "ssdlite":
        return  # the VGG inputs are identical; SSDLite is the model that is hypersensitive to its input
    model = get_entry(spec.name).network(spec).eval()
    model.load_state_dict(convert_mmdet_state_dict(mmdet_state_dict(short), spec))
    with torch.no_grad():
        decoded = postprocess(model(x), spec)
    count = int(decoded.counts[0])
    boxes = decoded.boxes[0, :count].double().numpy() * np.asarray(ORIGINAL_WH * 2, dtype=np.float64)
    labels = decoded.labels[0, :count].numpy()
    iou = iou_matrix(golden["det_bboxes"][:TOP_N].astype(np.float64), boxes)
    same = (golden["det_labels"][:TOP_N, None] + 1) == labels[None, :]
    assert (np.where(same, iou, 0.0).max(axis=1) > 0.99).all()


def test_model_detect_on_the_raw_image_matches_mmdetection():
    """The one-call pipeline (load, cv2-exact resize, normalise, forward, mmdetection's recipe, rescale)."""
    spec = MODELS["ssdlite"]
    model = get_entry(spec.name).network(spec).eval()
    model.load_state_dict(convert_mmdet_state_dict(mmdet_state_dict("ssdlite"), spec))
    found = model.detect([astronaut_crop()])[0]
    golden = np.load(GOLDEN / "ssdlite_golden.npz")
    assert len(found) == 200
    iou = iou_matrix(golden["det_bboxes"][:TOP_N].astype(np.float64), found.boxes.astype(np.float64))
    same = (golden["det_labels"][:TOP_N, None] + 1) == found.labels[None, :]
    assert (np.where(same, iou, 0.0).max(axis=1) > 0.99).all()
    np.testing.assert_allclose(found.scores[:TOP_N], golden["det_scores"][:TOP_N], atol=1e-4)
