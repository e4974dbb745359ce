"""Export to ONNX / OpenVINO: parity with PyTorch (raw outputs and detect), metadata round trips, refusals, CLI."""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
import torch

from ssd.box_coder import BoxCoder
from ssd.models import SSD300, nvidia_spec
from ssd.postprocess import class_scores
from ssd.transforms import preprocess_for_detection

from helpers import SAMPLE_PHOTOS, photo
from helpers.checkpoints import detecting_state_dict, save_detecting_checkpoint
from helpers.detections import assert_same_exported_detections

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ssd.backends import OnnxBackend, load_exported  # noqa: E402
from ssd.export import (  # noqa: E402
    MissingExportPackage,
    export_onnx,
    export_openvino,
    export_program,
    export_torchscript,
)
from ssd.inference import detect, detect_iter  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> SSD300:
    net = SSD300()
    net.load_state_dict(detecting_state_dict())
    return net.eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("exports")
    return {"raw": export_onnx(model, folder / "ssd.onnx"),
            "nms": export_onnx(model, folder / "ssd-nms.onnx", nms=True)}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [photo(name) for name in SAMPLE_PHOTOS[:3]]


def _batch(photos: list[np.ndarray], n: int) -> torch.Tensor:
    tensors = [torch.from_numpy(p).permute(2, 0, 1) for p in photos[:n]]
    return preprocess_for_detection(tensors, NVIDIA.input)


NVIDIA = nvidia_spec()


def _reference(model: SSD300, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        locs, confs = model(batch)
    return BoxCoder.from_spec(model.spec).decode(locs).numpy(), class_scores(confs).numpy()


@pytest.mark.parametrize("n", [1, 3])
def test_onnxruntime_boxes_and_scores_match_pytorch(model, exports, photos, n):
    batch = _batch(photos, n)
    session = ort.InferenceSession(str(exports["raw"]), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(["boxes", "scores"], {"images": batch.numpy()})
    ref_boxes, ref_scores = _reference(model, batch)
    assert boxes.shape == (n, 8732, 4) and scores.shape == (n, 8732, 81)
    np.testing.assert_allclose(boxes, ref_boxes, atol=TOL, rtol=0)
    np.testing.assert_allclose(scores, ref_scores, atol=TOL, rtol=0)


def test_onnx_file_passes_checker_and_carries_metadata(exports):
    proto = onnx.load(str(exports["raw"]))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["ssd.class_names"])[0] == "person" and len(json.loads(meta["ssd.class_names"])) == 80
    assert json.loads(meta["ssd.category_ids"])[-1] == 90
    assert json.loads(meta["ssd.input"]) == {"size": 300, "mean": [0.485, 0.456, 0.406],
                                             "std": [0.229, 0.224, 0.225], "value_range": 1.0, "resize": "antialias"}
    assert meta["ssd.model"] == "nvidia_ssd" and meta["ssd.format_version"] == "1"
    assert json.loads(meta["ssd.detect_postprocess"])["score_threshold"] == 0.4
    assert [o.name for o in proto.graph.output] == ["boxes", "scores"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    # Decoding is in the graph: the anchors are an initializer, and an Exp decodes the sizes.
    assert "Exp" in {node.op_type for node in proto.graph.node}


def test_onnxruntime_detect_equals_pytorch_detect(model, exports, photos):
    expected = model.detect(photos)
    for kind in ("raw", "nms"):
        detector = load_exported(exports[kind])
        assert isinstance(detector, OnnxBackend) and detector.outputs == ("nms" if kind == "nms" else "decoded")
        assert_same_exported_detections(detect(detector, photos, batch_size=2), expected)


def test_nms_graph_outputs_are_padded_detections(model, exports, photos):
    batch = _batch(photos, 3)
    session = ort.InferenceSession(str(exports["nms"]), providers=["CPUExecutionProvider"])
    boxes, scores, labels, counts = session.run(None, {"images": batch.numpy()})
    assert boxes.shape == (3, 100, 4) and scores.shape == (3, 100) and labels.dtype == np.int64
    assert counts.shape == (3,) and (counts > 0).all()
    for i, count in enumerate(counts):
        assert (labels[i, count:] == 0).all() and (scores[i, count:] == 0).all()
        assert (np.diff(scores[i, :count]) <= 0).all()


def test_stricter_threshold_on_nms_graph_and_fixed_iou(model, exports, photos):
    detector = load_exported(exports["nms"])
    assert_same_exported_detections(detect(detector, photos, threshold=0.83, max_detections=3),
                     model.detect(photos, threshold=0.83, max_detections=3))
    with pytest.raises(ValueError, match="iou_threshold: expected 0.5"):
        detect(detector, photos, iou_threshold=0.3)
    with pytest.raises(ValueError, match="threshold, max_detections: expected at least 0.4"):
        detect_iter(detector, photos, threshold=0.1)  # refused at the call, not at the first result
    with pytest.raises(ValueError, match="precision: expected None or 'fp32'"):
        detect(detector, photos, precision="bf16")


@pytest.mark.slow
def test_openvino_fp32_matches_pytorch(model, exports, photos, tmp_path):
    pytest.importorskip("openvino")
    xml = export_openvino(model, tmp_path / "ssd.xml")
    assert xml.with_suffix(".bin").is_file()
    detector = load_exported(xml)
    assert detector.runtime == "openvino" and detector.names == model.names
    batch = _batch(photos, 3)
    boxes, scores = detector(batch)
    ref_boxes, ref_scores = _reference(model, batch)
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=TOL, rtol=0)
    expected = model.detect(photos)
    assert_same_exported_detections(detect(detector, photos), expected)
    nms = export_openvino(model, tmp_path / "ssd-nms.xml", nms=True)
    assert_same_exported_detections(detect(load_exported(nms), photos), expected)


def _four_class_state_dict() -> dict[str, torch.Tensor]:
    """Golden-recipe weights with the class heads cut to background + 4 classes (a head's channel c belongs to
    class c // boxes_per_cell, so the first 5 * boxes_per_cell channels are those classes'): a "fine-tuned" model
    whose label 1 still fires like the detecting model's person."""
    state = detecting_state_dict()
    for key in [k for k in state if k.startswith("conf.")]:
        per_cell = state[key].shape[0] // 81
        state[key] = state[key][: 5 * per_cell].clone()
    return state


@pytest.mark.slow
def test_fine_tuned_four_class_model_round_trips_its_classes(tmp_path, photos):
    names = ("cup", "saucer", "spoon", "cake")
    net = SSD300(nvidia_spec(class_names=names, category_ids=(11, 12, 13, 14)))
    net.load_state_dict(_four_class_state_dict())
    net.eval()
    path = export_onnx(net, tmp_path / "four.onnx", opset=13, nms=True)
    detector = load_exported(path)
    assert detector.names == list(names) and detector.spec.classes.category_ids == (11, 12, 13, 14)
    assert detector.spec.num_classes == 5
    expected = net.detect(photos)
    assert_same_exported_detections(detect(detector, photos), expected)
    assert expected[0].names[0] == "cup" and detect(detector, photos[0])[0].category_ids[0] == 11
    raw = load_exported(export_onnx(net, tmp_path / "four-raw.onnx"))
    batch = _batch(photos, 1)
    boxes, scores = raw(batch)
    ref_boxes, ref_scores = _reference(net, batch)
    assert scores.shape == (1, 8732, 5)
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=TOL, rtol=0)


def test_missing_package_names_the_requirements_file(model, tmp_path, monkeypatch, capsys):
    import importlib

    import ssd.export.metadata as metadata

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime", "openvino"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(metadata.importlib, "import_module", fake)
    with pytest.raises(MissingExportPackage, match=r"pip install -r requirements-export.txt"):
        export_onnx(model, tmp_path / "x.onnx")
    with pytest.raises(ImportError, match=r"onnxruntime: expected the package installed"):
        OnnxBackend(tmp_path / "x.onnx")
    from ssd.cli import main

    assert main(["export", "--out", str(tmp_path / "y.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "requirements-export.txt" in err[0]
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_unwritable_out_is_one_error_line(tmp_path, capsys):
    from ssd.cli import main

    (tmp_path / "a-file").write_text("not a folder")
    for out in (tmp_path / "a-file" / "m.onnx", tmp_path, tmp_path / "m.txt"):
        assert main(["export", "--format", "onnx", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --out: expected")
    assert main(["export", "--format", "openvino", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "expected a .xml file" in capsys.readouterr().err


def test_foreign_onnx_file_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["boxes"])], "foreign",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 300, 300])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 300, 300])])
    path = tmp_path / "foreign.onnx"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # loadable by any onnxruntime: the refusal must come from the missing metadata
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=r"foreign.onnx: expected a model exported by `python -m ssd export`"):
        load_exported(path)


def test_wrong_input_size_is_refused(exports, tmp_path):
    proto = onnx.load(str(exports["raw"]))
    for entry in proto.metadata_props:
        if entry.key == "ssd.input":
            entry.value = json.dumps({**json.loads(entry.value), "size": 512})
    path = tmp_path / "resized.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=r"resized.onnx: expected input 'images' of shape N x 3 x 512 x 512"):
        load_exported(path)


def test_too_old_opset_is_refused(model, exports, tmp_path):
    with pytest.raises(ValueError, match=r"opset: expected 11 or newer"):
        export_onnx(model, tmp_path / "old.onnx", opset=9)
    assert not (tmp_path / "old.onnx").exists()
    proto = onnx.load(str(exports["nms"]))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 9
    path = tmp_path / "old.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=r"old.onnx: expected an opset that has every op .* opset 9, too old"):
        load_exported(path)


def test_cli_export_then_detect_with_backends(tmp_path, capsys):
    from ssd.cli import main

    checkpoint = save_detecting_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "new" / "folder" / "ssd.onnx"  # missing folders are created
    assert main(["export", "--format", "onnx", "--out", str(out), "--checkpoint", str(checkpoint), "--nms",
                 "--opset", "13", "--batch", "2"]) == 0  # --batch: the former name of --batch-size
    lines = capsys.readouterr().out.splitlines()
    # Each stage says when it is done, then the file's size and the time taken.
    assert [line.split(":", 1)[0] for line in lines[:-1]] == ["export", "trace", "check", "run"]
    assert lines[-1].startswith(f"wrote {out} (")
    assert "runs a 2 x 3 x 300 x 300 batch" in lines[3]
    size = re.search(r"\((\d+\.\d) MB;", lines[-1])
    assert size and float(size.group(1)) == round(out.stat().st_size / 1e6, 1)
    assert re.search(r" in \d+\.\d s$", lines[-1])
    image = tmp_path / "coffee.png"
    from PIL import Image

    Image.fromarray(photo("coffee")).save(image)
    results = []
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        folder = tmp_path / backend
        assert main(["detect", str(image), "--model", str(out), "--backend", backend, "--out", str(folder)]) == 0
        results.append(json.loads((folder / "detections.json").read_text())["images"][0]["detections"])
    assert results[0] and [d["name"] for d in results[0]] == [d["name"] for d in results[-1]]


def test_torchscript_export_matches(model, photos, tmp_path):
    path = export_torchscript(model, tmp_path / "ssd.pt")
    extra = {"ssd_metadata.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["ssd_metadata.json"])["ssd.model"] == "nvidia_ssd"
    batch = _batch(photos, 3)
    with torch.inference_mode():
        boxes, scores = loaded(batch)
    ref_boxes, ref_scores = _reference(model, batch)
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=TOL, rtol=0)


def test_torch_export_program_matches(model, photos, tmp_path):
    path = export_program(model, tmp_path / "ssd.pt2")
    extra = {"ssd_metadata.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra["ssd_metadata.json"])["ssd.outputs"] == "decoded"
    batch = _batch(photos, 3)
    boxes, scores = program.module()(batch)
    ref_boxes, ref_scores = _reference(model, batch)
    np.testing.assert_allclose(boxes.detach().numpy(), ref_boxes, atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.detach().numpy(), ref_scores, atol=TOL, rtol=0)


def test_mmdetection_style_recipe_in_graph(model, photos, tmp_path):
    """Per-level candidates, clipping, empty-box removal and IoU > t suppression: the graph follows the recipe."""
    import dataclasses

    from ssd.models import PostProcessSpec

    recipe = PostProcessSpec(score_threshold=0.3, iou_threshold=0.45, max_detections=50, candidates_per_class=None,
                             candidates_per_level=20, clip_boxes=True, drop_empty=True, suppress_equal=False)
    net = SSD300(dataclasses.replace(model.spec, detect_postprocess=recipe, name="mmdet_like"))
    net.load_state_dict(model.state_dict())
    net.eval()
    expected = net.detect(photos[:2])
    for nms in (True, False):
        detector = load_exported(export_onnx(net, tmp_path / f"mm-{nms}.onnx", nms=nms))
        assert detector.spec.detect_postprocess == recipe
        assert_same_exported_detections(detect(detector, photos[:2]), expected)
