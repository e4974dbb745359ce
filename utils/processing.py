"""The helpers of NVIDIA's published SSD notebook, same names and meaning, built on the ``ssd`` library.

Differences from NVIDIA's: they run without CUDA, load grayscale images the right way round and drop alpha,
decode with one vectorized pass (also for images with nothing in them) without modifying their inputs, and
name the COCO classes without downloading the annotations archive.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ssd.compat.nvidia import crop_center, normalize, prepare_input, rescale
from ssd.data.coco import COCO_NAMES
from ssd.io.images import load_image
from ssd.models.ssd300_resnet50 import NVIDIA_SSD300, nvidia_spec
from ssd.postprocess import postprocess, split_detections

# NVIDIA's argument names for the recipe's fields.
_NVIDIA_NAMES = {"iou_threshold": "criteria", "max_detections": "max_output"}

__all__ = [
    "load_image", "rescale", "crop_center", "normalize", "prepare_input", "prepare_tensor", "decode_results",
    "pick_best", "get_coco_object_dictionary",
]


def prepare_tensor(inputs: Sequence[np.ndarray], fp16: bool = False,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Stack ``prepare_input`` outputs (each 300 x 300 x 3) into an N x 3 x 300 x 300 tensor.

    Float32 (float16 with ``fp16=True``), on ``device``: CUDA when available and CPU otherwise by default.
    """
    if isinstance(inputs, np.ndarray) and inputs.ndim == 3:
        inputs = [inputs]
    arrays = [np.asarray(x) for x in inputs]
    if not arrays:
        raise ValueError("inputs: expected at least one H x W x 3 image, got an empty sequence")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"inputs: expected images of one shape H x W x 3, got shapes {sorted(shapes)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    nchw = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return nchw.to(device=device, dtype=torch.float16 if fp16 else torch.float32).contiguous()


def decode_results(predictions, criteria: float = 0.5, max_output: int = 20) -> list[list[np.ndarray]]:
    """Turn the model's ``(locs, confs)`` into detections per image, as NVIDIA's ``decode_results`` does.

    Returns, per image, ``[boxes, labels, scores]``: boxes N x 4 float32 (left, top, right, bottom, relative to
    the 300 x 300 input), labels N int64 in 1..80 (1..K-1 for a model fine-tuned with K classes), scores N
    float32, in ascending score order, N <= max_output.
    """
    recipe = NVIDIA_SSD300.postprocess.updated(_NVIDIA_NAMES, iou_threshold=criteria, max_detections=max_output)
    spec = NVIDIA_SSD300
    confs = predictions[1] if isinstance(predictions, (tuple, list)) and len(predictions) == 2 else None
    if isinstance(confs, torch.Tensor) and confs.dim() == 3 and confs.shape[1] not in (1, NVIDIA_SSD300.num_classes):
        spec = nvidia_spec(num_classes=int(confs.shape[1]))  # a fine-tuned model with its own classes
    decoded = postprocess(predictions, spec, recipe)
    return [list(found) for found in split_detections(decoded, ascending=True)]


def pick_best(detections: Sequence[np.ndarray], threshold: float = 0.3) -> list[np.ndarray]:
    """Keep the detections whose score is above ``threshold``: ``[boxes, labels, scores]`` filtered alike."""
    if len(detections) != 3:
        raise ValueError(f"detections: expected [boxes, labels, scores], got {len(detections)} items")
    boxes, labels, scores = (np.asarray(part) for part in detections)
    best = np.flatnonzero(scores > threshold)
    return [boxes.reshape(-1, 4)[best], labels[best], scores[best]]


def get_coco_object_dictionary() -> list[str]:
    """The 80 COCO category names; model label ``k`` is ``names[k - 1]``. Shipped here: no download."""
    return list(COCO_NAMES)


class Processing:
    """What ``nvidia_ssd_processing_utils`` returns: the notebook's helpers as attributes."""

    load_image = staticmethod(load_image)
    rescale = staticmethod(rescale)
    crop_center = staticmethod(crop_center)
    normalize = staticmethod(normalize)
    prepare_input = staticmethod(prepare_input)
    prepare_tensor = staticmethod(prepare_tensor)
    decode_results = staticmethod(decode_results)
    pick_best = staticmethod(pick_best)
    get_coco_object_dictionary = staticmethod(get_coco_object_dictionary)

    def __repr__(self) -> str:
        return f"Processing({', '.join(__all__)})"
