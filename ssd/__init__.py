"""SSD300 (ResNet-50) object detection: NVIDIA's published model and checkpoints, with a safe and fast toolkit."""
# Every submodule is imported here, eagerly: hubconf.py loads this package with the caller's own `ssd` set
# aside and then restores it, so nothing of ours may be imported lazily later by name.
from . import builder, checkpoints, coco, default_boxes, model  # noqa: F401
