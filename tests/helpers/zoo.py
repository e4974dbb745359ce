"""Every registered model with weights that detect, built once per test session (``conftest.zoo``).

Published weights cannot be downloaded here, so each family's test weights stand in, written in the family's own
file format and read through the one checkpoint reader: NVIDIA's training file with biased class logits
(helpers.checkpoints), mmdetection's checkpoint of the golden recipe (helpers.mmdet), torchvision's state dict with
key-seeded weights (helpers.tv).
"""
from __future__ import annotations

import pathlib

import torch

MMDET_SHORT = {"ssd300_vgg16": "ssd300", "ssd512_vgg16": "ssd512", "ssdlite320_mobilenet_v2": "ssdlite"}
# The models whose stages also run in the fast suite (make test-fast): the two cheapest, of two families. The
# others' run in the whole suite (marked slow): SSD300/512's VGG and NVIDIA's ResNet-50 take seconds an image here,
# and minutes to export and train.
FAST_MODELS = ("ssdlite320_mobilenet_v2", "tv_ssdlite320_mobilenet_v3_large")


def write_detecting_checkpoint(name: str, path: pathlib.Path) -> pathlib.Path:
    """A checkpoint of model ``name`` in its family's format, with weights that find objects in the photos."""
    if name == "nvidia_ssd":
        from .checkpoints import save_detecting_checkpoint

        return save_detecting_checkpoint(path)
    if name in MMDET_SHORT:
        from .mmdet import mmdet_state_dict, save_mmdet

        return save_mmdet(path, mmdet_state_dict(MMDET_SHORT[name]), legacy=False)
    if name.startswith("tv_"):
        from .tv import detecting_state_dict

        torch.save(detecting_state_dict(name), path)
        return path
    raise ValueError(f"model: expected a registered model with test weights, got {name!r}; add its family here")


class Zoo:
    """Per model name, made on first use and kept for the session: the checkpoint file, the model built from it,
    and its ONNX export."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._checkpoints: dict[str, pathlib.Path] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._onnx: dict[str, pathlib.Path] = {}

    def checkpoint(self, name: str) -> pathlib.Path:
        if name not in self._checkpoints:
            self._checkpoints[name] = write_detecting_checkpoint(name, self.folder / f"{name}.pth")
        return self._checkpoints[name]

    def model(self, name: str) -> torch.nn.Module:
        """The model with the detecting weights, in eval mode. Shared: tests must not modify it."""
        if name not in self._models:
            from ssd.registry import build_model

            self._models[name] = build_model(name, checkpoint=self.checkpoint(name))
        return self._models[name]

    def onnx(self, name: str) -> pathlib.Path:
        """The model exported as ONNX (decoded boxes and scores, dynamic batch)."""
        if name not in self._onnx:
            from ssd.export import export_onnx

            self._onnx[name] = export_onnx(self.model(name), self.folder / f"{name}.onnx")
        return self._onnx[name]
