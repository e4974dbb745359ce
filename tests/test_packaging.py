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
    # Each extra installs what its name says; evaluation needs none (pycocotools is a runtime dependency).
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert extras == {"onnx", "openvino", "int8", "pandas", "tensorboard", "video"}, extras
    assert any(r.startswith("pycocotools") for r in runtime)
    by_extra: dict[str, set[str]] = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" in line:
            requirement, marker = line.split(":", 1)[1].split(";", 1)
            name = re.split(r"[<>=!~ ]", requirement.strip())[0]
            by_extra.setdefault(marker.split("==")[1].strip().strip("'\""), set()).add(name)
    assert by_extra == {"onnx": {"onnx", "onnxruntime", "onnxscript"}, "openvino": {"onnx", "openvino"},
                        "int8": {"onnx", "openvino", "nncf"}, "pandas": {"pandas"}, "tensorboard": {"tensorboard"},
                        "video": {"av"}}, by_extra


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
    # The benchmark command is the installed package's, not only the checkout's benchmarks/.
    bench = run("benchmark", "--formats", "pytorch,tensorrt")
    assert bench.returncode == 2 and "formats: expected a comma-separated list of pytorch" in bench.stderr, bench.stderr
    where = subprocess.run([sys.executable, "-c", "import ssd, ssd.inference.detect; print(ssd.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert pathlib.Path(where.stdout.strip()).is_relative_to(target)


# ---------------------------------------------------------------------------------------------------------------
# One library whether pip-installed or hub-loaded

HUB_AND_INSTALLED = """
    import pathlib, sys, tempfile, torch
    import ssd
    from ssd.evaluation import evaluate
    from ssd.export import export_onnx
    from skimage import data

    repo, golden = {repo!r}, {golden!r}
    model = torch.hub.load(repo, "ssdlite320_mobilenet_v2", source="local", pretrained=False)
    print("module", type(model).__module__)
    print("installed", pathlib.Path(ssd.__file__).parent)
    found = ssd.detect(model, data.chelsea(), threshold=0.0, max_detections=5)[0]
    same = model.detect(data.chelsea(), threshold=0.0, max_detections=5)[0]
    assert len(found) == len(same) == 5 and (found.scores == same.scores).all()
    result = evaluate(model, golden + "/minicoco/images", golden + "/minicoco/instances.json", progress=False,
                      verbose=False)
    print("evaluated", len(result.stats))
    onnx = export_onnx(model, pathlib.Path(tempfile.mkdtemp()) / "model.onnx")
    print("exported", len(ssd.detect(ssd.load(onnx), data.chelsea(), threshold=0.0, max_detections=5)[0]))
    try:
        torch.hub.load(repo, "nvidia_ssd", source="local", checkpoint="http://127.0.0.1:{port}/missing.pt")
    except ssd.DownloadError as exc:
        print("caught", type(exc).__name__, type(exc).__module__.split(".")[0])
"""


def _install(wheel: pathlib.Path, target: pathlib.Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:  # bound then closed: nothing listens there, so a connection is refused at once
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_beside_installed(target: pathlib.Path, cwd: pathlib.Path) -> dict[str, list[str]]:
    import textwrap

    from helpers import GOLDEN

    code = textwrap.dedent(HUB_AND_INSTALLED.format(repo=str(REPO), golden=str(GOLDEN), port=_closed_port()))
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "TORCH_HOME": str(cwd / "torch")}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.timeout(900)
def test_hub_load_uses_the_installed_library_of_the_same_release(wheel, tmp_path):
    """`pip install .` then torch.hub.load of the checkout: one library, so the installed functions take the hub's
    model and ``except ssd.DownloadError`` catches the hub's errors."""
    target = tmp_path / "site"
    _install(wheel, target)
    (tmp_path / "run").mkdir()
    seen = _run_beside_installed(target, tmp_path / "run")
    assert seen["module"] == ["ssd.models.ssdlite_mobilenetv2"]  # not a private _ssd_hub_* copy
    assert pathlib.Path(seen["installed"][0]).is_relative_to(target)
    assert seen["evaluated"] == ["12"] and seen["exported"] == ["5"]
    assert seen["caught"] == ["CheckpointUnavailableError", "ssd"]


@pytest.mark.timeout(900)
def test_a_private_copy_beside_another_release_shares_errors_and_models(wheel, tmp_path):
    """The installed ``ssd`` is this project at another release: the hub loads a private copy, whose models the
    installed functions take (recognised by their spec) and whose errors are the installed errors' subclasses."""
    target = tmp_path / "site"
    _install(wheel, target)
    [info] = target.glob("ssd_hub-*.dist-info")
    metadata = info / "METADATA"
    metadata.write_text(re.sub(r"^Version: .*$", "Version: 0.0.1", metadata.read_text(), count=1, flags=re.M))
    (tmp_path / "run").mkdir()
    seen = _run_beside_installed(target, tmp_path / "run")
    assert seen["module"][0].startswith("_ssd_hub_")
    assert pathlib.Path(seen["installed"][0]).is_relative_to(target)
    assert seen["evaluated"] == ["12"] and seen["exported"] == ["5"]
    assert seen["caught"][0] == "CheckpointUnavailableError" and seen["caught"][1].startswith("_ssd_hub_")
