"""A training dataset over a COCO-format annotation file and its image folder.

How imperfect annotations are handled (each case is counted in ``dataset.stats``):

* ``empty_dropped``: boxes of zero or negative width or height are dropped.
* ``clipped``: boxes reaching outside the image (as declared by the image's ``width``/``height``) are clipped to it;
  ``outside_dropped``: boxes with nothing left inside the image after clipping are dropped.
* ``crowd_ignored``: crowd annotations (``iscrowd`` = 1) are not used for training (SSD has no "ignore" label, and
  matching to a crowd region would teach a wrong box).
* ``images_without_boxes``: images with no usable annotation are kept as all-background examples, which teaches the
  detector what not to detect (COCO's own training sets contain such images).

Structural errors raise ``AnnotationFileError`` (a ``ValueError``) naming the file: a missing or unreadable file,
invalid JSON, missing keys, duplicate ids, an annotation referencing an unknown image or a category id not listed in
``categories``. A corrupt image file makes ``__getitem__`` raise :class:`ssd.images.ImageLoadError`, unless the
dataset was built with ``skip_bad_images=True``: then it returns None, which :class:`DetectionCollate` drops.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.images import ImageLoadError, load_rgb

__all__ = ["AnnotationFileError", "CocoDetectionDataset", "DetectionCollate"]

Transform = Callable[[np.ndarray, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class AnnotationFileError(ValueError):
    """A COCO annotation file that cannot be used; the message names the file."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise AnnotationFileError(f"{path}: annotation file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationFileError(f"{path}: cannot read the annotation file: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationFileError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise AnnotationFileError(f"{path}: expected a JSON object at the top level, got {type(document).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise AnnotationFileError(f"{path}: expected a list under {key!r}, got {type(document.get(key)).__name__}")
    return document


class CocoDetectionDataset(Dataset):
    """Images and their boxes from a COCO-format detection annotation file.

    Args:
        annotation_file: the COCO ``instances``-style JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder that ``file_name`` of each image is relative to.
        transform: optional callable ``(image HxWx3 uint8, boxes n x 4 pixel ltrb, labels) -> (image, boxes,
            labels)``, e.g. :class:`ssd.training.augment.SSDAugmentation` (which returns relative boxes).
        skip_bad_images: return None for an unreadable image instead of raising (see :class:`DetectionCollate`).

    Items are ``(image, target)``: without a transform, ``image`` is a 3 x H x W uint8 tensor and ``target`` holds
    ``boxes`` (n x 4 float32, pixel ltrb), ``labels`` (n int64, contiguous 1..K in the order of the sorted category
    ids, 0 being background), ``image_id`` (int) and ``size`` ((H, W) of the file). With a transform, image,
    boxes and labels are what it returns.
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
        self._parse(_read_json(self.annotation_file))

    def _fail(self, message: str) -> AnnotationFileError:
        return AnnotationFileError(f"{self.annotation_file}: {message}")

    def _parse(self, document: dict[str, Any]) -> None:
        names: dict[int, str] = {}
        for entry in document["categories"]:
            if not isinstance(entry, dict) or not _is_id(entry.get("id")):
                raise self._fail(f"expected each category to have an integer 'id', got {entry!r}")
            if entry["id"] in names:
                raise self._fail(f"duplicate category id {entry['id']}")
            names[entry["id"]] = str(entry.get("name", entry["id"]))
        if not names:
            raise self._fail("expected at least one category, got none")
        self.category_ids: list[int] = sorted(names)
        self.class_names: list[str] = [names[i] for i in self.category_ids]
        # Label 0 is background, so the model needs len(category_ids) + 1 classes.
        self.label_of_category: dict[int, int] = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

        images: dict[int, dict[str, Any]] = {}
        for entry in document["images"]:
            if not isinstance(entry, dict) or not _is_id(entry.get("id")):
                raise self._fail(f"expected each image to have an integer 'id', got {entry!r}")
            if not isinstance(entry.get("file_name"), str):
                raise self._fail(f"image {entry['id']}: expected a string 'file_name', got {entry.get('file_name')!r}")
            for key in ("width", "height"):
                if not (_is_number(entry.get(key)) and entry[key] > 0):
                    raise self._fail(f"image {entry['id']}: expected a positive {key!r}, got {entry.get(key)!r}")
            if entry["id"] in images:
                raise self._fail(f"duplicate image id {entry['id']}")
            images[entry["id"]] = entry

        boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
        labels: dict[int, list[int]] = {image_id: [] for image_id in images}
        for entry in document["annotations"]:
            self.stats["annotations"] += 1
            if not isinstance(entry, dict):
                raise self._fail(f"expected each annotation to be an object, got {entry!r}")
            image_id, category_id = entry.get("image_id"), entry.get("category_id")
            if image_id not in images:
                raise self._fail(f"annotation {entry.get('id')!r} refers to unknown image id {image_id!r}")
            if category_id not in self.label_of_category:
                raise self._fail(
                    f"annotation {entry.get('id')!r} has category id {category_id!r}, which is not in 'categories'"
                )
            bbox = entry.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise self._fail(f"annotation {entry.get('id')!r}: expected 'bbox' [x, y, w, h] numbers, got {bbox!r}")
            if entry.get("iscrowd", 0):
                self.stats["crowd_ignored"] += 1
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                self.stats["empty_dropped"] += 1
                continue
            width, height = float(images[image_id]["width"]), float(images[image_id]["height"])
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if box != [x, y, x + w, y + h]:
                if box[2] <= box[0] or box[3] <= box[1]:
                    self.stats["outside_dropped"] += 1
                    continue
                self.stats["clipped"] += 1
            boxes[image_id].append(box)
            labels[image_id].append(self.label_of_category[category_id])

        # Sorted by id so that the order (and hence any sampler's order) does not depend on the file's order.
        self._records: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        for image_id in sorted(images):
            box_array = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)
            label_array = np.asarray(labels[image_id], dtype=np.int64)
            if len(label_array) == 0:
                self.stats["images_without_boxes"] += 1
            self.stats["boxes"] += len(label_array)
            self._records.append((image_id, images[image_id]["file_name"], box_array, label_array))
        self.stats["images"] = len(self._records)

    @property
    def num_classes(self) -> int:
        """Classes the model must score: the categories plus background."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, index: int) -> pathlib.Path:
        return self.image_dir / self._records[index][1]

    def _load(self, path: pathlib.Path) -> np.ndarray:
        pixels = load_rgb(path)
        if pixels.dtype != np.uint8:
            # 16-bit and float sources come back as float in [0, 1]; training works on 8-bit images.
            pixels = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
        return pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        image_id, _, box_array, label_array = self._records[index]
        path = self.image_path(index)
        try:
            pixels = self._load(path)
        except (ImageLoadError, OSError):
            if self.skip_bad_images:
                return None
            raise
        boxes = torch.from_numpy(box_array.copy())
        labels = torch.from_numpy(label_array.copy())
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.transform is not None:
            image, boxes, labels = self.transform(pixels, boxes, labels)
        else:
            image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
        return image, {"boxes": boxes, "labels": labels, "image_id": image_id, "size": size}


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
