"""A synthetic detection set of big, high-contrast shapes on noisy backgrounds, written in COCO format.

Meant for smoke tests and overfitting checks: a detector learns it within a few dozen iterations. Each image has
1 to 4 shapes; each class has its own colour family, so both shape and colour identify the class. The output is
deterministic for a given seed (and Pillow's JPEG encoder).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import torch

from ..boxes import box_iou
from ..io.files import atomic_open

__all__ = ["SHAPES", "make_shapes_dataset"]

# The shapes the maker can draw, with a saturated base colour for each (RGB).
SHAPES: dict[str, tuple[int, int, int]] = {
    "circle": (230, 40, 40),
    "square": (40, 200, 60),
    "triangle": (50, 90, 235),
    "diamond": (240, 200, 30),
}
_MAX_OVERLAP = 0.1  # IoU allowed between two shapes of one image, so every shape stays visible


def _check_size_spec(value: object, name: str) -> tuple[int, int]:
    """An int or an inclusive (low, high) pair -> (low, high)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        low = high = int(value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        low, high = int(value[0]), int(value[1])
    else:
        raise TypeError(f"{name}: expected an int or a (low, high) pair of ints, got {value!r}")
    if not 32 <= low <= high:
        raise ValueError(f"{name}: expected 32 <= low <= high pixels, got {value!r}")
    return low, high


def _polygon(kind: str, left: float, top: float, size: float) -> list[tuple[float, float]]:
    if kind == "square":
        return [(left, top), (left + size, top), (left + size, top + size), (left, top + size)]
    if kind == "triangle":
        return [(left + size / 2, top), (left + size, top + size), (left, top + size)]
    if kind == "diamond":
        half = size / 2
        return [(left + half, top), (left + size, top + half), (left + half, top + size), (left, top + half)]
    raise ValueError(f"kind: expected a polygon shape, got {kind!r}")


def _shape_area(kind: str, size: float) -> float:
    return {"circle": math.pi * size * size / 4, "square": size * size}.get(kind, size * size / 2)


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    """Whether ``box`` overlaps any of ``others`` by more than the allowed IoU (in float64, like Python floats)."""
    ious = box_iou(torch.tensor([box], dtype=torch.float64), torch.tensor(others, dtype=torch.float64).reshape(-1, 4))
    return bool((ious > _MAX_OVERLAP).any())


def _render(
    rng: np.random.Generator, height: int, width: int, classes: Sequence[str]
) -> tuple[np.ndarray, list[tuple[int, tuple[float, float, float, float], float]]]:
    from PIL import Image, ImageDraw

    # A greyish, noisy background: the saturated shapes stand out by colour, contrast and edges.
    base = int(rng.integers(70, 150)) + rng.integers(-20, 21, size=3)
    pixels = base + rng.normal(0.0, 18.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects: list[tuple[int, tuple[float, float, float, float], float]] = []
    short = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            size = float(rng.uniform(0.25, 0.55) * short)
            left = float(rng.uniform(0, width - size))
            top = float(rng.uniform(0, height - size))
            box = (left, top, left + size, top + size)
            if not _overlaps(box, [other for _, other, _ in objects]):
                break
        else:
            continue
        class_index = int(rng.integers(len(classes)))
        kind = classes[class_index]
        colour = tuple(int(c) for c in np.clip(np.array(SHAPES[kind]) + rng.integers(-25, 26, size=3), 0, 255))
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon(_polygon(kind, left, top, size), fill=colour)
        objects.append((class_index, box, _shape_area(kind, size)))
    return np.asarray(image), objects


def make_shapes_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int,
    image_size: int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = (300, 300),
    classes: Sequence[str] = ("circle", "square", "triangle"),
    seed: int = 0,
) -> pathlib.Path:
    """Write ``num_images`` JPEGs to ``out_dir/images`` and their COCO annotations to ``out_dir/annotations.json``.

    Args:
        out_dir: created if missing; existing files of the same names are replaced.
        num_images: how many images (>= 1).
        image_size: ``(H, W)``; each of H and W may be an int or an inclusive ``(low, high)`` range drawn per image;
            a single int is a square size. At least 32 pixels.
        classes: shape names from :data:`SHAPES`, distinct; category ids are 1..K in this order.
        seed: the same seed writes the same files.

    Returns:
        The path of ``annotations.json``. Its ``bbox`` entries are ``[x, y, w, h]`` in pixels, ``area`` is the
        shape's own area, ``iscrowd`` is 0.
    """
    from PIL import Image

    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise TypeError(f"image_size: expected (H, W), got {image_size!r}")
    heights = _check_size_spec(image_size[0], "image_size[0]")
    widths = _check_size_spec(image_size[1], "image_size[1]")
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
        raise TypeError(f"classes: expected a non-empty sequence of shape names, got {classes!r}")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"classes: expected names from {sorted(SHAPES)}, got {unknown}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: expected distinct names, got {list(classes)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")

    root = pathlib.Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(seed))
    images, annotations = [], []
    for index in range(int(num_images)):
        height = int(rng.integers(heights[0], heights[1] + 1))
        width = int(rng.integers(widths[0], widths[1] + 1))
        pixels, objects = _render(rng, height, width, classes)
        file_name = f"{index:06d}.jpg"
        with atomic_open(image_dir / file_name) as out:
            Image.fromarray(pixels).save(out, format="JPEG", quality=95)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for class_index, (left, top, right, bottom), area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": [round(left, 2), round(top, 2), round(right - left, 2), round(bottom - top, 2)],
                    "area": round(area, 2),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    annotation_file = root / "annotations.json"
    with atomic_open(annotation_file) as out:
        out.write(json.dumps(document, indent=1, allow_nan=False).encode())
    return annotation_file
