"""Writers of exported detectors: ONNX, OpenVINO (float or INT8), TorchScript and torch.export files that carry their
spec.

The files run through :mod:`ssd.backends` (``ssd.load("model.onnx")``). Importing this package needs only torch;
onnx, openvino and nncf are imported when used (``pip install -r requirements-export.txt``).
"""
from .int8 import export_openvino_int8
from .metadata import FORMAT_VERSION, MissingExportPackage
from .onnx import DecodingWrapper, export_onnx, export_openvino, export_program, export_torchscript

__all__ = ["FORMAT_VERSION", "DecodingWrapper", "MissingExportPackage", "export_onnx", "export_openvino",
           "export_openvino_int8", "export_program", "export_torchscript"]
