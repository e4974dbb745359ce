"""Every code block of README.md runs, offline, against this checkout: the README cannot rot."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from PIL import Image
from skimage import data

from helpers import REPO
from helpers.checkpoints import save_detecting_checkpoint

# Runs notebooks, README code, packaging or subprocesses: minutes (make test-fast leaves it out).
pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture()
def workdir(tmp_path, hub_dir):
    """A user's folder: a photo, a folder of photos, and a checkpoint under its published name."""
    Image.fromarray(data.chelsea()).save(tmp_path / "photo.jpg")
    Image.fromarray(data.coffee()).save(tmp_path / "street.jpg")
    (tmp_path / "photos").mkdir()
    Image.fromarray(data.astronaut()).save(tmp_path / "photos" / "astronaut.png")
    checkpoint = save_detecting_checkpoint(tmp_path / "nvidia_ssdpyt_fp32_190826.pt")
    _ten_frame_clip(tmp_path / "clip.mp4")
    env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "TORCH_HOME": str(hub_dir), "MPLBACKEND": "Agg",
           "PYTHONPATH": str(REPO)}
    return tmp_path, env


def _ten_frame_clip(path) -> None:
    """clip.mp4 of the video section: ten small frames of the cat photo, sliding (PyAV: requirements-dev.txt)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(10):
            pixels = data.chelsea()[100:164, 7 * i:7 * i + 96].copy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))


def as_local(code: str) -> str:
    """The README loads from GitHub; here the same calls load this checkout."""
    code = re.sub(r'torch\.hub\.load\("OWNER/REPO", ("[a-z_]+")', rf'torch.hub.load({str(REPO)!r}, \1, source="local"',
                  code)
    return code.replace('torch.hub.load(".", ', f"torch.hub.load({str(REPO)!r}, ")


def test_python_blocks_run(workdir):
    folder, env = workdir
    python_blocks = blocks("python")
    assert len(python_blocks) >= 5
    for number, block in enumerate(python_blocks):
        done = subprocess.run([sys.executable, "-c", as_local(block)], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"README python block {number}:\n{block}\n{done.stderr}"
    assert (folder / "photo-detections.png").is_file()


def test_command_line_block_runs(workdir):
    folder, env = workdir
    [cli] = [b for b in blocks("bash") if "python -m ssd" in b]
    for command in commands(cli):
        args = shlex.split(command)
        # As written for the .venv of `make demo`; here this interpreter stands in for it.
        assert args[:3] == [".venv/bin/python", "-m", "ssd"]
        done = subprocess.run([sys.executable, *args[1:]], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
    assert (folder / "ssd-out" / "detections.json").is_file()
    assert sorted(p.name for p in (folder / "results").iterdir()) == ["astronaut.png", "detections.json",
                                                                      "street.jpg"]
    assert sorted(p.name for p in (folder / "people").iterdir()) == ["astronaut.png", "crops", "detections.csv",
                                                                     "detections.json", "labels"]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
    assert commands(block) == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    # CI runs the README's test command, then the suite at the version floors.
    assert [line for line in ci.splitlines() if line.startswith("make")] == ["make test", "make test-floor"]


def test_make_demo_runs_the_main_job(workdir):
    folder, env = workdir
    dry = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    if dry.returncode != 0 or "pip install" in dry.stdout:
        pytest.skip("the .venv that `make demo` uses is not built here (CI builds it with `make test`)")
    done = subprocess.run(["make", "demo", f"ARGS=--out {folder / 'demo'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (folder / "demo").iterdir()) == ["astronaut.png", "chelsea.png", "coffee.png",
                                                                   "detections.json", "rocket.png"]
