"""``python -m ssd train`` and ``make-shapes``: fine-tuning starts, refusing/resuming/forcing an output folder,
metrics, validation and best.pt, torchrun, fine-tuning through the hub, and trained checkpoints loading back.

Everything runs on tiny synthetic sets with a few iterations (SSD300 trains at about 1 image/s on this CPU).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from ssd.cli import main
from ssd.data.coco import COCO_NAMES
from ssd.data.synthetic import make_shapes_dataset
from ssd.models import SSD300
from ssd.models.ssd300_resnet50 import nvidia_spec
from ssd.registry import build_model
from ssd.training import checkpointing
from ssd.training.loop import TrainConfig, lr_factor, train
from ssd.weights import TRAIN_FORMAT, InvalidCheckpointError, read_checkpoint

from helpers import REPO
from helpers.checkpoints import golden_state_dict, save_training_checkpoint, serve_published

NAMES = ["circle", "square", "triangle"]
IDS = [11, 12, 13]  # not 1..K, so that a test can tell category ids from labels


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("shapes")
    annotation_file = make_shapes_dataset(root, 4, image_size=(96, 128), seed=5)
    document = json.loads(annotation_file.read_text())
    for entry in document["categories"] + document["annotations"]:
        key = "id" if "name" in entry else "category_id"
        entry[key] += 10
    annotation_file.write_text(json.dumps(document))
    return annotation_file, root / "images"


@pytest.fixture(scope="module")
def golden_checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_training_checkpoint(tmp_path_factory.mktemp("golden") / "golden.pt")


def _train_args(shapes, out, *extra: str) -> list[str]:
    annotations, images = shapes
    return ["train", "--images", str(images), "--annotations", str(annotations), "--out", str(out),
            "--batch-size", "2", "--device", "cpu", "--no-augment", *extra]


def _records(out: pathlib.Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def first_run(shapes, golden_checkpoint, tmp_path_factory) -> pathlib.Path:
    """One epoch (2 iterations) fine-tuned from a golden-recipe COCO checkpoint."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = _train_args(shapes, out, "--checkpoint", str(golden_checkpoint), "--epochs", "1", "--lr", "0.01",
                       "--warmup-iterations", "2")
    assert main(args) == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetune_refuse_resume_and_force(first_run, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    start = _records(out, "start")[0]
    head_tensors = 12  # conf.0..5 weight and bias: COCO's 81 classes do not fit 3 + background
    assert start["init"]["skipped"] == head_tensors
    assert start["init"]["loaded"] == len(SSD300().state_dict()) - head_tensors
    assert start["world_size"] == 1 and start["base_lr"] == 0.01
    # Logged: the first and the last iteration (log-every is 20).
    assert [r["iteration"] for r in _records(out, "iteration")] == [1, 2]
    assert [(r["epoch"], r["iteration"], r["images"]) for r in _records(out, "epoch")] == [(0, 2, 4)]
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True, mmap=True)
    assert state["class_names"] == NAMES and state["category_ids"] == IDS
    assert state["format"] == TRAIN_FORMAT == "ssd-train/2" and state["model"] == "nvidia_ssd"
    capsys.readouterr()

    # A second run into the same folder is refused, in one line.
    assert main(_train_args(shapes, out, "--checkpoint", "none", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--force" in err and "previous run" in err

    # Resume: the iteration counter, the schedule and the metrics continue.
    args = _train_args(shapes, out, "--resume", str(out / "last.pt"), "--epochs", "3", "--lr", "0.01",
                       "--warmup-iterations", "2", "--log-every", "2")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed
    # The run continues the schedule it started with (issue 23): --epochs 3 only moves where it stops.
    assert ("continues its step schedule of 1 epoch (x0.1 at epoch(s) 1, 1), warmup 2 iterations: epochs=3 only "
            "moves where it stops; past epoch 0 the rate stays at its last value") in printed
    starts = _records(out, "start")
    assert len(starts) == 2 and starts[1]["resumed_from_epoch"] == 0 and starts[1]["iteration"] == 2
    assert starts[1]["planned_epochs"] == 1 and starts[1]["warmup_iters"] == 2
    logged = _records(out, "iteration")
    # 3 is the first of this call, 4 and 6 are multiples of 2, 6 is the last; 5 is not logged.
    assert [r["iteration"] for r in logged] == [1, 2, 3, 4, 6]
    milestones = TrainConfig("a", "b", "c", epochs=1).epoch_milestones()  # the first run's plan: (1, 1)
    for record in logged[2:]:
        expected = 0.01 * lr_factor(record["iteration"] - 1, 2, 2, milestones, 0.1)
        assert record["lr"] == pytest.approx(expected)
    # Past both milestones of the 1-epoch plan, and past the warmup: it was not restarted (that would give 0).
    assert logged[2]["lr"] == pytest.approx(0.01 * 0.1 * 0.1)
    assert [(r["epoch"], r["iteration"]) for r in _records(out, "epoch")] == [(0, 2), (1, 4), (2, 6)]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["iteration"] == 6

    # Force: a fresh run, old metrics gone.
    assert main(_train_args(shapes, out, "--force", "--checkpoint", "none", "--epochs", "1")) == 0
    assert len(_records(out, "start")) == 1 and _records(out, "start")[0]["init"] is None
    assert [r["iteration"] for r in _records(out, "iteration")] == [1, 2]
    assert "random weights" in capsys.readouterr().out


def test_default_checkpoint_offline_is_a_one_line_error(shapes, tmp_path, hub_dir, monkeypatch, capsys, http_server):
    # Offline: every published URL points at a stopped loopback server, so each connection is refused.
    serve_published(monkeypatch, http_server)
    http_server.stop()
    assert main(_train_args(shapes, tmp_path / "out", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--checkpoint none" in err and "no nvidia_ssd checkpoint" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "1"], "--batch-size: expected an integer >= 2"),
        (["--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        (["--val-images", "."], "--val-images/--val-annotations: expected both or neither"),
        (["--resume", "nowhere/last.pt"], "--resume: expected an existing last.pt"),
        (["--resume", "x", "--force"], "--resume/--force: expected one of them, got both"),
        (["--checkpoint", "missing.pt"], "--checkpoint: expected a checkpoint file"),
        (["--lr", "-1"], "--lr: expected a positive number"),
        (["--precision", "fp16", "--device", "cpu"], "--precision: fp16 needs a CUDA device"),
        (["--device", "gpu7"], "error: --device: expected cpu, cuda or cuda:N, got 'gpu7'"),
    ],
)
def test_bad_arguments_exit_2(shapes, tmp_path, capsys, extra, message):
    assert main(_train_args(shapes, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err


def test_make_shapes_command(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path / "set"), "--images", "2", "--size", "64x48"]) == 0
    document = json.loads((tmp_path / "set" / "annotations.json").read_text())
    assert [(i["width"], i["height"]) for i in document["images"]] == [(64, 48), (64, 48)]
    assert "wrote 2 images" in capsys.readouterr().out
    assert main(["make-shapes", "--out", str(tmp_path / "bad"), "--images", "2", "--size", "10x10"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_validation_lines_and_best_checkpoint(shapes, tmp_path):
    scores = iter([0.25, 0.125])
    seen_modes = []

    def validate(model):
        seen_modes.append(model.training)
        value = next(scores)
        return {"mAP": value, "stats": [value] + [0.0] * 10 + [-1.0]}

    annotations, images = shapes
    config = TrainConfig(annotations, images, tmp_path, epochs=2, batch_size=2, device="cpu", augment=False,
                         max_iters_per_epoch=1, validate=validate)
    summary = train(config)
    assert summary["best_map"] == 0.25 and seen_modes == [False, False]
    lines = _records(tmp_path, "validation")
    assert [(r["epoch"], r["mAP"], r["best"]) for r in lines] == [(0, 0.25, True), (1, 0.125, False)]
    assert len(lines[0]["stats"]) == 12 and lines[0]["stats"][-1] == -1.0
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0 and best["best_map"] == 0.25 and "optimizer" not in best
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["best_map"] == 0.25
    with pytest.raises(ValueError, match=r"expected last.pt \(with the optimizer state\)"):
        train(TrainConfig(annotations, images, tmp_path, epochs=3, batch_size=2, device="cpu",
                          resume=tmp_path / "best.pt"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_command_validates_with_the_evaluator(shapes, tmp_path):
    pytest.importorskip("ssd.evaluation")
    annotations, images = shapes
    args = _train_args(shapes, tmp_path / "out", "--checkpoint", "none", "--epochs", "1",
                       "--max-iterations-per-epoch", "1", "--val-images", str(images),
                       "--val-annotations", str(annotations))
    assert main(args) == 0
    line = _records(tmp_path / "out", "validation")[0]
    assert len(line["stats"]) == 12 and line["mAP"] == line["stats"][0]
    assert (tmp_path / "out" / "best.pt").exists() or line["mAP"] is None


@pytest.mark.timeout(600)
def test_train_command_validation_wiring(shapes, tmp_path, monkeypatch):
    """The command's use of ssd.evaluation.evaluate: the checked validation set, the model in eval mode, the
    evaluation batch size, every --val-every epochs and after the last."""
    import types

    import ssd.evaluation

    calls = []

    def evaluate(model, images_dir, annotations, **kwargs):
        calls.append((model.training, images_dir, annotations, kwargs))
        return types.SimpleNamespace(stats=[0.5, 0.75] + [0.1] * 10, per_class_ap={})

    monkeypatch.setattr(ssd.evaluation, "evaluate", evaluate)
    annotations, images = shapes
    out = tmp_path / "out"
    args = _train_args(shapes, out, "--checkpoint", "none", "--epochs", "3", "--max-iterations-per-epoch", "1",
                       "--val-images", str(images), "--val-annotations", str(annotations), "--val-every", "2",
                       "--eval-batch-size", "3", "--workers", "0")
    assert main(args) == 0
    # Epoch 1 (every 2nd) and epoch 2 (the last).
    assert len(calls) == 2 and all(c[0] is False and c[1] == images for c in calls)
    assert calls[0][2].source_path == str(annotations)  # the set checked before the first epoch, parsed once
    assert calls[0][3]["progress"] is False and calls[0][3]["device"] == torch.device("cpu")
    assert calls[0][3]["batch_size"] == 3 and calls[0][3]["workers"] == 0
    lines = _records(out, "validation")
    assert [(r["epoch"], r["mAP"], r["best"]) for r in lines] == [(1, 0.5, True), (2, 0.5, False)]
    assert len(lines[0]["stats"]) == 12
    assert torch.load(out / "best.pt", map_location="cpu", weights_only=True)["best_map"] == 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_processes(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, 8, image_size=128, seed=2)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "ssd", "train", "--images", str(data / "images"), "--annotations",
               str(data / "annotations.json"), "--out", str(out), "--checkpoint", "none", "--epochs", "1",
               "--batch-size", "2", "--max-iterations-per-epoch", "2", "--device", "cpu", "--no-augment"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone logs and writes.
    assert done.stdout.count("done: epoch 0") == 1
    start = _records(out, "start")[0]
    assert start["world_size"] == 2 and start["global_batch_size"] == 4
    assert start["base_lr"] == pytest.approx(2.6e-3 * 2 * 2 / 32)
    epoch = _records(out, "epoch")[0]
    assert epoch["iteration"] == 2 and epoch["images"] == 8  # 2 iterations x 2 images x 2 processes
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state["state_dict"])
    model = build_model("nvidia_ssd", checkpoint=str(out / "last.pt"))
    assert model.spec.classes.names == tuple(NAMES)


def _run_bounded(command: list[str], cwd: pathlib.Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group and kill the whole group (torchrun's workers too) on timeout."""
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_processes_with_validation(tmp_path):
    """Validation at the end of each epoch under torchrun: every rank evaluates its share (issue 24: only rank 0
    validated and the other waited in a barrier until the process group's timeout)."""
    make_shapes_dataset(tmp_path / "data", 8, image_size=96, seed=2)
    make_shapes_dataset(tmp_path / "val", 4, image_size=96, seed=3)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "ssd", "train", "--images", str(tmp_path / "data" / "images"),
               "--annotations", str(tmp_path / "data" / "annotations.json"), "--val-images",
               str(tmp_path / "val" / "images"), "--val-annotations", str(tmp_path / "val" / "annotations.json"),
               "--out", str(out), "--checkpoint", "none", "--epochs", "2", "--batch-size", "2",
               "--max-iterations-per-epoch", "1", "--device", "cpu", "--no-augment", "--workers", "0"]
    started = time.monotonic()
    done = _run_bounded(command, tmp_path, env, timeout=420)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"2-process torchrun training with validation, 2 epochs: {wall:.1f} s wall")
    assert done.stdout.count("validation: mAP") == 2 and done.stdout.count("validation data: 4 images") == 1
    lines = _records(out, "validation")
    assert [r["epoch"] for r in lines] == [0, 1] and all(len(r["stats"]) == 12 for r in lines)
    assert lines[0]["best"] is True
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["best_map"] == max(r["mAP"] for r in lines)
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1


def test_hub_fine_tuning_start_keeps_everything_but_the_heads(golden_checkpoint, monkeypatch):
    monkeypatch.setenv("SSD_CHECKPOINT", str(golden_checkpoint))
    golden = golden_state_dict()
    model = torch.hub.load(str(REPO), "nvidia_ssd", source="local", num_classes=4)
    own = model.state_dict()
    assert own["conf.0.weight"].shape[0] == 4 * 4 and model.spec.classes.names == ("class_1", "class_2", "class_3")
    assert all(torch.equal(own[k], golden[k]) for k in own if not k.startswith("conf."))
    # New heads start as NVIDIA's training starts them (SSD300's own initialisation: Xavier uniform).
    bound = (6 / (1024 * 9 + 16 * 9)) ** 0.5
    assert own["conf.0.weight"].abs().max() <= bound
    named = torch.hub.load(str(REPO), "nvidia_ssd", source="local", class_names=["cat", "dog"])
    assert named.spec.classes.names == ("cat", "dog") and named.state_dict()["conf.5.weight"].shape[0] == 4 * 3
    # The same number of classes as the checkpoint, but other names: new heads too.
    coco_count = [f"thing{i}" for i in range(80)]
    renamed = build_model("nvidia_ssd", class_names=coco_count)
    assert not torch.equal(renamed.state_dict()["conf.0.weight"], golden["conf.0.weight"])
    assert torch.equal(build_model("nvidia_ssd", num_classes=81).state_dict()["conf.0.weight"], golden["conf.0.weight"])
    with pytest.raises(TypeError, match="class_names"):
        build_model("nvidia_ssd", class_names="cat")
    # None of them claims the published accuracy: it belongs to NVIDIA's published weights with COCO's classes.
    assert all("accuracy" not in m.meta for m in (model, named, renamed))


def test_trained_checkpoint_loads_with_the_dataset_classes(first_run, shapes, monkeypatch, tmp_path):
    monkeypatch.delenv("SSD_CHECKPOINT", raising=False)
    last = first_run / "last.pt"
    stored = read_checkpoint(last, "nvidia_ssd").classes
    assert (stored.names, stored.category_ids) == (tuple(NAMES), tuple(IDS))
    model = torch.hub.load(str(REPO), "nvidia_ssd", source="local", checkpoint=str(last))
    assert model.spec.classes.names == tuple(NAMES) and model.spec.classes.category_ids == tuple(IDS)
    assert "accuracy" not in model.meta  # fine-tuned: NVIDIA's 0.25 is not its accuracy
    # Given to another model, it is refused naming both.
    with pytest.raises(InvalidCheckpointError, match="written by ssd train for nvidia_ssd, not ssdlite320_mobilenet"):
        build_model("ssdlite320_mobilenet_v2", checkpoint=str(last))
    _, images = shapes
    found = model.detect(sorted(images.iterdir())[0], threshold=0.01)[0]
    assert found.names and set(found.names) <= set(NAMES)
    assert {d["category_id"] for d in found.to_dict()["detections"]} <= set(IDS)
    # The detect command takes it too.
    image = str(sorted(images.iterdir())[0])
    assert main(["detect", image, "--checkpoint", str(last), "--threshold", "0.01", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "detections.json").read_text())
    assert {(d["name"], d["category_id"]) for d in report["images"][0]["detections"]} <= set(zip(NAMES, IDS))


def test_starting_from_a_trained_checkpoint_keeps_heads_only_for_the_same_classes(first_run):
    same = SSD300(nvidia_spec(class_names=tuple(NAMES), category_ids=tuple(IDS)))
    kept = checkpointing.initialise_from(same, first_run / "last.pt", None)
    assert kept["skipped"] == 0 and kept["loaded"] == len(same.state_dict())
    trained = torch.load(first_run / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(same.state_dict()["conf.0.weight"], trained["conf.0.weight"])
    # Three classes again, but other ones: the heads start afresh.
    other = SSD300(nvidia_spec(class_names=("cat", "dog", "cow")))
    assert checkpointing.initialise_from(other, first_run / "last.pt", None)["skipped"] == 12
    assert not torch.equal(other.state_dict()["conf.0.weight"], trained["conf.0.weight"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_docs_python_loop_runs(golden_checkpoint, tmp_path, monkeypatch, capsys):
    text = (REPO / "docs" / "training.md").read_text()
    snippet = text.split("<!-- training-loop-snippet -->\n```python\n", 1)[1].split("```", 1)[0]
    # The same code at tiny sizes: 2 small images, one batch, one epoch.
    for big, tiny in (("num_images=64, image_size=300", "num_images=2, image_size=96"),
                      ("batch_size=8,", "batch_size=2,"), ("range(10)", "range(1)")):
        assert big in snippet
        snippet = snippet.replace(big, tiny)
    monkeypatch.setenv("SSD_CHECKPOINT", str(golden_checkpoint))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/training.md", "exec"), {})
    assert "epoch 0: loss" in capsys.readouterr().out


def test_distributed_helpers_in_one_process(monkeypatch):
    from ssd import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.setup("cpu") == (0, 1, torch.device("cpu"))
    assert distributed.is_main() and distributed.world_size() == 1 and distributed.all_ok(False) is False
    distributed.barrier()
    distributed.cleanup()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer"):
        distributed.setup("cpu")


def test_class_metadata_only_from_our_checkpoints(golden_checkpoint, tmp_path):
    assert read_checkpoint(golden_checkpoint, "nvidia_ssd").classes is None  # NVIDIA-style: no names of ours
    bare = tmp_path / "bare.pt"
    torch.save(golden_state_dict(), bare)
    assert read_checkpoint(bare, "nvidia_ssd").classes is None
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt", "nvidia_ssd")
    # The names are read through the same guarded reader as the weights, and must agree with them.
    tagged = tmp_path / "tagged.pt"
    torch.save({"format": TRAIN_FORMAT, "model": "nvidia_ssd", "state_dict": golden_state_dict(),
                "class_names": ["a", "b"], "category_ids": [3, 9]}, tagged)
    with pytest.raises(InvalidCheckpointError, match="class names list 2 classes, but its class predictor"):
        read_checkpoint(tagged, "nvidia_ssd")
    # A file of the first format (before models were named) is read as nvidia_ssd's.
    old = tmp_path / "old.pt"
    torch.save({"format": "ssd300-train/1", "model": golden_state_dict(), "class_names": list(COCO_NAMES),
                "category_ids": list(range(1, 81))}, old)
    assert read_checkpoint(old, "nvidia_ssd").classes.category_ids == tuple(range(1, 81))
    with pytest.raises(InvalidCheckpointError, match="for nvidia_ssd, not ssd300_vgg16"):
        read_checkpoint(old, "ssd300_vgg16")
