"""COCO-style evaluation of a detector over any backend: its published protocol, batched, on one process or many
(torchrun). A PyTorch network, an exported ONNX or OpenVINO file (``ssd.load("model.onnx")``) are scored alike.

The protocol is the model's own (``model.spec``): for NVIDIA's SSD300 that of DeepLearningExamples, which gives the
published 0.25 mAP on val2017: every image with at least one annotation, resized whole to 300 x 300 (PIL bilinear),
ImageNet mean/std; ``spec.postprocess`` (score > 0.05, 200 candidates per class, NMS 0.5, 200 per image); boxes
scaled by the image's width and height from the annotation file, *not* clipped, written as COCO ``[x, y, w, h]``;
pycocotools ``COCOeval(iouType='bbox')``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed
from ..backends.base import as_backend, input_format, is_detector, nms_mismatch, spec_of
from ..backends.plan import first_conv_weight
from ..backends.pytorch import PyTorchBackend
from ..data.coco_format import CocoAnnotations, check_image_size, parse_annotations
from ..io.files import write_json
from ..io.images import load_uint8
from ..models.spec import ClassSpec, DetectorSpec, InputSpec, PostProcessSpec, check_int, check_real
from ..postprocess import postprocess_outputs, split_detections
from ..transforms import has_uint8_resize, preprocess_for_detection, resize_uint8
from .metrics import (
    CONFUSION_IOU,
    CONFUSION_SCORE,
    ConfusionMatrix,
    PRCurves,
    confusion_matrix,
    per_class_ap,
    pr_curves,
)

__all__ = [
    "STAT_NAMES",
    "CocoBatch",
    "CocoImages",
    "CocoSample",
    "EvalResult",
    "category_map",
    "collate_samples",
    "evaluate",
    "load_annotations",
    "per_class_table",
]

# COCOeval.stats, in its order.
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_EXAMPLES = 5  # how many offending names an error message lists before "... and N more"


def _some(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_EXAMPLES])
    return shown + (f" ... and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


def _quiet() -> contextlib.AbstractContextManager:
    """pycocotools prints its progress ("loading annotations into memory..."); the caller decides what to print."""
    return contextlib.redirect_stdout(io.StringIO())


# --------------------------------------------------------------------------------------------------------------
# Annotations


def load_annotations(annotations: str | os.PathLike | Mapping[str, Any] | CocoAnnotations) -> Any:
    """A validated ``pycocotools.coco.COCO`` from an annotation file (or an already-parsed dict).

    The file is read and checked by :func:`ssd.data.coco_format.parse_annotations`, the parser training uses too
    (a regular file under a size cap; ids, references, boxes, ``iscrowd`` and sizes checked), with at least one
    annotation required; missing ``area``/``iscrowd``/``id`` are filled in as COCO defines them. A
    :class:`~ssd.data.coco_format.CocoAnnotations` (e.g. ``ssd.data.yolo.load_yolo_split(...).annotations``) is
    used as it is.

    Raises:
        FileNotFoundError / IsADirectoryError: the path does not exist / is a folder.
        ValueError: not a regular file, too large, not JSON, or not a COCO detection set with at least one image,
            annotation and category (each message names the file and the entry that was wrong).
    """
    if isinstance(annotations, CocoAnnotations):  # validated already (a converted YOLO split)
        if not annotations.annotations:
            raise ValueError(f"{annotations.name}: expected at least one annotation, got none (an empty annotation "
                             "set has nothing to evaluate)")
        coco = annotations.to_coco()
    else:
        coco = parse_annotations(annotations, require_annotations=True).to_coco()
    coco.validated_by_ssd = True
    return coco


def _as_coco(annotations: Any) -> Any:
    """A ``COCO`` object from :func:`load_annotations` as given; anything else (a path, a dict, pycocotools' own
    ``COCO``) loaded and checked."""
    if getattr(annotations, "validated_by_ssd", False):
        return annotations
    if hasattr(annotations, "imgToAnns") and hasattr(annotations, "dataset"):
        return load_annotations(annotations.dataset)
    return load_annotations(annotations)


_PLACEHOLDER = re.compile(r"^class_\d+$")


def _normalise(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name.strip().lower())


def category_map(classes: ClassSpec, categories: Sequence[Mapping[str, Any]], source: str = "annotations"
                 ) -> dict[int, int]:
    """Model label (1..K) -> the annotation file's category id, for every category of the file.

    Names are compared with case, spaces, ``_`` and ``-`` ignored. Categories are matched by id
    (``classes.category_ids``; COCO models carry COCO's official ids, which COCO files use) when every file id is
    one of the model's and every name agrees with the model's for that id, or the model's names are placeholders
    (``class_1``...: a model built with only ``num_classes`` has no names to compare). They are matched by name
    when the ids are not the model's, or the names contradict them, and every name is one of the model's (a file
    numbering its own categories 1..n). Anything else is an error: a category the model knows neither by id nor
    by name (it cannot be scored on a class it does not predict), and a name that contradicts its id without
    naming another class (VOC's ``tvmonitor`` for COCO's ``tv``): one of the two is wrong, and scoring by id would
    hide it. Model classes absent from the file are left out (their detections are not scored, as COCOeval would
    ignore them anyway).
    """
    by_id = {cid: label for label, cid in enumerate(classes.category_ids, start=1)}
    by_name: dict[str, int] = {}
    for label, name in enumerate(classes.names, start=1):
        by_name.setdefault(_normalise(name), label)
    placeholders = all(_PLACEHOLDER.match(n) for n in classes.names)
    file_cats = [(int(c["id"]), str(c["name"])) for c in categories]

    ids_known = all(cid in by_id for cid, _ in file_cats)
    differing = [(cid, name) for cid, name in file_cats
                 if cid in by_id and _normalise(name) != _normalise(classes.names[by_id[cid] - 1])]
    names_known = all(_normalise(name) in by_name for _, name in file_cats)
    if ids_known and (placeholders or not differing):
        return {by_id[cid]: cid for cid, _ in file_cats}
    if names_known:
        mapping: dict[int, int] = {}
        for cid, name in file_cats:
            label = by_name[_normalise(name)]
            if label in mapping:
                raise ValueError(f"{source}: expected one category per class name, got {name!r} for ids "
                                 f"{mapping[label]} and {cid}")
            mapping[label] = cid
        return mapping
    if ids_known:
        contradicting = [f"{cid} {name!r} (the model's {cid} is {classes.names[by_id[cid] - 1]!r})"
                         for cid, name in differing]
        raise ValueError(f"{source}: expected category names that agree with the model's for the same ids, got "
                         f"{len(differing)} that do not: {_some(contradicting)}; rename them as the model names "
                         "its classes (model.names)")
    unknown = [f"{cid} {name!r}" for cid, name in file_cats if cid not in by_id and _normalise(name) not in by_name]
    if not unknown:  # every category matches one way or the other, but not all the same way
        unknown = [f"{cid} {name!r}" for cid, name in file_cats if _normalise(name) not in by_name]
    raise ValueError(f"{source}: expected categories the model knows (by id or by name), got {len(unknown)} "
                     f"unknown: {_some(unknown)}")


# --------------------------------------------------------------------------------------------------------------
# Images


class CocoSample(NamedTuple):
    """One image of the set, as a data-loader worker delivers it."""

    index: int  # position in the dataset
    image_id: int
    file: str
    height: int  # from the annotation file when it says, else the decoded image's
    width: int
    pixels: torch.Tensor | None  # 3 x H x W uint8 (3 x S x S when the dataset resizes), None on error
    error: Exception | None


class CocoBatch(NamedTuple):
    """Samples collated: the images that loaded, stacked (pinned by the DataLoader for CUDA), and the failures."""

    samples: list[CocoSample]  # the good ones, pixels dropped (they are in ``pixels``)
    pixels: torch.Tensor | list[torch.Tensor] | None  # N x 3 x S x S uint8 (or a list of 3 x H x W), None if none
    failed: list[CocoSample]


def collate_samples(samples: list[CocoSample]) -> CocoBatch | list[CocoSample]:
    """The DataLoader's ``collate_fn``: stacks same-size images (a resizing dataset's), passes others as a list."""
    good = [s for s in samples if s.error is None]
    failed = [s for s in samples if s.error is not None]
    shapes = {tuple(s.pixels.shape) for s in good}
    if len(shapes) > 1:
        return samples
    pixels = torch.stack([s.pixels for s in good]) if good else None
    return CocoBatch([s._replace(pixels=None) for s in good], pixels, failed)


class CocoImages(Dataset):
    """The images of a COCO annotation set, in ascending id order, decoded as uint8 RGB.

    Args:
        images_dir: the folder the annotation file's ``file_name`` entries are relative to.
        annotations: a COCO JSON path, a parsed dict or a ``COCO`` object (see :func:`load_annotations`).
        input_spec: when given (``model.spec.input``), images are also resized to its S x S as uint8, with the
            filter of the published protocol (PIL's bilinear for NVIDIA's model), in the data-loader workers. A
            rule without a lossless uint8 result (``"torch_bilinear"``) leaves them whole: the evaluation then
            resizes them in the main process, exactly as ``detect`` does.
        include_empty: keep images without annotations (NVIDIA's protocol skips them, so by default they are).
        skip_errors: record images missing on disk instead of raising (their samples carry the error).

    ``dataset[i]`` is a :class:`CocoSample`; decoding errors (corrupt files, a size differing from the
    annotation's) are returned in ``sample.error``, never raised by a worker, so the caller decides.

    Raises:
        FileNotFoundError: ``images_dir`` is missing, or (unless ``skip_errors``) some listed images are.
    """

    def __init__(self, images_dir: str | os.PathLike, annotations: Any, *, input_spec: InputSpec | None = None,
                 include_empty: bool = False, skip_errors: bool = False) -> None:
        self.coco = _as_coco(annotations)
        self.images_dir = pathlib.Path(images_dir)
        if not self.images_dir.is_dir():
            what = "a file" if self.images_dir.exists() else "a path that does not exist"
            raise FileNotFoundError(f"images {str(self.images_dir)!r}: expected a folder of images, got {what}")
        if input_spec is not None and not isinstance(input_spec, InputSpec):
            raise TypeError(f"input_spec: expected an InputSpec (model.spec.input), got {type(input_spec).__name__}")
        self.input_spec = input_spec
        ids = sorted(self.coco.imgs)
        if not include_empty:
            ids = [i for i in ids if self.coco.imgToAnns.get(i)]
        self.image_ids: list[int] = ids
        self.missing: list[str] = [self.coco.imgs[i]["file_name"] for i in ids if not self.path(i).is_file()]
        if self.missing and not skip_errors:
            raise FileNotFoundError(
                f"images {str(self.images_dir)!r}: expected every image the annotations list, got "
                f"{len(self.missing)} of {len(ids)} missing: {_some(self.missing)}")

    def path(self, image_id: int) -> pathlib.Path:
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> CocoSample:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.path(image_id)
        try:
            pixels, _ = load_uint8(path)
            check_image_size(info, pixels.shape[0], pixels.shape[1], path)
        except (OSError, ValueError, TypeError) as exc:
            return CocoSample(index, image_id, str(path), info.get("height", 0), info.get("width", 0), None, exc)
        height, width = pixels.shape[:2]
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        if self.input_spec is not None and has_uint8_resize(self.input_spec):
            # exact: the filter the published accuracy was measured with (PIL's own for NVIDIA's model).
            tensor = resize_uint8(tensor, self.input_spec, exact=True)
        return CocoSample(index, image_id, str(path), height, width, tensor.contiguous(), None)


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``stats`` are COCOeval's 12 numbers in its order (:data:`STAT_NAMES`);
    ``per_class_ap`` is AP@[.5:.95] and ``per_class_ap50`` AP50 per category name (categories with ground truth
    only; :func:`ssd.evaluation.metrics.per_class_ap`); ``detections`` the COCO results list (on rank 0 of a
    distributed run; empty on the others). ``pr_curves`` and ``confusion`` are what ``pr_curve.png`` and
    ``confusion_matrix.png`` draw (:mod:`ssd.evaluation.metrics`); ``plots`` the files written, if any."""

    stats: list[float]
    per_class_ap: dict[str, float]
    images: int
    seconds: float
    images_per_second: float
    detections: list[dict[str, Any]] = field(default_factory=list, repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    summary: str = ""
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    pr_curves: PRCurves | None = field(default=None, repr=False)
    confusion: ConfusionMatrix | None = field(default=None, repr=False)
    plots: list[str] = field(default_factory=list)

    @property
    def ap(self) -> float:
        return self.stats[0]

    def metrics(self) -> dict[str, float]:
        return dict(zip(STAT_NAMES, self.stats))


def _target(device: torch.device | str) -> torch.device:
    device = distributed.resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _backend_for(model: Any, device: torch.device | str | None, precision: str | None) -> Any:
    """What evaluate runs: a network is moved to ``device`` (a copy: the caller's model is not changed) and run by a
    PyTorch backend (in eval mode) with torch's own thread count, since the data loader does not load images
    alongside in threads; a backend is moved the same way when it can be, or must already be on ``device``."""
    if is_detector(model):
        if device is not None:
            target = _target(device)
            if first_conv_weight(model).device != target:
                # Moving the caller's model would change it under them; the copy costs one model's memory.
                model = copy.deepcopy(model).to(target)
        return PyTorchBackend(model, precision, threads=torch.get_num_threads())
    backend = as_backend(model, precision)
    if device is not None:
        target = _target(device)
        if backend.device != target:
            if callable(getattr(backend, "to", None)):
                return backend.to(target)
            raise ValueError(f"device: expected {backend.device} for this backend (its runtime runs there) or None, "
                             f"got {str(device)!r}")
    return backend


def _evaluation_recipe(backend: Any, spec: DetectorSpec) -> PostProcessSpec:
    """The published protocol's recipe (``spec.postprocess``), which a graph with NMS in it must be able to give."""
    problem = nms_mismatch(backend, spec.postprocess, ("iou_threshold", "score_threshold", "max_detections"))
    if problem is not None:
        raise ValueError(f"model: expected a backend that gives the evaluation protocol's post-processing "
                         f"(spec.postprocess), got a graph exported with --nms that cannot ({problem}); export the "
                         "model without --nms to evaluate it")
    return spec.postprocess


def _rows(decoded: list, samples: Sequence[CocoSample], label_to_cat: np.ndarray) -> np.ndarray:
    """COCO result rows ``[image_id, x, y, w, h, score, category_id]`` (float64), by image then score."""
    out = []
    for (boxes, labels, scores), sample in zip(decoded, samples):
        cats = label_to_cat[labels]
        keep = cats >= 0  # model classes the annotation file does not have are not scored
        boxes, scores, cats = boxes[keep], scores[keep], cats[keep]
        # NVIDIA's arithmetic, in float32: left * width, top * height, (right - left) * width, ...
        width, height = np.float32(sample.width), np.float32(sample.height)
        rows = np.empty((boxes.shape[0], 7), dtype=np.float64)
        rows[:, 0] = sample.image_id
        rows[:, 1] = boxes[:, 0] * width
        rows[:, 2] = boxes[:, 1] * height
        rows[:, 3] = (boxes[:, 2] - boxes[:, 0]) * width
        rows[:, 4] = (boxes[:, 3] - boxes[:, 1]) * height
        rows[:, 5] = scores
        rows[:, 6] = cats
        out.append(rows)
    return np.concatenate(out) if out else np.empty((0, 7))


def _infer(backend: Any, spec: DetectorSpec, recipe: PostProcessSpec, loader: DataLoader, label_to_cat: np.ndarray,
           skip_errors: bool, bar: Any) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
    rows, done, skipped = [], [], []
    device = backend.device
    dtype, memory_format = input_format(backend)
    non_blocking = device.type == "cuda"
    started = time.perf_counter()
    for batch in loader:
        if isinstance(batch, list):
            # Images of several sizes: the spec's rule has no lossless uint8 resize for the workers to do, so
            # preprocess_for_detection resizes them here, as detect does.
            good = [s for s in batch if s.error is None]
            batch = CocoBatch([s._replace(pixels=None) for s in good], [s.pixels for s in good],
                              [s for s in batch if s.error is not None])
        for sample in batch.failed:
            if not skip_errors:
                raise sample.error
            skipped.append((sample.file, str(sample.error)))
        if batch.samples:
            images = batch.pixels
            if isinstance(images, torch.Tensor):
                # Pinned by the DataLoader on CUDA, so this copy overlaps with the work still queued on the device.
                images = images.to(device, non_blocking=non_blocking)
            inputs = preprocess_for_detection(images, spec.input, device=device, dtype=dtype,
                                              memory_format=memory_format)
            outputs = backend(inputs)
            decoded = split_detections(postprocess_outputs(outputs, backend.outputs, spec, recipe))
            rows.append(_rows(decoded, batch.samples, label_to_cat))
            done += [s.image_id for s in batch.samples]
        bar.update(len(batch.samples) + len(batch.failed))
        # tqdm shows s/image below one image a second; the postfix always says images/s.
        bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - started, 1e-9):.2f} images/s", refresh=False)
    return rows, done, skipped


def _coco_eval(coco: Any, rows: np.ndarray, image_ids: list[int]) -> tuple[list[float], dict[str, float], str]:
    """COCO's 12 numbers, AP per class and the printed summary."""
    evaluator, summary = _cocoeval(coco, rows, image_ids)
    return [float(s) for s in evaluator.stats], per_class_ap(evaluator), summary


def _cocoeval(coco: Any, rows: np.ndarray, image_ids: list[int]) -> tuple[Any, str]:
    """pycocotools' COCOeval over ``rows``, evaluated, accumulated and summarised; and its printed summary."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with _quiet():
        if rows.shape[0]:
            detections = coco.loadRes(rows)
        else:  # loadRes cannot take an empty list; an empty result set scores 0 everywhere
            detections = COCO()
            detections.dataset = {"images": list(coco.dataset["images"]), "categories": coco.dataset["categories"],
                                  "annotations": []}
            detections.createIndex()
        evaluator = COCOeval(coco, detections, iouType="bbox")
        # Only the images that ran: identical to all images when none was skipped (images without truths add
        # nothing), and an honest score of the rest when some were.
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    return evaluator, summary.getvalue()


def per_class_table(per_class_ap: Mapping[str, float]) -> str:
    """The per-class AP as an aligned two-column text table, in the annotation file's category order."""
    if not per_class_ap:
        return "(no category has ground truth)"
    width = max(len("category"), *(len(n) for n in per_class_ap))
    lines = [f"{'category':<{width}}  AP", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {ap:.3f}" for name, ap in per_class_ap.items()]
    return "\n".join(lines)


def evaluate(
    model: Any,
    images_dir: str | os.PathLike,
    annotations: str | os.PathLike | Mapping[str, Any],
    *,
    batch_size: int = 8,
    workers: int = 0,
    device: torch.device | str | None = None,
    precision: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    verbose: bool | None = None,
    skip_errors: bool = False,
    plots: bool | str | os.PathLike = False,
    confusion_iou: float = CONFUSION_IOU,
    confusion_score: float = CONFUSION_SCORE,
) -> EvalResult:
    """COCO bbox evaluation of ``model`` on ``annotations`` (a COCO JSON file) with images from ``images_dir``.

    Args:
        model: a detector network of this library, or any backend (``ssd.load(NAME_OR_FILE)``: an exported ONNX or
            OpenVINO file is scored the same way); its spec gives the preprocessing and the evaluation recipe
            (``spec.postprocess``). A network is not modified (a copy runs when it must move or is in training
            mode). A graph exported with ``--nms`` is refused unless its own recipe can give that one.
        batch_size: images per forward pass. workers: DataLoader processes decoding and resizing (0: in this one).
        device: where to run (default: the model's; an exported file's runtime runs where it runs). precision: None
            (the weights' dtype), 'fp32', 'bf16' or 'fp16' for a network; a backend has its own.
        out_dir: when given, ``metrics.json`` and ``detections.json`` (the COCO results list) are written there.
        progress: the stages on stdout (reading the annotations, detecting N images with a progress bar and
            images/s, scoring, the plots written). verbose: print COCO's 12-line summary, the per-class AP table and
            the speed (default: same as ``progress``).
        skip_errors: images missing or unreadable are counted, reported and left out of the score instead of
            raising.
        plots: where ``pr_curve.png``, ``confusion_matrix.png`` and ``confusion_matrix.json`` go: False (default)
            nowhere, True into ``out_dir`` (``python -m ssd evaluate`` does this unless ``--no-plots``), a folder
            path into that folder (with or without ``out_dir``; training's validation can pass its run folder). The
            curves and the matrix are in the result either way (``pr_curves``, ``confusion``).
        confusion_iou, confusion_score: the confusion matrix's IoU and score thresholds (detections scoring above
            ``confusion_score`` are matched to objects with IoU above ``confusion_iou``; defaults Ultralytics' 0.45
            and 0.25; see :func:`ssd.evaluation.metrics.confusion_matrix`). They do not change the COCO scores.

    Under ``torchrun`` (a process group of several processes), every rank must call this with the same arguments
    (checked before any image is read: ranks with another model, annotation set or image count are refused): each
    evaluates the images ``rank::world`` of the id-sorted list, rank 0 gathers the detections, scores them and
    writes the outputs; every rank returns the scores (the detections list only on rank 0). An error on any rank
    is raised on all of them, so none waits for the others. Category ids: see :func:`category_map`.

    Raises:
        FileNotFoundError, ValueError, TypeError: bad arguments, annotation file, images (messages name them).
    """
    spec = spec_of(model)
    batch_size = check_int("batch_size", batch_size, 1)
    workers = check_int("workers", workers, 0)
    verbose = progress if verbose is None else verbose
    plot_dir = _plot_dir(plots, out_dir)
    # Checked now, not after the whole set has run.
    confusion_iou = check_real("confusion_iou", confusion_iou, 0.0, 1.0, open_high=True)
    confusion_score = check_real("confusion_score", confusion_score, 0.0, 1.0, open_high=True)
    say = _stage_printer(progress and distributed.is_main())
    if isinstance(annotations, (str, os.PathLike)):
        say(f"reading annotations {os.fspath(annotations)}")
    coco = _as_coco(annotations)
    say(f"{len(coco.imgs)} images, {len(coco.anns)} boxes, {len(coco.cats)} categories in {coco.source}")
    mapping = category_map(spec.classes, coco.dataset["categories"], coco.source)
    label_to_cat = np.full(spec.num_classes, -1, dtype=np.int64)
    for label, cat_id in mapping.items():
        label_to_cat[label] = cat_id
    dataset = CocoImages(images_dir, coco, input_spec=spec.input, skip_errors=skip_errors)
    backend = _backend_for(model, device, precision)
    recipe = _evaluation_recipe(backend, spec)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    # Before any image is read: ranks given other arguments would score a mix of two evaluations.
    distributed.check_same({"model": (spec.name, spec.classes.names), "annotations": coco.source,
                            "image count": len(dataset)}, "evaluate")
    mine = distributed.shard(range(len(dataset)), rank, world)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_samples, pin_memory=backend.device.type == "cuda")

    from tqdm.auto import tqdm

    say(f"detecting {len(dataset)} images (those with annotations) with {spec.name} on {backend.device}, batches "
        f"of {batch_size}" + (f", {world} processes" if world > 1 else ""))
    started = time.perf_counter()
    outcome: tuple | BaseException
    with tqdm(total=len(mine), unit="image", disable=not (progress and main), file=sys.stderr,
              desc="evaluate" if world == 1 else f"evaluate (rank 0 of {world})") as bar:
        try:
            rows, done, skipped = _infer(backend, spec, recipe, loader, label_to_cat, skip_errors, bar)
            outcome = (np.concatenate(rows) if rows else np.empty((0, 7)), done, skipped)
        except Exception as exc:
            if world == 1:
                raise
            # Every rank must reach the gather, or the others would wait there for the timeout: the error
            # travels with the results and is raised everywhere.
            outcome = exc
    gathered = distributed.gather_to_main(outcome)
    seconds = time.perf_counter() - started

    result: EvalResult | BaseException | None = None
    if main:
        errors = [o for o in gathered if isinstance(o, BaseException)]
        if errors:
            result = errors[0]
        else:
            rows = np.concatenate([o[0] for o in gathered])
            done = [i for o in gathered for i in o[1]]
            skipped = [s for o in gathered for s in o[2]]
            # Stable by image id: each image's rows stay by descending score, as in a single process.
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
            try:
                result = _finish(backend, spec, coco, rows, done, skipped, seconds, out_dir, verbose,
                                 _Plots(plot_dir, confusion_iou, confusion_score, say))
            except Exception as exc:
                result = exc
    shared = distributed.broadcast_from_main(result if not isinstance(result, EvalResult) else
                                             _replace_detections(result, []))
    if isinstance(shared, BaseException):
        raise shared
    return result if main else shared


class _Plots(NamedTuple):
    folder: pathlib.Path | None
    iou: float
    score: float
    say: Any


def _plot_dir(plots: bool | str | os.PathLike, out_dir: str | os.PathLike | None) -> pathlib.Path | None:
    if isinstance(plots, bool):
        return pathlib.Path(out_dir) if plots and out_dir is not None else None
    if isinstance(plots, (str, os.PathLike)):
        return pathlib.Path(plots)
    raise TypeError(f"plots: expected True, False or a folder path, got {type(plots).__name__}")


def _stage_printer(enabled: bool) -> Any:
    def say(message: str) -> None:
        if enabled:
            # stdout, with the summary: stderr stays the one error line a failing command prints (its contract
            # with scripts), plus the progress bar.
            print(f"evaluate: {message}", flush=True)

    return say


def _replace_detections(result: EvalResult, detections: list) -> EvalResult:
    clone = copy.copy(result)
    clone.detections = detections
    return clone


def _finish(backend: Any, spec: DetectorSpec, coco: Any, rows: np.ndarray, done: list[int],
            skipped: list[tuple[str, str]], seconds: float, out_dir: str | os.PathLike | None,
            verbose: bool, plots: _Plots) -> EvalResult:
    if not done:
        raise ValueError(f"{coco.source}: expected at least one image to evaluate, got none that could be read "
                         f"({len(skipped)} skipped)")
    plots.say(f"scoring {rows.shape[0]} detections on {len(done)} images (pycocotools COCOeval)")
    evaluator, summary = _cocoeval(coco, rows, done)
    stats, per_class = [float(s) for s in evaluator.stats], per_class_ap(evaluator)
    detections = [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]],
                   "score": float(r[5])} for r in rows]
    result = EvalResult(stats, per_class, len(done), seconds, len(done) / seconds if seconds > 0 else 0.0,
                        detections, skipped, summary, per_class_ap(evaluator, 0.5), pr_curves(evaluator),
                        confusion_matrix(coco, rows, done, iou_threshold=plots.iou, score_threshold=plots.score))
    if plots.folder is not None:
        from .plots import write_plots

        result.plots = [str(p) for p in write_plots(plots.folder, result.pr_curves, result.confusion)]
        plots.say(f"wrote {', '.join(pathlib.Path(p).name for p in result.plots)} to {plots.folder}")
    if out_dir is not None:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "detections.json", detections, indent=None)
        write_json(out / "metrics.json", {
            "model": spec.name,
            "checkpoint": getattr(backend, "source", None),
            "backend": getattr(backend, "runtime", type(backend).__name__),
            "annotations": coco.source_path,
            "images": result.images,
            "seconds": round(seconds, 3),
            "images_per_second": round(result.images_per_second, 3),
            "world_size": distributed.world_size(),
            "stats": stats,
            "stat_names": list(STAT_NAMES),
            "per_class_ap": per_class,
            "per_class_ap50": result.per_class_ap50,
            "confusion_matrix": {"iou_threshold": plots.iou, "score_threshold": plots.score},
            "detections": len(detections),
            "skipped": [{"file": f, "error": e} for f, e in skipped],
        })
    if verbose:
        print(summary.rstrip())
        print(per_class_table(per_class))
        print(f"{result.images} image(s) in {seconds:.1f} s: {result.images_per_second:.1f} images/s"
              + (f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))
        if skipped:
            print(f"{len(skipped)} image(s) skipped:", file=sys.stderr)
            for name, error in skipped:
                print(f"  {name}: {error}", file=sys.stderr)
    return result
