"""Accuracy of a detector on a COCO-format set: ``evaluate(model, images_dir, annotations)`` and the
``python -m ssd evaluate`` command (one process, or many under ``torchrun``). The API is that of
:mod:`ssd.evaluation.coco`; per-class AP, precision-recall curves and the confusion matrix are in
:mod:`ssd.evaluation.metrics`, their pictures in :mod:`ssd.evaluation.plots`."""
from .coco import *  # noqa: F403
from .coco import __all__  # noqa: F401
