"""mmdetection-format checkpoints for the tests: the golden recipe's weights under mmdetection's key names."""
from __future__ import annotations

import collections
import importlib.util
import json
import pathlib

import numpy as np
import torch

from ssd.models import MMDET_SSD300, MMDET_SSD512, MMDET_SSDLITE320
from ssd.registry import get_entry
from ssd.weights import read_checkpoint

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "golden" / "mmdet"

# mmdetection's CocoDataset METAINFO['classes'], as its 2.x checkpoints store them in meta['CLASSES'].
MMDET_COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


def mmdet_recipe():
    spec = importlib.util.spec_from_file_location("mmdet_detweights", GOLDEN / "detweights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mmdet_layout(short: str) -> dict:
    return json.loads((GOLDEN / f"{short}_layout.json").read_text())


_STATE_DICTS: dict[str, dict[str, torch.Tensor]] = {}


def mmdet_state_dict(short: str) -> dict[str, torch.Tensor]:
    """The golden weights under mmdetection's key names, in its state_dict order (built once per model)."""
    if short not in _STATE_DICTS:
        layout = mmdet_layout(short)
        arrays = mmdet_recipe().make_state_dict(layout["layout"], layout["init_rule"])
        _STATE_DICTS[short] = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
    return _STATE_DICTS[short]


def mmdet_meta(classes: tuple[str, ...] = MMDET_COCO_CLASSES) -> dict:
    """Plain-data meta as mmdetection 2.x writes it."""
    return {
        "mmdet_version": "2.15.0",
        "CLASSES": classes,
        "config": "model = dict(type='SingleStageDetector')\n",
        "env_info": "sys.platform: linux",
        "seed": 0,
        "exp_name": "ssd300_coco.py",
        "epoch": 120,
        "iter": 879600,
        "mmcv_version": "1.3.9",
        "time": "Tue Aug  3 01:54:28 2021",
        "hook_msgs": {"last_ckpt": "/work_dirs/ssd300_coco/epoch_120.pth"},
    }


def save_mmdet(path: pathlib.Path, state_dict: dict, *, legacy: bool, meta: dict | None = None) -> pathlib.Path:
    obj = {"meta": mmdet_meta() if meta is None else meta, "state_dict": collections.OrderedDict(state_dict)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


MODELS = {"ssd300": MMDET_SSD300, "ssd512": MMDET_SSD512, "ssdlite": MMDET_SSDLITE320}
ORIGINAL_WH = (500, 400)  # the astronaut crop the golden detections are in
TOP_N = 50

def network_input(golden: dict, spec) -> torch.Tensor:
    """mmdetection's input: RGB(resized_bgr) as float32, minus mean, over std, 1 x 3 x S x S."""
    rgb = golden["resized_bgr"][..., ::-1].astype(np.float32)
    x = (rgb - np.asarray(spec.input.mean, np.float32)) / np.asarray(spec.input.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


_RUNS: dict[str, tuple] = {}


def golden_run(short: str, tmp_path_factory) -> tuple:
    """(spec, golden npz, model input, (locs, confs)) with the weights loaded from mmdetection-style files.

    Both torch formats are written and loaded; they must give the same tensors, so one forward serves both.
    """
    if short not in _RUNS:
        spec = MODELS[short]
        folder = tmp_path_factory.mktemp(f"mmdet_{short}")
        converted = [
            read_checkpoint(save_mmdet(folder / f"{fmt}.pth", mmdet_state_dict(short), legacy=fmt == "legacy"),
                            spec.name).state_dict
            for fmt in ("legacy", "zip")
        ]
        assert converted[0].keys() == converted[1].keys()
        assert all(torch.equal(converted[0][k], converted[1][k]) for k in converted[0])
        model = get_entry(spec.name).network(spec).eval()
        model.load_state_dict(converted[0], strict=True)
        golden = dict(np.load(GOLDEN / f"{short}_golden.npz"))
        x = network_input(golden, spec)
        with torch.no_grad():
            out = model(x)
        _RUNS[short] = (spec, golden, x, out)
    return _RUNS[short]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)
