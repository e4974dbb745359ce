"""Hostile COCO annotation files, fed alike to both consumers of the one parser: the training dataset and the
evaluation's loader. Each must end in one error line naming the file (and the entry, where one is at fault), never
hang, never fill memory, and never silently accept a value that would change what is trained or scored."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageOps

from ssd.data import coco_format
from ssd.data.coco_format import CocoDetectionDataset, parse_annotations
from ssd.evaluation import CocoImages

pytestmark = pytest.mark.timeout(120)  # a FIFO read by mistake blocks forever: this turns it into a failure

WIDTH, HEIGHT = 40, 30
RED = (220, 20, 20)


def _base() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 12]}],
        "categories": [{"id": 3, "name": "thing"}],
    }


def _train(path: pathlib.Path, images: pathlib.Path) -> list:
    dataset = CocoDetectionDataset(path, images)
    return [dataset[i] for i in range(len(dataset))]


def _evaluate(path: pathlib.Path, images: pathlib.Path) -> list:
    # What evaluate() does with the set: load it, then raise the first image error (without --skip-errors).
    dataset = CocoImages(images, path, include_empty=True)
    samples = [dataset[i] for i in range(len(dataset))]
    for sample in samples:
        if sample.error is not None:
            raise sample.error
    return samples


CONSUMERS: dict[str, Callable[[pathlib.Path, pathlib.Path], list]] = {"train": _train, "evaluate": _evaluate}


@contextlib.contextmanager
def memory_cap(extra_bytes: int = 2**30) -> Iterator[None]:
    """At most ``extra_bytes`` more address space for the block: reading a huge file by mistake fails with
    MemoryError instead of filling the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fp:
        current = int(fp.read().split()[0]) * resource.getpagesize()
    cap = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture()
def images(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (WIDTH, HEIGHT), (10, 120, 200)).save(folder / "a.png")
    return folder


def _write(tmp_path: pathlib.Path, document: object, name: str = "set.json") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def _refused(consumer: str, path: pathlib.Path, images: pathlib.Path, match: str,
             errors: type[Exception] | tuple[type[Exception], ...] = ValueError) -> str:
    with memory_cap(), pytest.raises(errors, match=match) as caught:
        CONSUMERS[consumer](path, images)
    message = str(caught.value)
    assert "\n" not in message and path.name in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# The file itself


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_fifo_is_refused_unread(consumer, tmp_path, images):
    path = tmp_path / "pipe.json"
    os.mkfifo(path)  # nobody writes: opening it for reading the ordinary way would block forever
    _refused(consumer, path, images, r"expected a regular COCO JSON file, got a FIFO \(named pipe\)")


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_device_is_refused_unread(consumer, images):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    _refused(consumer, pathlib.Path("/dev/zero"), images, "expected a regular COCO JSON file, got a character device")


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_file_over_the_size_cap_is_refused_unread(consumer, tmp_path, images, monkeypatch):
    # A sparse 3 GiB file (no disk used): over the 2 GiB cap, refused from its size, not read.
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fp:
        fp.truncate(3 * 2**30)
    _refused(consumer, huge, images, r"at most 2,147,483,648 bytes, got 3,221,225,472 bytes")
    # The cap is read at call time: a small one applies to an ordinary file.
    monkeypatch.setattr(coco_format, "MAX_ANNOTATION_BYTES", 100)
    _refused(consumer, _write(tmp_path, _base()), images, r"at most 100 bytes, got \d+ bytes")


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@pytest.mark.parametrize(("content", "match"), [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to parse"),
    ('{"images": [', r"invalid JSON \(Expecting value: line 1 column 13"),
    (b'{"images": "\xff\xfe"}', "bytes that are not UTF-8 text"),
    ('{"images": [{"id": 1' + "0" * 5000 + "}]}", "invalid JSON"),  # beyond Python's integer digit limit
    ("", "invalid JSON"),
], ids=["deep nesting", "truncated", "not UTF-8", "giant integer", "empty"])
def test_unparsable_files_give_one_line(consumer, tmp_path, images, content, match):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    _refused(consumer, path, images, match)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_missing_and_folder_paths(consumer, tmp_path, images):
    _refused(consumer, tmp_path / "nowhere.json", images, "got a path that does not exist", FileNotFoundError)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    _refused(consumer, folder, images, "got a directory", IsADirectoryError)


# ---------------------------------------------------------------------------------------------------------------
# The entries


def _changed(change: Callable[[dict], None]) -> dict:
    document = _base()
    change(document)
    return document


def _second_annotation(**fields) -> Callable[[dict], None]:
    return lambda d: d["annotations"].append({"id": 8, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5],
                                              **fields})


ENTRY_CASES = {
    # What a plain `if entry["iscrowd"]` (and pycocotools) would take for a crowd, silently ignoring the box.
    "iscrowd string": (_second_annotation(iscrowd="0"), r"annotations\[1\] \(id 8\): expected 'iscrowd' to be 0 or 1, "
                                                         r"got '0'"),
    "iscrowd bool": (_second_annotation(iscrowd=False), r"annotations\[1\] \(id 8\): expected 'iscrowd' .* got False"),
    # JSON true is Python's True, which equals 1: it would become category 1.
    "category_id bool": (_second_annotation(category_id=True),
                         r"annotations\[1\] \(id 8\): expected 'category_id' to be an integer .* got True"),
    "category_id string": (_second_annotation(category_id="3"),
                           r"annotations\[1\] \(id 8\): expected 'category_id' to be an integer .* got '3'"),
    "image_id float": (_second_annotation(image_id=1.0),
                       r"annotations\[1\] \(id 8\): expected 'image_id' to be an integer .* got 1.0"),
    "annotation id float": (_second_annotation(id=2.5), r"annotations\[1\]: expected 'id' to be an integer .* got 2.5"),
    "negative id": (lambda d: d["categories"].append({"id": -1, "name": "minus"}),
                    r"categories\[1\]: expected 'id' to be an integer in \[0, 2\*\*53\), got -1"),
    "id beyond float64": (lambda d: d["images"].append({"id": 2**60, "file_name": "a.png"}),
                          r"images\[1\]: expected 'id' to be an integer in \[0, 2\*\*53\)"),
    "unknown image": (_second_annotation(image_id=99),
                      r"annotations\[1\] \(id 8\): expected 'image_id' to be the id of one of the 'images', got 99"),
    "unknown category": (_second_annotation(category_id=12),
                         r"annotations\[1\] \(id 8\): expected 'category_id' to be the id of one of the "
                         r"'categories', got 12"),
    "duplicate annotation id": (_second_annotation(id=7),
                                r"annotations\[1\] \(id 7\): expected distinct ids, got id 7 twice"),
    "duplicate image id": (lambda d: d["images"].append({"id": 1, "file_name": "b.png", "width": 4, "height": 4}),
                           r"images\[1\] \(id 1\): expected distinct ids, got id 1 twice"),
    "duplicate category id": (lambda d: d["categories"].append({"id": 3, "name": "other"}),
                              r"categories\[1\] \(id 3\): expected distinct ids, got id 3 twice"),
    "bbox of strings": (_second_annotation(bbox=["1", "1", "5", "5"]),
                        r"annotations\[1\] \(id 8\): expected a 'bbox' of 4 numbers"),
    "bbox with NaN": (_second_annotation(bbox=[1, 1, float("nan"), 5]),
                      r"annotations\[1\] \(id 8\): expected a 'bbox' of 4 numbers"),
    "negative area": (_second_annotation(area=-3), r"annotations\[1\] \(id 8\): expected 'area' to be a finite number"),
    "annotation not an object": (lambda d: d["annotations"].append([1, 2]),
                                 r"annotations\[1\]: expected a JSON object, got a JSON list"),
    "width as a string": (lambda d: d["images"][0].update(width="40"),
                          r"images\[0\] \(id 1\): expected 'width' to be a positive integer, got '40'"),
    "height alone": (lambda d: d["images"][0].pop("width"), r"images\[0\] \(id 1\): expected 'width' and 'height'"),
    "empty file name": (lambda d: d["images"][0].update(file_name=""),
                        r"images\[0\] \(id 1\): expected a non-empty string 'file_name'"),
    "category without a name": (lambda d: d["categories"][0].pop("name"),
                                r"categories\[0\] \(id 3\): expected a non-empty string 'name', got None"),
    "images an object": (lambda d: d.update(images={}), "expected a list under 'images', got a JSON object"),
    "no categories key": (lambda d: d.pop("categories"), "expected a list under 'categories', got nothing"),
    "no images": (lambda d: d.update(images=[]), "expected at least one image, got an empty 'images' list"),
}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_bad_entries_are_refused_naming_the_file_and_entry(consumer, case, tmp_path, images):
    change, match = ENTRY_CASES[case]
    _refused(consumer, _write(tmp_path, _changed(change)), images, match)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_json_that_is_not_an_object_is_refused(consumer, tmp_path, images):
    _refused(consumer, _write(tmp_path, [_base()]), images, "expected a COCO annotation object .* got a JSON list")


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_the_good_base_set_and_its_filled_defaults(consumer, tmp_path, images):
    # The control: the same set without a fault loads in both. Nested extras (here 900 levels, below the parser's
    # limit) are not carried into the validated set, so nothing later recurses through them.
    document = _base()
    document["info"] = json.loads("[" * 900 + "]" * 900)
    document["annotations"][0]["segmentation"] = json.loads("[" * 900 + "]" * 900)
    items = CONSUMERS[consumer](_write(tmp_path, document), images)
    assert len(items) == 1
    parsed = parse_annotations(_write(tmp_path, document, "again.json"))
    assert parsed.annotations == [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [2.0, 3.0, 10.0, 12.0],
                                   "iscrowd": 0, "area": 120.0}]
    assert "info" not in parsed.dataset() and parsed.classes.names == ("thing",)


def test_missing_annotation_ids_are_filled_with_unused_ones(tmp_path):
    document = _base()
    document["annotations"] = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]},
                               {"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]}]
    assert [a["id"] for a in parse_annotations(document).annotations] == [6, 5]


def test_options_differ_only_where_the_consumers_need_it(tmp_path, images):
    # Training keeps a set without annotations (all background); evaluation has nothing to score in it.
    empty = _write(tmp_path, _changed(lambda d: d.update(annotations=[])), "empty.json")
    assert len(CocoDetectionDataset(empty, images)) == 1
    with pytest.raises(ValueError, match="empty annotation set has nothing to evaluate"):
        CocoImages(images, empty)
    # Training clips boxes to the declared size, so it needs one; evaluation reads the decoded size.
    sizeless = _write(tmp_path, _changed(lambda d: [d["images"][0].pop(k) for k in ("width", "height")]), "no.json")
    assert len(_evaluate(sizeless, images)) == 1
    with pytest.raises(ValueError, match=r"images\[0\] \(id 1\): expected 'width' and 'height'"):
        CocoDetectionDataset(sizeless, images)


# ---------------------------------------------------------------------------------------------------------------
# Images against their entries: one loader (EXIF orientation applied), one size rule


def _rotated_photo(folder: pathlib.Path) -> tuple[np.ndarray, list[float]]:
    """A JPEG stored 60 x 40 whose EXIF orientation (6: turn 90 degrees clockwise) shows it 40 x 60, with a red
    block; returns the upright picture and the block's box on it, [x, y, w, h]."""
    stored = Image.new("RGB", (60, 40), (10, 120, 200))
    stored.paste(RED, (5, 8, 25, 20))  # left, top, right, bottom on the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "a.jpg", quality=95, exif=exif)
    with Image.open(folder / "a.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(im))
    red = (upright[..., 0] > 180) & (upright[..., 1] < 70)
    rows, cols = np.nonzero(red)
    box = [float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()), float(rows.max() + 1 - rows.min())]
    return upright, box


def _rotated_set(tmp_path: pathlib.Path, width: int, height: int, box: list[float]) -> pathlib.Path:
    return _write(tmp_path, {
        "images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": height}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": box}],
        "categories": [{"id": 3, "name": "thing"}],
    })


def test_exif_rotated_photo_with_boxes_on_the_upright_picture(tmp_path, images):
    upright, box = _rotated_photo(images)
    assert upright.shape == (60, 40, 3)
    path = _rotated_set(tmp_path, 40, 60, box)
    # Training sees the upright picture, as detect and evaluate do: the box covers the red block's pixels.
    [(image, target)] = _train(path, images)
    assert tuple(image.shape) == (3, 60, 40) and target["size"] == (60, 40)
    left, top, right, bottom = (int(v) for v in target["boxes"][0].tolist())
    block = image[:, top:bottom, left:right]
    assert bool(((block[0] > 180) & (block[1] < 70)).float().mean() > 0.9)
    [sample] = _evaluate(path, images)
    assert tuple(sample.pixels.shape) == (3, 60, 40) and (sample.height, sample.width) == (60, 40)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_size_declared_for_the_stored_pixels_is_refused_alike(consumer, tmp_path, images):
    _, box = _rotated_photo(images)
    path = _rotated_set(tmp_path, 60, 40, box)  # the size of the stored pixels, not of the picture
    with pytest.raises(ValueError) as caught:
        CONSUMERS[consumer](path, images)
    message = str(caught.value)
    assert message == (f"{images / 'a.jpg'}: expected a 60 x 40 image as the annotations say, got 40 x 60 (width "
                       "and height swapped: annotations must describe the upright picture, with the file's EXIF "
                       "orientation applied)")


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_declared_size_differing_from_the_file_is_refused_alike(consumer, tmp_path, images):
    path = _write(tmp_path, _changed(lambda d: d["images"][0].update(width=41)))
    with pytest.raises(ValueError) as caught:
        CONSUMERS[consumer](path, images)
    assert str(caught.value) == f"{images / 'a.png'}: expected a 41 x 30 image as the annotations say, got 40 x 30"


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_a_corrupt_image_is_one_line_naming_the_file(consumer, tmp_path, images):
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError) as caught:
        CONSUMERS[consumer](_write(tmp_path, _base()), images)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(images / "a.png")) and "not a readable image" in message
    if consumer == "train":
        lenient = CocoDetectionDataset(_write(tmp_path, _base(), "again.json"), images, skip_bad_images=True)
        assert lenient[0] is None
