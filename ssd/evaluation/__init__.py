"""Accuracy of a detector on a COCO-format set: ``evaluate(model, images_dir, annotations)`` and the
``python -m ssd evaluate`` command (one process, or many under ``torchrun``)."""
from .coco import (
    STAT_NAMES,
    CocoBatch,
    CocoImages,
    CocoSample,
    EvalResult,
    category_map,
    collate_samples,
    evaluate,
    load_annotations,
    per_class_table,
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
