"""The registry: one row per model, one build_model for all of them, the small lazy public API, and accuracy that
belongs to the published weights."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch

import ssd
from ssd.data.coco import COCO_NAMES
from ssd.registry import ROWS, build_model, get_entry, list_models
from ssd.weights import TRAIN_FORMAT, InvalidCheckpointError

from helpers import REPO
from helpers.checkpoints import save_training_checkpoint

MODELS = ["nvidia_ssd", "ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v2", "tv_ssd300_vgg16",
          "tv_ssdlite320_mobilenet_v3_large"]


def test_list_models_names_every_model_in_order():
    assert list_models() == MODELS == [row.name for row in ROWS]
    for name in MODELS:
        entry = get_entry(name)
        assert entry.name == name and entry.spec.name == name and entry.default_weights in entry.weights
        assert all(w.classes == entry.spec.classes for w in entry.weights.values())
    with pytest.raises(ValueError, match="model: expected one of 'nvidia_ssd', 'ssd300_vgg16'.*got 'yolo'"):
        get_entry("yolo")
    with pytest.raises(TypeError, match="model: expected a model name"):
        get_entry(3)


def test_import_ssd_and_list_models_import_no_torch():
    code = ("import sys, ssd; from ssd.registry import list_models; names = list_models(); "
            "print(len(names), 'torch' in sys.modules, ssd.__version__ == __import__('ssd').__version__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(len(MODELS)), "False", "True"]


def test_public_api_is_small_and_lazy():
    assert sorted(ssd.__all__) == sorted(["build_model", "list_models", "load", "detect", "evaluate", "train",
                                          "export", "Detections", "DetectionBatch", "DetectorSpec",
                                          "DownloadError", "__version__"])
    from ssd.backends import load
    from ssd.inference.detect import detect
    from ssd.inference.detections import DetectionBatch, Detections
    from ssd.io.http import DownloadError
    from ssd.models.spec import DetectorSpec
    from ssd.training.loop import train

    assert (ssd.build_model, ssd.list_models, ssd.load, ssd.detect, ssd.train) == (build_model, list_models, load,
                                                                                      detect, train)
    assert (ssd.Detections, ssd.DetectionBatch, ssd.DetectorSpec, ssd.DownloadError) == (
        Detections, DetectionBatch, DetectorSpec, DownloadError)
    if importlib.util.find_spec("pycocotools") is not None:
        from ssd.evaluation import evaluate

        assert ssd.evaluate is evaluate
    import ssd.export as export_package

    assert ssd.export is export_package and callable(ssd.export.export_onnx)
    assert set(ssd.__all__) <= set(dir(ssd))
    with pytest.raises(AttributeError, match="has no attribute 'build_ssd300'"):
        ssd.build_ssd300  # noqa: B018 - the old name is gone


def test_every_hub_entrypoint_is_a_registered_model():
    spec = importlib.util.spec_from_file_location("hubconf_registry_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = {name for name in vars(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert public == {*MODELS, "nvidia_ssd_processing_utils"}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_untrained_and_in_half_precision(name, monkeypatch):
    model = build_model(name, pretrained=False)
    assert type(model) is get_entry(name).network and model.spec is get_entry(name).spec and not model.training
    assert "accuracy" not in model.meta and model.meta["model"] == name and model.checkpoint_source is None
    # half / model_math are honoured for every family (they used to be dropped for mmdetection's).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for options in ({"half": True}, {"model_math": "fp16"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            half = build_model(name, pretrained=False, num_classes=3, **options)
        assert [str(w.message) for w in caught if "very slow" not in str(w.message)] == []  # nothing of weights
        assert len(caught) == 1
        layers = (torch.nn.Conv2d, torch.nn.BatchNorm2d)
        dtypes = {type(m): m.weight.dtype for m in half.modules() if isinstance(m, layers)}
        assert dtypes[torch.nn.Conv2d] == torch.float16
        assert dtypes.get(torch.nn.BatchNorm2d, torch.float32) == torch.float32
        assert half.spec.num_classes == 3


def test_arguments_are_checked_for_every_model():
    with pytest.raises(ValueError, match="half/model_math: expected one precision"):
        build_model("ssd300_vgg16", pretrained=False, half=True, model_math="fp32")
    with pytest.raises(ValueError, match="model_math: expected one of 'fp32', 'fp16', got 'bf16'"):
        build_model("ssdlite320_mobilenet_v2", pretrained=False, model_math="bf16")
    with pytest.raises(ValueError, match="weights: expected one of 'coco', got 'fp32'"):
        build_model("ssd512_vgg16", weights="fp32")
    with pytest.raises(ValueError, match=r"num_classes: expected 3 \(the 2 class names plus background\), got 5"):
        build_model("ssd300_vgg16", pretrained=False, class_names=["a", "b"], num_classes=5)
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 2"):
        build_model("nvidia_ssd", pretrained=False, num_classes=1)
    with pytest.raises(TypeError, match="half: expected True or False"):
        build_model("nvidia_ssd", pretrained=False, half="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'pretrainde'"):
        build_model("nvidia_ssd", pretrainde=False)
    with pytest.warns(UserWarning, match="pretrained=False: the weights/checkpoint argument is ignored"):
        build_model("ssdlite320_mobilenet_v2", pretrained=False, checkpoint="nowhere.pth")



def test_accuracy_belongs_to_the_published_weights(tmp_path, hub_dir, monkeypatch):
    # NVIDIA's published fp32 file, found in the cache under its published name.
    (hub_dir / "checkpoints").mkdir(parents=True)
    published = save_training_checkpoint(hub_dir / "checkpoints" / "nvidia_ssdpyt_fp32_190826.pt")
    model = build_model("nvidia_ssd")
    assert model.meta["accuracy"]["mAP"] == 0.25 and model.meta["weights"] == "fp32"
    assert build_model("nvidia_ssd", class_names=list(COCO_NAMES)).meta["accuracy"]["mAP"] == 0.25  # the same heads
    # Other classes, other weights, or none: no claim.
    assert "accuracy" not in build_model("nvidia_ssd", num_classes=4).meta
    assert "accuracy" not in build_model("nvidia_ssd", class_names=[f"x{i}" for i in range(80)]).meta
    assert "accuracy" not in build_model("nvidia_ssd", pretrained=False).meta
    copy = tmp_path / "copy.pt"
    copy.write_bytes(published.read_bytes())
    assert "accuracy" not in build_model("nvidia_ssd", checkpoint=copy).meta  # a file: not known to be published
    monkeypatch.setenv("SSD_CHECKPOINT", str(copy))
    assert "accuracy" not in build_model("nvidia_ssd").meta


@pytest.mark.parametrize("name", MODELS)
def test_a_train_checkpoint_of_any_model_loads_with_its_classes_and_only_into_that_model(name, tmp_path, hub_dir):
    trained = build_model(name, pretrained=False, class_names=["circle", "square", "triangle"])
    path = tmp_path / "last.pt"
    # What ssd train writes (less the optimizer state): the model's name, its weights and its classes.
    torch.save({"format": TRAIN_FORMAT, "model": name, "state_dict": trained.state_dict(),
                "class_names": ["circle", "square", "triangle"], "category_ids": [7, 8, 9], "epoch": 0}, path)
    for model in (build_model(name, checkpoint=str(path)),
                  torch.hub.load(str(REPO), name, source="local", checkpoint=str(path))):
        assert model.names == ["circle", "square", "triangle"] and model.spec.classes.category_ids == (7, 8, 9)
        assert "accuracy" not in model.meta and model.checkpoint_source == str(path)
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())
    other = next(m for m in MODELS if m != name)
    with pytest.raises(InvalidCheckpointError, match=f"written by ssd train for {name}, not {other}"):
        build_model(other, checkpoint=str(path))
