"""The networks (pure ``nn.Module``s) and their specs: one module per family.

A file here imports torch, torchvision and the spec only: never image loading, HTTP, drawing or the pipelines. Each
family module declares its models (network, spec, published weights) in ``MODELS``; :mod:`ssd.registry` names them.
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
