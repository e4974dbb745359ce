"""One-call detection: images in, labelled boxes in original image pixels out."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .coco import COCO_CATEGORY_IDS, COCO_NAMES
from .decode import decode_batch, split_detections
from .drawing import draw_boxes, save_figure_of
from .images import describe_source, load_rgb
from .transforms import preprocess_for_detection, to_tensor_chw

PRECISIONS = ("fp32", "bf16", "fp16")
_LOAD_WORKERS = min(8, (os.cpu_count() or 2) * 2)  # decoding releases the GIL; URLs wait on the network


@dataclass(eq=False)
class Detections:
    """What the model found in one image, highest score first.

    Attributes:
        boxes: N x 4 float32, (x1, y1, x2, y2) in the original image's pixels, clipped to the image.
        scores: N float32 confidences in (threshold, 1].
        labels: N int64 model labels in 1..80 (``names`` gives the COCO names).
        image_size: (height, width) of the original image.
        source: a short description of the input (its path or URL, or the kind of object).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image_size: tuple[int, int]
    source: str = ""
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return [COCO_NAMES[int(label) - 1] for label in self.labels]

    @property
    def category_ids(self) -> list[int]:
        """Official COCO category ids (1..90 with gaps), as COCO results files use."""
        return [COCO_CATEGORY_IDS[int(label) - 1] for label in self.labels]

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
        """JSON-ready: each detection's name, COCO category id, score, and box as [x1, y1, x2, y2] and
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
        return json.dumps(self.to_dict(), **kwargs)

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
        """Write the annotated picture (format from the suffix, e.g. .png or .jpg) at the image's resolution."""
        return save_figure_of(self._picture(), self.boxes, self.labels.tolist(), self.captions(), path)


def _inference_setup(weight: torch.Tensor, precision: str | None):
    """Device, input dtype and autocast context for ``precision``, given the model's first convolution weight;
    None follows the model's own weights."""
    device, model_dtype = weight.device, weight.dtype
    if precision is None:
        return device, model_dtype, contextlib.nullcontext()
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected None or one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "fp32":
        if model_dtype != torch.float32:
            raise ValueError(f"precision='fp32': expected a float32 model, got {model_dtype}; build it with "
                             "model_math='fp32'")
        return device, torch.float32, contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if model_dtype == dtype:
        return device, dtype, contextlib.nullcontext()
    if model_dtype != torch.float32:
        raise ValueError(f"precision={precision!r}: expected a float32 model to autocast, got {model_dtype}")
    if device.type == "cpu" and precision == "fp16":
        warnings.warn("precision='fp16' on the CPU is very slow (about 100x slower than fp32); use 'bf16' or "
                      "'fp32' there", UserWarning, stacklevel=4)
    return device, torch.float32, torch.autocast(device.type, dtype=dtype)


def _as_chw(image: Any) -> tuple[torch.Tensor, np.ndarray | None, str]:
    """A 3 x H x W tensor for the network, the H x W x 3 array kept for pictures, and the input's description.

    RGB tensors go straight to the network (they may already be on the GPU); their picture is made on demand.
    """
    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3:
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(f"image {describe_source(image)}: expected uint8 or floating point, got {image.dtype}")
        return image, None, describe_source(image)
    array = load_rgb(image)
    return to_tensor_chw(array), array, describe_source(image)


def _checked(name: str, value: Any, kind: type, low: float, high: float | None = None, *,
             open_low: bool = False, open_high: bool = False):
    if isinstance(value, bool) or not isinstance(value, kind if kind is int else (int, float)):
        raise TypeError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    too_low = value <= low if open_low else value < low
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        interval = (f"{'(' if open_low else '['}{low}, {'inf' if high is None else high}"
                    f"{')' if open_high or high is None else ']'}")
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return value


def detect_iter(
    model: torch.nn.Module,
    images: Iterable[Any],
    *,
    threshold: float = 0.4,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    batch_size: int = 8,
    precision: str | None = None,
    keep_images: bool = True,
    skip_errors: bool = False,
) -> Iterator[tuple[int, Detections | Exception]]:
    """Detect objects in ``images``, yielding ``(index, Detections)`` in input order as batches finish.

    Images load in a thread pool one batch ahead of the network. With ``skip_errors`` an unreadable image
    yields ``(index, exception)`` and the rest go on; otherwise the exception propagates.
    """
    # The decoder's own ranges (a score must exceed the threshold; IoU >= iou_threshold suppresses), checked
    # here so that the error names detect's arguments.
    _checked("threshold", threshold, float, 0.0, 1.0, open_high=True)
    _checked("iou_threshold", iou_threshold, float, 0.0, 1.0, open_low=True)
    _checked("max_detections", max_detections, int, 1)
    _checked("batch_size", batch_size, int, 1)
    weight = next(p for p in model.parameters() if p.dim() == 4)
    device, input_dtype, autocast = _inference_setup(weight, precision)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def load(item):
        try:
            return _as_chw(item)
        except (OSError, ValueError, TypeError) as exc:
            return exc

    items = list(images)
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(_LOAD_WORKERS) as pool:
            pending = [pool.submit(load, items[i]) for i in batches[0]] if batches else []
            for b, indices in enumerate(batches):
                loaded = [future.result() for future in pending]
                if b + 1 < len(batches):  # read the next batch while this one runs through the network
                    pending = [pool.submit(load, items[i]) for i in batches[b + 1]]
                good = []
                for index, result in zip(indices, loaded):
                    if isinstance(result, Exception):
                        if not skip_errors:
                            raise result
                        yield index, result
                    else:
                        good.append((index, *result))
                if good:
                    yield from _detect_batch(model, good, device, input_dtype, memory_format, autocast,
                                             threshold, iou_threshold, max_detections, keep_images)
    finally:
        model.train(was_training)


def _detect_batch(model, good, device, input_dtype, memory_format, autocast, threshold, iou_threshold,
                  max_detections, keep_images):
    tensors = [chw for _, chw, _, _ in good]
    batch = preprocess_for_detection(tensors, device=device, dtype=input_dtype, memory_format=memory_format)
    with torch.inference_mode(), autocast:
        locs, confs = model(batch)
    decoded = decode_batch(locs, confs, criteria=iou_threshold, max_output=max_detections,
                           score_threshold=threshold)
    for (index, chw, array, source), (boxes, labels, scores) in zip(good, split_detections(decoded)):
        height, width = int(chw.shape[-2]), int(chw.shape[-1])
        scale = np.array([width, height, width, height], dtype=np.float32)
        pixels = np.clip(boxes * scale, 0, scale).astype(np.float32)
        if keep_images and array is None:
            array = _picture_of(chw)
        yield index, Detections(pixels, scores, labels, (height, width), source, array if keep_images else None)


def _picture_of(chw: torch.Tensor) -> np.ndarray:
    if chw.dtype != torch.uint8:
        chw = (chw.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return chw.permute(1, 2, 0).cpu().numpy()


def detect(
    model: torch.nn.Module,
    images: Any,
    threshold: float = 0.4,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    batch_size: int = 8,
    precision: str | None = None,
) -> list[Detections]:
    """Detect objects in original image coordinates.

    Args:
        model: the SSD300 to run (this is ``model.detect(images, ...)``); its device, dtype and memory format
            are followed, and its train/eval mode is restored afterwards.
        images: one image or a list: paths, http(s) URLs, bytes, PIL images, numpy arrays (H x W x 3, uint8
            or float in [0, 1]) or tensors (3 x H x W, uint8 or float in [0, 1]).
        threshold: keep detections scoring above this (0..1).
        iou_threshold: boxes of one class overlapping a better one by this IoU or more are dropped.
        max_detections: at most this many per image, highest scores first.
        batch_size: images per forward pass; results agree across batch sizes up to float rounding (on a
            small CPU, contiguous fp32 slows down per image as batches grow; see benchmarks/RESULTS.md).
        precision: None to follow the model's weights; 'fp32'; 'bf16' (autocast; fast on CPUs with bf16
            and on recent GPUs); 'fp16' (autocast on CUDA).

    Returns:
        One ``Detections`` per image (a list, also for a single image): ``boxes`` N x 4 (x1, y1, x2, y2
        pixels), ``scores``, ``labels`` (1..80), ``names``, ``image_size``; ``plot()``, ``save(path)``,
        ``to_dict()``, ``to_json()``.

    The whole image is resized to 300 x 300 and normalized with ImageNet statistics, as in training.
    """
    items: Sequence[Any] = list(images) if isinstance(images, list | tuple) else [images]
    results: list[Detections] = [None] * len(items)  # type: ignore[list-item]
    for index, found in detect_iter(model, items, threshold=threshold, iou_threshold=iou_threshold,
                                    max_detections=max_detections, batch_size=batch_size, precision=precision):
        results[index] = found
    return results
