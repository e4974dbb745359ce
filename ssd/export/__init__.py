"""Exported detectors: ONNX and OpenVINO files that carry their spec, and runtimes with ``detect``'s API.

Importing this package needs only torch; onnx, onnxruntime and openvino are imported when used
(``pip install -r requirements-export.txt``).
"""
from .metadata import FORMAT_VERSION, MissingExportPackage
from .onnx import DecodingWrapper, export_onnx, export_openvino, export_program, export_torchscript

__all__ = ["FORMAT_VERSION", "DecodingWrapper", "MissingExportPackage", "export_onnx", "export_openvino",
           "export_program", "export_torchscript"]
