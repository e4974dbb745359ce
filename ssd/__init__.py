"""SSD object detectors for torch.hub: NVIDIA's SSD300 (ResNet-50) with its published checkpoints, and the
pipelines around it (detection, drawing, checkpoints, the command line).

Layout: ``ssd.models`` (networks and their specs), ``ssd.anchors``, ``ssd.box_coder``, ``ssd.postprocess``,
``ssd.weights`` (checkpoints), ``ssd.io`` (images, HTTP), ``ssd.inference`` (``detect``), ``ssd.compat`` (NVIDIA's
notebook transforms), ``ssd.data`` (class vocabularies), ``ssd.zoo`` (model builders), ``ssd.cli``.
"""
from .inference.detections import Detections
from .models import SSD300, DetectorSpec
from .zoo import build_ssd300

__all__ = ["SSD300", "Detections", "DetectorSpec", "build_ssd300"]
