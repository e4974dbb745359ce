"""One-call detection: boxes in original pixels, every input kind, pictures, precision paths."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.ops import box_iou

from ssd.inference.detect import Detections
from ssd.models import SSD300
from ssd.transforms import preprocess_for_detection, to_tensor_chw
from utils import decode_results, pick_best

from helpers.checkpoints import detecting_state_dict
from helpers.detections import (
    assert_detect_results_agree,
    assert_same_detections,
    box_tolerance,
    per_image_deltas,
    raw_delta,
    raw_outputs_recorder,
    score_tolerance,
)


@pytest.fixture(scope="module")
def model() -> SSD300:
    model = SSD300().eval()
    model.load_state_dict(detecting_state_dict())
    return model


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()  # 300 x 451 x 3 uint8: landscape, so x and y scales differ


def test_boxes_are_decoded_relative_boxes_scaled_to_the_image(model, chelsea):
    from ssd.backends.plan import channels_last_copy

    height, width = chelsea.shape[:2]
    # detect runs a channels_last copy of this contiguous fp32 model on the CPU (model(x) itself is untouched):
    # other convolution kernels, so raw outputs a few float32 ulps of the partial sums apart, by how much depends on
    # the CPU and the thread count (1.25e-6 in the scores on CI). The copy's outputs are recorded as detect computes
    # them; their distance to model(x) is carried through the decoding by arithmetic (tests/helpers/detections.py).
    copy_raw, hook = raw_outputs_recorder(channels_last_copy(model))
    [found] = model.detect(chelsea, threshold=0.3, max_detections=20)
    hook.remove()
    batch = preprocess_for_detection([to_tensor_chw(chelsea)], model.spec.input)
    with torch.inference_mode():
        predictions = model(batch)
    [copy_raw] = copy_raw
    loc_delta, conf_delta = raw_delta(copy_raw, predictions)
    assert max(loc_delta, conf_delta) < 1e-3  # the same network: a wrong copy would be far off
    boxes, labels, scores = pick_best(decode_results(predictions, criteria=0.5, max_output=20)[0], 0.3)
    assert len(found) == len(scores) > 2
    order = slice(None, None, -1)  # decode_results is ascending, Detections descending
    scale = np.array([width, height, width, height], dtype=np.float32)
    expected = {"boxes": np.clip(boxes[order] * scale, 0, scale), "labels": labels[order], "scores": scores[order]}
    box_tol = box_tolerance(loc_delta, float(predictions[0].abs().max()), model.spec.box_coder, max(width, height))
    assert_same_detections(found, expected, score_tol=score_tolerance(conf_delta), box_tol=box_tol, cut=20,
                           threshold=0.3)
    assert found.image_size == (height, width)
    assert found.names[0] == "person" and set(found.names) == {"person", "cat"}
    assert np.all(np.diff(found.scores) <= 0)


@pytest.fixture()
def same_picture_inputs(tmp_path, http_server, chelsea):
    path = tmp_path / "chelsea.png"
    Image.fromarray(chelsea).save(path)
    url = http_server.add("/chelsea.png", path.read_bytes(), headers={"Content-Type": "image/png"})
    return {
        "path": path,
        "str": str(path),
        "url": url,
        "bytes": path.read_bytes(),
        "file": io.BytesIO(path.read_bytes()),
        "pil": Image.open(path),
        "uint8": chelsea,
        "float": chelsea.astype(np.float64) / 255,
        "tensor_uint8": torch.from_numpy(chelsea).permute(2, 0, 1),
        "tensor_float": torch.from_numpy(chelsea).permute(2, 0, 1).float() / 255,
    }


def _detect_recorded(model, images, **kwargs) -> tuple[list, list]:
    """detect's results, and the raw outputs of the network it ran (the channels_last copy), batch by batch."""
    from ssd.backends.plan import channels_last_copy

    recorded, hook = raw_outputs_recorder(channels_last_copy(model))
    try:
        return model.detect(images, **kwargs), recorded
    finally:
        hook.remove()


def test_every_input_kind_gives_the_same_detections(model, same_picture_inputs):
    kinds = list(same_picture_inputs)
    results, raw = _detect_recorded(model, [same_picture_inputs[k] for k in kinds], batch_size=3)
    reference = results[kinds.index("uint8")]
    assert len(reference) > 0
    # Batches of 3, 3, 3 and 1: an image's place in a batch, and the batch's size, may pick other convolution kernels;
    # float inputs are other pixels (float64 / 255, rounded once more). Each image's raw outputs are measured against
    # the reference's, and the detections compared to what that difference allows.
    deltas = per_image_deltas(raw, rows=[kinds.index("uint8")] * len(kinds))
    for kind, delta in zip(kinds, deltas):
        assert max(delta) < (1e-2 if "float" in kind else 1e-3), (kind, delta)
    max_offset = float(torch.cat([r[0] for r in raw]).abs().max())
    assert_detect_results_agree(results, [reference] * len(kinds), deltas, model.spec.box_coder,
                                max_offset=max_offset, label="input kinds")
    assert results[kinds.index("url")].source == same_picture_inputs["url"]
    assert results[kinds.index("str")].source == same_picture_inputs["str"]


def test_batch_size_does_not_change_results(model):
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.coffee()[::2, ::3]]
    one, raw_one = _detect_recorded(model, images, batch_size=1)
    three, raw_three = _detect_recorded(model, images, batch_size=3)
    assert len(raw_one) == 5 and len(raw_three) == 2
    # The same pixels in batches of another size: other kernels may sum in another order; measured per image.
    deltas = per_image_deltas(raw_one, raw_three)
    assert max(max(d) for d in deltas) < 1e-3
    max_offset = float(torch.cat([r[0] for r in raw_one]).abs().max())
    assert_detect_results_agree(one, three, deltas, model.spec.box_coder, max_offset=max_offset,
                                label="batch 1 vs 3")


def test_grayscale_and_rgba_files(model, tmp_path):
    gray = tmp_path / "camera.png"
    Image.fromarray(data.camera()).save(gray)
    rgba = tmp_path / "logo.png"
    Image.fromarray(data.logo()).save(rgba)
    found_gray, found_rgba = model.detect([gray, rgba])
    assert found_gray.image_size == data.camera().shape and len(found_gray) > 0
    assert found_rgba.image_size == data.logo().shape[:2] and len(found_rgba) > 0
    rgb_copy = model.detect(np.repeat(data.camera()[:, :, None], 3, axis=2))[0]
    np.testing.assert_allclose(found_gray.boxes, rgb_copy.boxes, atol=1e-4)


def test_plot_and_save_draw_the_boxes(model, tmp_path):
    image = np.full((240, 320, 3), 255, dtype=np.uint8)  # white: any drawn pixel stands out
    [found] = model.detect(image, threshold=0.9)
    assert found.names == ["person"]
    path = found.save(tmp_path / "out.png")
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == image.shape
    x1, y1, x2, y2 = found.boxes[0].round().astype(int)
    x1, y1, x2, y2 = max(x1, 2), max(y1, 2), min(x2, 317), min(y2, 237)
    middle = (y1 + y2) // 2
    # The box's left and right edges are drawn in colour; the inside of the box stays white.
    for x in (x1, x2):
        strip = picture[middle - 3:middle + 4, x - 2:x + 3].reshape(-1, 3)
        assert (strip.astype(int).sum(axis=1) < 700).any(), f"no edge drawn near x={x}"
    inside = picture[middle - 3:middle + 4, (x1 + x2) // 2]
    assert (inside == 255).all()

    import matplotlib

    matplotlib.use("Agg")
    ax = found.plot()
    assert len(ax.patches) == 1 and ax.texts[0].get_text().startswith("person")
    import matplotlib.pyplot as plt

    plt.close("all")


def test_detections_json_and_repr(model, chelsea):
    [found] = model.detect(chelsea)
    record = json.loads(found.to_json())
    assert record["height"] == 300 and record["width"] == 451
    first = record["detections"][0]
    assert set(first) == {"name", "label", "category_id", "score", "box", "bbox"}
    assert first["name"] == "person" and first["category_id"] == 1
    x, y, w, h = first["bbox"]
    assert first["box"] == pytest.approx([x, y, x + w, y + h], abs=0.02)
    cat = next(d for d in record["detections"] if d["name"] == "cat")
    assert cat["category_id"] == 17 and cat["label"] == 16
    assert "451x300" in repr(found) and "person" in repr(found)
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), (5, 7))
    assert "0 objects" in repr(empty) and empty.to_dict()["detections"] == []


def test_bad_image_in_a_list_names_that_image(model, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        model.detect([data.chelsea(), bad])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"threshold": 1.5}, ValueError), ({"threshold": "high"}, TypeError), ({"batch_size": 0}, ValueError),
     ({"max_detections": 2.5}, TypeError), ({"precision": "int8"}, ValueError), ({"iou_threshold": -1}, ValueError),
     ({"threshold": 1.0}, ValueError), ({"iou_threshold": 0.0}, ValueError)],
)
def test_detect_validates_arguments(model, chelsea, kwargs, error):
    with pytest.raises(error, match=f"^{next(iter(kwargs))}: expected"):
        model.detect(chelsea, **kwargs)


def test_detect_restores_training_mode(chelsea):
    model = SSD300()
    model.load_state_dict(detecting_state_dict())
    model.train()
    model.detect(chelsea)
    assert model.training


def _assert_top_detections_agree(reference: Detections, other: Detections, top: int = 5) -> None:
    """Each of the reference's best ``top`` detections is found again: same label, box IoU >= 0.9."""
    n = min(top, len(reference))
    assert n > 0
    iou = box_iou(torch.from_numpy(reference.boxes[:n]), torch.from_numpy(other.boxes)).numpy()
    same_label = reference.labels[:n, None] == other.labels[None, :]
    assert ((iou >= 0.9) & same_label).any(axis=1).all(), (reference, other)


def test_bf16_autocast_keeps_the_top_detections(model):
    images = [data.astronaut(), data.chelsea()]
    for exact, fast in zip(model.detect(images), model.detect(images, precision="bf16")):
        _assert_top_detections_agree(exact, fast)


@pytest.mark.slow
def test_fp16_model_detects_like_fp32(model, chelsea):
    # A half-precision model (as model_math='fp16' builds) takes half inputs; on the CPU only a small check
    # is affordable, so compare on one image.
    from ssd.models.base import half_with_float_batchnorm

    half = SSD300().eval()
    half.load_state_dict(detecting_state_dict())
    half_with_float_batchnorm(half)
    small = chelsea[::2, ::2]
    try:
        # It runs, but says that half precision is the slow choice on a CPU.
        with pytest.warns(UserWarning, match="float16 weights on the CPU.*use model.float"):
            [fast] = half.detect(small)
    except RuntimeError as exc:  # some CPU builds lack half convolutions altogether
        pytest.skip(f"this torch build cannot run float16 convolutions on the CPU: {exc}")
    [exact] = model.detect(small)
    _assert_top_detections_agree(exact, fast)
