"""What an evaluation measured, beyond COCO's 12 numbers: AP per class, precision-recall curves and the confusion
matrix.

AP per class and the precision-recall curves are read from the array pycocotools' ``COCOeval.accumulate()`` fills,
``evaluator.eval["precision"]`` (T IoU thresholds x R recall thresholds x K categories x A areas x M max-detection
limits), at area ``all`` and the largest detection limit (100), the slice ``COCOeval.summarize()`` averages for AP:
no second implementation of the matching, so the curves average exactly to the AP COCO reports.

The confusion matrix is the one question COCOeval does not answer (which class a detection took an object for), so
it has its own, stated rule (:func:`confusion_matrix`), with Ultralytics' defaults: IoU above 0.45, score above 0.25.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.spec import check_real

__all__ = [
    "CONFUSION_IOU",
    "CONFUSION_SCORE",
    "ConfusionMatrix",
    "PRCurves",
    "confusion_matrix",
    "per_class_ap",
    "pr_curves",
    "top_classes",
]

# Ultralytics' defaults for its confusion matrix (ConfusionMatrix(conf=0.25, iou_thres=0.45)), so the pictures read
# the same as the ones users know.
CONFUSION_IOU = 0.45
CONFUSION_SCORE = 0.25


def _precision_slice(evaluator: Any) -> np.ndarray:
    """``eval['precision']`` at area 'all' and the largest max-detections: T x R x K, -1 where a category has no
    ground truth (COCOeval's marker)."""
    if not getattr(evaluator, "eval", None) or "precision" not in evaluator.eval:
        raise ValueError("evaluator: expected a COCOeval after evaluate() and accumulate(), got one without "
                         "eval['precision']")
    params = evaluator.params
    area = list(params.areaRngLbl).index("all")
    return np.asarray(evaluator.eval["precision"])[:, :, :, area, -1]


def _iou_index(evaluator: Any, iou_threshold: float) -> int:
    thresholds = np.asarray(evaluator.params.iouThrs)
    found = np.flatnonzero(np.isclose(thresholds, iou_threshold))
    if found.size == 0:
        raise ValueError(f"iou_threshold: expected one of COCOeval's thresholds "
                         f"{', '.join(f'{t:.2f}' for t in thresholds)}, got {iou_threshold!r}")
    return int(found[0])


def _category_names(evaluator: Any) -> list[str]:
    cats = evaluator.cocoGt.cats
    return [str(cats[cid]["name"]) for cid in evaluator.params.catIds]


def per_class_ap(evaluator: Any, iou_threshold: float | None = None) -> dict[str, float]:
    """AP per category name, from an accumulated pycocotools ``COCOeval`` (``evaluate()`` and ``accumulate()`` done).

    ``iou_threshold=None`` gives AP@[.5:.95] (COCO's AP), ``0.5`` AP50, ``0.75`` AP75 (any of ``params.iouThrs``).
    The value is the mean of the precision array over recall thresholds (and IoU thresholds), as
    ``COCOeval.summarize()`` computes AP, restricted to one category; categories without ground truth are left
    out. Keys follow ``params.catIds`` (ascending category id).
    """
    precision = _precision_slice(evaluator)
    if iou_threshold is not None:
        precision = precision[_iou_index(evaluator, iou_threshold)][None]
    out: dict[str, float] = {}
    for k, name in enumerate(_category_names(evaluator)):
        p = precision[:, :, k]
        if (p > -1).any():
            out[name] = float(p[p > -1].mean())
    return out


@dataclass(frozen=True, eq=False)
class PRCurves:
    """Precision against recall, from COCOeval's precision array (see the module docstring).

    ``recall``: COCOeval's R recall thresholds (101: 0, 0.01, ..., 1). ``precision50`` and ``precision``: over all
    categories with ground truth, at IoU 0.5 and averaged over IoU 0.5:0.95; their means over ``recall`` are AP50
    and AP. ``per_class50`` / ``per_class``: the same per category name (categories with ground truth only).
    """

    recall: np.ndarray
    precision50: np.ndarray
    precision: np.ndarray
    per_class50: dict[str, np.ndarray]
    per_class: dict[str, np.ndarray]

    @property
    def ap50(self) -> float:
        return float(self.precision50.mean()) if self.precision50.size else float("nan")

    @property
    def ap(self) -> float:
        return float(self.precision.mean()) if self.precision.size else float("nan")


def _masked_mean(values: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Mean over ``axis`` of the entries > -1 (COCOeval's "no ground truth" marker); -1 where there are none."""
    valid = values > -1
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), -1.0)


def pr_curves(evaluator: Any) -> PRCurves:
    """:class:`PRCurves` from an accumulated pycocotools ``COCOeval``."""
    precision = _precision_slice(evaluator)  # T x R x K
    t50 = _iou_index(evaluator, 0.5)
    names = _category_names(evaluator)
    has_truth = [bool((precision[:, :, k] > -1).any()) for k in range(len(names))]
    kept = precision[:, :, has_truth]
    # Averaging over classes (and IoUs) at each recall threshold, as summarize() averages the whole slice.
    all50 = _masked_mean(kept[t50][None], (0, 2)) if kept.shape[2] else np.empty(0)
    all_iou = _masked_mean(kept, (0, 2)) if kept.shape[2] else np.empty(0)
    per50, per = {}, {}
    for k, name in enumerate(names):
        if has_truth[k]:
            per50[name] = precision[t50, :, k].copy()
            per[name] = _masked_mean(precision[:, :, k], (0,))
    return PRCurves(np.asarray(evaluator.params.recThrs, dtype=np.float64), all50, all_iou, per50, per)


# --------------------------------------------------------------------------------------------------------------
# Confusion matrix


@dataclass(frozen=True, eq=False)
class ConfusionMatrix:
    """Counts of objects and detections, classes plus background.

    ``matrix[i, j]``: row ``i`` the true class, column ``j`` the predicted one, over ``names`` followed by
    ``"background"`` (index K). Row K (true background) counts detections that matched no object (false
    positives), column K (predicted background) objects no detection matched (missed). See :func:`confusion_matrix`
    for the rule.
    """

    names: tuple[str, ...]
    matrix: np.ndarray
    iou_threshold: float
    score_threshold: float

    @property
    def labels(self) -> list[str]:
        return [*self.names, "background"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (what ``confusion_matrix.json`` holds)."""
        return {
            "rows": "true class",
            "columns": "predicted class",
            "classes": self.labels,
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "rule": "detections with score > score_threshold; each matched to at most one object and each object to at "
                    "most one detection, greedily by IoU (any class), pairs with IoU > iou_threshold; crowd objects "
                    "are not counted, and detections on them are ignored",
            "matrix": self.matrix.astype(int).tolist(),
        }


def confusion_matrix(coco: Any, detections: np.ndarray, image_ids: Sequence[int], *,
                     iou_threshold: float = CONFUSION_IOU, score_threshold: float = CONFUSION_SCORE
                     ) -> ConfusionMatrix:
    """The confusion matrix of ``detections`` against the ground truth of ``coco`` on ``image_ids``.

    Args:
        coco: a ``pycocotools.coco.COCO`` with the ground truth (classes: its categories, in ascending id order).
        detections: COCO result rows ``[image_id, x, y, w, h, score, category_id]`` (N x 7, boxes in pixels,
            top-left corner), as :func:`ssd.evaluation.evaluate` scores them.
        image_ids: the images evaluated (an image with no detection still counts its objects as missed).
        iou_threshold, score_threshold: the rule's two numbers (defaults: Ultralytics' 0.45 and 0.25).

    The rule, per image: detections scoring above ``score_threshold`` are kept. Each (object, detection) pair of
    any classes with an IoU above ``iou_threshold`` is a candidate; candidates are taken by descending IoU, each
    object and each detection at most once, and each taken pair adds 1 at (object's class, detection's class): the
    diagonal counts right classes, the rest confusions. An object left over adds 1 at (its class, background); a
    detection left over adds 1 at (background, its class), unless it lies on a crowd region (more than
    ``iou_threshold`` of it inside one, COCO's crowd rule), which COCO does not score. Crowd objects themselves are
    not counted. IoU is COCOeval's own (``pycocotools.mask.iou``).
    """
    from pycocotools import mask as mask_utils

    iou_threshold = check_real("iou_threshold", iou_threshold, 0.0, 1.0, open_high=True)
    score_threshold = check_real("score_threshold", score_threshold, 0.0, 1.0, open_high=True)
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 7)
    cat_ids = sorted(coco.cats)
    index = {cid: i for i, cid in enumerate(cat_ids)}
    k = len(cat_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    unknown = sorted({int(c) for c in detections[:, 6]} - set(cat_ids))
    if unknown:
        raise ValueError(f"detections: expected category ids of the ground truth, got {len(unknown)} others: "
                         f"{', '.join(map(str, unknown[:5]))}")
    kept = detections[detections[:, 5] > score_threshold]
    by_image: dict[int, np.ndarray] = {}
    if kept.shape[0]:
        order = np.argsort(kept[:, 0], kind="stable")
        kept = kept[order]
        starts = np.flatnonzero(np.r_[True, kept[1:, 0] != kept[:-1, 0]])
        for rows in np.split(kept, starts[1:]):
            by_image[int(rows[0, 0])] = rows
    for image_id in image_ids:
        truths = coco.imgToAnns.get(image_id, [])
        dets = by_image.get(int(image_id), np.empty((0, 7)))
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in truths], dtype=bool)
        boxes = np.array([a["bbox"] for a in truths], dtype=np.float64).reshape(-1, 4)
        classes = np.array([index[a["category_id"]] for a in truths], dtype=np.int64)
        det_classes = np.array([index[int(c)] for c in dets[:, 6]], dtype=np.int64)
        if len(truths) and len(dets):
            iou = np.asarray(mask_utils.iou(dets[:, 1:5].tolist(), boxes.tolist(), crowd.astype(np.uint8).tolist()))
        else:
            iou = np.zeros((len(dets), len(truths)))
        normal = np.flatnonzero(~crowd)
        det_used = np.zeros(len(dets), dtype=bool)
        truth_used = np.zeros(len(truths), dtype=bool)
        d_idx, t_idx = np.nonzero(iou[:, normal] > iou_threshold)
        t_idx = normal[t_idx]
        # Descending IoU; ties by detection order (descending score within an image), then by object order.
        for pos in np.lexsort((t_idx, d_idx, -iou[d_idx, t_idx])):
            d, t = d_idx[pos], t_idx[pos]
            if det_used[d] or truth_used[t]:
                continue
            det_used[d] = truth_used[t] = True
            matrix[classes[t], det_classes[d]] += 1
        for t in normal[~truth_used[normal]]:
            matrix[classes[t], k] += 1
        on_crowd = (iou[:, crowd] > iou_threshold).any(axis=1) if crowd.any() else np.zeros(len(dets), dtype=bool)
        for d in np.flatnonzero(~det_used & ~on_crowd):
            matrix[k, det_classes[d]] += 1
    names = tuple(str(coco.cats[cid]["name"]) for cid in cat_ids)
    return ConfusionMatrix(names, matrix, iou_threshold, score_threshold)


def top_classes(values: Mapping[str, float], count: int = 10) -> list[str]:
    """The ``count`` names with the highest values (ties in the mapping's order): the classes plots show."""
    ranked = sorted(enumerate(values.items()), key=lambda item: (-item[1][1], item[0]))
    return [name for _, (name, _) in ranked[:count]]
