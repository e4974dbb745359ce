"""The benchmarks' own model: random weights whose heads favour two classes, so ``detect`` has boxes to decode.

Speed does not depend on the weights' values; only the number of detections does, which these biases make
realistic (a handful per image). Independent of the test suite's golden data on purpose.
"""
from __future__ import annotations

import functools

import torch

from ssd.models import SSD300

# Per feature map j: (class label, logit bias) added to that class's channels of the conf head.
DETECTING_BIASES = {5: (1, 12.0), 4: (16, 6.0)}  # person on the 1x1 map, cat on the 3x3 map


@functools.cache
def detecting_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = SSD300().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for j, (label, bias) in DETECTING_BIASES.items():
        key = f"conf.{j}.bias"
        per_cell = state[key].numel() // model.num_classes
        # Distinct offsets per box shape, so that overlapping boxes never nearly tie.
        state[key][label * per_cell:(label + 1) * per_cell] += bias - 2.0 * torch.arange(per_cell)
    return state


def detecting_model() -> SSD300:
    model = SSD300().eval()
    model.load_state_dict(detecting_state_dict())
    return model
