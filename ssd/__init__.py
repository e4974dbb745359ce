"""SSD object detectors for torch.hub: NVIDIA's SSD300 (ResNet-50) with its published checkpoints, and the
pipelines around it (detection, drawing, checkpoints, the command line).

Layout: ``ssd.models`` (networks and their specs), ``ssd.anchors``, ``ssd.box_coder``, ``ssd.postprocess``,
``ssd.weights`` (checkpoints), ``ssd.io`` (images, HTTP), ``ssd.inference`` (``detect``), ``ssd.compat`` (NVIDIA's
notebook transforms), ``ssd.data`` (class vocabularies), ``ssd.zoo`` (model builders), ``ssd.cli``.
"""
__version__ = "0.2.0"  # read by pyproject.toml (setuptools' attr:), so the package and `ssd --version` agree

from .inference.detections import DetectionBatch, Detections  # noqa: E402
from .models import SSD300, DetectorSpec  # noqa: E402
from .zoo import build_ssd300  # noqa: E402

__all__ = ["SSD300", "DetectionBatch", "Detections", "DetectorSpec", "build_ssd300"]
