"""The data checks ``ssd train`` runs before its first iteration, and their one-line summaries.

Training set: the annotation file is parsed and validated when the dataset is built
(:class:`ssd.data.coco_format.CocoDetectionDataset`), which counts what it does with imperfect boxes; here every
listed image must be a file (a missing one stops the run before it starts, or with ``skip_bad_images`` is skipped
and counted). Decoding errors show only when an image is read, during training.

Validation set: read as evaluation reads it (:func:`ssd.evaluation.load_annotations`), its categories mapped to the
model's classes as evaluation maps them (:func:`ssd.evaluation.category_map`: a category the model does not know is
an error), its images looked up (:class:`ssd.evaluation.CocoImages`: a missing one is an error). So a bad validation
set stops the run before the first epoch instead of after it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..data.coco_format import CocoDetectionDataset
from ..models.spec import ClassSpec

__all__ = ["ValidationSet", "check_training_images", "load_validation_set", "training_summary"]

_EXAMPLES = 5  # how many file names a message lists before "... and N more"


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (f" ... and {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else "")


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def check_training_images(dataset: CocoDetectionDataset, skip_bad_images: bool) -> list[str]:
    """The ``file_name`` of every listed training image that is not a file; FileNotFoundError naming the folder and
    some of them unless ``skip_bad_images`` (then they are skipped, and reported, as unreadable images are)."""
    missing = dataset.missing_images()
    if missing and not skip_bad_images:
        raise FileNotFoundError(
            f"images {str(dataset.image_dir)!r}: expected every image the annotations list, got {len(missing)} of "
            f"{len(dataset)} missing: {_some(missing)} (skip_bad_images / --skip-bad-images trains without them)")
    return missing


def training_summary(dataset: CocoDetectionDataset, missing: list[str]) -> str:
    """One line: images, boxes, what was dropped and why, crowd boxes, images without boxes, missing files."""
    stats = dataset.stats
    classes = _plural(len(dataset.class_names), "class", "classes")
    parts = [f"training data: {_plural(stats['images'], 'image')} ({stats['images_without_boxes']} without boxes, "
             f"trained as background), {_plural(stats['boxes'], 'box', 'boxes')} of {classes}"]
    dropped = stats["empty_dropped"] + stats["outside_dropped"]
    parts.append(f"{dropped} dropped ({stats['empty_dropped']} of no width or height, {stats['outside_dropped']} "
                 f"outside their image)")
    parts.append(f"{stats['clipped']} clipped to their image")
    parts.append(f"{_plural(stats['crowd_ignored'], 'crowd box', 'crowd boxes')} not trained on")
    if missing:
        parts.append(f"{_plural(len(missing), 'image file')} missing, skipped: {_some(missing)}")
    return "; ".join(parts)


@dataclass(frozen=True)
class ValidationSet:
    """A checked validation set: the ``COCO`` object evaluation scores against, its image folder, the number of
    images evaluated (those with annotations) and a one-line summary."""

    coco: Any
    images: str | os.PathLike[str]
    count: int
    summary: str


def load_validation_set(annotations: str | os.PathLike[str], images: str | os.PathLike[str],
                        classes: ClassSpec) -> ValidationSet:
    """Read and check a validation set for a model of ``classes`` (see the module docstring).

    Raises:
        ImportError: ssd.evaluation or pycocotools is not installed (the message says what to install).
        FileNotFoundError / AnnotationFileError (ValueError): missing files, a bad annotation file, categories the
            model does not know, no image with annotations; each message names the file.
    """
    try:
        from ..evaluation import CocoImages, category_map, load_annotations

        coco = load_annotations(annotations)
    except ImportError as exc:
        raise ImportError(f"val_annotations: validation needs ssd.evaluation and pycocotools (pip install "
                          f"'.[eval]'), which this installation lacks ({exc})") from None
    categories = coco.dataset["categories"]
    mapping = category_map(classes, categories, coco.source)
    found = CocoImages(images, coco)  # every image with annotations must be there
    if len(found) == 0:
        raise ValueError(f"{coco.source}: expected at least one image with annotations to validate on, got none")
    boxes = coco.dataset["annotations"]
    crowd = sum(1 for a in boxes if a.get("iscrowd"))
    by_id = all(classes.category_ids[label - 1] == cid for label, cid in mapping.items())
    unmatched = [name for label, name in enumerate(classes.names, start=1) if label not in mapping]
    how = "id" if by_id else "name"
    summary = (f"validation data: {_plural(len(coco.dataset['images']), 'image')} ({len(found)} with boxes, "
               f"evaluated), {_plural(len(boxes), 'box', 'boxes')} ({crowd} crowd); its "
               f"{_plural(len(categories), 'category', 'categories')} match the model's classes by {how}")
    if unmatched:
        summary += f"; classes without validation boxes (not scored): {_some(unmatched)}"
    return ValidationSet(coco, images, len(found), summary)
