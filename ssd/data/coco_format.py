"""COCO detection annotations: the one reader and validator of annotation files, serving training and evaluation
alike, and the training dataset over them.

Reading (:func:`read_annotation_file`): the path must be a regular file (a FIFO or a device is refused before a byte
is read, so nothing hangs or fills memory) of at most :data:`MAX_ANNOTATION_BYTES`; invalid JSON, bytes that are not
UTF-8 and JSON nested too deeply to parse each give one ``ValueError`` line naming the file.

Validation (:func:`parse_annotations`), the same checks for every consumer, each error naming the file and the
entry (``annotations[3] (id 17)``):

* ``images``, ``annotations`` and ``categories`` are lists; at least one image and one category.
* ids (of images, annotations and categories), ``image_id`` and ``category_id`` are integers in [0, 2**53) (JSON
  ``true`` is not 1, ``"3"`` is not 3), distinct within their list, and every reference names a listed entry.
* an image has a non-empty ``file_name`` and both or neither of ``width`` and ``height`` (positive integers): the
  size of the picture as viewers show it, i.e. with its EXIF orientation applied (see :func:`check_image_size`).
* a category has a non-empty string ``name``.
* an annotation has a ``bbox`` of 4 finite numbers ``[x, y, width, height]`` (top-left corner, pixels of the upright
  picture); ``iscrowd``, when given, is 0 or 1 (``"0"`` is refused: it would count as a crowd); ``area``, when
  given, a finite number >= 0. Missing ``id``, ``iscrowd`` and ``area`` are filled in as COCO defines them (unused
  ids, 0, the box area), which is what pycocotools' COCOeval reads.

Options say what a consumer needs on top: ``require_annotations`` (evaluation: an empty set has nothing to score)
and ``require_size`` (training clips boxes to the declared size). The validated entries keep only the fields above,
so large or deeply nested extras (segmentations, ``info``) are not carried along.

Labels, one rule for the whole library: label ``k`` (1..K) is the ``k``-th category in ascending id order, 0 is
background (:attr:`CocoAnnotations.classes`). A model trained on a file carries those names and ids, and evaluation
maps its labels back to the file's ids.

The training dataset (:class:`CocoDetectionDataset`) counts how it treats imperfect annotations in ``stats``:

* ``empty_dropped``: boxes of zero or negative width or height are dropped.
* ``clipped``: boxes reaching outside the image (as declared by the image's ``width``/``height``) are clipped to it;
  ``outside_dropped``: boxes with nothing left inside the image after clipping are dropped.
* ``crowd_ignored``: crowd annotations (``iscrowd`` = 1) are not used for training (SSD has no "ignore" label, and
  matching to a crowd region would teach a wrong box).
* ``images_without_boxes``: images with no usable annotation are kept as all-background examples, which teaches the
  detector what not to detect (COCO's own training sets contain such images).

Images are loaded as ``detect`` and ``evaluate`` load them (:func:`ssd.io.images.load_uint8`, EXIF orientation
applied), and a decoded size differing from the declared one is refused with the message evaluation gives. A
corrupt image makes ``__getitem__`` raise :class:`ssd.io.images.ImageLoadError` naming the file, unless the
dataset was built with ``skip_bad_images=True``: then it returns None, which :class:`DetectionCollate` drops.
:meth:`CocoDetectionDataset.load_item` returns a :class:`BadImage` (the file and why) instead of raising, so that
a DataLoader worker hands the problem to the main process as data, not as a traceback inside an error message.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.images import ImageLoadError, load_uint8, read_capped_file
from ..models.spec import ClassSpec

__all__ = [
    "MAX_ANNOTATION_BYTES",
    "AnnotationFileError",
    "BadImage",
    "CocoAnnotations",
    "CocoDetectionDataset",
    "DetectionCollate",
    "check_image_size",
    "parse_annotations",
    "read_annotation_file",
]

# The largest annotation file read. COCO's largest, instances_train2017.json, is 448 MB and LVIS v1's training file
# about 1.1 GB; 2 GiB leaves room for sets of that kind while bounding what one file can make us hold (parsed JSON
# takes several times its size in memory). Read at call time, so it can be changed (or patched in tests).
MAX_ANNOTATION_BYTES = 2 * 2**30
# Ids travel through pycocotools' float64 result arrays; integers beyond 2**53 would come back rounded.
_MAX_ID = 2**53 - 1

Transform = Callable[[np.ndarray, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class AnnotationFileError(ValueError):
    """A COCO annotation file (or dict) that cannot be used; the message names the file and the entry."""


class BadImage(NamedTuple):
    """An image of the set that cannot be used (missing, unreadable, or not the declared size): its path and the
    one-line reason, which starts with the path. Plain strings, so it travels from DataLoader workers intact."""

    path: str
    reason: str


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID


def _source_name(path: str | os.PathLike[str]) -> str:
    return f"annotations {os.fspath(path)!r}"


# --------------------------------------------------------------------------------------------------------------
# Reading


def read_annotation_file(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> Any:
    """The parsed JSON of an annotation file, read under the guards of the module docstring.

    ``max_bytes`` defaults to :data:`MAX_ANNOTATION_BYTES`.

    Raises:
        FileNotFoundError / IsADirectoryError: the path does not exist / is a folder.
        AnnotationFileError (ValueError): not a regular file, larger than ``max_bytes``, not UTF-8, not JSON, or
            nested too deeply (one line naming the file).
        OSError: the file cannot be read (permissions...).
    """
    name = _source_name(path)
    limit = MAX_ANNOTATION_BYTES if max_bytes is None else max_bytes
    data = read_capped_file(path, name, kind="COCO JSON file", limit=limit, error=AnnotationFileError,
                            hint=" (see ssd.data.coco_format.MAX_ANNOTATION_BYTES)")
    return _parse_json(data, name)


def _parse_json(data: bytes, name: str) -> Any:
    import json

    try:
        # utf-8-sig: a byte-order mark, as some Windows tools write, is not an error.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationFileError(f"{name}: expected a COCO JSON file, got bytes that are not UTF-8 text "
                                  f"(at byte {exc.start})") from None
    del data  # the bytes are not needed while the (larger) parsed objects are built
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationFileError(f"{name}: expected a COCO JSON file, got invalid JSON ({exc})") from None
    except RecursionError:
        raise AnnotationFileError(f"{name}: expected a COCO JSON file, got JSON nested too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise AnnotationFileError(f"{name}: expected a COCO JSON file, got invalid JSON ({exc})") from None
    except MemoryError:
        raise AnnotationFileError(f"{name}: not enough memory to parse {len(text):,} characters of JSON") from None


# --------------------------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True, eq=False)
class CocoAnnotations:
    """A validated COCO detection set (see the module docstring): its entries, with only the fields the library
    reads, and the one label rule. ``name`` is how messages name the source (``annotations '/data/val.json'``);
    ``path`` is the file, None for a dict."""

    name: str
    path: str | None
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]

    @property
    def category_ids(self) -> list[int]:
        """The category ids in label order (ascending): label ``k`` is ``category_ids[k - 1]``."""
        return sorted(c["id"] for c in self.categories)

    @property
    def class_names(self) -> list[str]:
        names = {c["id"]: c["name"] for c in self.categories}
        return [names[i] for i in self.category_ids]

    @property
    def classes(self) -> ClassSpec:
        """The labels as a model's :class:`~ssd.models.spec.ClassSpec`: names and ids in ascending id order."""
        return ClassSpec(tuple(self.class_names), tuple(self.category_ids))

    @property
    def label_of_category(self) -> dict[int, int]:
        """Category id -> label (1..K); 0 is background."""
        return {cid: label for label, cid in enumerate(self.category_ids, start=1)}

    def dataset(self) -> dict[str, list[dict[str, Any]]]:
        """The set as a COCO dict (``images``, ``annotations``, ``categories``), e.g. for ``pycocotools``."""
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}

    def to_coco(self) -> Any:
        """A ``pycocotools.coco.COCO`` over :meth:`dataset` (indexed; pycocotools' progress output silenced), with
        ``source`` and ``source_path`` attributes naming where it came from."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.dataset()
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        coco.source, coco.source_path = self.name, self.path
        return coco


def parse_annotations(source: str | os.PathLike[str] | Mapping[str, Any], *, require_annotations: bool = False,
                      require_size: bool = False, max_bytes: int | None = None,
                      name: str | None = None) -> CocoAnnotations:
    """A COCO annotation file (read with :func:`read_annotation_file`) or an already parsed dict, validated.

    Args:
        require_annotations: refuse a set without annotations (evaluation: nothing to score).
        require_size: every image must declare ``width`` and ``height`` (training clips boxes to them).
        max_bytes: the file size cap (default :data:`MAX_ANNOTATION_BYTES`).
        name: how messages (and ``CocoAnnotations.name``) name a dict source (default ``"annotations"``), e.g. the
            YOLO data file it was converted from.

    Raises:
        FileNotFoundError / IsADirectoryError / OSError: see :func:`read_annotation_file`.
        AnnotationFileError (ValueError): the file or an entry breaks a rule of the module docstring; the message
            names the file and the entry.
        TypeError: ``source`` is neither a path nor a dict.
    """
    if isinstance(source, Mapping):
        name, path, document = name or "annotations", None, source
    elif isinstance(source, (str, os.PathLike)):
        name, path = _source_name(source), os.fspath(source)
        document = read_annotation_file(source, max_bytes=max_bytes)
    else:
        raise TypeError(f"annotations: expected a path to a COCO JSON file or a dict, got {type(source).__name__}")
    lists = _top_level(document, name)
    if not lists["images"]:
        raise AnnotationFileError(f"{name}: expected at least one image, got an empty 'images' list")
    if require_annotations and not lists["annotations"]:
        raise AnnotationFileError(f"{name}: expected at least one annotation, got an empty 'annotations' list (an "
                                  "empty annotation set has nothing to evaluate)")
    if not lists["categories"]:
        raise AnnotationFileError(f"{name}: expected at least one category, got an empty 'categories' list")
    categories = _categories(lists["categories"], name)
    images = _images(lists["images"], name, require_size)
    annotations = _annotations(lists["annotations"], name, {i["id"] for i in images},
                               {c["id"] for c in categories})
    return CocoAnnotations(name, path, images, annotations, categories)


def _top_level(document: Any, name: str) -> dict[str, list]:
    if not isinstance(document, Mapping):
        raise AnnotationFileError(f"{name}: expected a COCO annotation object with 'images', 'annotations' and "
                                  f"'categories', got a JSON {_json_type(document)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            got = "nothing" if key not in document else f"a JSON {_json_type(document[key])}"
            raise AnnotationFileError(f"{name}: expected a list under {key!r}, got {got}")
    return {key: document[key] for key in ("images", "annotations", "categories")}


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _where(kind: str, index: int, entry: Any) -> str:
    """``annotations[3] (id 17)``: the entry as a message names it (its id when it has a usable one)."""
    entry_id = entry.get("id") if isinstance(entry, Mapping) else None
    return f"{kind}[{index}]" + (f" (id {entry_id})" if _is_id(entry_id) else "")


def _entry(kind: str, index: int, entry: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise AnnotationFileError(f"{name}: {kind}[{index}]: expected a JSON object, got a JSON {_json_type(entry)}")
    return entry


def _id_field(entry: Mapping[str, Any], key: str, where: str, name: str) -> int:
    value = entry.get(key)
    if not _is_id(value):
        got = "nothing" if key not in entry else repr(value)
        raise AnnotationFileError(f"{name}: {where}: expected {key!r} to be an integer in [0, 2**53), got {got}")
    return value


def _distinct(kind: str, entries: list[dict[str, Any]], name: str) -> None:
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        if "id" in entry:
            if entry["id"] in seen:
                raise AnnotationFileError(f"{name}: {kind}[{index}] (id {entry['id']}): expected distinct ids, got "
                                          f"id {entry['id']} twice")
            seen.add(entry["id"])


def _categories(entries: list, name: str) -> list[dict[str, Any]]:
    out = []
    for index, raw in enumerate(entries):
        entry = _entry("categories", index, raw, name)
        where = _where("categories", index, entry)
        category = {"id": _id_field(entry, "id", where, name)}
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise AnnotationFileError(f"{name}: {where}: expected a non-empty string 'name', "
                                      f"got {entry.get('name')!r}")
        category["name"] = entry["name"]
        if isinstance(entry.get("supercategory"), str):
            category["supercategory"] = entry["supercategory"]
        out.append(category)
    _distinct("categories", out, name)
    return out


def _images(entries: list, name: str, require_size: bool) -> list[dict[str, Any]]:
    out = []
    for index, raw in enumerate(entries):
        entry = _entry("images", index, raw, name)
        where = _where("images", index, entry)
        image = {"id": _id_field(entry, "id", where, name)}
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise AnnotationFileError(f"{name}: {where}: expected a non-empty string 'file_name', "
                                      f"got {entry.get('file_name')!r}")
        image["file_name"] = entry["file_name"]
        declared = [key for key in ("width", "height") if key in entry]
        if (require_size and len(declared) < 2) or len(declared) == 1:
            missing = " and ".join(repr(k) for k in ("width", "height") if k not in entry)
            raise AnnotationFileError(f"{name}: {where}: expected 'width' and 'height' (the upright picture's size), "
                                      f"got no {missing}")
        for key in declared:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnnotationFileError(f"{name}: {where}: expected {key!r} to be a positive integer, got {value!r}")
            image[key] = value
        out.append(image)
    _distinct("images", out, name)
    return out


def _annotations(entries: list, name: str, image_ids: set[int], category_ids: set[int]) -> list[dict[str, Any]]:
    out = []
    for index, raw in enumerate(entries):
        entry = _entry("annotations", index, raw, name)
        where = _where("annotations", index, entry)
        ann: dict[str, Any] = {}
        if "id" in entry:
            ann["id"] = _id_field(entry, "id", where, name)
        for key, known, kind in (("image_id", image_ids, "images"), ("category_id", category_ids, "categories")):
            value = _id_field(entry, key, where, name)
            if value not in known:
                raise AnnotationFileError(f"{name}: {where}: expected {key!r} to be the id of one of the {kind!r}, "
                                          f"got {value!r}")
            ann[key] = value
        bbox = entry.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise AnnotationFileError(f"{name}: {where}: expected a 'bbox' of 4 numbers [x, y, width, height] "
                                      f"(finite), got {bbox!r}")
        ann["bbox"] = [float(v) for v in bbox]
        crowd = entry.get("iscrowd", 0)
        if isinstance(crowd, bool) or not isinstance(crowd, int) or crowd not in (0, 1):
            # "0" is truthy: pycocotools and a plain `if` would both take it for a crowd and ignore the box.
            raise AnnotationFileError(f"{name}: {where}: expected 'iscrowd' to be 0 or 1, got {crowd!r}")
        ann["iscrowd"] = crowd
        area = entry.get("area")
        if area is not None and not (_is_number(area) and area >= 0):
            raise AnnotationFileError(f"{name}: {where}: expected 'area' to be a finite number >= 0, got {area!r}")
        # COCOeval reads the area (small/medium/large ranges); for a box-only truth COCO's own is the box area.
        ann["area"] = float(area) if area is not None else ann["bbox"][2] * ann["bbox"][3]
        out.append(ann)
    _distinct("annotations", out, name)
    # Missing ids get numbers no other annotation uses (COCOeval matches truths by id).
    next_id = max((a["id"] for a in out if "id" in a), default=0) + 1
    for ann in out:
        if "id" not in ann:
            ann["id"], next_id = next_id, next_id + 1
    return out


def check_image_size(declared: Mapping[str, Any], height: int, width: int, path: str | os.PathLike[str]) -> None:
    """The one rule for a decoded image against its annotation entry, in training and evaluation alike: a declared
    ``width`` x ``height`` must be the decoded picture's, with its EXIF orientation applied (the upright picture
    viewers show, which :func:`ssd.io.images.load_uint8` returns). Raises ValueError naming the file."""
    want_w, want_h = declared.get("width"), declared.get("height")
    if want_w is None or (want_h, want_w) == (height, width):
        return
    hint = ""
    if (want_h, want_w) == (width, height):
        hint = (" (width and height swapped: annotations must describe the upright picture, with the file's EXIF "
                "orientation applied)")
    raise ValueError(f"{os.fspath(path)}: expected a {want_w} x {want_h} image as the annotations say, got "
                     f"{width} x {height}{hint}")


# --------------------------------------------------------------------------------------------------------------
# The training dataset


class CocoDetectionDataset(Dataset):
    """Images and their boxes from a COCO-format detection annotation file.

    Args:
        annotation_file: the COCO ``instances``-style JSON (``images``, ``annotations``, ``categories``), validated
            by :func:`parse_annotations` (every image must declare its ``width`` and ``height``).
        image_dir: folder that ``file_name`` of each image is relative to.
        transform: optional callable ``(image HxWx3 uint8, boxes n x 4 pixel ltrb, labels) -> (image, boxes,
            labels)``, e.g. :class:`ssd.training.augment.SSDAugmentation` (which returns relative boxes).
        skip_bad_images: return None for an unreadable image, or one whose size is not the declared one, instead
            of raising (see :class:`DetectionCollate`).

    Items are ``(image, target)``: without a transform, ``image`` is a 3 x H x W uint8 tensor and ``target`` holds
    ``boxes`` (n x 4 float32, pixel ltrb), ``labels`` (n int64, contiguous 1..K in the order of the sorted category
    ids, 0 being background), ``image_id`` (int) and ``size`` ((H, W) of the upright picture). With a transform,
    image, boxes and labels are what it returns.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike[str],
        image_dir: str | os.PathLike[str],
        transform: Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.annotation_file = pathlib.Path(annotation_file)
        self.image_dir = pathlib.Path(image_dir)
        if not self.image_dir.is_dir():
            raise NotADirectoryError(f"image_dir: expected a folder, got {str(self.image_dir)!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable or None, got {type(transform).__name__}")
        self.transform = transform
        self.skip_bad_images = bool(skip_bad_images)
        self.stats: dict[str, int] = {
            "images": 0,
            "annotations": 0,
            "boxes": 0,
            "empty_dropped": 0,
            "clipped": 0,
            "outside_dropped": 0,
            "crowd_ignored": 0,
            "images_without_boxes": 0,
        }
        parsed = parse_annotations(self.annotation_file, require_size=True)
        self.classes: ClassSpec = parsed.classes
        self.category_ids: list[int] = list(self.classes.category_ids)
        self.class_names: list[str] = list(self.classes.names)
        # Label 0 is background, so the model needs len(category_ids) + 1 classes.
        self.label_of_category: dict[int, int] = parsed.label_of_category
        self._records = self._boxes(parsed)

    def _boxes(self, parsed: CocoAnnotations) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
        """Per image (by ascending id): its entry, its training boxes (pixel ltrb) and labels, counted in stats."""
        images = {image["id"]: image for image in parsed.images}
        boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
        labels: dict[int, list[int]] = {image_id: [] for image_id in images}
        for ann in parsed.annotations:
            self.stats["annotations"] += 1
            if ann["iscrowd"]:
                self.stats["crowd_ignored"] += 1
                continue
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0:
                self.stats["empty_dropped"] += 1
                continue
            image = images[ann["image_id"]]
            width, height = float(image["width"]), float(image["height"])
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if box != [x, y, x + w, y + h]:
                if box[2] <= box[0] or box[3] <= box[1]:
                    self.stats["outside_dropped"] += 1
                    continue
                self.stats["clipped"] += 1
            boxes[ann["image_id"]].append(box)
            labels[ann["image_id"]].append(self.label_of_category[ann["category_id"]])

        # Sorted by id so that the order (and hence any sampler's order) does not depend on the file's order.
        records = []
        for image_id in sorted(images):
            box_array = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)
            label_array = np.asarray(labels[image_id], dtype=np.int64)
            if len(label_array) == 0:
                self.stats["images_without_boxes"] += 1
            self.stats["boxes"] += len(label_array)
            records.append((images[image_id], box_array, label_array))
        self.stats["images"] = len(records)
        return records

    @property
    def num_classes(self) -> int:
        """Classes the model must score: the categories plus background."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, index: int) -> pathlib.Path:
        return self.image_dir / self._records[index][0]["file_name"]

    def _pixels(self, index: int) -> np.ndarray:
        """The upright H x W x 3 uint8 picture, as detect and evaluate see it (EXIF orientation applied, 16-bit and
        float sources rounded to 8 bits); ImageLoadError, OSError or ValueError naming the file otherwise."""
        path = self.image_path(index)
        pixels, _ = load_uint8(path)
        check_image_size(self._records[index][0], pixels.shape[0], pixels.shape[1], path)
        return pixels

    def _item(self, index: int, pixels: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        image, box_array, label_array = self._records[index]
        boxes = torch.from_numpy(box_array.copy())
        labels = torch.from_numpy(label_array.copy())
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.transform is not None:
            pixels, boxes, labels = self.transform(pixels, boxes, labels)
        else:
            pixels = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
        return pixels, {"boxes": boxes, "labels": labels, "image_id": image["id"], "size": size}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        try:
            pixels = self._pixels(index)
        except (ImageLoadError, OSError, ValueError):
            if self.skip_bad_images:
                return None
            raise
        return self._item(index, pixels)

    def load_item(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | BadImage:
        """``dataset[index]``, or a :class:`BadImage` for an image that cannot be used, whatever
        ``skip_bad_images`` says: the caller decides (the training loop skips and reports it, or stops with one
        line naming the file)."""
        try:
            pixels = self._pixels(index)
        except (ImageLoadError, OSError, ValueError) as exc:
            path = str(self.image_path(index))
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return BadImage(path, reason if reason.startswith(path) else f"{path}: {reason}")
        return self._item(index, pixels)

    def missing_images(self) -> list[str]:
        """The ``file_name`` of every listed image that is not a regular file in ``image_dir`` (a cheap check of the
        whole set before training; decoding errors show only when an image is read)."""
        return [image["file_name"] for index, (image, _, _) in enumerate(self._records)
                if not self.image_path(index).is_file()]


class DetectionCollate:
    """Batches ``(image, target)`` items into ``(images N x 3 x H x W, [targets])``, dropping None items.

    ``skipped`` counts the dropped items seen by this instance. With a DataLoader using worker processes, each worker
    has its own copy, so a training loop should rather compare ``len(targets)`` with the batch size it asked for.
    A batch whose items were all dropped comes out as None.
    """

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, dict[str, Any]] | None]
    ) -> tuple[torch.Tensor, list[dict[str, Any]]] | None:
        items = [item for item in batch if item is not None]
        self.skipped += len(batch) - len(items)
        if not items:
            return None
        return torch.stack([image for image, _ in items]), [target for _, target in items]
