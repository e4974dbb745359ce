"""Every registered model through every stage, one test per stage parametrized over ``ssd.registry.list_models()``
(as torchvision's test_models.py): an offline untrained build, the forward pass's shapes from the spec, detect on a
real photo, a 2-iteration training run whose checkpoint torch.hub loads with its classes, the ONNX export detecting
as PyTorch does, and evaluation through both backends giving the same scores.

A new family is covered by adding its test weights to tests/helpers/zoo.py. The models are built once a session
(the ``zoo`` fixture); every stage of every model runs in the whole suite, those of FAST_MODELS in the fast one
too (the others are marked slow).
"""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.backends.plan import plan_for
from ssd.box_coder import BoxCoder
from ssd.data.synthetic import make_shapes_dataset
from ssd.inference import detect
from ssd.inference.detections import Detections
from ssd.postprocess import class_scores
from ssd.registry import build_model, get_entry, list_models
from ssd.transforms import preprocess_for_detection
from ssd.weights import InvalidCheckpointError

from helpers import REPO, photo
from helpers.detections import EPS32, assert_same_detections, raw_outputs_recorder
from helpers.zoo import FAST_MODELS

NAMES = list_models()
PHOTOS = ("chelsea", "astronaut")


def _staged(names=NAMES):
    """Each model, marked slow unless it is one of FAST_MODELS."""
    return [pytest.param(n, marks=() if n in FAST_MODELS else pytest.mark.slow) for n in names]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [photo(p) for p in PHOTOS]


def test_every_model_of_the_registry_is_covered():
    from helpers.zoo import MMDET_SHORT

    assert len(NAMES) >= 6 and set(FAST_MODELS) <= set(NAMES)
    assert all(n == "nvidia_ssd" or n in MMDET_SHORT or n.startswith("tv_") for n in NAMES), "add test weights"


# ---------------------------------------------------------------------------------------------------------------
# Build, forward, detect


@pytest.mark.parametrize("name", _staged())
def test_builds_untrained_offline_with_the_layout_of_its_weights(name, zoo, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"building {name} untrained opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    untrained = build_model(name, pretrained=False)
    entry = get_entry(name)
    assert type(untrained) is entry.network and untrained.spec is entry.spec and not untrained.training
    assert untrained.checkpoint_source is None and "accuracy" not in untrained.meta
    # The same tensors, by name and shape, as the family's weight file gives: a published file would fit.
    trained = zoo.model(name).state_dict()
    assert {k: v.shape for k, v in untrained.state_dict().items()} == {k: v.shape for k, v in trained.items()}


@pytest.mark.parametrize("name", _staged())
def test_forward_gives_the_shapes_the_spec_declares(name, zoo):
    model = zoo.model(name)
    spec = model.spec
    size = spec.input.size
    with torch.inference_mode():
        locs, confs = model(torch.zeros(2, 3, size, size))
    anchors = spec.anchors.num_anchors
    assert locs.shape == (2, 4, anchors) and confs.shape == (2, spec.num_classes, anchors)
    assert locs.dtype == confs.dtype == torch.float32 and torch.isfinite(locs).all() and torch.isfinite(confs).all()
    assert spec.num_classes == len(model.names) + 1 == len(spec.classes.category_ids) + 1


@pytest.mark.parametrize("name", _staged())
def test_detect_on_a_photo_returns_detections(name, zoo):
    model = zoo.model(name)
    image = photo("chelsea")
    [found] = model.detect(image)
    recipe = model.spec.detect_postprocess
    assert isinstance(found, Detections) and found.image_size == image.shape[:2]
    assert 0 < len(found) <= recipe.max_detections
    assert np.all(found.scores > recipe.score_threshold) and np.all(np.diff(found.scores) <= 0)
    height, width = image.shape[:2]
    assert np.all(found.boxes >= 0) and np.all(found.boxes[:, [0, 2]] <= width)
    assert np.all(found.boxes[:, [1, 3]] <= height)
    assert np.all(found.boxes[:, 2:] >= found.boxes[:, :2])
    assert set(found.names) <= set(model.names) and found.names == [model.names[k - 1] for k in found.labels]


# ---------------------------------------------------------------------------------------------------------------
# Training: two iterations through the command, and the checkpoint through torch.hub


CLASS_NAMES = ("circle", "square", "triangle")
CLASS_IDS = (21, 22, 23)  # not 1..K, so that the test tells category ids from labels


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
    """Record the spec every training piece of the loop is given, and whether each optimizer step's gradients
    were all finite."""
    from ssd.training import batches, loop

    seen: dict[str, list] = {"augmentation": [], "targets": [], "loss": [], "gradients": []}
    augmentation, encode, loss = loop.SSDAugmentation, batches.encode_targets, loop.SSDLoss
    optimizer = loop.build_optimizer

    def spy_augmentation(input_spec, **kwargs):
        seen["augmentation"].append(input_spec)
        return augmentation(input_spec, **kwargs)

    def spy_encode(boxes, labels, spec):
        seen["targets"].append(spec)
        return encode(boxes, labels, spec)

    def spy_loss(spec, **kwargs):
        seen["loss"].append(spec)
        return loss(spec, **kwargs)

    def spy_optimizer(*args, **kwargs):
        made = optimizer(*args, **kwargs)

        def check(opt, _args, _kwargs) -> None:
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            seen["gradients"].append((len(grads), all(bool(torch.isfinite(g).all()) for g in grads),
                                      sum(float(g.abs().sum()) for g in grads)))

        made.register_step_pre_hook(check)
        return made

    monkeypatch.setattr(loop, "SSDAugmentation", spy_augmentation)
    monkeypatch.setattr(batches, "encode_targets", spy_encode)
    monkeypatch.setattr(loop, "SSDLoss", spy_loss)
    monkeypatch.setattr(loop, "build_optimizer", spy_optimizer)
    return seen


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", _staged())
def test_two_training_iterations_give_a_checkpoint_torch_hub_loads_with_its_classes(name, shapes, tmp_path,
                                                                                    monkeypatch, capsys):
    from ssd.cli import main

    monkeypatch.delenv("SSD_CHECKPOINT", raising=False)
    seen = _spying(monkeypatch)
    annotations, images = shapes
    out = tmp_path / "out"
    args = ["train", "--model", name, "--images", str(images), "--annotations", str(annotations), "--out", str(out),
            "--checkpoint", "none", "--epochs", "1", "--batch-size", "2", "--max-iterations-per-epoch", "2",
            "--device", "cpu", "--workers", "0", "--warmup-iterations", "0"]
    assert main(args) == 0, capsys.readouterr().err
    assert f"training {name} on 1 x cpu" in capsys.readouterr().out

    # Every piece read the model's spec, with the data set's classes.
    published = get_entry(name).spec
    for piece in ("augmentation", "targets", "loss"):
        assert seen[piece], piece
    assert all(s == published.input for s in seen["augmentation"])
    for spec in seen["targets"] + seen["loss"]:
        assert (spec.name, spec.anchors, spec.box_coder, spec.matching_iou) == (
            name, published.anchors, published.box_coder, published.matching_iou)
        assert spec.classes.names == CLASS_NAMES and spec.classes.category_ids == CLASS_IDS
    # Two steps, each with finite, non-zero gradients on the parameters, and two finite losses logged.
    assert len(seen["gradients"]) == 2
    assert all(count > 0 and finite and total > 0 for count, finite, total in seen["gradients"]), seen["gradients"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "start" and records[0]["model"] == name
    losses = [r["loss"] for r in records if r["type"] == "iteration"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(v > 0 for v in losses)

    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "ssd-train/2" and state["model"] == name and state["iteration"] == 2
    size = published.input.size
    assert state["preprocessing"] == {
        "size": [size, size], "resize": published.input.resize, "mean": list(published.input.mean),
        "std": list(published.input.std), "value_range": published.input.value_range,
        "scale": published.input.value_range / 255,
    }
    trained = state["state_dict"]
    model = build_model(name, checkpoint=str(out / "last.pt"))
    assert (model.spec.classes.names, model.spec.classes.category_ids) == (CLASS_NAMES, CLASS_IDS)
    assert "accuracy" not in model.meta
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    hub = torch.hub.load(str(REPO), name, source="local", checkpoint=str(out / "last.pt"))
    assert (hub.spec.name, hub.spec.classes.names, hub.spec.classes.category_ids) == (name, CLASS_NAMES, CLASS_IDS)
    assert all(torch.equal(v, trained[k]) for k, v in hub.state_dict().items())
    other = next(n for n in NAMES if n != name)
    with pytest.raises(InvalidCheckpointError, match=f"written by ssd train for {name}, not {other}"):
        build_model(other, checkpoint=str(out / "last.pt"))


# ---------------------------------------------------------------------------------------------------------------
# ONNX: the exported graph detects and evaluates as the PyTorch model does


def _decoded(spec, recorded: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch network's recorded (locs, confs) batches as the exported graph's outputs: decoded boxes (in
    fractions of the input) and class probabilities."""
    coder = BoxCoder.from_spec(spec)
    boxes = torch.cat([coder.decode(locs) for locs, _ in recorded])
    scores = torch.cat([class_scores(confs) for _, confs in recorded])
    return boxes, scores


def _recording_exported(monkeypatch) -> list:
    """Record what every exported backend returns (the graph's decoded boxes and scores), batch by batch."""
    from ssd.backends.exported import ExportedBackend

    seen: list = []
    call = ExportedBackend.__call__

    def recording(self, batch):
        outputs = call(self, batch)
        seen.append(tuple(t.clone() for t in outputs))
        return outputs

    monkeypatch.setattr(ExportedBackend, "__call__", recording)
    return seen


def _output_deltas(spec, torch_raw: list, onnx_raw: list) -> tuple[float, float]:
    """The largest difference of the decoded boxes (fractions of the input) and of the scores, the two runtimes'
    outputs as each computed them during the run compared (same batches, same order)."""
    boxes, scores = _decoded(spec, torch_raw)
    their_boxes = torch.cat([b for b, _ in onnx_raw])
    their_scores = torch.cat([s for _, s in onnx_raw])
    assert their_boxes.shape == boxes.shape and their_scores.shape == scores.shape
    return float((boxes - their_boxes).abs().max()), float((scores - their_scores).abs().max())


def _float32_error(model, photos: list[np.ndarray]) -> tuple[float, float]:
    """How far this network's float32 outputs (decoded boxes, scores) are from its float64 ones on these photos.

    Rounding differences grow through the layers by the network's own gain: the test weights of SSDLite on
    MobileNetV2 (random, not trained) move their logits by ~1e-2 for a 1-ulp change of the input, NVIDIA's by ~5e-7.
    Two float32 runtimes computing the same network differ by about the sum of their errors; a wrong graph (a layer
    missing or changed) by far more.
    """
    import copy

    batch = preprocess_for_detection([torch.from_numpy(p).permute(2, 0, 1) for p in photos], model.spec.input)
    with torch.inference_mode():
        single = model(batch)
        double = copy.deepcopy(model).double()(batch.double())
    boxes, scores = _decoded(model.spec, [single])
    boxes64, scores64 = _decoded(model.spec, [tuple(t.float() for t in double)])
    return float((boxes - boxes64).abs().max()), float((scores - scores64).abs().max())


def _assert_same_network(deltas: tuple[float, float], errors: tuple[float, float]) -> None:
    # 4 x PyTorch's own error: the other runtime may round up to 3 x worse; 16 ulps of the outputs' scale (boxes
    # and scores are below a few units) where the network is so well conditioned that its error is near zero.
    for what, delta, error in zip(("boxes", "scores"), deltas, errors):
        assert delta <= 4 * error + 16 * EPS32 * 4, f"{what}: the runtimes differ by {delta:.3g}, float32 rounding " \
                                                     f"of this network is {error:.3g}"


def _tolerances(box_delta: float, score_delta: float, side: float) -> dict[str, float]:
    # The post-processing does no arithmetic on scores (thresholds, NMS and top-k select them), so they keep the
    # runtimes' difference; boxes are scaled by the image's sides (and clipped, which moves no edge further): the
    # difference times the side, plus the scaling's rounding, a float32 ulp or two of the side.
    return {"score_tol": score_delta, "box_tol": box_delta * side + 4 * EPS32 * side}


def _pytorch_network(model):
    """The module detect and evaluate run for this model (on the CPU in fp32: its cached channels_last copy)."""
    return plan_for(model, None).module(model)


@pytest.mark.parametrize("name", _staged())
def test_onnx_export_detects_as_pytorch_does(name, zoo, photos, monkeypatch):
    from ssd.backends import OnnxBackend

    pytest.importorskip("onnxruntime")
    model = zoo.model(name)
    backend = OnnxBackend(zoo.onnx(name))
    assert backend.spec.name == name and backend.names == model.names and backend.outputs == "decoded"
    torch_raw, hook = raw_outputs_recorder(_pytorch_network(model))
    expected = model.detect(photos)
    hook.remove()
    onnx_raw = _recording_exported(monkeypatch)
    found = detect(backend, photos)
    # Other kernels (onnxruntime's against oneDNN's) sum the convolutions in other orders: the outputs' difference
    # is measured as both runs computed them, and must be float32 rounding of the same network, not a change.
    box_delta, score_delta = _output_deltas(model.spec, torch_raw, onnx_raw)
    _assert_same_network((box_delta, score_delta), _float32_error(model, photos))
    recipe = model.spec.detect_postprocess
    for ours, theirs, image, photo_name in zip(found, expected, photos, PHOTOS):
        assert len(theirs) > 0 and ours.image_size == theirs.image_size and ours.names == [
            model.names[k - 1] for k in ours.labels]
        assert_same_detections(ours, theirs, **_tolerances(box_delta, score_delta, max(image.shape[:2])),
                               cut=recipe.max_detections, threshold=recipe.score_threshold,
                               label=f"{name} {photo_name}")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, photos):
    """Two photos as files, for an annotation set made per model."""
    folder = tmp_path_factory.mktemp("tiny")
    for name, image in zip(PHOTOS, photos):
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


def _annotations(model, found: list[Detections], folder) -> dict:
    """A COCO set whose objects are where the model finds them, less a little, so that its scores are neither 0
    nor 1: per photo, the 3 best detections of named classes, the second shifted by a tenth of its width (IoU
    0.82: a match at IoU 0.5 to 0.8 only), and one object in a corner that nothing finds."""
    images, annotations, used = [], [], set()
    objects: dict[int, list[tuple[int, list[float]]]] = {}
    for image_id, (name, dets) in enumerate(zip(PHOTOS, found), start=1):
        height, width = dets.image_size
        images.append({"id": image_id, "file_name": f"{name}.png", "width": width, "height": height})
        keep = [k for k, n in enumerate(dets.names) if not n.startswith("N/A")][:3]
        boxes = [dets.boxes[k].astype(float).copy() for k in keep]
        if len(boxes) > 1:
            shift = 0.1 * (boxes[1][2] - boxes[1][0])
            boxes[1][[0, 2]] += shift
        labels = [int(dets.labels[k]) for k in keep]
        boxes.append(np.array([1.0, 1.0, 9.0, 9.0]))  # nothing finds a 8 x 8 object in the corner
        labels.append(labels[0])
        for box, label in zip(boxes, labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                "category_id": model.spec.classes.category_ids[label - 1]})
            objects.setdefault(image_id, []).append((annotations[-1]["category_id"], annotations[-1]["bbox"]))
            used.add(label)
    categories = [{"id": model.spec.classes.category_ids[k - 1], "name": model.names[k - 1]} for k in sorted(used)]
    path = folder / f"{model.spec.name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"path": path, "categories": len(categories), "objects": objects}


def _as_arrays(detections: list[dict], image_id: int) -> dict[str, np.ndarray]:
    mine = sorted((d for d in detections if d["image_id"] == image_id), key=lambda d: -d["score"])
    return {"boxes": np.array([d["bbox"] for d in mine], dtype=np.float64).reshape(-1, 4),
            "scores": np.array([d["score"] for d in mine]), "labels": np.array([d["category_id"] for d in mine])}


def _iou_threshold_crossings(ours: dict, theirs: dict, pairs: list, objects: list[tuple[int, list[float]]]) -> int:
    """Matched detections whose IoUs with an object of their category, as the two runs place them, lie on two
    sides of one of COCO's IoU thresholds."""
    def iou(a: np.ndarray, b: list[float]) -> float:  # x, y, w, h
        w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    thresholds = np.linspace(0.5, 0.95, 10)
    crossings = 0
    for i, j in pairs:
        for category, box in objects:
            if category == theirs["labels"][j]:
                a, b = iou(ours["boxes"][i], box), iou(theirs["boxes"][j], box)
                crossings += int(np.any((a - thresholds) * (b - thresholds) <= 0))
    return crossings


def _near_tie_events(pairs_of_scores: dict[int, list[tuple[float, float]]]) -> int:
    """Pairs of detections of one category (over all images: COCOeval ranks them together) that the two runs
    rank in opposite orders."""
    events = 0
    for pairs in pairs_of_scores.values():
        a = np.array([p[0] for p in pairs])
        b = np.array([p[1] for p in pairs])
        events += int(np.sum(np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :]) < 0) // 2)
    return events


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", _staged())
def test_evaluation_through_pytorch_and_onnx_gives_the_same_scores(name, zoo, photos, tiny_set, monkeypatch):
    pytest.importorskip("pycocotools")
    pytest.importorskip("onnxruntime")
    from ssd.backends import OnnxBackend
    from ssd.evaluation import evaluate

    model = zoo.model(name)
    truth = _annotations(model, model.detect(photos), tiny_set)
    torch_raw, hook = raw_outputs_recorder(_pytorch_network(model))
    reference = evaluate(model, tiny_set, truth["path"], batch_size=2, progress=False, verbose=False)
    hook.remove()
    onnx_raw = _recording_exported(monkeypatch)
    result = evaluate(OnnxBackend(zoo.onnx(name)), tiny_set, truth["path"], batch_size=2, progress=False,
                      verbose=False)
    assert 0.05 < reference.stats[0] < 0.95, reference.stats  # neither nothing nor everything found
    box_delta, score_delta = _output_deltas(model.spec, torch_raw, onnx_raw)
    _assert_same_network((box_delta, score_delta), _float32_error(model, photos))
    recipe = model.spec.postprocess
    # COCO's boxes are x, y, w, h: a width is the difference of two edges, so twice an edge's tolerance.
    tolerances = _tolerances(2 * box_delta, score_delta, max(max(p.shape[:2]) for p in photos))
    ranked: dict[int, list[tuple[float, float]]] = {}
    exchanged = crossings = 0
    for image_id in range(1, len(PHOTOS) + 1):
        ours, theirs = _as_arrays(result.detections, image_id), _as_arrays(reference.detections, image_id)
        pairs, left_ours, left_theirs = assert_same_detections(
            ours, theirs, **tolerances, cut=recipe.max_detections, threshold=recipe.score_threshold,
            label=f"{name} image {image_id}")
        for i, j in pairs:
            ranked.setdefault(int(theirs["labels"][j]), []).append((theirs["scores"][j], ours["scores"][i]))
        exchanged += max(len(left_ours), len(left_theirs))
        crossings += _iou_threshold_crossings(ours, theirs, pairs, truth["objects"][image_id])
    # COCOeval's numbers follow from the ranking of the detections per category and which IoU thresholds (0.5 to
    # 0.95) each detection's IoU with the objects passes: the same ranking and the same side of every threshold give
    # the same numbers exactly. Each near-tie ranked the other way (or exchanged at the cut), and each detection
    # whose two IoUs fall on two sides of a threshold, can change one category's numbers by at most 1, so the mean
    # over the categories by at most 1 / categories.
    events = _near_tie_events(ranked) + exchanged + crossings
    bound = events / truth["categories"]
    np.testing.assert_allclose(result.stats, reference.stats, rtol=0, atol=bound, err_msg=f"{events} near-ties")
    assert len(result.detections) == len(reference.detections) and result.images == reference.images == 2
