"""`pip install .` gives the `ssd` package, all of it, and an `ssd` command; the hub-only parts stay out.

The wheel is built from a copy of the checkout (building in place would leave build/ and *.egg-info behind), then
installed with --target into a temporary folder and run from yet another folder, so that nothing from the checkout
can be imported by accident. Runtime dependencies come from the running environment (--no-deps).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import ssd

from helpers import REPO

# Runs notebooks, README code, packaging or subprocesses: minutes (make test-fast leaves it out).
pytestmark = pytest.mark.slow

_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
                                     ".pytest_cache", ".ruff_cache", "ssd-out", ".ipynb_checkpoints")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    source = tmp_path_factory.mktemp("src") / "repo"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           str(source), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [built] = out.glob("*.whl")
    return built


@pytest.mark.timeout(600)
def test_wheel_holds_the_whole_library_and_nothing_else(wheel):
    assert wheel.name.startswith(f"ssd_hub-{ssd.__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"ssd", f"ssd_hub-{ssd.__version__}.dist-info"}, top  # no utils/, tests/, benchmarks/, hubconf
    packages = {p.relative_to(REPO).as_posix() for p in (REPO / "ssd").rglob("__init__.py")}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ssd").rglob("*.py")}
    assert packages and modules <= set(names), sorted(modules - set(names))
    info = f"ssd_hub-{ssd.__version__}.dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert re.search(r"^ssd = ssd\.cli:main$", entry_points, flags=re.M)
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    required = {line.split(";")[0].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    runtime = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {f"Requires-Dist: {r}" for r in runtime} <= required
    assert "Provides-Extra: eval" in metadata and "Provides-Extra: onnx" in metadata


@pytest.mark.timeout(600)
def test_installed_command_runs_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (target / "utils").exists() and not (target / "tests").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(target / "bin" / "ssd")]  # its shebang names this interpreter anyway

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ssd {ssd.__version__}"
    helped = run("detect", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: ssd detect") and "examples:" in helped.stdout
    where = subprocess.run([sys.executable, "-c", "import ssd, ssd.inference.detect; print(ssd.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert pathlib.Path(where.stdout.strip()).is_relative_to(target)
