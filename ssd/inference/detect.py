"""One-call detection over any backend: images in, labelled boxes in original image pixels out."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..backends.base import as_backend, default_recipe, input_format, nms_mismatch, spec_of
from ..io.images import ImageSource, load_uint8
from ..io.video import is_video_source, webcam_index
from ..models.spec import MAX_DETECTIONS_LIMIT, DetectorSpec, PostProcessSpec, check_int
from ..postprocess import Decoded, postprocess_outputs, split_detections
from ..transforms import preprocess_for_detection
from .batching import prefetched_batches
from .detections import DetectionBatch, Detections, StageTimes

__all__ = ["CLASSES_BY", "detect", "detect_iter", "detection_recipe", "resolve_classes"]

# detect's argument names for the recipe's fields, so that errors name what the caller wrote.
_ARGUMENT_NAMES = {"score_threshold": "threshold"}


CLASSES_BY = ("label", "coco-id")


def resolve_classes(classes: Any, spec: DetectorSpec, by: str = "label") -> np.ndarray | None:
    """The labels (1..K) that ``classes`` names; None for all classes.

    ``classes``: one item or a list of them, mixed: class names (``"person"``) and numbers. With ``by="label"``
    numbers are the model's labels, 1-based (1..K, 0 being the background; label ``k`` is ``names[k - 1]``); with
    ``by="coco-id"`` they are the dataset's category ids (``spec.classes.category_ids``; COCO's are 1..90 with
    gaps, so they drift from the labels: category id 18 is dog, which is label 17; id 17 is cat, label 16).
    """
    if by not in CLASSES_BY:
        raise ValueError(f"classes_by: expected one of {', '.join(CLASSES_BY)}, got {by!r}")
    if classes is None:
        return None
    names = spec.classes.names
    category_ids = list(spec.classes.category_ids)
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
            if by == "coco-id":
                if int(item) not in category_ids:
                    raise ValueError(f"classes: expected category ids of this model's classes "
                                     f"({_id_ranges(category_ids)}), got {item}")
                wanted.add(category_ids.index(int(item)) + 1)
            elif not 1 <= item <= len(names):
                raise ValueError(f"classes: expected labels 1..{len(names)} (label 0 is background), got {item}")
            else:
                wanted.add(int(item))
        else:
            raise TypeError(f"classes: expected class names (str) or labels (int), got {type(item).__name__}")
    if not wanted:
        raise ValueError("classes: expected at least one class name or label, got none")
    return np.array(sorted(wanted), dtype=np.int64)


def _id_ranges(ids: Sequence[int]) -> str:
    """'1-11, 13-25, 27-28' for sorted ids: COCO's 80 category ids in a line."""
    ranges: list[list[int]] = []
    for value in sorted(ids):
        if ranges and value == ranges[-1][1] + 1:
            ranges[-1][1] = value
        else:
            ranges.append([value, value])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def _uncapped(recipe: PostProcessSpec, backend: Any, spec: DetectorSpec) -> PostProcessSpec:
    """The recipe with room for every detection NMS can keep, so that the class filter picks the best of the wanted
    classes rather than the wanted ones among the overall best (for a graph with NMS in it: all it keeps)."""
    if backend.outputs == "nms" and getattr(backend, "nms_recipe", None) is not None:
        return recipe.updated(max_detections=backend.nms_recipe.max_detections)
    if recipe.candidates_per_class is not None:
        bound = recipe.candidates_per_class * (spec.num_classes - 1)
    else:
        bound = recipe.candidates_per_level * len(spec.anchors.level_sizes)
    return recipe.updated(max_detections=max(recipe.max_detections, min(bound, MAX_DETECTIONS_LIMIT)))


def _load(item: ImageSource) -> tuple[np.ndarray, str] | Exception:
    try:
        if webcam_index(item) is None and is_video_source(item):
            raise ValueError(f"{item}: expected an image, got a video; a video is given alone, as the only input "
                             f"(detect(model, 'clip.mp4')), and yields one result per frame")
        return load_uint8(item)
    except (OSError, ValueError, TypeError) as exc:
        return exc


def detection_recipe(backend: Any, threshold: float | None, iou_threshold: float | None,
                     max_detections: int | None) -> PostProcessSpec:
    """The backend's default recipe (``spec.detect_postprocess``, or the one baked into an ``--nms`` graph) with the
    caller's overrides; errors name detect's arguments, and a graph with NMS in it refuses what it cannot give."""
    recipe = default_recipe(backend).updated(_ARGUMENT_NAMES, score_threshold=threshold, iou_threshold=iou_threshold,
                                             max_detections=max_detections)
    problem = nms_mismatch(backend, recipe)
    if problem is not None:
        raise ValueError(problem)
    return recipe


def detect_iter(
    model: Any,
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
    classes_by: str = "label",
    agnostic: bool = False,
    times: StageTimes | None = None,
    vid_stride: int = 1,
) -> Iterator[tuple[int, Detections | Exception]]:
    """Detect objects in ``images``, yielding ``(index, Detections)`` in input order as batches finish.

    ``model`` is a detector network or any backend (``ssd.load(...)``); the arguments are those of :func:`detect`,
    checked now rather than when the first result is asked for. Images load in a thread pool one batch ahead of the
    network; ``images`` may be any iterable, consumed lazily. With ``skip_errors`` an unreadable image yields
    ``(index, exception)`` and the rest go on; otherwise the exception propagates. The model is never modified: a
    model in training mode runs as an evaluation-mode copy. ``times``, when given, accumulates the seconds spent per
    stage.

    ``images`` may instead be one video: a video file (mp4, avi, mkv, mov, webm...), a stream URL (rtsp://, rtmp://,
    an http(s) MJPEG or HLS URL) or a webcam index (``0``); every ``vid_stride``-th frame is detected and the index
    yielded is the frame's index in the video (:func:`ssd.inference.video.detect_video` gives the timestamps too).
    Frames are decoded as batches need them, so memory is bounded by the batch. Needs PyAV (the ``[video]`` extra).
    """
    vid_stride = check_int("vid_stride", vid_stride, 1)
    if is_video_source(images):
        from .video import detect_video

        frames = detect_video(model, images, vid_stride=vid_stride, threshold=threshold, iou_threshold=iou_threshold,
                              max_detections=max_detections, batch_size=batch_size, precision=precision,
                              keep_images=keep_images, skip_errors=skip_errors, classes=classes, classes_by=classes_by,
                              agnostic=agnostic, times=times)
        return _frame_results(frames)
    backend = as_backend(model, precision)
    spec = spec_of(backend)  # this copy's, whichever copy of the package made the backend
    recipe = detection_recipe(backend, threshold, iou_threshold, max_detections)
    wanted = resolve_classes(classes, spec, classes_by)
    if not isinstance(agnostic, bool):
        raise TypeError(f"agnostic: expected True or False, got {type(agnostic).__name__}")
    batch_size = check_int("batch_size", batch_size, 1)
    # The class filter and the agnostic pass drop rows after the per-class NMS: they need every row NMS kept.
    filtered = wanted is not None or agnostic
    return _detections(backend, spec, images, _uncapped(recipe, backend, spec) if filtered else recipe,
                       batch_size, keep_images, skip_errors, wanted, recipe.iou_threshold if agnostic else None,
                       recipe.max_detections,
                       times if times is not None else StageTimes())


def _frame_results(frames: Any) -> Iterator[tuple[int, Detections]]:
    with frames:  # stops decoding when the consumer stops early
        for index, _, found in frames:
            yield index, found


def _detections(backend: Any, spec: DetectorSpec, images: Iterable[ImageSource], recipe: PostProcessSpec,
                batch_size: int, keep_images: bool, skip_errors: bool, wanted: np.ndarray | None,
                agnostic: float | None, max_detections: int,
                times: StageTimes) -> Iterator[tuple[int, Detections | Exception]]:
    kind, device = backend.outputs, backend.device

    def run(batch: torch.Tensor) -> tuple[Decoded, float, float]:
        """The batch's detections, and the seconds of its forward pass and of its post-processing."""
        started = time.perf_counter()
        outputs = backend(batch)
        _sync(device)
        inferred = time.perf_counter()
        decoded = postprocess_outputs(outputs, kind, spec, recipe)
        inference, postprocess = inferred - started, time.perf_counter() - inferred
        times.inference += inference
        times.postprocess += postprocess
        return decoded, inference, postprocess

    workers = getattr(backend, "load_workers", None)
    extra = {} if workers is None else {"workers": workers}
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
            yield from _detect_batch(run, backend, spec, good, keep_images, wanted, agnostic, max_detections,
                                     times)


def _sync(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the forward pass's time would be billed to postprocess.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _agnostic_keep(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices (ascending, so still best first) of the rows that class-agnostic NMS keeps: a box overlapping a
    better one of any class with IoU > ``iou_threshold`` goes. The per-class NMS has already run, so this only
    settles boxes of different classes on one object."""
    from torchvision.ops import nms

    if len(scores) < 2:
        return np.arange(len(scores))
    kept = nms(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
               torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), iou_threshold)
    return np.sort(kept.numpy())


def _detect_batch(run: Callable[[torch.Tensor], tuple[Decoded, float, float]], backend: Any, spec: DetectorSpec,
                  good: list, keep_images: bool, wanted: np.ndarray | None, agnostic: float | None,
                  max_detections: int, times: StageTimes) -> list[tuple[int, Detections]]:
    started = time.perf_counter()
    tensors = [torch.from_numpy(pixels).permute(2, 0, 1) for _, pixels, _ in good]
    dtype, memory_format = input_format(backend)
    batch = preprocess_for_detection(tensors, spec.input, device=backend.device, dtype=dtype,
                                     memory_format=memory_format)
    _sync(batch.device)
    preprocessed = time.perf_counter()
    decoded, inference_s, postprocess_s = run(batch)
    decoded_at = time.perf_counter()
    classes = spec.classes
    results = []
    for (index, pixels, source), (boxes, labels, scores) in zip(good, split_detections(decoded)):
        own_started = time.perf_counter()
        # A NaN/inf from the network (an fp16 overflow, broken weights) is no detection: it could not be drawn, and
        # JSON cannot hold it. NaN scores already fail the threshold; boxes may still be non-finite.
        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        if not finite.all():
            boxes, labels, scores = boxes[finite], labels[finite], scores[finite]
        if wanted is not None or agnostic is not None:
            # Rows stay in descending score order, so the first max_detections kept are the best of those wanted.
            keep = np.arange(len(scores)) if wanted is None else np.flatnonzero(np.isin(labels, wanted))
            if agnostic is not None:
                # On the boxes as reported (clipped to the image); IoU does not change with the scale to pixels.
                keep = keep[_agnostic_keep(np.clip(boxes[keep], 0.0, 1.0), scores[keep], agnostic)]
            keep = keep[:max_detections]
            boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
        height, width = pixels.shape[:2]
        scale = np.array([width, height, width, height], dtype=np.float32)
        pixel_boxes = np.clip(boxes * scale, 0, scale).astype(np.float32)
        found = Detections(pixel_boxes, scores, labels, (height, width), source, pixels if keep_images else None,
                           classes.names, classes.category_ids)
        results.append((index, found, time.perf_counter() - own_started))
    # The batch's shared stages are divided evenly among its images; what each image took alone is its own.
    n = len(good)
    finished = time.perf_counter()
    shared_post = finished - decoded_at - sum(own for _, _, own in results)
    for _, found, own in results:
        found.speed = {"preprocess": 1000.0 * (preprocessed - started) / n,
                       "inference": 1000.0 * inference_s / n,
                       "postprocess": 1000.0 * (postprocess_s + shared_post) / n + 1000.0 * own}
    times.preprocess += preprocessed - started
    times.postprocess += finished - decoded_at  # so the images' shares add up to the totals
    times.images += len(good)
    return [(index, found) for index, found, _ in results]


def detect(
    model: Any,
    images: Any,
    threshold: float | None = None,
    iou_threshold: float | None = None,
    max_detections: int | None = None,
    batch_size: int = 8,
    precision: str | None = None,
    keep_images: bool = True,
    classes: Any = None,
    classes_by: str = "label",
    agnostic: bool = False,
    vid_stride: int = 1,
) -> DetectionBatch:
    """Detect objects in original image coordinates.

    Args:
        model: the detector network to run (this is ``model.detect(images, ...)``; its device, dtype and memory
            format are followed, and it is never modified), or any backend (``ssd.load("model.onnx")``, a
            :class:`~ssd.backends.PyTorchBackend`, ...): the same pipeline and results whatever runs the network.
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
            and on recent GPUs); 'fp16' (autocast on CUDA). A backend has its own: None (or that one) there.
        keep_images: keep each decoded image in its ``Detections`` for ``plot``/``save``: uint8, H x W x 3, that is
            3 bytes per pixel (36 MB for a 12-megapixel photo), so the returned list grows with the input. False
            keeps no pixels: memory is then bounded by two batches (the one running and the one loading), however
            long the input; for long inputs with pictures use ``detect_iter`` and save each result as it comes.
        classes: keep only these classes: names (``["person", "dog"]``) or labels, or one of either;
            ``max_detections`` then counts only those. None keeps all. Labels are 1-based: 1..K, with 0 the
            background (never a detection); label ``k`` is ``model.names[k - 1]`` (COCO: 1 person, 16 cat, 17 dog).
        classes_by: what the numbers in ``classes`` are: ``"label"`` (default, as above) or ``"coco-id"``, the
            dataset's category ids (COCO's 1..90 with gaps: category id 18 is dog, which is label 17).
        agnostic: after the per-class NMS, also drop a box whose IoU with a better box of any class is above
            ``iou_threshold`` (one box per object, whatever its class).
        vid_stride: for a video, detect every ``vid_stride``-th frame (1: every frame).

    ``images`` may also be one video: a video file (mp4, avi, mkv, mov, webm...), a stream URL (rtsp://, rtmp://, an
    http(s) MJPEG or HLS URL) or a webcam index (``0``); the result then has one ``Detections`` per frame detected
    (its ``source`` is ``"clip.mp4#frame=12"``). Every frame's image is kept unless ``keep_images=False``: for long
    videos and streams, use ``detect_iter`` or :func:`ssd.inference.video.run_video`, which write as they go.

    Returns:
        A :class:`DetectionBatch`: a list with one ``Detections`` per image (also for a single image):
        ``boxes`` N x 4 (x1, y1, x2, y2 pixels), ``scores``, ``labels`` (1..K), ``names``, ``image_size``,
        ``speed`` (this image's ms per stage; a batch's forward pass is shared evenly among its images);
        ``plot()``, ``save(path)``, ``to_dict()``, ``to_json()``. The list adds ``times`` (ms per image per
        stage), ``print()``, ``show()``, ``save(folder)``, ``crop(folder)``, ``pandas()`` and ``to_coco()``.

    The whole image is resized to the model's input size and normalised as its spec says (for NVIDIA's model:
    300 x 300, PIL-style antialiased bilinear, ImageNet mean and std: the protocol of its published accuracy).
    """
    single = not isinstance(images, (list, tuple)) and not _is_iterable_of_images(images)
    items = [images] if single and not is_video_source(images) else images
    times = StageTimes()
    found = detect_iter(model, items, threshold=threshold, iou_threshold=iou_threshold,
                        max_detections=max_detections, batch_size=batch_size, precision=precision,
                        keep_images=keep_images, classes=classes, classes_by=classes_by, agnostic=agnostic,
                        times=times, vid_stride=vid_stride)
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
