"""``detect``'s batch result: timings, summary, pictures, crops, pandas and COCO exports, and the class filter.

Real photos through a random-weights SSD300 at a low threshold: untrained, it still finds plenty of boxes, which is
all these tests need.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ssd import DetectionBatch, Detections
from ssd.inference.drawing import render
from ssd.inference.runs import PictureWriter
from ssd.models import SSD300

THRESHOLD = 0.02


@pytest.fixture(scope="module")
def model() -> SSD300:
    torch.manual_seed(0)
    return SSD300().eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A JPEG and a PNG, the PNG again in another folder under the same name, and a nameless array."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.fromarray(data.astronaut()).save(root / "a" / "astronaut.jpg", quality=95)
    Image.fromarray(data.chelsea()).save(root / "a" / "chelsea.png")
    Image.fromarray(data.chelsea()).save(root / "b" / "chelsea.png")
    return [root / "a" / "astronaut.jpg", root / "a" / "chelsea.png", root / "b" / "chelsea.png", data.chelsea()]


@pytest.fixture(scope="module")
def batch(model, photos) -> DetectionBatch:
    return model.detect(photos, threshold=THRESHOLD, max_detections=6, batch_size=4)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_detect_returns_a_list_with_timings_and_a_summary(batch, capsys):
    assert isinstance(batch, list) and isinstance(batch, DetectionBatch) and len(batch) == 4
    assert all(isinstance(found, Detections) and len(found) == 6 for found in batch)
    assert set(batch.times) == {"preprocess", "inference", "postprocess"}
    assert all(ms >= 0 for ms in batch.times.values()) and batch.times["inference"] > 0
    assert batch.stage_times.images == 4
    text = str(batch)
    # A line per image with its own times, as YOLOv5's results.print() (see test_per_image_speed for the figures).
    for i, (line, found) in enumerate(zip(text.splitlines()[:4], batch), 1):
        assert line.startswith(f"image {i}/4: {found!r} (") and line.endswith(" ms postprocess)")
        assert f"{found.speed['inference']:.1f} ms inference" in line
    assert text.splitlines()[-1].startswith("Speed: ") and "ms inference" in text and "(4 images)" in text
    batch.print()
    assert capsys.readouterr().out == text + "\n"
    first, *rest = batch  # still unpacks like the plain list it was
    assert first is batch[0] and len(rest) == 3


def test_save_names_pictures_after_their_inputs_in_their_formats(batch, photos, tmp_path):
    written = batch.save(tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "astronaut.jpg", "chelsea.png", "chelsea-2.png", "image3.png"]
    assert [Image.open(p).format for p in written] == ["JPEG", "PNG", "PNG", "PNG"]
    for path, found in zip(written, batch):
        height, width = found.image_size
        assert Image.open(path).size == (width, height)
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(("name", "written", "kind"), [
    ("x.jpg", "x.jpg", "JPEG"), ("x.JPEG", "x.JPEG", "JPEG"), ("x.png", "x.png", "PNG"), ("x.bmp", "x.bmp", "BMP"),
    ("x", "x.png", "PNG"), ("x.unknown", "x.unknown.png", "PNG"),
])
def test_detections_save_returns_the_path_it_wrote(batch, tmp_path, name, written, kind):
    path = batch[0].save(tmp_path / "deep" / name)
    assert path == tmp_path / "deep" / written and Image.open(path).format == kind


def test_pictures_draw_boxes_and_scaled_captions():
    white = np.full((600, 800, 3), 255, np.uint8)
    boxes = np.array([[100, 200, 400, 500]], np.float32)
    picture = np.asarray(render(white, boxes, [1], ["person 97%"]))
    assert (picture[350, 98:103] != 255).any() and (picture[350, 398:403] != 255).any()  # left and right edges
    assert (picture[350, 250] == 255).all()  # the inside of the box stays untouched
    caption = picture[150:200, 100:300]  # above the box: a filled label with dark text on it
    assert (caption != 255).any(axis=2).sum() > 800 and (caption.sum(axis=2) < 150).any()
    small = np.asarray(render(np.full((150, 200, 3), 255, np.uint8), boxes / 4, [1], ["person 97%"]))
    tall_big = int((picture[:200, :, :] != 255).any(axis=(1, 2)).sum())
    tall_small = int((small[:50, :, :] != 255).any(axis=(1, 2)).sum())
    assert tall_big > tall_small  # the caption grows with the picture


def test_crop_writes_one_picture_per_object_in_class_folders(batch, tmp_path):
    written = batch.crop(tmp_path / "crops")
    assert len(written) == sum(len(found) for found in batch)
    expected = [(found, rank) for found in batch for rank in range(len(found))]
    for path, (found, rank) in zip(written, expected):
        assert path.parent.name == found.names[rank]
        x1, y1, x2, y2 = found.boxes[rank]
        crop = Image.open(path)
        assert abs(crop.width - (x2 - x1)) <= 2 and abs(crop.height - (y2 - y1)) <= 2
    png = next(p for p in written if p.name.startswith("chelsea-"))  # lossless: the very pixels of the image
    rank = int(png.stem.split("-")[1])
    x1, y1 = (int(np.floor(v)) for v in batch[1].boxes[rank][:2])
    crop = np.asarray(Image.open(png))
    np.testing.assert_array_equal(crop, batch[1].image[y1:y1 + crop.shape[0], x1:x1 + crop.shape[1]])
    assert len({p.as_posix() for p in written}) == len(written)  # the two chelsea.png never overwrite each other


def test_pandas_has_one_row_per_detection(batch):
    pandas = pytest.importorskip("pandas")
    frame = batch.pandas()
    assert isinstance(frame, pandas.DataFrame) and len(frame) == sum(len(found) for found in batch)
    assert list(frame.columns) == ["image", "source", "xmin", "ymin", "xmax", "ymax", "confidence", "class", "name",
                                   "category_id"]
    rows = frame[frame["image"] == 2]
    np.testing.assert_allclose(rows[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), batch[2].boxes)
    assert rows["name"].tolist() == batch[2].names and rows["category_id"].tolist() == batch[2].category_ids
    assert DetectionBatch([]).pandas().empty


def test_pandas_missing_names_the_install_command(batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # what `import pandas` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install pandas"):
        batch.pandas()


def test_to_coco_is_a_flat_results_list(batch):
    results = batch.to_coco()
    assert len(results) == sum(len(found) for found in batch)
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert [r["image_id"] for r in results] == [i for i, found in enumerate(batch) for _ in range(len(found))]
    first = batch[0]
    x1, y1, x2, y2 = first.boxes[0].tolist()
    assert results[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert results[0]["category_id"] == first.category_ids[0] and results[0]["score"] == pytest.approx(
        float(first.scores[0]), abs=1e-5)
    ids = [397133, 37777, 252219, 87038]
    assert {r["image_id"] for r in batch.to_coco(ids)} == set(ids)
    with pytest.raises(ValueError, match=r"^image_ids: expected 4 ids \(one per image\), got 2$"):
        batch.to_coco([1, 2])


def test_classes_filter_by_name_or_label_and_before_the_cap(model):
    image = data.astronaut()
    everything = model.detect(image, threshold=THRESHOLD, max_detections=200)[0]
    assert len(set(everything.names)) >= 2
    rare = everything.names[-1]  # the lowest-ranked class still found: surely not in an overall top 3
    [by_name] = model.detect(image, threshold=THRESHOLD, max_detections=3, classes=[rare])
    label = model.names.index(rare) + 1
    [by_label] = model.detect(image, threshold=THRESHOLD, max_detections=3, classes=label)
    assert by_name.names == [rare] * len(by_name) and len(by_name) >= 1
    np.testing.assert_array_equal(by_name.boxes, by_label.boxes)
    mine = np.flatnonzero(everything.labels == label)[:3]
    np.testing.assert_allclose(by_name.boxes, everything.boxes[mine], atol=1e-4)
    np.testing.assert_array_equal(by_name.scores, everything.scores[mine])


@pytest.mark.parametrize(("classes", "error", "message"), [
    (["persn"], ValueError, r"^classes: expected names of this model's classes \(person, bicycle, .*got 'persn'$"),
    ([0], ValueError, r"^classes: expected labels 1\.\.80 \(label 0 is background\), got 0$"),
    ([81], ValueError, r"got 81$"),
    ([1.5], TypeError, r"^classes: expected class names \(str\) or labels \(int\), got float$"),
    ([], ValueError, r"^classes: expected at least one"),
])
def test_classes_errors(model, classes, error, message):
    with pytest.raises(error, match=message):
        model.detect(np.zeros((8, 8, 3), np.uint8), classes=classes)


def test_show_draws_each_image(batch, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(len(plt.gca().patches)))
    batch.show()
    plt.close("all")
    assert shown == [len(found) for found in batch]


def test_picture_writer_reports_a_failed_picture_and_writes_the_rest(batch, tmp_path):
    (tmp_path / "taken.png").mkdir()  # a folder where the picture should go: its rename fails
    with PictureWriter(depth=1) as writer:
        writer.put(0, batch[0], tmp_path / "taken.png")
        for i in range(1, 4):
            writer.put(i, batch[i], tmp_path / f"ok{i}.png")
    assert list(writer.errors) == [0] and "taken.png" in writer.errors[0]
    assert sorted(writer.written) == [1, 2, 3] and all(p.is_file() for p in writer.written.values())
