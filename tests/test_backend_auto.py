"""``backend="auto"``: the decision from its inputs, the agreement test, and real choices on this machine."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ssd.backends import PyTorchBackend
from ssd.backends import auto as auto_module
from ssd.backends.auto import AUTO_CANDIDATES, auto_order, choose_backend, detections_disagree, native_bf16
from ssd.inference.detections import Detections

from helpers import REPO, photo
from helpers.checkpoints import SMALL_MODEL, detecting_ssdlite


@pytest.mark.parametrize(("device", "openvino", "bf16", "expected"), [
    ("cpu", True, True, ["openvino", "bf16", "fp32"]),
    ("cpu", True, False, ["openvino", "fp32"]),
    ("cpu", False, True, ["bf16", "fp32"]),
    ("cpu", False, False, ["fp32"]),
    ("cuda", True, True, ["fp32"]),
])
def test_order_follows_what_is_installed_and_the_cpu(device, openvino, bf16, expected):
    assert auto_order(device, openvino, bf16) == expected


@pytest.mark.parametrize(("capability", "flags", "expected"), [
    ("AVX512", "fpu sse avx512f avx512_bf16 avx512_vnni", True),
    ("AVX512", "fpu avx512f amx_bf16 amx_tile", True),
    ("AVX512", "fpu avx512f avx512bw", False),  # AVX-512 without bf16 instructions: bf16 is emulated
    ("AVX2", "fpu avx2 avx512_bf16", False),  # torch would not use the AVX-512 kernels
    ("DEFAULT", "", False),
])
def test_native_bf16_needs_the_instructions_and_torch_kernels(capability, flags, expected):
    assert native_bf16(capability, flags) is expected


def detections(rows: list[tuple[list[float], int, float]]) -> Detections:
    boxes = np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, 4)
    return Detections(boxes, np.array([r[2] for r in rows], dtype=np.float32),
                      np.array([r[1] for r in rows], dtype=np.int64), (100, 100))


def test_agreement_asks_for_each_clear_detection_in_both():
    ref = detections([([10, 10, 50, 50], 1, 0.9), ([60, 60, 90, 90], 17, 0.45)])
    # The same, rounded a little, and without the detection near the threshold (0.45 < 0.4 + 0.1): agree.
    assert detections_disagree(ref, detections([([10.5, 10, 50, 50.5], 1, 0.88)]), 0.4) is None
    assert "did not" in detections_disagree(ref, detections([([10, 10, 50, 50], 3, 0.9)]), 0.4)
    assert "IoU" in detections_disagree(ref, detections([([30, 30, 70, 70], 1, 0.9)]), 0.4)
    assert "score 0.70" in detections_disagree(ref, detections([([10, 10, 50, 50], 1, 0.7)]), 0.4)
    # A clear detection only the candidate has is a disagreement too.
    extra = detections([([10, 10, 50, 50], 1, 0.9), ([0, 0, 20, 20], 5, 0.95)])
    assert "the candidate found" in detections_disagree(ref, extra, 0.4)


@pytest.fixture(scope="module")
def model():
    return detecting_ssdlite()


def test_picks_the_first_candidate_that_agrees(model):
    # On this machine: OpenVINO when installed, else bf16 on a CPU with native bf16, else fp32.
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    choice = choose_backend(model, threads=1)
    assert choice.name == "openvino" and choice.backend.runtime == "openvino" and choice.passed == []
    assert choice.detections > 0  # the check compared real detections
    assert choice.describe().startswith("backend auto: OpenVINO")
    # bf16 alone: it agrees on the check image, and it runs autocast on a channels_last copy.
    choice = choose_backend(model, order=["bf16", "fp32"], threads=1)
    assert choice.name == "bf16" and isinstance(choice.backend, PyTorchBackend)
    assert choice.backend.precision == "bf16" and choice.backend.memory_format == torch.channels_last
    assert next(model.parameters()).is_contiguous()  # the caller's model is not converted


def test_a_candidate_that_disagrees_is_passed_over(model, monkeypatch):
    monkeypatch.setattr(auto_module, "detections_disagree", lambda ref, found, threshold: "a person moved")
    choice = choose_backend(model, order=["bf16", "fp32"], check_image=photo("coffee"), threads=1)
    assert choice.name == "fp32" and choice.backend.precision == "fp32"
    assert choice.passed == [("bf16", "disagrees with fp32: a person moved")]
    assert "passed over: bf16 (disagrees with fp32: a person moved)" in choice.describe()
    with pytest.raises(ValueError, match="order: expected names among"):
        choose_backend(model, order=["tensorrt"])
    assert set(AUTO_CANDIDATES) == {"openvino", "bf16", "fp32"}


def test_detect_command_says_what_it_picked(tmp_path, model):
    checkpoint = tmp_path / "ssdlite.pt"
    torch.save(model.state_dict(), checkpoint)
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", "--model", SMALL_MODEL, "--checkpoint",
                           str(checkpoint), "--backend", "auto", "--device", "cpu", "--no-pictures", "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "backend auto: " in done.stdout and (tmp_path / "out" / "detections.json").is_file()
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", "--model", SMALL_MODEL, "--backend", "auto",
                           "--precision", "bf16", "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2 and "--precision: expected fp32 (the reference) with --backend auto" in done.stderr
