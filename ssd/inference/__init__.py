"""Inference pipelines built on the networks: ``detect``, the ``Detections`` result, drawing."""
from .detect import detect, detect_iter
from .detections import DetectionBatch, Detections, StageTimes

__all__ = ["DetectionBatch", "Detections", "StageTimes", "detect", "detect_iter"]
