"""``ssd train`` on imperfect data and in long runs (issue 20): the data checked and summarised before the first
iteration, unusable images as one line or skipped and reported, a full disk, Ctrl-C, kills, the temporaries of
killed runs, metrics without repeats after a resume, and the messages and bounds of the command.

The runs use SSDLite (about a second per iteration here) where the model does not matter.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ssd.cli import main
from ssd.data.synthetic import make_shapes_dataset
from ssd.io.images import ImageLoadError
from ssd.training import batches, loop, outputs
from ssd.training.loop import NonFiniteLossError, TrainConfig, TrainingInterrupted, train
from ssd.training.outputs import RunFolder, RunOutputError, trim_metrics
from ssd.training.schedule import lr_factor, milestones_from_fractions

from helpers import REPO

FAST = "ssdlite320_mobilenet_v2"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, 4, image_size=(64, 80), seed=6), root / "images"


def _config(shapes, out, **overrides) -> TrainConfig:
    annotations, images = shapes
    settings = {"annotations": annotations, "images": images, "out_dir": out, "model": FAST, "epochs": 1,
                "batch_size": 2, "device": "cpu", "num_workers": 0, "warmup_iters": 0, "augment": False}
    settings.update(overrides)
    return TrainConfig(**settings)


def _records(out: pathlib.Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["type"] == kind]


def _copy_set(shapes, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict]:
    annotations, images = shapes
    shutil.copytree(images, root / "images")
    shutil.copy(annotations, root / "annotations.json")
    return root / "annotations.json", root / "images", json.loads(annotations.read_text())


def _temporaries(out: pathlib.Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*.tmp"))


def _no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the loss was computed: the problem was not found before the first iteration")

    monkeypatch.setattr(loop.SSDLoss, "forward", refuse)


# ------------------------------------------------------------------------------------------ the data up front


def test_data_summary_counts_what_is_dropped_and_why(shapes, tmp_path):
    annotations, images, document = _copy_set(shapes, tmp_path)
    first = document["images"][0]
    extra = [
        {"image_id": first["id"], "category_id": 1, "bbox": [1, 1, 0, 5]},  # no width
        {"image_id": first["id"], "category_id": 2, "bbox": [500, 500, 5, 5]},  # outside the image
        {"image_id": first["id"], "category_id": 2, "bbox": [-4, 2, 10, 10]},  # clipped
        {"image_id": first["id"], "category_id": 3, "bbox": [2, 2, 20, 20], "iscrowd": 1},
    ]
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] != document["images"][-1]["id"]]
    document["annotations"] += [{"id": 1000 + i, **a} for i, a in enumerate(extra)]
    annotations.write_text(json.dumps(document))
    messages = []
    summary = train(_config((annotations, images), tmp_path / "out", log=messages.append, max_iters_per_epoch=1,
                            val_annotations=annotations, val_images=images))
    line = next(m for m in messages if m.startswith("training data:"))
    assert "4 images (1 without boxes, trained as background)" in line
    assert "2 dropped (1 of no width or height, 1 outside their image)" in line
    assert "1 clipped to their image" in line and "1 crowd box not trained on" in line
    val_line = next(m for m in messages if m.startswith("validation data:"))
    assert "4 images (3 with boxes, evaluated)" in val_line and "(1 crowd)" in val_line
    assert "3 categories match the model's classes by id" in val_line
    assert summary["dataset_stats"]["crowd_ignored"] == 1
    assert _records(tmp_path / "out", "start")[0]["data"] == [line, val_line]


@pytest.mark.parametrize("problem", ["unknown category", "missing image", "bad file", "no annotations"])
def test_a_bad_validation_set_stops_the_run_before_the_first_epoch(problem, shapes, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    annotations, images, document = _copy_set(shapes, tmp_path)
    val = tmp_path / "val.json"
    if problem == "unknown category":
        document["categories"].append({"id": 9, "name": "hexagon"})
        document["annotations"][0]["category_id"] = 9
        error, message = ValueError, r"val.json.*categories the model knows.*1 unknown: 9 'hexagon'"
    elif problem == "missing image":
        (images / document["images"][1]["file_name"]).unlink()
        shutil.copytree(shapes[1], tmp_path / "train-images")
        images_for_training = tmp_path / "train-images"
        error, message = FileNotFoundError, "expected every image the annotations list, got 1 of 4 missing"
    elif problem == "bad file":
        val.write_text('{"images": [], ')
        error, message = ValueError, r"val.json.*invalid JSON"
    else:
        document["annotations"] = []
        error, message = ValueError, r"val.json.*at least one annotation"
    if problem != "bad file":
        val.write_text(json.dumps(document))
    training = (shapes[0], images_for_training if problem == "missing image" else shapes[1])
    with pytest.raises(error, match=message):
        train(_config(training, tmp_path / "out", val_annotations=val, val_images=images))
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "last.pt").exists()


def test_a_bad_validation_set_is_one_line_before_training(shapes, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    annotations, images, document = _copy_set(shapes, tmp_path)
    document["categories"][0]["name"] = "hexagon"  # id 1 named otherwise than the training set's circle
    val = tmp_path / "val.json"
    val.write_text(json.dumps(document))
    code = main(["train", "--model", FAST, "--images", str(shapes[1]), "--annotations", str(shapes[0]), "--out",
                 str(tmp_path / "out"), "--checkpoint", "none", "--device", "cpu", "--val-images", str(images),
                 "--val-annotations", str(val)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "val.json" in err and "hexagon" in err


def test_missing_training_images_are_found_up_front_or_skipped(shapes, tmp_path, monkeypatch):
    annotations, images, document = _copy_set(shapes, tmp_path)
    missing = document["images"][2]["file_name"]
    (images / missing).unlink()
    with monkeypatch.context() as patch:
        _no_training(patch)
        with pytest.raises(FileNotFoundError, match=f"got 1 of 4 missing: {missing}.*--skip-bad-images"):
            train(_config((shapes[0], images), tmp_path / "strict"))
    messages = []
    summary = train(_config((shapes[0], images), tmp_path / "lenient", skip_bad_images=True, log=messages.append,
                            batch_size=4))
    assert any(f"1 image file missing, skipped: {missing}" in m for m in messages)
    assert summary["skipped_images"] == 1 and summary["skipped_files"][0]["file"] == str(images / missing)
    assert any(m.startswith("skipped 1 unusable image(s): ") and missing in m for m in messages)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("skip", [False, True])
def test_a_corrupt_image_with_workers_is_one_line_or_skipped_and_reported(skip, shapes, tmp_path, capsys):
    annotations, images, document = _copy_set(shapes, tmp_path)
    corrupt = images / document["images"][1]["file_name"]
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["train", "--model", FAST, "--images", str(images), "--annotations", str(annotations), "--out",
            str(tmp_path / "out"), "--checkpoint", "none", "--device", "cpu", "--epochs", "1", "--batch-size", "4",
            "--workers", "1", "--no-augment"] + (["--skip-bad-images"] if skip else [])
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if skip:
        assert code == 0
        assert f"skipped 1 unusable image(s): {corrupt}" in captured.out
        assert _records(tmp_path / "out", "epoch")[0]["skipped_images"] == 1
    else:
        err = captured.err.strip()
        assert code == 2 and "\n" not in err and err.startswith(f"error: {corrupt}") and "--skip-bad-images" in err


def test_the_loop_raises_the_workers_bad_image_in_the_main_process(shapes, tmp_path):
    annotations, images, document = _copy_set(shapes, tmp_path)
    (images / document["images"][0]["file_name"]).write_bytes(b"")
    with pytest.raises(ImageLoadError, match=document["images"][0]["file_name"]) as info:
        train(_config((annotations, images), tmp_path / "out", num_workers=1))
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ long runs


@pytest.mark.parametrize("failure", ["ENOSPC", "stream writer"])
def test_a_full_disk_keeps_the_previous_last_pt(failure, shapes, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(_config(shapes, out, epochs=1, max_iters_per_epoch=1))
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as partial:
            partial.write(b"PK\x03\x04 half a checkpoint")
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunOutputError) as info:
        train(_config(shapes, out, epochs=2, max_iters_per_epoch=1))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(out / "last.pt"))
    assert ("the disk is full" if failure == "ENOSPC" else "the disk may be full") in message
    assert "MiB free there" in message and "the previous last.pt is unchanged" in message
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert kept["epoch"] == saved["epoch"] == 0 and kept["iteration"] == saved["iteration"]
    assert _temporaries(out) == []


def test_a_full_disk_is_one_line_exit_1_from_the_command(shapes, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    code = main(["train", "--model", FAST, "--images", str(shapes[1]), "--annotations", str(shapes[0]), "--out",
                 str(out), "--checkpoint", "none", "--device", "cpu", "--epochs", "1", "--batch-size", "2",
                 "--workers", "0", "--max-iterations-per-epoch", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "the disk is full" in err and "no last.pt was written" in err
    assert not (out / "last.pt").exists() and _temporaries(out) == []


@pytest.fixture()
def default_ctrl_c():
    """Python's own Ctrl-C handler, whatever this process inherited: a shell's background job starts with SIGINT
    ignored, and then a SIGINT the test sends itself would be a no-op."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_saving_finishes_the_file_then_stops(shapes, tmp_path, monkeypatch, default_ctrl_c):
    out = tmp_path / "out"
    real_save = torch.save
    interrupted = []

    def save_with_ctrl_c(obj, path, *args, **kwargs):
        if not interrupted:
            interrupted.append(path)
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_with_ctrl_c)
    with pytest.raises(TrainingInterrupted) as info:
        train(_config(shapes, out, epochs=3, max_iters_per_epoch=1))
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.checkpoint == str(out / "last.pt") and info.value.epoch == 0
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert _temporaries(out) == [] and [r["epoch"] for r in _records(out, "epoch")] == [0]


def _start(args: list[str], cwd: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ssd", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_line(child: subprocess.Popen, text: str) -> list[str]:
    """Read the child's stdout until a line contains ``text`` (the synchronisation: no sleeps)."""
    lines = []
    for line in child.stdout:
        lines.append(line)
        if text in line:
            return lines
    child.wait()
    pytest.fail(f"the run ended (exit {child.returncode}) before printing {text!r}: {''.join(lines)[-2000:]} "
                f"{child.stderr.read()[-2000:]}")


def _train_args(shapes, out: pathlib.Path, *extra: str) -> list[str]:
    return ["train", "--model", FAST, "--images", str(shapes[1]), "--annotations", str(shapes[0]), "--out",
            str(out), "--checkpoint", "none", "--device", "cpu", "--batch-size", "2", "--no-augment",
            "--log-every", "1", *extra]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_tests_leave_no_temporary_and_a_whole_last_pt(shapes, tmp_path):
    """SIGINT (Ctrl-C) and SIGKILL of real runs: the next start removes every temporary, last.pt loads, and the
    metrics of the resumed run repeat no iteration."""
    out = tmp_path / "out"
    # Ctrl-C after the first epoch was saved, in the middle of the next: exit 130, one line, last.pt whole.
    child = _start(_train_args(shapes, out, "--epochs", "40", "--workers", "1"), tmp_path)
    try:
        _wait_for_line(child, "epoch 0 done")
        _wait_for_line(child, "epoch 1 iteration")
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    err = err.strip()
    assert child.returncode == 130, err
    assert "\n" not in err and "Traceback" not in err and err.startswith("interrupted: ")
    assert f"{out / 'last.pt'} holds epoch" in err and "--resume" in err
    epoch = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert f"holds epoch {epoch};" in err and _temporaries(out) == []

    # SIGKILL (no handler runs) of a resumed run, in the middle of an epoch; then what a kill during a save leaves.
    child = _start(_train_args(shapes, out, "--epochs", "40", "--workers", "1", "--resume", str(out / "last.pt")),
                   tmp_path)
    try:
        _wait_for_line(child, f"epoch {epoch + 1} done")
        _wait_for_line(child, f"epoch {epoch + 2} iteration")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    killed_epoch = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert killed_epoch >= epoch + 1
    for name in (".last.pt.k1ll3d.tmp", ".best.pt.k1ll3d.tmp"):
        (out / name).write_bytes(b"PK\x03\x04 half a checkpoint")  # young: no age rule would remove them
    # The killed epoch logged iterations that last.pt does not hold (unless the kill came after its save).
    beyond = [r for r in _records(out, "iteration") if r["epoch"] > killed_epoch]
    assert beyond or killed_epoch == epoch + 2

    messages = []
    summary = train(_config(shapes, out, epochs=killed_epoch + 2, resume=True, log=messages.append))
    assert sorted(pathlib.Path(p).name for p in summary["swept"]) == [".best.pt.k1ll3d.tmp", ".last.pt.k1ll3d.tmp"]
    assert _temporaries(out) == [] and any("removed 2 temporary file(s)" in m for m in messages)
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == killed_epoch + 1
    iterations = [r["iteration"] for r in _records(out, "iteration")]
    assert iterations == sorted(set(iterations)) and iterations[-1] == summary["iterations"]
    assert [r["epoch"] for r in _records(out, "epoch")] == list(range(killed_epoch + 2))


def test_a_live_run_holds_its_folder_and_the_age_rule_without_locks(shapes, tmp_path, monkeypatch):
    out = tmp_path / "out"
    holder = RunFolder(out)
    holder.open()
    try:
        assert holder.locked
        with pytest.raises(RunOutputError, match="another ssd train is writing to this folder"):
            train(_config(shapes, out))
    finally:
        holder.close()
    # Without locks (some network file systems), only temporaries older than an hour are taken for a killed run's.
    monkeypatch.setattr(RunFolder, "_lock", lambda self: None)
    old, young = out / ".last.pt.0ld.tmp", out / ".last.pt.y0ung.tmp"
    for path in (old, young):
        path.write_bytes(b"half")
    stale = time.time() - 2 * outputs.STALE_TEMPORARY_S
    os.utime(old, (stale, stale))
    assert RunFolder(out).open() == [old] and young.exists()


_HOLDER = """
import os, sys
from ssd.training.outputs import RunFolder
folder = RunFolder(sys.argv[1])
folder.open()
child = os.fork()
if child == 0:  # what a forked DataLoader worker does first (worker_init_fn), then it lives on
    if sys.argv[2] == "forget":
        folder.forget_in_child()
    os.read(0, 1)
    os._exit(0)
print(child, flush=True)
os.read(0, 1)
"""


@pytest.mark.parametrize("forget", [True, False])
def test_a_killed_runs_workers_do_not_keep_its_folder_locked(forget, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), "forget" if forget else "keep"],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())
    try:
        holder.kill()  # SIGKILL of the training process alone: its worker lives on
        holder.wait()
        folder = RunFolder(tmp_path)
        if forget:
            folder.open()  # the lock died with the process that took it
            assert folder.locked
            folder.close()
        else:  # the failure the worker_init_fn prevents: the orphan's copy of the descriptor holds the lock
            with pytest.raises(RunOutputError, match="another ssd train"):
                folder.open()
    finally:
        os.kill(worker, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(worker, 0)


def test_metrics_of_a_killed_epoch_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"type": "start", "epoch": 0, "iteration": 0}, {"type": "iteration", "epoch": 0, "iteration": 1},
               {"type": "epoch", "epoch": 0, "iteration": 2}, {"type": "validation", "epoch": 0, "iteration": 2},
               {"type": "start", "epoch": 1, "iteration": 2}, {"type": "iteration", "epoch": 1, "iteration": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "iter')  # a torn last line
    assert trim_metrics(path, last_epoch=0) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]
    assert trim_metrics(path, last_epoch=0) == 0 and trim_metrics(tmp_path / "none.jsonl", 0) == 0


def test_the_nan_message_names_only_a_checkpoint_on_disk(shapes, tmp_path, monkeypatch):
    def nan_loss(self, ploc, plabel, gloc, glabel):
        return (ploc.sum() + plabel.sum()) * float("nan")

    monkeypatch.setattr(loop.SSDLoss, "forward", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"Last good checkpoint: none \(no epoch finished\)"):
        train(_config(shapes, tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / "last.pt").exists()
    monkeypatch.undo()
    train(_config(shapes, tmp_path / "first", max_iters_per_epoch=1))
    elsewhere = tmp_path / "kept" / "last.pt"
    elsewhere.parent.mkdir()
    shutil.copy(tmp_path / "first" / "last.pt", elsewhere)
    monkeypatch.setattr(loop.SSDLoss, "forward", nan_loss)
    # Resumed from another folder: the new out_dir has no last.pt, so the message names the file resumed from.
    with pytest.raises(NonFiniteLossError, match=rf"Last good checkpoint: {elsewhere} \(epoch 0\)"):
        train(_config(shapes, tmp_path / "second", epochs=2, resume=elsewhere))
    assert not (tmp_path / "second" / "last.pt").exists()


# ------------------------------------------------------------------------------------------ the schedule


def test_cosine_and_fractional_milestones():
    assert lr_factor(0, 10, 0, (), 0.1, "cosine", 100) == 1.0
    assert lr_factor(50, 10, 0, (), 0.1, "cosine", 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 0, (), 0.1, "cosine", 100) == pytest.approx(0.0)
    # The warmup multiplies the decay (NVIDIA's warmup overwrites it; see docs/training.md).
    assert lr_factor(5, 10, 10, (), 0.1, "cosine", 100) == pytest.approx(0.5 * 0.5 * (1 + math_cos(0.05)))
    assert lr_factor(5, 1, 10, (3,), 0.1) == pytest.approx(0.05)
    assert milestones_from_fractions([0.66, 0.83], 65) == (43, 54)
    assert milestones_from_fractions([0.01], 10) == (1,)
    with pytest.raises(ValueError, match="milestones: expected increasing fractions"):
        milestones_from_fractions([0.8, 0.5], 10)
    with pytest.raises(ValueError, match=r"milestones: expected a number in \(0, 1\), got 1.5"):
        milestones_from_fractions([1.5], 10)
    with pytest.raises(ValueError, match="total_iters"):
        lr_factor(1, 10, 0, (), 0.1, "cosine")


def math_cos(fraction: float) -> float:
    """cos(pi * fraction): the cosine schedule's curve."""
    return math.cos(math.pi * fraction)


def test_cosine_schedule_runs_and_resumes_on_the_same_curve(shapes, tmp_path):
    """A resumed run continues the schedule it started with (issue 23); a cosine one cannot go past its end."""
    out = tmp_path / "out"
    calls = []

    def interrupt_at_epoch_2(model):
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C once epoch 2 is trained, before it is saved: last.pt holds epoch 1
        return {"mAP": 0.1 * len(calls)}

    with pytest.raises(TrainingInterrupted) as stopped:
        train(_config(shapes, out, epochs=4, max_iters_per_epoch=1, schedule="cosine", lr=0.01, log_every=1,
                      validate=interrupt_at_epoch_2))
    assert stopped.value.epoch == 1
    # Another epoch count cannot stretch a cosine curve that reaches 0 at epoch 4: one error naming both.
    with pytest.raises(ValueError, match=r"planned for 4 epochs.*expected epochs <= 4 to resume it, got 6"):
        train(_config(shapes, out, epochs=6, max_iters_per_epoch=1, schedule="cosine", lr=0.01, log_every=1))
    messages = []
    train(_config(shapes, out, epochs=3, max_iters_per_epoch=1, schedule="cosine", lr=0.01, log_every=1,
                  log=messages.append))
    assert any("continues its cosine schedule of 4 epochs" in m and "epochs=3 only moves where it stops" in m
               for m in messages), messages
    logged = {r["iteration"]: r["lr"] for r in _records(out, "iteration")}
    # Iteration i (1-based) ran at the rate of step i - 1 of the curve planned when the run started, over 4 epochs.
    assert logged[2] == pytest.approx(0.01 * 0.5 * (1 + math_cos(1 / 4)))
    assert logged[3] == pytest.approx(0.01 * 0.5 * (1 + math_cos(2 / 4)))
    assert sorted(logged) == [1, 2, 3]  # the killed epoch's iteration 3 was dropped and run again


@pytest.mark.parametrize(("cores", "local_world", "device", "expected"), [
    (2, None, "cpu", 1), (16, None, "cpu", 4), (64, None, "cpu", 4), (8, None, "cpu", 2),
    (2, None, "cuda", 2), (16, None, "cuda", 8), (16, "4", "cuda", 4), (16, "8", "cuda", 2), (4, "8", "cuda", 1),
])
def test_default_workers_feed_the_device_within_the_cores(cores, local_world, device, expected, monkeypatch):
    monkeypatch.setattr(batches, "usable_cores", lambda: cores)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert loop.default_workers(device) == expected


# ------------------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--milestones", "0.5,0.4"], "--milestones: expected increasing fractions of the run"),
        (["--milestones", "half"], "--milestones: expected increasing fractions of the run in (0, 1)"),
        (["--milestones", "0.5", "--schedule", "cosine"], "--milestones: expected only with --schedule step"),
        (["--val-every", "0"], "--val-every: expected an integer >= 1, got 0"),
        (["--eval-batch-size", "0"], "--eval-batch-size: expected an integer >= 1, got 0"),
        (["--val-every", "2"], "--val-every/--eval-batch-size: expected with --val-images"),
        (["--timeout", "0"], "--timeout: expected a positive number of minutes, got 0.0"),
        (["--workers", "-1"], "--workers: expected an integer >= 0, got -1"),
    ],
)
def test_new_options_are_checked_in_one_line(extra, message, shapes, tmp_path, capsys):
    code = main(_train_args(shapes, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_peer_that_never_comes_is_one_line_after_the_timeout(shapes, tmp_path):
    """A rank started by hand whose peer never starts: the rendezvous gives up after --timeout (minutes, here 3 s),
    where it waited up to the 6-hour default before."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": "0",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ssd", *_train_args(shapes, tmp_path / "out", "--timeout", "0.05")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    err = done.stderr.strip()
    assert done.returncode == 1, err
    assert "\n" not in err and "did not answer within --timeout 0.05 minutes" in err and "Traceback" not in err
    assert time.monotonic() - started < 120


def test_out_naming_a_file_is_refused_before_anything(shapes, tmp_path, hub_dir, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    started = time.monotonic()
    # No --checkpoint: were the weights resolved first, an offline download would fail with another message.
    code = main(["train", "--images", str(shapes[1]), "--annotations", str(shapes[0]), "--out", str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --out: expected a folder (created if missing), got the file {str(target)!r}"
    assert time.monotonic() - started < 30 and target.read_text() == "not a folder"
    with pytest.raises(NotADirectoryError, match="out_dir: expected a folder"):
        train(_config(shapes, target))


def test_make_shapes_size_is_bounded(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path / "s"), "--images", "1", "--size", "5000x64"]) == 2
    assert "--size: expected WxH or N with sides of 32 to 4096 pixels, got '5000x64'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
