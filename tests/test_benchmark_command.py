"""``ssd benchmark``: the installed command in a subprocess, and the library function's checks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ssd.benchmark import FORMATS, BenchmarkRow, format_table, run_benchmark

from helpers import REPO
from helpers.checkpoints import SMALL_MODEL, detecting_ssdlite

MINICOCO = REPO / "tests" / "data" / "golden" / "minicoco"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ssdlite.pt"
    torch.save(detecting_ssdlite().state_dict(), path)
    return path


@pytest.mark.slow
def test_command_prints_a_row_per_format_with_map(tmp_path, checkpoint):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pycocotools")
    done = subprocess.run([sys.executable, "-m", "ssd", "benchmark", "--model", SMALL_MODEL, "--checkpoint",
                           str(checkpoint), "--formats", "pytorch,onnx", "--images", str(MINICOCO / "images"),
                           "--annotations", str(MINICOCO / "instances.json"), "--batch-size", "2", "--batches", "1",
                           "--threads", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["format", "size", "(MB)", "ms/image", "images/s", "(batch", "2)", "mAP"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {"pytorch", "onnx"}
    for size, ms, per_second, score in rows.values():
        assert 5 < float(size) < 30  # 3.4M float32 parameters: ~14 MB
        assert float(ms) > 0 and float(per_second) > 0
        assert 0.0 <= float(score) <= 1.0
    # The same network in two runtimes, scored on the same images: the same COCO mAP to float rounding.
    assert abs(float(rows["pytorch"][3]) - float(rows["onnx"][3])) < 1e-3


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="formats: expected a comma-separated list of pytorch, .* got tensorrt"):
        run_benchmark(SMALL_MODEL, formats="pytorch,tensorrt")
    with pytest.raises(ValueError, match="model: expected one of nvidia_ssd"):
        run_benchmark("yolo", formats="pytorch")
    with pytest.raises(ValueError, match="images: expected a folder of images"):
        run_benchmark(SMALL_MODEL, formats="pytorch", images=tmp_path / "missing")
    with pytest.raises(ValueError, match="annotations: expected them together with images"):
        run_benchmark(SMALL_MODEL, formats="pytorch", annotations=MINICOCO / "instances.json")
    assert FORMATS == ("pytorch", "bf16", "onnx", "openvino", "openvino-bf16", "int8")


def test_int8_without_calibration_is_a_row_error_not_a_crash(checkpoint):
    pytest.importorskip("nncf")
    rows = run_benchmark(SMALL_MODEL, checkpoint=str(checkpoint), formats="int8,pytorch", batch_size=1, batches=1,
                         threads=1)
    assert rows[0].format == "int8" and "expected calibration images" in rows[0].error
    assert rows[1].format == "pytorch" and rows[1].error is None and rows[1].images_per_second > 0
    table = format_table(rows, 1)
    assert "(int8: expected calibration images" in table and table.splitlines()[2].startswith("pytorch")


def test_table_layout():
    text = format_table([BenchmarkRow("onnx", 13_800_000, 199.25, 5.02, None)], 4)
    assert text.splitlines() == ["format  size (MB)  ms/image  images/s (batch 4)", "onnx    13.8       199.2     5.02"]
