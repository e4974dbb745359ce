"""INT8 OpenVINO export (NNCF post-training quantization) and detection through the quantized file."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ssd.cli import main

from helpers import REPO, photo
from helpers.checkpoints import SMALL_MODEL as SMALL
from helpers.checkpoints import detecting_ssdlite

pytest.importorskip("onnx")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from ssd.backends import OpenVinoBackend, load  # noqa: E402
from ssd.data.synthetic import make_shapes_dataset  # noqa: E402
from ssd.export import export_openvino, export_openvino_int8  # noqa: E402
from ssd.export.int8 import MIN_CALIBRATION_IMAGES, calibration_files  # noqa: E402
from ssd.inference import detect  # noqa: E402


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    make_shapes_dataset(root, MIN_CALIBRATION_IMAGES, image_size=(96, 128), seed=3)
    return root / "images"


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    return float(inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter))


@pytest.mark.slow
def test_int8_file_is_smaller_and_detects_like_fp32(tmp_path, calibration):
    model = detecting_ssdlite()
    fp32 = export_openvino(model, tmp_path / "fp32.xml")
    int8 = export_openvino_int8(model, tmp_path / "int8.xml", calibration)
    # INT8 weights: a quarter of the float32 bytes for the convolutions (biases and the anchors stay float).
    assert os.path.getsize(int8.with_suffix(".bin")) < 0.4 * os.path.getsize(fp32.with_suffix(".bin"))
    backend = load(int8)
    assert isinstance(backend, OpenVinoBackend) and backend.spec == model.spec
    photos = [photo("astronaut"), photo("coffee")]
    reference = detect(model, photos, threshold=0.5)
    found = detect(backend, photos, threshold=0.5)
    for ref, got in zip(reference, found):
        assert len(ref) > 0 and len(got) > 0
        # The network's numbers move by the quantization step, so the test asks for the same best detection, not
        # the same digits: its class, a score within 0.1 and a box overlapping the float one.
        assert got.labels[0] == ref.labels[0]
        assert abs(got.scores[0] - ref.scores[0]) < 0.1
        assert box_iou(got.boxes[0], ref.boxes[0]) > 0.7


def test_too_few_calibration_images_are_refused(tmp_path):
    make_shapes_dataset(tmp_path, 5, image_size=64)
    with pytest.raises(ValueError, match=f"at least {MIN_CALIBRATION_IMAGES} images .* got 5"):
        calibration_files(tmp_path / "images")
    with pytest.raises(ValueError, match="expected a folder of images"):
        calibration_files(tmp_path / "annotations.json")


def test_calibration_picks_spread_over_the_folder(calibration):
    files = calibration_files(calibration, count=MIN_CALIBRATION_IMAGES // 2, minimum=10)
    everything = sorted(calibration.glob("*.jpg"))
    assert len(files) == MIN_CALIBRATION_IMAGES // 2 and files[0] == everything[0] and files[-1] == everything[-1]


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssd", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "onnx", "--int8", "--out", "m.onnx"], "--int8: expected --format openvino"),
    (["--format", "openvino", "--int8", "--out", "m.xml"], "--calibration: expected a folder of images with --int8"),
    (["--format", "openvino", "--out", "m.xml", "--calibration", "."], "--calibration: expected it only with --int8"),
    (["--format", "openvino", "--int8", "--calibration", ".", "--calibration-images", "20", "--out", "m.xml"],
     "--calibration-images: expected at least 100"),
])
def test_command_refuses_bad_int8_options(tmp_path, capsys, args, message):
    args = [str(tmp_path / a) if a in ("m.onnx", "m.xml") else a for a in args]
    assert main(["export", *args]) == 2
    assert message in capsys.readouterr().err


def test_command_refuses_a_small_calibration_set_before_exporting(tmp_path):
    make_shapes_dataset(tmp_path, 12, image_size=64)
    out = tmp_path / "m.xml"
    done = run_export("--model", SMALL, "--format", "openvino", "--int8", "--calibration", str(tmp_path / "images"),
                      "--out", str(out))
    assert done.returncode == 2 and "at least 100 images" in done.stderr and "got 12" in done.stderr, done.stderr
    assert not out.exists()
