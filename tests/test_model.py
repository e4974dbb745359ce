"""The model matches NVIDIA's layout and numbers, and building it touches no network."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch

from ssd.anchors import default_boxes
from ssd.models import NVIDIA_SSD300, SSD300
from ssd.models.base import half_with_float_batchnorm
from ssd.registry import build_model

from helpers import REPO, forward_error


def test_state_dict_layout_matches_nvidia(layout):
    state = SSD300().state_dict()
    assert list(state) == [key for key, _, _ in layout]
    for key, shape, dtype in layout:
        assert list(state[key].shape) == shape, key
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key


def test_forward_parity_with_reference(golden_state_dict, forward_golden):
    model = SSD300().eval()
    model.load_state_dict(golden_state_dict, strict=True)
    assert forward_error(model, forward_golden) < 1e-4


def test_untrained_model_is_not_the_golden_one(forward_golden):
    # Guards the parity test itself: different weights must be visibly different.
    assert forward_error(SSD300().eval(), forward_golden) > 1e-2


def test_default_boxes_equal_reference(golden_dir):
    reference = np.load(golden_dir / "default_boxes_xywh.npy")
    ours = default_boxes(NVIDIA_SSD300.anchors, "cxcywh").numpy()
    assert ours.shape == (NVIDIA_SSD300.anchors.num_anchors, 4) == (8732, 4) == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-7, rtol=0)
    xyxy = default_boxes(NVIDIA_SSD300.anchors, "xyxy").numpy()
    np.testing.assert_allclose((xyxy[:, :2] + xyxy[:, 2:]) / 2, ours[:, :2], atol=1e-6)
    # "xywh" (COCO's top-left boxes in ssd.boxes) is refused, not silently taken for the old centre boxes.
    for fmt in ("xywh", "ltrb"):
        with pytest.raises(ValueError, match="fmt: expected 'cxcywh' or 'xyxy'"):
            default_boxes(NVIDIA_SSD300.anchors, fmt)


def test_building_makes_no_network_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network connection attempted while building the model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = build_model("nvidia_ssd", pretrained=False)
    assert not model.training


def test_importing_ssd_is_light():
    # Drawing and HTTP load when a picture is drawn or a URL fetched, not on import (torch itself brings tqdm).
    code = "import sys, ssd; print(sorted(m for m in ('matplotlib', 'requests', 'skimage') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fp16_keeps_batchnorm_in_float32_and_warns_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="very slow.*fp32"):
        model = build_model("nvidia_ssd", pretrained=False, model_math="fp16")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.weight.dtype == module.running_var.dtype == torch.float32
        elif isinstance(module, torch.nn.Conv2d):
            assert module.weight.dtype == torch.float16
    # Half activations through a half conv and a float32 BatchNorm, the mix CUDA runs (a full CPU fp16
    # forward takes tens of seconds).
    stem = model.feature_extractor.feature_extractor[:3]
    out = stem(torch.rand(1, 3, 64, 64).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_half_helper_is_reusable():
    block = half_with_float_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    assert block[0].weight.dtype == torch.float16 and block[1].weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_math": "bf16"}, ValueError, "model_math: expected one of 'fp32', 'fp16', got 'bf16'"),
        ({"weights": "int8"}, ValueError, "weights: expected one of"),
        ({"pretrained": "yes"}, TypeError, "pretrained: expected True or False"),
        ({"progress": None}, TypeError, "progress: expected True or False"),
    ],
)
def test_builder_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_model("nvidia_ssd", **kwargs)


def test_network_files_import_no_pipeline():
    """ssd/models holds pure networks: torch, torchvision, the spec, anchors and box coding, nothing else."""
    import ast

    allowed_absolute = {"__future__", "typing", "dataclasses", "math", "numbers", "functools", "itertools",
                        "collections", "torch", "torchvision"}
    siblings = {path.stem for path in (REPO / "ssd" / "models").glob("*.py")}
    allowed_relative = {"anchors", "box_coder", "data.coco", "", *siblings}
    for path in sorted((REPO / "ssd" / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
                assert roots <= allowed_absolute, f"{path.name} imports {roots}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in allowed_absolute, f"{path.name} imports {node.module}"
                elif not (node.level == 2 and node.module == "inference.detect" and path.name == "base.py"):
                    # (base.py's detect method looks the pipeline up when called, never at import time)
                    assert (node.module or "") in allowed_relative, f"{path.name} imports {node.module}"


def test_a_model_with_its_own_classes_works_end_to_end(tmp_path):
    from ssd.models import nvidia_spec

    spec = nvidia_spec(class_names=("circle", "square", "triangle"), category_ids=(7, 8, 9))
    torch.manual_seed(0)
    model = SSD300(spec).eval()
    assert model.conf[0].out_channels == 4 * 4 and model.names == ["circle", "square", "triangle"]
    with torch.no_grad():
        for head in model.conf:  # uniform class scores (0.25) everywhere ...
            head.weight.zero_()
            head.bias.zero_()
        model.conf[5].bias[2 * 4:3 * 4] = 20.0  # ... but "square" on the last map (label 2: its 4 channels)
    found = model.detect(skimage.data.chelsea(), threshold=0.5)[0]
    assert len(found) > 0 and set(found.names) == {"square"} and set(found.category_ids) == {8}
    record = json.loads(found.to_json())
    assert record["detections"][0]["name"] == "square" and record["detections"][0]["category_id"] == 8
    assert found.save(tmp_path / "square.png").stat().st_size > 0
    assert SSD300(num_classes=4).spec.classes.names == ("class_1", "class_2", "class_3")
    with pytest.raises(ValueError, match="num_classes"):
        SSD300(num_classes=1)
