"""Checkpoints made by the tests: golden-recipe weights saved the way NVIDIA's training saves them."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import torch

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "golden"


def _recipe():
    spec = importlib.util.spec_from_file_location("golden_weights", GOLDEN / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout() -> list:
    return json.loads((GOLDEN / "state_dict_layout.json").read_text())


def golden_state_dict(layout_entries: list | None = None, salt: int = 0) -> dict[str, torch.Tensor]:
    return _recipe().state_dict(layout_entries or layout(), salt=salt)


def training_checkpoint(state_dict: dict[str, torch.Tensor], distributed: bool = False) -> dict:
    """A dict shaped like NVIDIA's training checkpoints: model weights plus optimizer and scheduler state."""
    model = {("module." + k if distributed else k): v for k, v in state_dict.items()}
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=2.6e-3, momentum=0.9, weight_decay=5e-4)
    params[0].grad = torch.ones(2)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[43, 54], gamma=0.1)
    return {
        "epoch": 65,
        "iteration": 120000,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "label_map": {i: f"class{i}" for i in range(1, 81)},
        "model": model,
    }


def save_training_checkpoint(path: pathlib.Path, salt: int = 0, distributed: bool = False) -> pathlib.Path:
    torch.save(training_checkpoint(golden_state_dict(salt=salt), distributed=distributed), path)
    return path


# Head biases that make the golden-recipe network see objects: per feature map j, (class label, bias). A head's
# output channel c belongs to class c // boxes_per_cell, so raising those channels' biases raises that class's
# logit at every default box of the map.
DETECTING_BIASES = {5: (1, 12.0), 4: (16, 6.0)}  # person on the 1x1 map, cat on the 3x3 map


def detecting_state_dict(salt: int = 0) -> dict[str, torch.Tensor]:
    """Golden-recipe weights whose heads are biased towards a few classes, so that detection finds boxes."""
    state = golden_state_dict(salt=salt)
    for j, (label, bias) in DETECTING_BIASES.items():
        key = f"conf.{j}.bias"
        per_cell = state[key].numel() // 81
        state[key] = state[key].clone()
        # Each box size gets its own offset so that no two overlapping boxes nearly tie: a near-tie would make
        # the agreement checks between precisions depend on rounding rather than on the code under test.
        state[key][label * per_cell:(label + 1) * per_cell] += bias - 2.0 * torch.arange(per_cell)
    return state


def save_detecting_checkpoint(path: pathlib.Path) -> pathlib.Path:
    torch.save(training_checkpoint(detecting_state_dict()), path)
    return path


# The minicoco golden set (tests/data/golden/minicoco) was scored with salt 23 and +7.0 on the class-logit biases
# of these labels, at every default box of every head: `bias[c * nd:(c + 1) * nd]` for head k with nd boxes a cell.
# c is the model's label (head channel block), so 1, 17 and 62 are person, dog and toilet. The shared README calls
# them "person, cat and chair", the names of COCO *category ids* 1, 17 and 62; biasing those classes' labels
# (1, 16, 57) instead scores 0 everywhere, while these labels reproduce all 12 of NVIDIA's numbers exactly.
MINICOCO_SALT = 23
MINICOCO_FAVOURED = (1, 17, 62)
MINICOCO_BIAS = 7.0


def minicoco_state_dict() -> dict[str, torch.Tensor]:
    """The weights behind minicoco/nvidia_eval.json, exactly as shared/golden/README.md makes them."""
    state = golden_state_dict(salt=MINICOCO_SALT)
    for key in [k for k in state if k.startswith("conf.") and k.endswith(".bias")]:
        per_cell = state[key].numel() // 81
        bias = state[key].clone()
        for c in MINICOCO_FAVOURED:
            bias[c * per_cell:(c + 1) * per_cell] += MINICOCO_BIAS
        state[key] = bias
    return state


def save_minicoco_checkpoint(path: pathlib.Path) -> pathlib.Path:
    torch.save(training_checkpoint(minicoco_state_dict()), path)
    return path


def serve_published(monkeypatch, server, model: str = "nvidia_ssd") -> dict:
    """Point ``model``'s published weights at ``server``: URL i of weights ``name`` becomes ``/{name}/{i}/{file}``.

    Returns the patched table (name -> Weights); nothing is served until a test adds it.
    """
    import dataclasses

    from ssd.registry import get_entry

    table = get_entry(model).weights
    for name, weights in list(table.items()):
        urls = tuple(server.url(f"/{name}/{i}/{weights.file_name}") for i in range(len(weights.urls)))
        monkeypatch.setitem(table, name, dataclasses.replace(weights, urls=urls))
    return dict(table)


SMALL_MODEL = "tv_ssdlite320_mobilenet_v3_large"  # the smallest network of the registry: 3.4M parameters


def detecting_ssdlite() -> torch.nn.Module:
    """SSDLite with random weights whose class head favours person on the last two feature maps, so that it finds
    boxes on any photo (the scores still depend on the pixels). Fast enough for tests that export and quantize."""
    from ssd.registry import build_model

    torch.manual_seed(0)
    model = build_model(SMALL_MODEL, pretrained=False).eval()
    classes = model.spec.num_classes
    state = model.state_dict()
    for level in (4, 5):
        bias = state[f"head.classification_head.module_list.{level}.1.bias"]
        for anchor in range(bias.numel() // classes):
            bias[anchor * classes + 1] += 9.0 - 0.5 * anchor  # distinct per anchor shape: no near-ties in NMS
    model.load_state_dict(state)
    return model
