"""The result type of ``detect``: what the model found in one image, in that image's pixels."""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.coco import COCO_CATEGORY_IDS, COCO_NAMES
from .drawing import draw_boxes, save_figure_of

__all__ = ["Detections"]


@dataclass(eq=False)
class Detections:
    """What the model found in one image, highest score first.

    Attributes:
        boxes: N x 4 float32, (x1, y1, x2, y2) in the original image's pixels, clipped to the image.
        scores: N float32 confidences in (threshold, 1].
        labels: N int64 model labels in 1..K (``names`` gives the class names).
        image_size: (height, width) of the original image.
        source: a short description of the input (its path or URL, or the kind of object).
        class_names, category_ids: the model's classes (label ``k`` is ``class_names[k - 1]``); COCO's by default.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image_size: tuple[int, int]
    source: str = ""
    image: np.ndarray | None = field(default=None, repr=False)
    class_names: tuple[str, ...] = field(default=COCO_NAMES, repr=False)
    class_category_ids: tuple[int, ...] = field(default=COCO_CATEGORY_IDS, repr=False)

    @property
    def names(self) -> list[str]:
        return [self.class_names[int(label) - 1] for label in self.labels]

    @property
    def category_ids(self) -> list[int]:
        """Dataset category ids of the detections (COCO's 1..90 with gaps for COCO models)."""
        return [self.class_category_ids[int(label) - 1] for label in self.labels]

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        height, width = self.image_size
        found = ", ".join(f"{name} {score:.2f}" for name, score in zip(self.names[:6], self.scores[:6]))
        more = f", ... (+{len(self) - 6})" if len(self) > 6 else ""
        noun = "object" if len(self) == 1 else "objects"
        listing = f": {found}{more}" if found else ""
        return f"Detections({self.source or 'image'} {width}x{height}: {len(self)} {noun}{listing})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each detection's name, category id, score, and box as [x1, y1, x2, y2] and
        COCO-style ``bbox`` [x, y, width, height], in pixels."""
        detections = []
        for box, score, label, name, cat in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(),
                                                self.names, self.category_ids):
            x1, y1, x2, y2 = (round(v, 2) for v in box)
            detections.append({"name": name, "label": label, "category_id": cat, "score": round(score, 4),
                               "box": [x1, y1, x2, y2], "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]})
        height, width = self.image_size
        return {"source": self.source, "height": height, "width": width, "detections": detections}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def captions(self) -> list[str]:
        return [f"{name} {score:.0%}" for name, score in zip(self.names, self.scores)]

    def _picture(self) -> np.ndarray:
        if self.image is None:
            raise ValueError("these detections were made without keeping the image; pass keep_images=True")
        return self.image

    def plot(self, ax=None):
        """Draw the image with its labelled boxes on ``ax`` (a new figure when None); returns the axes."""
        if ax is None:
            from matplotlib import pyplot as plt

            height, width = self.image_size
            _, ax = plt.subplots(figsize=(8, 8 * height / max(width, 1)))
        return draw_boxes(ax, self._picture(), self.boxes, self.labels.tolist(), self.captions())

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the annotated picture (format from the suffix, e.g. .png or .jpg; no suffix means .png, appended) at
        the image's resolution, atomically; returns the path actually written (``save('pic')`` gives ``pic.png``)."""
        return save_figure_of(self._picture(), self.boxes, self.labels.tolist(), self.captions(), path)
