"""A killed export leaves nothing behind for long: SIGINT (Ctrl-C) removes its temporary files at once and exits 130
with one line; after SIGKILL (no handler runs) the next export removes the dead one's temporary folders, in the
system's temporary folder and beside ``--out``; the output is always whole or absent."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ssd.export.onnx import STALE_EXPORT_S, TEMPORARY_PREFIX, _host_tag, sweep_stale_exports

from helpers import REPO
from helpers.mmdet import mmdet_state_dict, save_mmdet
from helpers.processes import ssd_env

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

MODEL = "ssdlite320_mobilenet_v2"  # the quickest to export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_mmdet(tmp_path_factory.mktemp("ckpt") / "ssdlite.pth", mmdet_state_dict("ssdlite"), legacy=False)


def _leftovers(tmp: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Every temporary an export makes: its folder in TMPDIR, its staging folder and --out's temporary beside it."""
    found = list(tmp.glob(TEMPORARY_PREFIX + "*"))
    found += list(out.parent.glob("." + TEMPORARY_PREFIX + "*")) + list(out.parent.glob(f".{out.name}.*.tmp"))
    return sorted(p.name for p in found)


def _command(checkpoint: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "ssd", "export", "--model", MODEL, "--checkpoint", str(checkpoint), "--out",
            str(out)]


def _start_export(checkpoint: pathlib.Path, out: pathlib.Path, tmp: pathlib.Path) -> subprocess.Popen:
    # TMPDIR: a folder of the test's own, so that what the export leaves in "/tmp" is seen (and nothing else).
    return subprocess.Popen(_command(checkpoint, out), cwd=REPO, env=ssd_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_its_temporary_folder(child: subprocess.Popen, tmp: pathlib.Path, deadline_s: float = 240) -> None:
    """Block until the export has made its temporary folder (it is writing the graph there), or fail."""
    end = time.monotonic() + deadline_s
    while not list(tmp.glob(TEMPORARY_PREFIX + "*")):
        if child.poll() is not None:
            pytest.fail(f"the export ended ({child.returncode}) before it made its folder: {child.stderr.read()}")
        if time.monotonic() > end:
            pytest.fail("the export made no temporary folder in time")
        time.sleep(0.02)  # polling a condition, not timing the kill


def _stop(child: subprocess.Popen, sig: int) -> str:
    try:
        os.killpg(child.pid, sig)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return err.strip()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigint_and_sigkill_of_an_export_leave_no_temporary_and_no_half_output(checkpoint, tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "out" / "model.onnx"
    tmp.mkdir()
    out.parent.mkdir()

    # Ctrl-C while the graph is written: one line, exit 130, nothing left, no output.
    child = _start_export(checkpoint, out, tmp)
    _wait_for_its_temporary_folder(child, tmp)
    err = _stop(child, signal.SIGINT)
    assert child.returncode == 130, err
    assert err == f"interrupted: {out} was left as it was"
    assert _leftovers(tmp, out) == [] and not out.exists()

    # SIGKILL: no handler runs, so the folder stays (named by the dead process)...
    child = _start_export(checkpoint, out, tmp)
    _wait_for_its_temporary_folder(child, tmp)
    _stop(child, signal.SIGKILL)
    [left] = _leftovers(tmp, out)
    assert left.startswith(f"{TEMPORARY_PREFIX}{child.pid}-{_host_tag()}-") and not out.exists()
    # ... until the next export, which removes it at once (its process is gone) and writes a whole file.
    done = subprocess.run(_command(checkpoint, out), cwd=REPO, env=ssd_env(TMPDIR=str(tmp)), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert _leftovers(tmp, out) == []
    onnx.checker.check_model(onnx.load(str(out)))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_sweep_removes_dead_exports_and_old_temporaries_and_keeps_live_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    host, dead, alive = _host_tag(), _dead_pid(), os.getppid()
    old = time.time() - STALE_EXPORT_S - 60

    def folder(parent: pathlib.Path, name: str, age: float | None = None) -> pathlib.Path:
        path = parent / name
        path.mkdir()
        (path / "raw.onnx").write_bytes(b"half a graph")
        if age is not None:
            os.utime(path, (age, age))
        return path

    def file(name: str, age: float | None = None) -> pathlib.Path:
        path = out.parent / name
        path.write_bytes(b"half a file")
        if age is not None:
            os.utime(path, (age, age))
        return path

    gone = [folder(tmp_path / "tmp", f"{TEMPORARY_PREFIX}{dead}-{host}-a1"),
            folder(out.parent, f".{TEMPORARY_PREFIX}{dead}-{host}-b2"),
            folder(tmp_path / "tmp", f"{TEMPORARY_PREFIX}{alive}-otherhost-c3", old),  # unattributable, old
            file(f".{out.name}.x9.tmp", old)]
    kept = [folder(tmp_path / "tmp", f"{TEMPORARY_PREFIX}{alive}-{host}-d4"),  # a live export's
            folder(tmp_path / "tmp", f"{TEMPORARY_PREFIX}{dead}-otherhost-e5"),  # another host's pid: not ours
            folder(out.parent, f".{TEMPORARY_PREFIX}{os.getpid()}-{host}-f6"),  # this process's other thread
            file(f".{out.name}.y8.tmp"),  # young: maybe being written
            file(".other.onnx.z7.tmp", old)]  # another output's: its own export sweeps it
    link = out.parent / f".{TEMPORARY_PREFIX}{dead}-{host}-link"
    link.symlink_to(kept[0])
    removed = sweep_stale_exports(out)
    assert sorted(removed) == sorted(gone)
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept) and link.is_symlink()
