"""Shared test helpers, in one place: the golden data, recipe weights and checkpoints, photos, a loopback server.

Tests import from here (``from helpers import ...``) and never from each other.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "golden"
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs, as an H x W x 3 uint8 array."""
    from skimage import data

    return getattr(data, name)()


def forward_error(model: torch.nn.Module, golden: dict) -> float:
    """Worst absolute difference to forward.npz, relative to the golden output's range."""
    x = torch.from_numpy(golden["image"]).permute(2, 0, 1)[None]
    with torch.inference_mode():
        locs, confs = model(x)
    assert locs.shape == (1, 4, 8732) and confs.shape == (1, 81, 8732)
    errors = []
    for ours, theirs in ((locs, golden["locs"]), (confs, golden["confs"])):
        errors.append(np.abs(ours.float().numpy() - theirs).max() / (theirs.max() - theirs.min()))
    return float(max(errors))
