"""The result types of ``detect``: what the model found in one image (``Detections``, in that image's pixels), and
the list of them with timings and batch-wide exports (``DetectionBatch``)."""
from __future__ import annotations

import json
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.coco import COCO_CATEGORY_IDS, COCO_NAMES
from ..io.files import UniqueNames, atomic_open
from .drawing import draw_boxes, render, save_picture

if TYPE_CHECKING:
    import pandas
    from PIL import Image

__all__ = ["DetectionBatch", "Detections", "StageTimes"]


@dataclass(eq=False)
class Detections:
    """What the model found in one image, highest score first.

    Attributes:
        boxes: N x 4 float32, (x1, y1, x2, y2) in the original image's pixels, clipped to the image.
        scores: N float32 confidences in (threshold, 1].
        labels: N int64 model labels in 1..K: 1-based, 0 being the background, which is never a detection
            (label ``k`` is ``class_names[k - 1]``; ``names`` gives each detection's class name).
        image_size: (height, width) of the original image.
        source: a short description of the input (its path or URL, or the kind of object).
        class_names, category_ids: the model's classes (label ``k`` is ``class_names[k - 1]``); COCO's by default.
        speed: this image's own milliseconds per stage, ``{'preprocess', 'inference', 'postprocess'}``. Images of
            one batch share the forward pass (and the batch-wide part of post-processing): each is billed that
            batch time divided by the number of images in the batch, plus the time spent on it alone. Summed over
            the images, the shares give the batches' total.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image_size: tuple[int, int]
    source: str = ""
    image: np.ndarray | None = field(default=None, repr=False)
    class_names: tuple[str, ...] = field(default=COCO_NAMES, repr=False)
    class_category_ids: tuple[int, ...] = field(default=COCO_CATEGORY_IDS, repr=False)
    speed: dict[str, float] = field(default_factory=dict, repr=False)

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

    def render(self) -> Image.Image:
        """The annotated picture, as a PIL image at the image's resolution."""
        return render(self._picture(), self.boxes, self.labels.tolist(), self.captions())

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the annotated picture at the image's resolution, atomically; returns the path actually written.

        The suffix picks the format: .jpg/.jpeg JPEG (quality 90), .png PNG, others Pillow writes (.bmp, .webp...)
        as such; without a suffix, or with one Pillow cannot write, PNG with ``.png`` appended.
        """
        return save_picture(self.render(), path)

    def save_crops(self, folder: str | os.PathLike[str], name: str | os.PathLike[str],
                   unique: UniqueNames | None = None) -> list[pathlib.Path]:
        """Write each detected object's pixels (the whole pixels covering its box, at the image's resolution) as its
        own picture ``folder/CLASS/STEM-K.SUFFIX``: one subfolder per class name, ``name``'s folders and stem, K the
        object's rank in this image (0 = best score), ``name``'s suffix picking the format as in :meth:`save`.
        ``unique``, shared across images, keeps names distinct. Returns the paths written, best first."""
        from PIL import Image

        name = pathlib.PurePosixPath(pathlib.PurePath(name).as_posix())
        pixels = self._picture()
        height, width = pixels.shape[:2]
        written = []
        for rank, (box, class_name) in enumerate(zip(self.boxes, self.names)):
            if not np.isfinite(box).all():
                continue
            # Whole pixels covering the box, at least one, inside the image.
            x1 = min(max(int(np.floor(min(box[0], box[2]))), 0), width - 1)
            y1 = min(max(int(np.floor(min(box[1], box[3]))), 0), height - 1)
            x2 = max(min(int(np.ceil(max(box[0], box[2]))), width), x1 + 1)
            y2 = max(min(int(np.ceil(max(box[1], box[3]))), height), y1 + 1)
            relative = pathlib.PurePosixPath(_folder_name(class_name), name.parent, f"{name.stem}-{rank}{name.suffix}")
            if unique is not None:
                relative = unique.claim(relative)
            written.append(save_picture(Image.fromarray(np.ascontiguousarray(pixels[y1:y2, x1:x2])),
                                        pathlib.Path(folder) / relative))
        return written

    def to_yolo_txt(self, scores: bool = True) -> str:
        """The detections as a YOLO label file: one line ``class cx cy w h [score]`` per object, best first.

        ``class`` is the 0-based index into the model's class list, that is ``label - 1`` (YOLO counts classes from
        0 and has no background; ``class_names[class]`` names it). ``cx cy w h`` are the box's centre and size
        divided by the image's width and height (0..1), with 6 decimals; ``score`` (with ``scores``) 4 decimals.
        """
        height, width = self.image_size
        lines = []
        for (x1, y1, x2, y2), score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            fields = [f"{(x1 + x2) / 2 / width:.6f}", f"{(y1 + y2) / 2 / height:.6f}", f"{(x2 - x1) / width:.6f}",
                      f"{(y2 - y1) / height:.6f}"]
            lines.append(" ".join([str(int(label) - 1), *fields, *([f"{score:.4f}"] if scores else [])]) + "\n")
        return "".join(lines)

    def save_txt(self, path: str | os.PathLike[str], scores: bool = True) -> pathlib.Path:
        """Write :meth:`to_yolo_txt` to ``path`` atomically (an image with no object gets an empty file, as YOLO's
        tools expect); its folder is created if needed. Returns the path."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w", encoding="utf-8") as out:
            out.write(self.to_yolo_txt(scores))
        return path


@dataclass
class StageTimes:
    """Seconds spent in each stage of ``detect`` over ``images`` images (whole batches, summed).

    preprocess: tensors to the network input (resize, normalize, to the device); inference: the forward pass (on
    CUDA, synchronized, so it is the GPU's time); postprocess: decoding, NMS and building the results. Loading and
    decoding image files runs in background threads, overlapped with these, and is not counted.
    """

    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    images: int = 0

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {stage: 1000.0 * getattr(self, stage) / n for stage in ("preprocess", "inference", "postprocess")}


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_KEPT_SUFFIXES = (".jpg", ".jpeg", ".png")
_STEM_LIMIT = 100  # bytes of an input's name kept in its picture's name; file systems allow 255 bytes


def picture_name(source: str, fallback: str) -> pathlib.PurePosixPath:
    """A file name for the picture of ``source``: its own name when it is a path or URL, keeping a JPEG or PNG
    suffix (other formats become .png); ``fallback`` (without suffix) for arrays, bytes and other nameless inputs."""
    if not source or source.startswith("<"):  # describe_source's '<numpy array ...>' and the like
        return pathlib.PurePosixPath(f"{fallback}.png")
    if _URL.match(source):
        source = source.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    name = pathlib.PurePath(source).name
    stem, suffix = pathlib.PurePath(name).stem, pathlib.PurePath(name).suffix
    # Long input names would make "<stem>-<n>.png" longer than a file name may be (255 bytes, not characters).
    stem = stem.encode("utf-8", "surrogateescape")[:_STEM_LIMIT].decode("utf-8", "ignore")
    if not stem or stem in (".", ".."):
        stem = fallback
    return pathlib.PurePosixPath(stem + (suffix if suffix.lower() in _KEPT_SUFFIXES else ".png"))


def _folder_name(name: str) -> str:
    # Class names become folder names: no separators, nothing hidden, nothing empty.
    cleaned = re.sub(r"[\\/\0]", "_", name).strip().lstrip(".")
    return cleaned or "unnamed"


def _speed_text(speed: dict[str, float]) -> str:
    return "(" + ", ".join(f"{speed[stage]:.1f} ms {stage}" for stage in ("preprocess", "inference", "postprocess")
                           if stage in speed) + ")"


class DetectionBatch(list):
    """What ``detect`` returns: a list of :class:`Detections`, one per image in input order, plus timings.

    Being a list, it indexes, unpacks and iterates as before; on top of that: ``times`` (milliseconds per image
    for preprocess, inference and postprocess), ``print()``, ``show()``, ``save(folder)``, ``crop(folder)``,
    ``pandas()`` and ``to_coco()``.
    """

    def __init__(self, items: Any = (), stage_times: StageTimes | None = None) -> None:
        super().__init__(items)
        self.stage_times = stage_times if stage_times is not None else StageTimes(images=len(self))

    @property
    def times(self) -> dict[str, float]:
        """Milliseconds per image: ``{'preprocess': ..., 'inference': ..., 'postprocess': ...}``."""
        return self.stage_times.per_image_ms()

    def __str__(self) -> str:
        # Like YOLOv5's results.print(): a line per image with its own times, then the averages.
        lines = [f"image {i}/{len(self)}: {found!r}" + (f" {_speed_text(found.speed)}" if found.speed else "")
                 for i, found in enumerate(self, 1)]
        speed = ", ".join(f"{ms:.1f} ms {stage}" for stage, ms in self.times.items())
        lines.append(f"Speed: {speed} per image ({len(self)} image{'s' if len(self) != 1 else ''})")
        return "\n".join(lines)

    def print(self) -> None:
        """Print one line per image (its detections and its own times, see :attr:`Detections.speed`), then the
        times per image over the whole call."""
        print(str(self))

    def show(self) -> None:
        """Show each annotated image with matplotlib (inline in notebooks)."""
        from matplotlib import pyplot as plt

        for found in self:
            found.plot()
            plt.show()

    def _names(self) -> list[pathlib.PurePosixPath]:
        unique = UniqueNames()
        return [unique.claim(picture_name(found.source, f"image{i}")) for i, found in enumerate(self)]

    def save(self, folder: str | os.PathLike[str]) -> list[pathlib.Path]:
        """Write one annotated picture per image into ``folder`` (created if needed), named after its input and in
        its format (JPEG stays JPEG, PNG stays PNG, the rest becomes PNG; nameless inputs are ``image<i>.png``);
        returns the paths written, in input order."""
        folder = pathlib.Path(folder)
        return [found.save(folder / name) for found, name in zip(self, self._names())]

    def crop(self, folder: str | os.PathLike[str]) -> list[pathlib.Path]:
        """Write each detected object's pixels as its own picture, in one subfolder per class name
        (``folder/person/astronaut-0.png``: image name, then the object's rank in its image); returns the paths."""
        unique = UniqueNames()
        return [path for found, name in zip(self, self._names()) for path in found.save_crops(folder, name, unique)]

    def pandas(self) -> pandas.DataFrame:
        """One row per detection: image (its index), source, xmin, ymin, xmax, ymax (pixels), confidence, class
        (the model's label), name, category_id. Needs pandas (``pip install pandas``)."""
        try:
            import pandas
        except ImportError as exc:
            raise ImportError("DetectionBatch.pandas: expected pandas to be installed, got none "
                              "(pip install pandas)") from exc
        columns = ("image", "source", "xmin", "ymin", "xmax", "ymax", "confidence", "class", "name", "category_id")
        rows = [
            (i, found.source, *box, score, label, name, category)
            for i, found in enumerate(self)
            for box, score, label, name, category in zip(found.boxes.tolist(), found.scores.tolist(),
                                                          found.labels.tolist(), found.names, found.category_ids)
        ]
        frame = pandas.DataFrame(rows, columns=list(columns))
        # An empty frame would otherwise have object columns; keep the types of a full one.
        return frame.astype({"image": "int64", "xmin": "float32", "ymin": "float32", "xmax": "float32",
                             "ymax": "float32", "confidence": "float32", "class": "int64", "category_id": "int64"})

    def to_coco(self, image_ids: Any = None) -> list[dict[str, Any]]:
        """Detections as a flat COCO results list: ``{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}``.

        ``image_ids``: one id per image (e.g. the COCO image ids of the inputs); by default the image's index.
        """
        if image_ids is None:
            ids = list(range(len(self)))
        else:
            ids = list(image_ids)
            if len(ids) != len(self):
                raise ValueError(f"image_ids: expected {len(self)} ids (one per image), got {len(ids)}")
        results = []
        for image_id, found in zip(ids, self):
            for (x1, y1, x2, y2), score, category in zip(found.boxes.tolist(), found.scores.tolist(),
                                                          found.category_ids):
                results.append({"image_id": image_id, "category_id": category,
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "score": round(score, 5)})
        return results
