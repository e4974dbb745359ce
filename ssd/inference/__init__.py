"""Inference pipelines built on the networks: preprocessing, ``detect``, the ``Detections`` result, drawing."""
from .detect import detect, detect_iter
from .detections import Detections

__all__ = ["Detections", "detect", "detect_iter"]
