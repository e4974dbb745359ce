"""One-call detection: images in, labelled boxes in original image pixels out."""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..io.images import ImageSource, load_uint8
from ..models.spec import MAX_DETECTIONS_LIMIT, DetectorSpec, PostProcessSpec, check_int
from ..postprocess import Decoded, postprocess, split_detections
from ..transforms import preprocess_for_detection
from .batching import prefetched_batches
from .detections import DetectionBatch, Detections, StageTimes
from .plan import InferencePlan, plan_for, thread_plan

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


def resolve_classes(classes: Any, spec: DetectorSpec) -> np.ndarray | None:
    """The labels (1..K) that ``classes`` names: class names or label ids, mixed; None for all classes."""
    if classes is None:
        return None
    names = spec.classes.names
    if isinstance(classes, (str, int, np.integer)):
        classes = [classes]
    if not isinstance(classes, Sequence | set | frozenset | np.ndarray):
        raise TypeError(f"classes: expected class names or labels (a list), got {type(classes).__name__}")
    wanted = set()
    for item in classes:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"classes: expected names of this model's classes ({', '.join(names)}), "
                                 f"got {item!r}")
            wanted.add(names.index(item) + 1)
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 1 <= item <= len(names):
                raise ValueError(f"classes: expected labels 1..{len(names)} (label 0 is background), got {item}")
            wanted.add(int(item))
        else:
            raise TypeError(f"classes: expected class names (str) or labels (int), got {type(item).__name__}")
    if not wanted:
        raise ValueError("classes: expected at least one class name or label, got none")
    return np.array(sorted(wanted), dtype=np.int64)


def _uncapped(recipe: PostProcessSpec, spec: DetectorSpec) -> PostProcessSpec:
    """The recipe with room for every detection NMS can keep, so that the class filter picks the best of the wanted
    classes rather than the wanted ones among the overall best."""
    if recipe.candidates_per_class is not None:
        bound = recipe.candidates_per_class * (spec.num_classes - 1)
    else:
        bound = recipe.candidates_per_level * len(spec.anchors.level_sizes)
    return recipe.updated(max_detections=max(recipe.max_detections, min(bound, MAX_DETECTIONS_LIMIT)))


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
    classes: Any = None,
    times: StageTimes | None = None,
) -> Iterator[tuple[int, Detections | Exception]]:
    """Detect objects in ``images``, yielding ``(index, Detections)`` in input order as batches finish.

    Images load in a thread pool one batch ahead of the network; ``images`` may be any iterable, consumed lazily.
    With ``skip_errors`` an unreadable image yields ``(index, exception)`` and the rest go on; otherwise the
    exception propagates. The model is never modified: a model in training mode runs as an evaluation-mode copy.
    ``classes`` keeps only those classes (see :func:`detect`); ``times``, when given, accumulates the seconds
    spent per stage.
    """
    spec = _spec_of(model)
    recipe = detection_recipe(spec, threshold, iou_threshold, max_detections)
    wanted = resolve_classes(classes, spec)
    decode_recipe = recipe if wanted is None else _uncapped(recipe, spec)
    times = times if times is not None else StageTimes()
    plan = plan_for(model, precision, stacklevel=4)
    if model.training:
        # Switching the caller's model to eval mode and back would race with other threads and with training.
        model = copy.deepcopy(model).eval()
    threads = thread_plan() if plan.device.type == "cpu" else None
    network = plan.module(model)  # the plan's channels_last copy, or the model itself

    def run(batch: torch.Tensor) -> Decoded:
        started = time.perf_counter()
        with torch.inference_mode(), plan.autocast(), (threads.forward() if threads else contextlib.nullcontext()):
            predictions = network(batch)
        _sync(batch.device)
        inferred = time.perf_counter()
        decoded = postprocess(predictions, spec, decode_recipe)
        times.inference += inferred - started
        times.postprocess += time.perf_counter() - inferred
        return decoded

    yield from detect_with(run, spec, images, batch_size=batch_size, plan=plan, keep_images=keep_images,
                           skip_errors=skip_errors, load_workers=threads.load_workers if threads else None,
                           wanted=wanted, max_detections=recipe.max_detections, times=times, runner_times=True)


def detection_recipe(spec: DetectorSpec, threshold: float | None, iou_threshold: float | None,
                     max_detections: int | None) -> PostProcessSpec:
    """``spec.detect_postprocess`` with the caller's overrides, errors naming detect's arguments."""
    return spec.detect_postprocess.updated(_ARGUMENT_NAMES, score_threshold=threshold, iou_threshold=iou_threshold,
                                           max_detections=max_detections)


def detect_with(runner: Runner, spec: DetectorSpec, images: Iterable[ImageSource], *, batch_size: int = 8,
                plan: InferencePlan | None = None, keep_images: bool = True, skip_errors: bool = False,
                load_workers: int | None = None, wanted: np.ndarray | None = None,
                max_detections: int | None = None, times: StageTimes | None = None,
                runner_times: bool = False) -> Iterator[tuple[int, Detections | Exception]]:
    """:func:`detect_iter` for any ``runner`` (preprocessed batch -> :class:`Decoded`): images are loaded, batched
    and preprocessed as ``spec.input`` says (on ``plan``'s device, dtype and memory format; CPU float32 when None),
    and the detections come back in each image's pixels. ``wanted`` labels (with at most ``max_detections`` of
    them per image) filter the classes; ``times`` accumulates the stages (the runner's whole time counts as
    inference unless ``runner_times`` says it records its own)."""
    batch_size = check_int("batch_size", batch_size, 1)
    if plan is None:
        plan = InferencePlan(torch.device("cpu"), torch.float32, torch.contiguous_format)
    times = times if times is not None else StageTimes()
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
            # Built before yielding, so that a consumer's time between two yields is never counted.
            yield from _detect_batch(runner, spec, good, plan, keep_images, wanted, max_detections, times,
                                     runner_times)


def _sync(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the forward pass's time would be billed to postprocess.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _detect_batch(runner: Runner, spec: DetectorSpec, good: list, plan: InferencePlan, keep_images: bool,
                  wanted: np.ndarray | None, max_detections: int | None, times: StageTimes,
                  runner_times: bool) -> list[tuple[int, Detections]]:
    started = time.perf_counter()
    tensors = [torch.from_numpy(pixels).permute(2, 0, 1) for _, pixels, _ in good]
    batch = preprocess_for_detection(tensors, spec.input, device=plan.device, dtype=plan.input_dtype,
                                     memory_format=plan.memory_format)
    _sync(batch.device)
    preprocessed = time.perf_counter()
    decoded = runner(batch)
    decoded_at = time.perf_counter()
    classes = spec.classes
    results = []
    for (index, pixels, source), (boxes, labels, scores) in zip(good, split_detections(decoded)):
        # A NaN/inf from the network (an fp16 overflow, broken weights) is no detection: it could not be drawn, and
        # JSON cannot hold it. NaN scores already fail the threshold; boxes may still be non-finite.
        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        if not finite.all():
            boxes, labels, scores = boxes[finite], labels[finite], scores[finite]
        if wanted is not None:
            # Rows stay in descending score order, so the first max_detections kept are the best of those wanted.
            keep = np.flatnonzero(np.isin(labels, wanted))[:max_detections]
            boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
        height, width = pixels.shape[:2]
        scale = np.array([width, height, width, height], dtype=np.float32)
        pixel_boxes = np.clip(boxes * scale, 0, scale).astype(np.float32)
        results.append((index, Detections(pixel_boxes, scores, labels, (height, width), source,
                                          pixels if keep_images else None, classes.names, classes.category_ids)))
    times.preprocess += preprocessed - started
    if not runner_times:
        times.inference += decoded_at - preprocessed
    times.postprocess += time.perf_counter() - decoded_at
    times.images += len(good)
    return results


def detect(
    model: torch.nn.Module,
    images: Any,
    threshold: float | None = None,
    iou_threshold: float | None = None,
    max_detections: int | None = None,
    batch_size: int = 8,
    precision: str | None = None,
    keep_images: bool = True,
    classes: Any = None,
) -> DetectionBatch:
    """Detect objects in original image coordinates.

    Args:
        model: the detector to run (this is ``model.detect(images, ...)``); its device, dtype and memory format
            are followed, and it is never modified.
        images: one image or any iterable of them (lists, tuples, generators, consumed lazily): paths, http(s)
            URLs, bytes, PIL images, numpy arrays (H x W x 3, uint8 or float in [0, 1]) or tensors (3 x H x W, uint8
            or float in [0, 1]). Files are turned upright as their EXIF orientation says, so boxes are in the
            picture as viewers show it; float pixels outside [0, 1] or NaN are refused, never rescaled.
        threshold: keep detections scoring above this, in [0, 1); default from the model's spec (0.4 for NVIDIA's).
            Numeric arguments accept Python, numpy and 0-d torch numbers; NaN and inf are refused.
        iou_threshold: boxes of one class overlapping a better one this much are dropped (default 0.5 for
            NVIDIA's model, which drops IoU >= it; mmdetection's models drop IoU > 0.45).
        max_detections: at most this many per image, highest scores first (default 100 for NVIDIA's model; at
            most ``MAX_DETECTIONS_LIMIT``, 100,000).
        batch_size: images per forward pass; results agree across batch sizes up to float rounding.
        precision: None to follow the model's weights; 'fp32'; 'bf16' (autocast; fast on CPUs with bf16
            and on recent GPUs); 'fp16' (autocast on CUDA).
        keep_images: keep each decoded image in its ``Detections`` for ``plot``/``save``: uint8, H x W x 3, that is
            3 bytes per pixel (36 MB for a 12-megapixel photo), so the returned list grows with the input. False
            keeps no pixels: memory is then bounded by two batches (the one running and the one loading), however
            long the input; for long inputs with pictures use ``detect_iter`` and save each result as it comes.
        classes: keep only these classes: names (``["person", "dog"]``) or labels 1..K (``model.names`` lists
            them), or one of either; ``max_detections`` then counts only those. None keeps all.

    Returns:
        A :class:`DetectionBatch`: a list with one ``Detections`` per image (also for a single image):
        ``boxes`` N x 4 (x1, y1, x2, y2 pixels), ``scores``, ``labels`` (1..K), ``names``, ``image_size``;
        ``plot()``, ``save(path)``, ``to_dict()``, ``to_json()``. The list adds ``times`` (ms per image per
        stage), ``print()``, ``show()``, ``save(folder)``, ``crop(folder)``, ``pandas()`` and ``to_coco()``.

    The whole image is resized to the model's input size and normalised as its spec says (for NVIDIA's model:
    300 x 300, PIL-style antialiased bilinear, ImageNet mean and std: the protocol of its published accuracy).
    """
    single = not isinstance(images, (list, tuple)) and not _is_iterable_of_images(images)
    items = [images] if single else images
    times = StageTimes()
    found = detect_iter(model, items, threshold=threshold, iou_threshold=iou_threshold,
                        max_detections=max_detections, batch_size=batch_size, precision=precision,
                        keep_images=keep_images, classes=classes, times=times)
    results = [result for _, result in found]
    return DetectionBatch(results, times)


def _is_iterable_of_images(images: Any) -> bool:
    """Generators and other iterables of images, as opposed to one image (str, bytes, arrays and tensors iterate
    too, over their characters or rows)."""
    if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray, torch.Tensor, dict)):
        return False
    if hasattr(images, "read") or type(images).__module__.startswith("PIL"):
        return False
    return isinstance(images, Iterable)
