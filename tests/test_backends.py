"""The backend protocol: PyTorch, onnxruntime and OpenVINO give the same detections and evaluation through the same
consumers; exported files are checked when they load; runtime failures name the file; OpenVINO is thread-safe; a
model of another copy of the package is accepted everywhere; ``ssd.load``."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import ssd
from ssd.backends import BackendError, OnnxBackend, PyTorchBackend, is_backend, is_detector, load_exported, spec_of
from ssd.evaluation import evaluate
from ssd.inference import detect
from ssd.models import SSD300
from ssd.models.spec import DetectorSpec
from ssd.transforms import preprocess_for_detection

from helpers import GOLDEN, REPO, SAMPLE_PHOTOS, photo
from helpers.checkpoints import detecting_state_dict, minicoco_state_dict
from helpers.detections import assert_same_exported_detections
from helpers.processes import ssd_env

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ssd.export import export_onnx, export_openvino  # noqa: E402
from ssd.export.metadata import MAX_INPUT_SIZE, metadata_for  # noqa: E402

IMAGES = GOLDEN / "minicoco" / "images"
ANNOTATIONS = GOLDEN / "minicoco" / "instances.json"
# Exported graphs compute the same float32 operations in another order: outputs agree to ~1e-6, and the decoded boxes
# (relative to the image) and scores of the tests' weights to well within 1e-4.
TOL = 1e-4


def _net(state: dict[str, torch.Tensor]) -> SSD300:
    net = SSD300()
    net.load_state_dict(state)
    return net.eval()


@pytest.fixture(scope="module")
def model() -> SSD300:
    return _net(detecting_state_dict())


@pytest.fixture(scope="module")
def files(model, tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("exports")
    made = {"onnx": export_onnx(model, folder / "ssd.onnx"), "nms": export_onnx(model, folder / "ssd-nms.onnx",
                                                                              nms=True)}
    if importlib.util.find_spec("openvino") is not None:
        made["xml"] = export_openvino(model, folder / "ssd.xml")
    return made


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [photo(name) for name in SAMPLE_PHOTOS[:3]]


def _backends(model, files) -> dict[str, object]:
    made = {"pytorch": PyTorchBackend(model), "onnxruntime": load_exported(files["onnx"])}
    if "xml" in files:
        made["openvino"] = load_exported(files["xml"])
        made["openvino (onnx file)"] = load_exported(files["onnx"], "openvino")
    return made




# ---------------------------------------------------------------------------------------------------------------
# One protocol, the same results


def test_every_backend_implements_the_protocol(model, files):
    for name, backend in _backends(model, files).items():
        assert is_backend(backend) and not is_detector(backend), name
        assert isinstance(backend.spec, DetectorSpec) and backend.names == model.names, name
        assert backend.device == torch.device("cpu") and backend.outputs in ("offsets", "decoded"), name
        batch = preprocess_for_detection([torch.from_numpy(photo("coffee")).permute(2, 0, 1)], model.spec.input)
        outputs = backend(batch)
        assert len(outputs) == 2 and all(isinstance(t, torch.Tensor) for t in outputs), name
    assert load_exported(files["nms"]).outputs == "nms"


@pytest.mark.slow
def test_detect_gives_the_same_detections_through_every_backend(model, files, photos):
    expected = detect(model, photos)
    for backend in _backends(model, files).values():
        assert_same_exported_detections(detect(backend, photos, batch_size=2), expected)
        assert_same_exported_detections(detect(backend, photos, classes=["person"], max_detections=3),
                         detect(model, photos, classes=["person"], max_detections=3))
    assert_same_exported_detections(detect(load_exported(files["nms"]), photos), expected)


@pytest.mark.slow
def test_evaluate_gives_the_same_stats_through_every_backend(tmp_path):
    # The minicoco weights, whose single-process PyTorch stats are NVIDIA's own (test_evaluation's golden test).
    net = _net(minicoco_state_dict())
    reference = evaluate(net, IMAGES, ANNOTATIONS, progress=False, verbose=False)
    files = {"onnx": export_onnx(net, tmp_path / "mini.onnx")}
    if importlib.util.find_spec("openvino") is not None:
        files["xml"] = export_openvino(net, tmp_path / "mini.xml")
    for name, backend in _backends(net, files).items():
        result = evaluate(backend, IMAGES, ANNOTATIONS, progress=False, verbose=False, batch_size=4,
                          out_dir=tmp_path / name)
        # Outputs agreeing to float32 rounding give the same matches: COCO's stats move only in steps of whole
        # matches, so the tolerance is that of the golden test, and the detection count is exact.
        np.testing.assert_allclose(result.stats, reference.stats, atol=1e-3, rtol=0, err_msg=name)
        assert len(result.detections) == len(reference.detections) and result.images == reference.images, name
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["backend"] == backend.runtime and metrics["model"] == "nvidia_ssd"


def test_an_nms_graph_is_evaluated_only_when_its_recipe_allows_it(model, files):
    with pytest.raises(ValueError, match=r"model: expected a backend that gives the evaluation protocol's .* "
                                         r"exported with --nms .* export the model without --nms"):
        evaluate(load_exported(files["nms"]), IMAGES, ANNOTATIONS, progress=False, verbose=False)


def test_a_backend_keeps_its_own_precision_and_device(model, files):
    onnx_backend = load_exported(files["onnx"])
    assert len(detect(onnx_backend, photo("coffee"), precision="fp32")) == 1  # its own precision is fine
    with pytest.raises(ValueError, match=r"precision: expected None or 'fp32' for a backend"):
        detect(onnx_backend, photo("coffee"), precision="bf16")
    with pytest.raises(ValueError, match=r"device: expected cpu for this backend"):
        evaluate(onnx_backend, IMAGES, ANNOTATIONS, device="meta")
    with pytest.raises(TypeError, match=r"model: expected a detector of this library .* or a backend"):
        detect(torch.nn.Conv2d(3, 3, 1), photo("coffee"))


def test_a_static_batch_graph_runs_any_batch(model, photos, tmp_path):
    static = load_exported(export_onnx(model, tmp_path / "static.onnx", batch=2, dynamic_batch=False))
    assert static.static_batch == 2
    assert_same_exported_detections(detect(static, photos, batch_size=3), detect(model, photos))


# ---------------------------------------------------------------------------------------------------------------
# Exported files: checked at load time, failures name the file


def _edited(source, path, *, outputs=None, metadata=None):
    """A copy of the ONNX file ``source`` with outputs renamed/removed (``outputs``: old -> new or None) and
    metadata entries replaced (``metadata``: key -> function of the parsed JSON value)."""
    proto = onnx.load(str(source))
    for old, new in (outputs or {}).items():
        for index, output in enumerate(proto.graph.output):
            if output.name == old:
                if new is None:
                    del proto.graph.output[index]
                else:
                    output.name = new
                    for node in proto.graph.node:
                        node.output[:] = [new if name == old else name for name in node.output]
                break
    for entry in proto.metadata_props:
        if entry.key in (metadata or {}):
            entry.value = json.dumps(metadata[entry.key](json.loads(entry.value)))
    onnx.save(proto, str(path))
    return path


def _with(key: str, value):
    return {key: lambda entry: {**entry, **value}}


BAD_FILES = {
    "an output renamed": ({"outputs": {"scores": "probabilities"}},
                          r"expected outputs boxes, scores \(its metadata says outputs 'decoded'\), got boxes, "
                          r"probabilities"),
    "an output missing": ({"outputs": {"boxes": None}}, r"expected outputs boxes, scores"),
    "another class count": ({"metadata": {"ssd.class_names": lambda names: names[:3],
                                          "ssd.category_ids": lambda ids: ids[:3]}},
                            r"expected output 'scores' of shape \? x 8732 x 4 \(N images, 8732 default boxes, 3 "
                            r"classes \+ background\), got \? x (8732|\?) x 81"),
    "an unbounded input size": ({"metadata": _with("ssd.input", {"size": 10 ** 9})},
                                rf"expected metadata with an input size of 1 to {MAX_INPUT_SIZE} pixels, got "
                                r"1000000000"),
    "a zero std": ({"metadata": _with("ssd.input", {"std": [0.229, 0.0, 0.225]})},
                   r"expected metadata with 3 finite positive input standard deviations"),
    "a NaN mean": ({"metadata": {"ssd.input": lambda entry: {**entry, "mean": [float("nan"), 0.4, 0.4]}}},
                   r"expected metadata with 3 finite input means"),
    "a huge anchor grid": ({"metadata": _with("ssd.anchors", {"feature_sizes": [10 ** 6] * 6})},
                           r"expected metadata with at most 1000000 default boxes"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_file_that_is_not_what_its_metadata_says_is_refused_at_load_naming_it(files, tmp_path, case, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    edits, message = BAD_FILES[case]
    path = _edited(files["onnx"], tmp_path / "bad.onnx", **edits)
    with pytest.raises(ValueError, match=r"bad\.onnx: " + message):
        load_exported(path, runtime)


def test_an_nms_graph_whose_metadata_promises_fewer_detections_is_refused(files, tmp_path):
    path = _edited(files["nms"], tmp_path / "fewer.onnx",
                   metadata={"ssd.nms": lambda recipe: {**recipe, "max_detections": 50}})
    with pytest.raises(ValueError, match=r"fewer\.onnx: expected padded detections of one length K <= 50 \(the "
                                         r"recipe in its metadata\), got outputs of shapes \? x 100 x 4"):
        load_exported(path)


def _allocating_graph(path):
    """A graph with this library's metadata whose run asks for 128 TB (a shape made from the batch size, so that
    no runtime can fold it away at load time): an allocation that fails inside the runtime."""
    from onnx import TensorProto, helper, numpy_helper

    spec = SSD300().spec
    anchors, classes = spec.anchors.num_anchors, spec.num_classes

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)

    def fill(shape, out, value):
        return helper.make_node("ConstantOfShape", [shape], [out],
                                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))

    nodes = [helper.make_node("Shape", ["images"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
             helper.make_node("Mul", ["n", "huge"], ["rows"]),
             helper.make_node("Concat", ["rows", "huge", "huge"], ["big_shape"], axis=0),
             fill("big_shape", "big", 1.0),
             helper.make_node("ReduceMax", ["big"], ["most"], keepdims=0),
             helper.make_node("Concat", ["n", "box_dims"], ["box_shape"], axis=0),
             fill("box_shape", "zeros", 0.0),
             helper.make_node("Add", ["zeros", "most"], ["boxes"]),
             helper.make_node("Concat", ["n", "score_dims"], ["score_shape"], axis=0),
             fill("score_shape", "scores", 0.0)]
    graph = helper.make_graph(
        nodes, "allocating", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 300, 300])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", anchors, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", anchors, classes])],
        [const("zero", [0]), const("one", [1]), const("huge", [1 << 15]), const("box_dims", [anchors, 4]),
         const("score_dims", [anchors, classes])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in metadata_for(spec, "decoded").items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def test_a_failure_inside_the_runtime_is_one_error_naming_the_file(tmp_path, capfd):
    path = _allocating_graph(tmp_path / "allocating.onnx")
    backend = load_exported(path, "onnxruntime")
    with pytest.raises(BackendError, match=r"allocating\.onnx: onnxruntime failed to run the graph") as caught:
        detect(backend, photo("coffee"))
    assert "\n" not in str(caught.value)
    # onnxruntime's own logging does not repeat the failure on stderr.
    assert "allocate" not in capfd.readouterr().err


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_failure_inside_the_runtime_is_one_line_from_the_command(tmp_path, runtime):
    # In a process of its own: OpenVINO is not left usable after a failed allocation (with one inference thread it
    # even returns empty outputs, which the backend refuses), so that process must end.
    if runtime == "openvino":
        pytest.importorskip("openvino")
    path = _allocating_graph(tmp_path / "allocating.onnx")
    image = tmp_path / "coffee.png"
    from PIL import Image

    Image.fromarray(photo("coffee")).save(image)
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", str(image), "--model", str(path), "--backend",
                           runtime, "--out", str(tmp_path / "out")], cwd=REPO, env=ssd_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), done.stderr
    assert "Traceback" not in done.stderr


def test_cli_runtime_failure_is_one_line_and_status_1(tmp_path, capsys):
    from ssd.cli import main

    path = _allocating_graph(tmp_path / "allocating.onnx")
    image = tmp_path / "coffee.png"
    from PIL import Image

    Image.fromarray(photo("coffee")).save(image)
    assert main(["detect", str(image), "--model", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "allocating.onnx: onnxruntime failed" in err[0]
    assert main(["evaluate", "--model", str(path), "--images", str(IMAGES), "--annotations", str(ANNOTATIONS),
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allocating.onnx: onnxruntime failed" in err[0]


# ---------------------------------------------------------------------------------------------------------------
# Threads


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_threads_sharing_one_exported_backend_get_their_own_results(files, kind):
    if kind == "openvino":
        pytest.importorskip("openvino")
    backend = load_exported(files["xml" if kind == "openvino" else "onnx"])
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(1 + k % 2, 3, 300, 300, generator=generator) * 4 - 2 for k in range(6)]
    sequential = [backend(batch) for batch in batches]
    start = threading.Barrier(len(batches))  # every thread runs at once, on one backend

    def work(k: int) -> list:
        start.wait()
        return [backend(batches[k]) for _ in range(3)]

    with ThreadPoolExecutor(len(batches)) as pool:
        concurrent = list(pool.map(work, range(len(batches))))
    for expected, runs in zip(sequential, concurrent):
        for outputs in runs:
            for got, want in zip(outputs, expected):
                # The same computation on the same input: equal up to the kernels' float32 reassociation.
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A model of another copy of the package (torch.hub's private copy)


@pytest.fixture()
def other_copy():
    """This package imported a second time under another name, as torch.hub does beside a caller's own ``ssd``."""
    name = "ssd_other_copy"
    spec = importlib.util.spec_from_file_location(name, REPO / "ssd" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "ssd")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


@pytest.mark.slow
def test_a_model_of_another_copy_is_accepted_everywhere(other_copy, model, files, photos, tmp_path):
    other_models = importlib.import_module("ssd_other_copy.models")
    theirs = other_models.SSD300()
    theirs.load_state_dict(model.state_dict())
    theirs.eval()
    assert type(theirs.spec) is not DetectorSpec and is_detector(theirs)
    assert spec_of(theirs) == model.spec  # rebuilt as this copy's, field by field
    assert_same_exported_detections(detect(theirs, photos), detect(model, photos))
    assert_same_exported_detections(detect(ssd.load(theirs), photos), detect(model, photos))
    exported = load_exported(export_onnx(theirs, tmp_path / "theirs.onnx"))
    assert_same_exported_detections(detect(exported, photos), detect(model, photos))
    # A backend of that copy too, an --nms graph's (its baked recipe is that copy's class) included.
    their_backend = importlib.import_module("ssd_other_copy.backends").load_exported(files["nms"])
    assert_same_exported_detections(detect(their_backend, photos, threshold=0.5), detect(model, photos, threshold=0.5))
    net = _net(minicoco_state_dict())
    twin = other_models.SSD300()
    twin.load_state_dict(net.state_dict())
    assert (evaluate(twin.eval(), IMAGES, ANNOTATIONS, progress=False, verbose=False).stats
            == evaluate(net, IMAGES, ANNOTATIONS, progress=False, verbose=False).stats)
    # And the other way: that copy's detect takes this copy's model.
    other_detect = importlib.import_module("ssd_other_copy.inference").detect
    assert_same_exported_detections(other_detect(model, photos), detect(model, photos))


def test_the_spec_of_another_copy_is_taken_by_every_function_of_specs(other_copy, model):
    """Post-processing, the box coder, training targets and the loss take another copy's spec (a hub model's
    ``model.spec`` beside an installed release) and compute exactly what they do with this copy's."""
    from ssd.box_coder import BoxCoder
    from ssd.postprocess import postprocess
    from ssd.training.loss import SSDLoss
    from ssd.training.targets import encode_targets

    theirs = importlib.import_module("ssd_other_copy.models").SSD300().spec
    assert type(theirs) is not DetectorSpec
    torch.manual_seed(0)
    predictions = model(torch.rand(1, 3, 300, 300))
    ours, same = postprocess(predictions, model.spec), postprocess(predictions, theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, same))
    assert BoxCoder.from_spec(theirs).anchors == BoxCoder.from_spec(model.spec).anchors
    boxes, labels = torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([3])
    assert all(torch.equal(a, b) for a, b in zip(encode_targets(boxes, labels, theirs),
                                                  encode_targets(boxes, labels, model.spec)))
    assert SSDLoss(theirs).box_coder.num_anchors == SSDLoss(model.spec).box_coder.num_anchors


# ---------------------------------------------------------------------------------------------------------------
# ssd.load


def test_load_a_name_a_file_or_a_network(model, files, hub_dir, monkeypatch):
    backend = ssd.load("nvidia_ssd", pretrained=False, precision="bf16", threads=1)
    assert isinstance(backend, PyTorchBackend) and backend.precision == "bf16" and backend.runtime == "pytorch"
    assert backend.spec.name == "nvidia_ssd" and backend.memory_format == torch.channels_last
    assert isinstance(ssd.load(files["onnx"]), OnnxBackend) and isinstance(ssd.load(str(files["onnx"])), OnnxBackend)
    assert ssd.load(model).model is model
    if "xml" in files:
        assert ssd.load(files["xml"], precision="fp32").runtime == "openvino"
    with pytest.raises(ValueError, match=r"backend: expected None or 'auto' for the model name 'nvidia_ssd', which "
                                         r"runs in PyTorch"):
        ssd.load("nvidia_ssd", backend="openvino", pretrained=False)
    with pytest.raises(TypeError, match=r"load: expected options among .* for a model name, got nms"):
        ssd.load("nvidia_ssd", nms=True)
    with pytest.raises(ValueError, match=r"model: expected one of nvidia_ssd, .* or an exported \.onnx / OpenVINO "
                                         r"\.xml file, got 'yolo'"):
        ssd.load("yolo")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'checkpoint'"):
        ssd.load(files["onnx"], checkpoint="x.pt")


def test_cli_backend_with_a_model_name_is_one_error_line(tmp_path, capsys):
    from ssd.cli import main

    for command in (["detect", "--out", str(tmp_path / "o")],
                    ["evaluate", "--images", str(IMAGES), "--annotations", str(ANNOTATIONS)]):
        assert main([*command, "--model", "nvidia_ssd", "--backend", "openvino"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --backend: expected it only with an exported --model"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_evaluates_an_exported_file(tmp_path, capsys):
    from ssd.cli import main

    net = _net(minicoco_state_dict())
    path = export_onnx(net, tmp_path / "mini.onnx")
    reference = evaluate(net, IMAGES, ANNOTATIONS, progress=False, verbose=False)
    assert main(["evaluate", "--model", str(path), "--images", str(IMAGES), "--annotations", str(ANNOTATIONS),
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    np.testing.assert_allclose(metrics["stats"], reference.stats, atol=1e-3, rtol=0)
    assert metrics["checkpoint"] == str(path) and metrics["backend"] == "onnxruntime"
    assert "Average Precision" in capsys.readouterr().out
    for extra, message in ((["--checkpoint", "x.pt"], "--checkpoint: expected none with an exported --model file"),
                           (["--precision", "bf16"], "--precision: expected fp32 with onnxruntime"),
                           (["--device", "meta"], "--device: expected cpu for an exported --model file")):
        assert main(["evaluate", "--model", str(path), "--images", str(IMAGES), "--annotations", str(ANNOTATIONS),
                     *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
