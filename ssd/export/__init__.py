"""Writers of exported detectors: ONNX, OpenVINO, TorchScript and torch.export files that carry their spec.

The files run through :mod:`ssd.backends` (``ssd.load("model.onnx")``). Importing this package needs only torch;
onnx and openvino are imported when used (``pip install -r requirements-export.txt``).
"""
from .metadata import FORMAT_VERSION, MissingExportPackage
from .onnx import DecodingWrapper, export_onnx, export_openvino, export_program, export_torchscript

__all__ = ["FORMAT_VERSION", "DecodingWrapper", "MissingExportPackage", "export_onnx", "export_openvino",
           "export_program", "export_torchscript"]
