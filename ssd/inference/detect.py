"""One-call detection: images in, labelled boxes in original image pixels out."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..io.images import ImageSource, load_uint8
from ..models.spec import DetectorSpec, PostProcessSpec, check_int
from ..postprocess import Decoded, postprocess, split_detections
from .batching import prefetched_batches
from .detections import Detections
from .plan import InferencePlan, plan_for, thread_plan
from .preprocess import preprocess_for_detection

__all__ = ["Runner", "detect", "detect_iter", "detect_with", "detection_recipe"]

# Anything that turns a preprocessed N x 3 x S x S batch into detections: the PyTorch model plus postprocess, or an
# exported graph (ssd.export.backends). Loading, batching, preprocessing and the Detections are shared by all.
Runner = Callable[[torch.Tensor], Decoded]

# detect's argument names for the recipe's fields, so that errors name what the caller wrote.
_ARGUMENT_NAMES = {"score_threshold": "threshold"}


def _spec_of(model: torch.nn.Module) -> DetectorSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, DetectorSpec):
        raise TypeError(f"model: expected a detector of this library (with a .spec), got {type(model).__name__}")
    return spec


def _load(item: ImageSource) -> tuple[np.ndarray, str] | Exception:
    try:
        return load_uint8(item)
    except (OSError, ValueError, TypeError) as exc:
        return exc


def detect_iter(
    model: torch.nn.Module,
    images: Iterable[ImageSource],
    *,
    threshold: float | None = None,
    iou_threshold: float | None = None,
    max_detections: int | None = None,
    batch_size: int = 8,
    precision: str | None = None,
    keep_images: bool = True,
    skip_errors: bool = False,
) -> Iterator[tuple[int, Detections | Exception]]:
    """Detect objects in ``images``, yielding ``(index, Detections)`` in input order as batches finish.

    Images load in a thread pool one batch ahead of the network; ``images`` may be any iterable, consumed lazily.
    With ``skip_errors`` an unreadable image yields ``(index, exception)`` and the rest go on; otherwise the
    exception propagates. The model is never modified: a model in training mode runs as an evaluation-mode copy.
    """
    spec = _spec_of(model)
    recipe = detection_recipe(spec, threshold, iou_threshold, max_detections)
    plan = plan_for(model, precision, stacklevel=4)
    if model.training:
        # Switching the caller's model to eval mode and back would race with other threads and with training.
        model = copy.deepcopy(model).eval()
    threads = thread_plan() if plan.device.type == "cpu" else None
    network = plan.module(model)  # the plan's channels_last copy, or the model itself

    def run(batch: torch.Tensor) -> Decoded:
        with torch.inference_mode(), plan.autocast(), (threads.forward() if threads else contextlib.nullcontext()):
            predictions = network(batch)
        return postprocess(predictions, spec, recipe)

    yield from detect_with(run, spec, images, batch_size=batch_size, plan=plan, keep_images=keep_images,
                           skip_errors=skip_errors, load_workers=threads.load_workers if threads else None)


def detection_recipe(spec: DetectorSpec, threshold: float | None, iou_threshold: float | None,
                     max_detections: int | None) -> PostProcessSpec:
    """``spec.detect_postprocess`` with the caller's overrides, errors naming detect's arguments."""
    return spec.detect_postprocess.updated(_ARGUMENT_NAMES, score_threshold=threshold, iou_threshold=iou_threshold,
                                           max_detections=max_detections)


def detect_with(runner: Runner, spec: DetectorSpec, images: Iterable[ImageSource], *, batch_size: int = 8,
                plan: InferencePlan | None = None, keep_images: bool = True, skip_errors: bool = False,
                load_workers: int | None = None) -> Iterator[tuple[int, Detections | Exception]]:
    """:func:`detect_iter` for any ``runner`` (preprocessed batch -> :class:`Decoded`): images are loaded, batched
    and preprocessed as ``spec.input`` says (on ``plan``'s device, dtype and memory format; CPU float32 when None),
    and the detections come back in each image's pixels."""
    batch_size = check_int("batch_size", batch_size, 1)
    if plan is None:
        plan = InferencePlan(torch.device("cpu"), torch.float32, torch.contiguous_format)
    extra = {} if load_workers is None else {"workers": load_workers}
    for batch in prefetched_batches(images, _load, batch_size, **extra):
        good = []
        for index, result in batch:
            if isinstance(result, Exception):
                if not skip_errors:
                    raise result
                yield index, result
            else:
                good.append((index, *result))
        if good:
            yield from _detect_batch(runner, spec, good, plan, keep_images)


def _detect_batch(runner: Runner, spec: DetectorSpec, good: list, plan: InferencePlan,
                  keep_images: bool) -> Iterator[tuple[int, Detections]]:
    tensors = [torch.from_numpy(pixels).permute(2, 0, 1) for _, pixels, _ in good]
    batch = preprocess_for_detection(tensors, device=plan.device, dtype=plan.input_dtype,
                                     memory_format=plan.memory_format, input_spec=spec.input)
    decoded = runner(batch)
    classes = spec.classes
    for (index, pixels, source), (boxes, labels, scores) in zip(good, split_detections(decoded)):
        height, width = pixels.shape[:2]
        scale = np.array([width, height, width, height], dtype=np.float32)
        pixel_boxes = np.clip(boxes * scale, 0, scale).astype(np.float32)
        yield index, Detections(pixel_boxes, scores, labels, (height, width), source,
                                pixels if keep_images else None, classes.names, classes.category_ids)


def detect(
    model: torch.nn.Module,
    images: Any,
    threshold: float | None = None,
    iou_threshold: float | None = None,
    max_detections: int | None = None,
    batch_size: int = 8,
    precision: str | None = None,
    keep_images: bool = True,
) -> list[Detections]:
    """Detect objects in original image coordinates.

    Args:
        model: the detector to run (this is ``model.detect(images, ...)``); its device, dtype and memory format
            are followed, and it is never modified.
        images: one image or an iterable of them: paths, http(s) URLs, bytes, PIL images, numpy arrays (H x W x 3,
            uint8 or float in [0, 1]) or tensors (3 x H x W, uint8 or float in [0, 1]).
        threshold: keep detections scoring above this (0..1); default from the model's spec (0.4 for NVIDIA's).
        iou_threshold: boxes of one class overlapping a better one this much are dropped (default 0.5 for
            NVIDIA's model, which drops IoU >= it; mmdetection's models drop IoU > 0.45).
        max_detections: at most this many per image, highest scores first (default 100 for NVIDIA's model).
        batch_size: images per forward pass; results agree across batch sizes up to float rounding.
        precision: None to follow the model's weights; 'fp32'; 'bf16' (autocast; fast on CPUs with bf16
            and on recent GPUs); 'fp16' (autocast on CUDA).
        keep_images: keep each decoded image in its ``Detections`` for ``plot``/``save`` (uint8, H x W x 3);
            False keeps memory bounded by the batch for long lists.

    Returns:
        One ``Detections`` per image (a list, also for a single image): ``boxes`` N x 4 (x1, y1, x2, y2
        pixels), ``scores``, ``labels`` (1..K), ``names``, ``image_size``; ``plot()``, ``save(path)``,
        ``to_dict()``, ``to_json()``.

    The whole image is resized to the model's input size and normalised as its spec says (for NVIDIA's model:
    300 x 300, PIL-style antialiased bilinear, ImageNet mean and std: the protocol of its published accuracy).
    """
    single = not isinstance(images, (list, tuple)) and not _is_iterable_of_images(images)
    items = [images] if single else images
    found = detect_iter(model, items, threshold=threshold, iou_threshold=iou_threshold,
                        max_detections=max_detections, batch_size=batch_size, precision=precision,
                        keep_images=keep_images)
    return [result for _, result in found]


def _is_iterable_of_images(images: Any) -> bool:
    """Generators and other iterables of images, as opposed to one image (str, bytes, arrays and tensors iterate
    too, over their characters or rows)."""
    if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray, torch.Tensor, dict)):
        return False
    if hasattr(images, "read") or type(images).__module__.startswith("PIL"):
        return False
    return isinstance(images, Iterable)
