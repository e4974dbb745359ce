"""torchvision's SSD checkpoints: bare state dicts (its published ``.pth`` files, ``torch.save(model.state_dict())``),
already under this package's key names, since :mod:`ssd.models.tv_ssd` keeps torchvision's layer names.

Converting is therefore checking: the file must be a state dict of the torchvision model asked for, not another
family's (NVIDIA's, mmdetection's, this package's own layouts) nor torchvision's other SSD. Files are read through
:func:`ssd.weights.formats.read_checkpoint`; the published table is in :mod:`ssd.models.tv_ssd`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.spec import ClassSpec, DetectorSpec
from .formats import describe, tensors
from .loader import InvalidCheckpointError

__all__ = ["LOAD_GLOBALS", "identify", "to_state_dict"]

# torchvision's published files are plain OrderedDicts of tensors: nothing beyond what the safe loader accepts.
LOAD_GLOBALS: tuple = ()

# Our model name -> torchvision's, for messages.
_TORCHVISION_NAMES = {
    "tv_ssd300_vgg16": "ssd300_vgg16",
    "tv_ssdlite320_mobilenet_v3_large": "ssdlite320_mobilenet_v3_large",
}
# A key only that layout has (its L2 scale; SSDLite's depthwise head block), and the model it marks.
_MARKERS = (
    ("backbone.scale_weight", "tv_ssd300_vgg16"),
    ("head.classification_head.module_list.0.0.0.weight", "tv_ssdlite320_mobilenet_v3_large"),
)


def identify(state_dict: Mapping[str, object]) -> str | None:
    """Which torchvision SSD (our model name) a state dict's keys belong to, or None when they are no such."""
    for key, name in _MARKERS:
        if key in state_dict:
            return name
    return None


def _other_family(state_dict: Mapping[str, object]) -> str | None:
    """What another family's state dict is, or None when its keys say nothing."""
    keys = list(state_dict)
    if any(k.startswith(("feature_extractor.", "additional_blocks.")) for k in keys):
        return "an NVIDIA SSD300 (ResNet-50) state dict"
    if any(k.startswith(("bbox_head.", "neck.")) for k in keys):
        return "an mmdetection SSD state dict"
    if any(k.startswith(("loc.", "conf.")) for k in keys):
        return "a state dict of this package's NVIDIA or mmdetection models (keys loc.*, conf.*)"
    found = identify(state_dict)
    return None if found is None else f"a torchvision {_TORCHVISION_NAMES[found]} state dict"


def to_state_dict(obj: object, source: str, spec: DetectorSpec) -> tuple[dict[str, torch.Tensor], ClassSpec | None]:
    """The tensors of a torchvision SSD state dict for ``spec``'s model; such files record no class names (the
    class count comes from the class predictor's shape, as for every file)."""
    wanted = f"a torchvision {_TORCHVISION_NAMES.get(spec.name, spec.name)} state dict"
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidCheckpointError(f"checkpoint {source!r}: expected {wanted} (torch.save(model.state_dict())), "
                                     f"got {describe(obj)}")
    state = tensors(obj, source)
    if identify(state) != spec.name:
        what = _other_family(state)
        if what is not None:
            raise InvalidCheckpointError(f"checkpoint {source!r}: expected {wanted}, got {what}")
        # Unknown keys: the reader's fit check names the missing and unexpected ones.
    return state, None
