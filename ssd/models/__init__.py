"""The networks (pure ``nn.Module``s) and their specs: one module per family, and a registry by name.

A file here imports torch, torchvision and the spec only: never image loading, HTTP, drawing or the pipelines.
"""
from .base import Detector
from .spec import AnchorSpec, BoxCoderSpec, ClassSpec, DetectorSpec, InputSpec, PostProcessSpec
from .ssd300_resnet50 import NVIDIA_SSD300, SSD300, nvidia_spec
from .ssd_vgg16 import MMDET_SSD300, MMDET_SSD512, SSDVGG16
from .ssdlite_mobilenetv2 import MMDET_SSDLITE320, SSDLiteMobileNetV2

__all__ = [
    "MMDET_SSD300",
    "MMDET_SSD512",
    "MMDET_SSDLITE320",
    "NETWORKS",
    "NVIDIA_SSD300",
    "SSD300",
    "AnchorSpec",
    "BoxCoderSpec",
    "ClassSpec",
    "Detector",
    "DetectorSpec",
    "InputSpec",
    "PostProcessSpec",
    "SSDLiteMobileNetV2",
    "SSDVGG16",
    "nvidia_spec",
]

# Model name -> (network class, its published spec). A new family adds its row here and its checkpoint table in
# ssd.weights, then an entrypoint in hubconf.py.
NETWORKS: dict[str, tuple[type[Detector], DetectorSpec]] = {
    NVIDIA_SSD300.name: (SSD300, NVIDIA_SSD300),
    MMDET_SSD300.name: (SSDVGG16, MMDET_SSD300),
    MMDET_SSD512.name: (SSDVGG16, MMDET_SSD512),
    MMDET_SSDLITE320.name: (SSDLiteMobileNetV2, MMDET_SSDLITE320),
}
