"""What a training run shows and writes for people (issue 23): the line per epoch, results.csv and results.png,
TensorBoard, per-class AP in the validation records, --quiet, the default warmup, early stopping (patience) and
the augmentation recipes and options."""
from __future__ import annotations

import csv
import json
import pathlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.cli import main
from ssd.data.synthetic import make_shapes_dataset
from ssd.models.spec import InputSpec
from ssd.registry import get_entry
from ssd.training.augment import SSDAugmentation
from ssd.training.loop import TrainConfig, train
from ssd.training.reporting import CSV_COLUMNS, format_seconds, read_epochs, write_results
from ssd.training.schedule import SchedulePlan, default_warmup, lr_factor

FAST = "ssdlite320_mobilenet_v2"
NVIDIA_INPUT: InputSpec = get_entry("nvidia_ssd").spec.input


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("reporting")
    make_shapes_dataset(root / "train", 4, image_size=64, seed=4)
    make_shapes_dataset(root / "val", 2, image_size=64, seed=5)
    return root


def _records(out: pathlib.Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _config(data: pathlib.Path, out: pathlib.Path, **overrides) -> TrainConfig:
    settings = {"annotations": data / "train" / "annotations.json", "images": data / "train" / "images",
                "out_dir": out, "model": FAST, "epochs": 1, "batch_size": 2, "device": "cpu", "num_workers": 0,
                "max_iters_per_epoch": 1, "augment": False}
    settings.update(overrides)
    return TrainConfig(**settings)


# ---------------------------------------------------------------------------------------------- results files


def test_results_csv_and_png_are_rebuilt_from_the_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"type": "start", "epoch": 0, "iteration": 0},
        {"type": "iteration", "epoch": 0, "iteration": 1, "loss": 9.0, "lr": 0.0},
        {"type": "epoch", "epoch": 0, "iteration": 4, "loss": 8.5, "lr": 0.01, "images_per_second": 3.5,
         "seconds": 2.25},
        {"type": "validation", "epoch": 0, "iteration": 4, "mAP": 0.125, "stats": [0.125, 0.5] + [0.0] * 10},
        {"type": "epoch", "epoch": 1, "iteration": 8, "loss": 7.0, "lr": 0.001, "images_per_second": 4.0,
         "seconds": 2.0},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "epo')  # a torn last line
    write_results(metrics, tmp_path, "title")
    with open(tmp_path / "results.csv", newline="") as fp:
        rows = list(csv.reader(fp))
    assert rows[0] == list(CSV_COLUMNS)
    assert rows[1] == ["0", "4", "8.5", "0.01", "3.5", "2.25", "0.125", "0.5"]
    assert rows[2] == ["1", "8", "7.0", "0.001", "4.0", "2.0", "", ""]  # no validation after epoch 1
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size == (640, 480)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "results.csv", "results.png"]
    assert read_epochs(tmp_path / "missing.jsonl") == []


def test_format_seconds():
    assert [format_seconds(s) for s in (12.34, 75.2, 3725, float("nan"))] == ["12.3s", "1m15s", "1h02m", "?"]


# ------------------------------------------------------------------------------------------------- schedule


def test_default_warmup_is_the_smaller_of_300_and_a_tenth_of_the_run():
    assert default_warmup(80) == 8  # the README's demo: 10 epochs of 8 iterations
    assert default_warmup(2999) == 299 and default_warmup(3000) == 300 and default_warmup(100_000) == 300
    assert default_warmup(9) == 0


def test_schedule_plan_round_trips_and_follows_lr_factor():
    plan = SchedulePlan(10, 8, 8, (7, 8), "step", 0.1)
    assert SchedulePlan.from_dict(plan.as_dict(), "x") == plan
    assert [plan.factor(i) for i in (0, 4, 8, 56, 64)] == [lr_factor(i, 8, 8, (7, 8), 0.1) for i in (0, 4, 8, 56, 64)]
    with pytest.raises(ValueError, match="last.pt: expected a schedule"):
        SchedulePlan.from_dict({"epochs": 3}, "last.pt")


# --------------------------------------------------------------------------------------- a run, end to end


@pytest.mark.timeout(600)
def test_train_writes_results_tensorboard_and_per_class_ap(data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--model", FAST, "--images", str(data / "train" / "images"), "--annotations",
            str(data / "train" / "annotations.json"), "--val-images", str(data / "val" / "images"),
            "--val-annotations", str(data / "val" / "annotations.json"), "--out", str(out), "--checkpoint", "none",
            "--epochs", "2", "--batch-size", "2", "--max-iterations-per-epoch", "2", "--device", "cpu",
            "--workers", "0", "--no-augment", "--tensorboard"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    # One line per epoch with the loss, the validation's mAP and AP50, the time and (but for the last) the ETA.
    epoch_lines = [line for line in printed.splitlines() if " done: loss " in line]
    assert len(epoch_lines) == 2 and all("validation: mAP " in line and ", AP50 " in line for line in epoch_lines)
    assert "ETA " in epoch_lines[0] and "ETA " not in epoch_lines[1]
    # The default warmup: 10% of the 4 iterations, rounded down.
    assert _records(out, "start")[0]["warmup_iters"] == 0
    validations = _records(out, "validation")
    names = ["circle", "square", "triangle"]
    assert all(set(v["per_class_ap"]) <= set(names) and v["per_class_ap"] for v in validations)
    assert all(v["AP50"] == v["stats"][1] for v in validations)
    with open(out / "results.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [float(r["mAP"]) for r in rows] == pytest.approx([v["mAP"] for v in validations])
    with Image.open(out / "results.png") as image:
        assert image.format == "PNG"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/loss", "val/mAP", "val/AP50"} <= tags
    assert [e.value for e in accumulator.Scalars("val/mAP")] == pytest.approx([v["mAP"] for v in validations])

    # --quiet: nothing on stdout; resuming the finished run with its epochs has nothing to do.
    assert main([*args, "--resume", str(out / "last.pt"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_tensorboard_missing_is_one_line_naming_the_extra(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what a missing package looks like to import
    args = ["train", "--images", str(data / "train" / "images"), "--annotations",
            str(data / "train" / "annotations.json"), "--out", str(tmp_path / "out"), "--checkpoint", "none",
            "--tensorboard"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tensorboard" in err and "ssd-hub[tensorboard]" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match=r"ssd-hub\[tensorboard\]"):
        train(_config(data, tmp_path / "api", tensorboard=True))


@pytest.mark.timeout(600)
def test_patience_stops_early_keeping_the_best(data, tmp_path):
    scores = iter([0.3, 0.5, 0.4, 0.45, 0.9])

    def validate(model):
        return {"mAP": next(scores), "stats": [0.0] * 12, "per_class_ap": {"circle": 0.25}}

    messages = []
    out = tmp_path / "out"
    summary = train(_config(data, out, epochs=5, validate=validate, patience=2, log=messages.append))
    # mAP 0.3, 0.5 (best, epoch 1), 0.4, 0.45: two validations without a better one stop it after epoch 3.
    assert summary["epoch"] == 3 and summary["epochs_run"] == 4 and summary["best_epoch"] == 1
    assert summary["best_map"] == 0.5 and "stopped early after epoch 3" in summary["stopped_early"]
    assert any("patience 2" in m and "mAP 0.5000 at epoch 1, is in best.pt" in m for m in messages), messages
    assert torch.load(out / "best.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    stop = _records(out, "stop")
    assert len(stop) == 1 and stop[0]["epoch"] == 3 and "patience 2" in stop[0]["reason"]
    assert _records(out, "validation")[0]["per_class_ap"] == {"circle": 0.25}


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"patience": 2}, ValueError, "patience: expected a validation set"),
    ({"patience": 0, "validate": lambda m: {"mAP": 0.0}}, ValueError, "patience: expected an integer >= 1"),
    ({"augment": "heavy"}, ValueError, "augment: expected one of 'nvidia', 'light', 'none'"),
    ({"zoom_out": 1}, TypeError, "zoom_out: expected True or False"),
    ({"warmup_iters": -1}, ValueError, "warmup_iters"),
])
def test_bad_new_options_are_refused(data, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train(_config(data, tmp_path, **overrides))


def test_cli_patience_needs_a_validation_set(data, tmp_path, capsys):
    args = ["train", "--images", str(data / "train" / "images"), "--annotations",
            str(data / "train" / "annotations.json"), "--out", str(tmp_path / "out"), "--patience", "3"]
    assert main(args) == 2
    assert "--patience: expected with --val-images" in capsys.readouterr().err
    assert main([*args[:-2], "--augment", "light", "--no-augment"]) == 2
    assert "--no-augment/--augment: expected one of them" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ augmentation


def _white_box_image() -> tuple[np.ndarray, torch.Tensor]:
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[30:90, 40:100] = 255
    return image, torch.tensor([[40.0, 30.0, 100.0, 90.0]])


@pytest.mark.parametrize("option", ["zoom_out", "scale_jitter"])
def test_zoom_out_and_scale_jitter_move_boxes_with_the_pixels(option):
    """The box that covers a white patch still covers it (and only it) after the geometric option."""
    image, boxes = _white_box_image()
    augment = SSDAugmentation(NVIDIA_INPUT, augment="light", color_jitter=False, flip_p=0.0, **{option: True})
    # The output is normalised; undo it to get back 0..255 grey levels.
    mean = torch.tensor(NVIDIA_INPUT.mean).view(3, 1, 1)
    std = torch.tensor(NVIDIA_INPUT.std).view(3, 1, 1)
    size = NVIDIA_INPUT.size
    changed = 0
    torch.manual_seed(0)
    for _ in range(12):
        out, out_boxes, labels = augment(image, boxes, torch.tensor([1]))
        assert out.shape == (3, size, size) and labels.tolist() == [1] * len(out_boxes)
        if len(out_boxes) == 0:
            continue  # scale jitter may crop the patch away; then the box goes too
        pixels = (out * std + mean) * 255 / NVIDIA_INPUT.value_range
        left, top, right, bottom = (out_boxes[0] * size).tolist()
        inner = pixels[:, round(top) + 2:round(bottom) - 2, round(left) + 2:round(right) - 2]
        assert inner.numel() > 0 and float(inner.min()) > 200  # inside the box: the white patch
        changed += not torch.allclose(out_boxes, torch.tensor([[40 / 160, 30 / 120, 100 / 160, 90 / 120]]))
        mask = torch.ones(size, size, dtype=torch.bool)
        mask[max(0, round(top) - 2):round(bottom) + 2, max(0, round(left) - 2):round(right) + 2] = False
        assert float(pixels[:, mask].max()) < 200  # outside it: black or the mean-colour fill, never white
    assert changed >= 3  # the option did something in most of the draws


def test_light_recipe_never_crops_and_none_is_the_evaluation_path():
    image, boxes = _white_box_image()
    relative = torch.tensor([[40 / 160, 30 / 120, 100 / 160, 90 / 120]])
    mirrored = torch.tensor([[1 - 100 / 160, 30 / 120, 1 - 40 / 160, 90 / 120]])
    light = SSDAugmentation(NVIDIA_INPUT, augment="light", generator=torch.Generator().manual_seed(1))
    for _ in range(8):
        _, out_boxes, _ = light(image, boxes, torch.tensor([1]))
        assert torch.allclose(out_boxes, relative) or torch.allclose(out_boxes, mirrored)
    none = SSDAugmentation(NVIDIA_INPUT, augment="none")(image, boxes, torch.tensor([1]))
    plain = SSDAugmentation(NVIDIA_INPUT, augment=False)(image, boxes, torch.tensor([1]))
    assert all(torch.equal(a, b) for a, b in zip(none, plain))
    # "none" ignores the options: they are augmentation.
    with_options = SSDAugmentation(NVIDIA_INPUT, augment="none", zoom_out=True, scale_jitter=True)
    assert all(torch.equal(a, b) for a, b in zip(with_options(image, boxes, torch.tensor([1])), plain))


def test_epoch_line_and_a_silent_rank(tmp_path, capsys):
    from ssd.training.reporting import Reporter, epoch_line

    validation = {"mAP": 0.412, "AP50": 0.701}
    line = epoch_line(3, 9, 2.13454, 41.23, validation, True, 663.0, "last.pt and best.pt")
    assert line == ("epoch 3 done: loss 2.1345, validation: mAP 0.4120 (best), AP50 0.7010, 41.2s, ETA 11m03s; "
                    "saved last.pt and best.pt")
    assert epoch_line(9, 9, 1.0, 5.0, None, False, 0.0, "last.pt") == "epoch 9 done: loss 1.0000, 5.0s; saved last.pt"
    # Another rank than 0 reports nothing and writes nothing, whatever it is asked.
    messages = []
    quiet = Reporter(tmp_path, main=False, log=messages.append, progress=True, tensorboard=True, fresh=True)
    quiet.start_epoch(0, 1, 4)
    quiet.iteration(1, 1.0, 0.1, 2.0, True)
    quiet.end_epoch()
    quiet.epoch_done(line, 1.0, validation, 1, tmp_path / "metrics.jsonl")
    quiet.close()
    assert messages == [] and list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")
