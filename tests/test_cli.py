"""``python -m ssd detect`` end to end, in temporary folders, with checkpoints the tests make."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ssd.cli import main

from helpers import REPO
from helpers.checkpoints import save_detecting_checkpoint, serve_published


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_detecting_checkpoint(tmp_path_factory.mktemp("ckpt") / "detecting.pt")


def check_schema(report: dict) -> None:
    assert set(report) == {"model", "checkpoint", "threshold", "images", "skipped"}
    for image in report["images"]:
        assert set(image) == {"file", "width", "height", "picture", "detections"}
        for found in image["detections"]:
            assert set(found) == {"name", "category_id", "score", "bbox"}
            x, y, w, h = found["bbox"]
            assert 0 <= x <= x + w <= image["width"] + 0.01 and 0 <= y <= y + h <= image["height"] + 0.01
            assert 0.4 < found["score"] <= 1 and 1 <= found["category_id"] <= 90


def test_default_run_on_sample_photos(tmp_path, checkpoint, hub_dir):
    env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "TORCH_HOME": str(hub_dir)}
    out = tmp_path / "ssd-out"
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "detections.json").read_text())
    check_schema(report)
    assert [image["file"] for image in report["images"]] == ["astronaut.png", "chelsea.png", "coffee.png",
                                                             "rocket.png"]
    assert report["skipped"] == [] and report["checkpoint"] == str(checkpoint)
    for image in report["images"]:
        picture = Image.open(out / image["picture"])
        assert picture.size == (image["width"], image["height"])
        assert image["detections"][0]["name"] == "person"
        assert f"{image['file']} ({image['width']}x{image['height']}): " in done.stdout
    assert "4 image(s)" in done.stdout and "Traceback" not in done.stderr


def test_folder_with_a_corrupt_file_reports_skips_and_fails(tmp_path, checkpoint, hub_dir, monkeypatch, capsys):
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    Image.fromarray(data.coffee()).save(photos / "coffee.jpg")
    Image.fromarray(data.camera()).save(photos / "nested" / "camera.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (photos / "notes.txt").write_text("not an image, and not named like one")
    out = tmp_path / "out"
    code = main(["detect", str(photos), "--out", str(out), "--batch-size", "2"])
    assert code == 1
    report = json.loads((out / "detections.json").read_text())
    check_schema(report)
    assert sorted(os.path.basename(i["file"]) for i in report["images"]) == ["camera.png", "coffee.jpg"]
    assert [os.path.basename(s["file"]) for s in report["skipped"]] == ["broken.jpg"]
    assert "broken.jpg" in report["skipped"][0]["error"]
    # Pictures mirror the input folder and keep their input's format; everything is readable by others.
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["coffee.jpg", "detections.json", "nested/camera.png"]
    assert sorted(i["picture"] for i in report["images"]) == ["coffee.jpg", "nested/camera.png"]
    assert Image.open(out / "coffee.jpg").format == "JPEG" and Image.open(out / "nested/camera.png").format == "PNG"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in written:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err


def test_urls_missing_paths_and_name_clashes(tmp_path, checkpoint, hub_dir, monkeypatch, http_server):
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(data.chelsea()).save(tmp_path / folder / "cat.png")
    buffer = tmp_path / "a" / "cat.png"
    url = http_server.add("/img/cat.png", buffer.read_bytes())
    out = tmp_path / "out"
    code = main(["detect", str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png"), url,
                 str(tmp_path / "missing.jpg"), "--out", str(out), "--threshold", "0.5"])
    assert code == 1
    report = json.loads((out / "detections.json").read_text())
    assert [i["picture"] for i in report["images"]] == ["cat.png", "cat-2.png", "cat-3.png"]
    assert report["skipped"] == [{"file": str(tmp_path / "missing.jpg"), "error": "no such file or folder"}]
    assert report["threshold"] == 0.5
    boxes = [np.array([d["bbox"] for d in i["detections"]]) for i in report["images"]]
    np.testing.assert_allclose(boxes[0], boxes[2], atol=0.02)  # the URL gives what the file gives


def test_without_weights_it_exits_with_the_checkpoint_message(tmp_path, hub_dir, monkeypatch, http_server, capsys):
    # Offline with nothing cached: every published URL refuses (a stopped local server stands in for NGC).
    serve_published(monkeypatch, http_server)
    http_server.stop()
    code = main(["detect", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no nvidia_ssd checkpoint could be downloaded") and "SSD_CHECKPOINT=" in err
    assert "Traceback" not in err and "Warning" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--threshold", "2"], "--threshold: expected a number in [0, 1), got 2.0"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["--device", "gpu7"], "--device: expected cpu, cuda or cuda:N"),
])
def test_bad_options(tmp_path, checkpoint, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    assert main(["detect", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
