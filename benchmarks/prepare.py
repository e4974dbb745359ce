"""Time ``prepare_input`` on a 640 x 480 JPEG against NVIDIA's pipeline done the straightforward way.

The baseline is what the published torch.hub utilities do: ``skimage.io.imread`` + ``img_as_float``, then
``skimage.transform.resize`` of the whole image, centre crop and normalise. Both run in the same process on the same
file; each time is the median of ``repeats`` runs after a warm-up.

Part of ``python -m benchmarks`` (``--suite prepare`` runs it alone).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import median_seconds
from ssd.compat.nvidia import crop_center, normalize, prepare_input, rescale


def nvidia_prepare_input(path: str) -> np.ndarray:
    """NVIDIA's ``prepare_input``, straightforwardly: read, convert to float, resize the whole image, crop."""
    import skimage
    import skimage.io

    img = skimage.img_as_float(skimage.io.imread(path))
    return normalize(crop_center(rescale(img, 300, 300), 300, 300))


def write_test_jpeg(folder: Path, width: int = 640, height: int = 480) -> Path:
    """scikit-image's chelsea photo resized to ``width`` x ``height``, saved as a quality-90 JPEG."""
    import skimage.data
    from PIL import Image

    path = folder / f"chelsea_{width}x{height}.jpg"
    Image.fromarray(skimage.data.chelsea()).resize((width, height), Image.BICUBIC).save(path, quality=90)
    return path



def measure_prepare_input(repeats: int = 30, warmup: int = 3, width: int = 640, height: int = 480) -> dict[str, Any]:
    """Median per-image seconds of ours and of the baseline on one JPEG, their ratio and their largest difference."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"expected repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_test_jpeg(Path(folder), width, height))
        ours = median_seconds(lambda: prepare_input(path), repeats, warmup)
        baseline = median_seconds(lambda: nvidia_prepare_input(path), repeats, warmup)
        max_abs_diff = float(np.abs(prepare_input(path) - nvidia_prepare_input(path)).max())
    return {
        "image": f"{width}x{height} JPEG",
        "repeats": repeats,
        "ours_s": ours,
        "baseline_s": baseline,
        "speedup": baseline / ours,
        "max_abs_diff": max_abs_diff,
    }
