"""``ssd train --model NAME`` for every registered model: one iteration at batch 2 on a tiny set, with the spec of the
model read by the augmentation, the targets and the loss, and the checkpoint loading back, with its classes, through
``build_model`` and the hub entrypoint of that model (and refused by another)."""
from __future__ import annotations

import json

import pytest
import torch

from ssd.cli import main
from ssd.data.synthetic import make_shapes_dataset
from ssd.registry import build_model, get_entry, list_models
from ssd.training import batches, loop
from ssd.weights import InvalidCheckpointError

from helpers import REPO

NAMES = ("circle", "square", "triangle")
IDS = (21, 22, 23)  # not 1..K, so that the test tells category ids from labels


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    annotation_file = make_shapes_dataset(root, 4, image_size=(64, 80), seed=4)
    document = json.loads(annotation_file.read_text())
    for entry in document["categories"]:
        entry["id"] += 20
    for entry in document["annotations"]:
        entry["category_id"] += 20
    annotation_file.write_text(json.dumps(document))
    return annotation_file, root / "images"


def _spying(monkeypatch) -> dict[str, list]:
    """Record the spec every training piece of the loop is given."""
    seen: dict[str, list] = {"augmentation": [], "targets": [], "loss": []}
    augmentation, encode, loss = loop.SSDAugmentation, batches.encode_targets, loop.SSDLoss

    def spy_augmentation(input_spec, **kwargs):
        seen["augmentation"].append(input_spec)
        return augmentation(input_spec, **kwargs)

    def spy_encode(boxes, labels, spec):
        seen["targets"].append(spec)
        return encode(boxes, labels, spec)

    def spy_loss(spec, **kwargs):
        seen["loss"].append(spec)
        return loss(spec, **kwargs)

    monkeypatch.setattr(loop, "SSDAugmentation", spy_augmentation)
    monkeypatch.setattr(batches, "encode_targets", spy_encode)
    monkeypatch.setattr(loop, "SSDLoss", spy_loss)
    return seen


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_and_its_checkpoint_loads_with_its_classes(name, shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SSD_CHECKPOINT", raising=False)
    seen = _spying(monkeypatch)
    annotations, images = shapes
    out = tmp_path / "out"
    args = ["train", "--model", name, "--images", str(images), "--annotations", str(annotations), "--out", str(out),
            "--checkpoint", "none", "--epochs", "1", "--batch-size", "2", "--max-iterations-per-epoch", "1",
            "--device", "cpu", "--workers", "0", "--warmup-iterations", "0"]
    assert main(args) == 0, capsys.readouterr().err
    assert f"training {name} on 1 x cpu" in capsys.readouterr().out

    published = get_entry(name).spec
    for piece, specs in seen.items():
        assert specs, piece
    assert all(s == published.input for s in seen["augmentation"])
    for spec in seen["targets"] + seen["loss"]:
        assert (spec.name, spec.anchors, spec.box_coder, spec.matching_iou) == (
            name, published.anchors, published.box_coder, published.matching_iou)
        assert spec.classes.names == NAMES and spec.classes.category_ids == IDS

    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "ssd-train/2" and state["model"] == name and state["iteration"] == 1
    size = published.input.size
    assert state["preprocessing"] == {
        "size": [size, size], "resize": published.input.resize, "mean": list(published.input.mean),
        "std": list(published.input.std), "value_range": published.input.value_range,
        "scale": published.input.value_range / 255,
    }
    start = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert start["type"] == "start" and start["model"] == name

    model = build_model(name, checkpoint=str(out / "last.pt"))
    assert (model.spec.classes.names, model.spec.classes.category_ids) == (NAMES, IDS)
    assert "accuracy" not in model.meta
    trained = state["state_dict"]
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    hub = torch.hub.load(str(REPO), name, source="local", checkpoint=str(out / "last.pt"))
    assert (hub.spec.name, hub.spec.classes.names, hub.spec.classes.category_ids) == (name, NAMES, IDS)
    assert all(torch.equal(v, trained[k]) for k, v in hub.state_dict().items())
    other = next(n for n in list_models() if n != name)
    with pytest.raises(InvalidCheckpointError, match=f"written by ssd train for {name}, not {other}"):
        build_model(other, checkpoint=str(out / "last.pt"))
