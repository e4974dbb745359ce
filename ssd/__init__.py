"""SSD300 (ResNet-50) object detection: NVIDIA's published model and checkpoints, with a safe and fast toolkit."""
# Every submodule is imported here, eagerly: hubconf.py loads this package with the caller's own `ssd` set
# aside and then restores it, so nothing of ours may be imported lazily later by name.
from . import (  # noqa: F401
    builder,
    checkpoints,
    cli,
    coco,
    decode,
    default_boxes,
    detection,
    drawing,
    fetch,
    images,
    model,
    transforms,
)
from .builder import build_ssd300  # noqa: F401
from .detection import Detections  # noqa: F401
from .model import SSD300  # noqa: F401
