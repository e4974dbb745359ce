"""mmdetection's SSD300, SSD512 and SSDLite: networks, anchors, post-processing and checkpoint conversion.

The golden data (tests/data/golden/mmdet, see its README) was produced by mmdetection 3.3.0 itself from key-seeded
weights (detweights.py). Here the same weights are rebuilt under mmdetection's key names, saved the way
mmdetection saves a checkpoint, read as every checkpoint is (:func:`ssd.weights.read_checkpoint`, converted by
:mod:`ssd.weights.mmdet`), and the outputs compared.
"""
from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch

from ssd.anchors import default_boxes
from ssd.data.coco import COCO_NAMES
from ssd.models import MMDET_SSD300, MMDET_SSD512, MMDET_SSDLITE320, SSDVGG16, SSDLiteMobileNetV2
from ssd.postprocess import _hits_per_level, postprocess
from ssd.registry import build_model, get_entry
from ssd.weights import InvalidCheckpointError, read_checkpoint
from ssd.weights.mmdet import convert_mmdet_state_dict, extract_mmdet, identify_mmdet

from helpers.mmdet import (
    GOLDEN,
    MMDET_COCO_CLASSES,
    MODELS,
    ORIGINAL_WH,
    TOP_N,
    golden_run,
    iou_matrix,
    mmdet_layout,
    mmdet_meta,
    mmdet_state_dict,
    save_mmdet,
)


def _level_bounds(spec) -> list[tuple[int, int]]:
    starts = np.cumsum([0, *spec.anchors.level_sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


# ---------------------------------------------------------------------------------------------------------------
# Networks against mmdetection's outputs


@pytest.mark.parametrize("short", sorted(MODELS))
def test_weight_recipe_matches_layout_sums(short):
    layout = mmdet_layout(short)
    state = mmdet_state_dict(short)
    assert [k for k, _, _ in layout["layout"]] == list(state)
    for key, expected in layout["weight_sums_float64"].items():
        assert state[key].double().sum().item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("short", sorted(MODELS))
def test_bbox_preds_match_mmdetection(short, tmp_path_factory):
    spec, golden, _, (locs, confs) = golden_run(short, tmp_path_factory)
    assert locs.shape == (1, 4, spec.anchors.num_anchors)
    assert confs.shape == (1, 81, spec.anchors.num_anchors)
    for level, ((start, stop), cells, per_cell) in enumerate(
        zip(_level_bounds(spec), spec.anchors.feature_sizes, spec.anchors.boxes_per_location)
    ):
        # Ours: 4 x (row, column, anchor); mmdetection's map: (anchor * 4 + coordinate) x row x column.
        ours = locs[0, :, start:stop].T.reshape(cells, cells, per_cell * 4).permute(2, 0, 1).numpy()
        np.testing.assert_allclose(ours, golden[f"bbox_preds_{level}"][0], atol=2e-3, rtol=1e-3,
                                   err_msg=f"{short} level {level}")


@pytest.mark.parametrize("short", sorted(MODELS))
def test_class_logits_match_mmdetection(short, tmp_path_factory):
    spec, golden, _, (_, confs) = golden_run(short, tmp_path_factory)
    level, channel, y, x = golden["cls_sample_idx"].T.astype(np.int64)
    per_cell = np.asarray(spec.anchors.boxes_per_location)
    cells = np.asarray(spec.anchors.feature_sizes)
    starts = np.asarray([b[0] for b in _level_bounds(spec)])
    anchor, mm_class = channel // 81, channel % 81
    ours_class = (mm_class + 1) % 81  # mmdetection's background (80) is our 0, its class k our k + 1
    box = starts[level] + (y * cells[level] + x) * per_cell[level] + anchor
    np.testing.assert_allclose(confs[0].numpy()[ours_class, box], golden["cls_sample_val"], atol=2e-3, rtol=1e-3)
    # Mean, std and max of a whole level do not depend on the channel order.
    for lv, (start, stop) in enumerate(_level_bounds(spec)):
        values = confs[0, :, start:stop].double().numpy()
        mean, std, top = golden["cls_stats"][lv]
        assert values.size == np.prod(golden["cls_shapes"][lv])
        assert values.mean() == pytest.approx(mean, abs=2e-4)
        assert values.std() == pytest.approx(std, rel=1e-3, abs=2e-4)
        assert values.max() == pytest.approx(top, rel=1e-3, abs=2e-3)


@pytest.mark.parametrize("short", sorted(MODELS))
def test_anchors_match_mmdetection(short):
    spec = MODELS[short]
    golden = np.load(GOLDEN / f"{short}_golden.npz")
    size = spec.anchors.image_size
    pixels = default_boxes(spec.anchors, "xyxy").double().numpy() * size
    bounds = _level_bounds(spec)
    assert [b - a for a, b in bounds] == list(golden["anchors_count"])
    for level, (start, stop) in enumerate(bounds):
        ours = pixels[start:stop]
        np.testing.assert_allclose(ours[:10], golden[f"anchors_{level}_first10"], atol=2e-4)
        np.testing.assert_allclose(ours[-10:], golden[f"anchors_{level}_last10"], atol=2e-4)
        assert ours.sum() == pytest.approx(golden["anchors_sum"][level], rel=1e-6, abs=0.05)


@pytest.mark.parametrize("short", sorted(MODELS))
def test_detections_match_mmdetection(short, tmp_path_factory):
    spec, golden, _, predictions = golden_run(short, tmp_path_factory)
    decoded = postprocess(predictions, spec)
    count = int(decoded.counts[0])
    assert count == len(golden["det_scores"]) == 200
    scale = np.asarray(ORIGINAL_WH * 2, dtype=np.float64)
    boxes = decoded.boxes[0, :count].double().numpy() * scale
    labels = decoded.labels[0, :count].numpy()
    scores = decoded.scores[0, :count].numpy()
    ref_boxes, ref_labels, ref_scores = golden["det_bboxes"], golden["det_labels"] + 1, golden["det_scores"]
    np.testing.assert_allclose(scores[:TOP_N], ref_scores[:TOP_N], atol=2e-4)
    # Each of mmdetection's top N has a detection of ours with its label and IoU > 0.99 (near-ties may swap ranks).
    iou = iou_matrix(ref_boxes[:TOP_N].astype(np.float64), boxes)
    same = ref_labels[:TOP_N, None] == labels[None, :]
    best = np.where(same, iou, 0.0).max(axis=1)
    assert (best > 0.99).all(), f"{short}: unmatched golden detections {np.flatnonzero(best <= 0.99)}"


@pytest.mark.parametrize("short", sorted(MODELS))
def test_pre_nms_candidates_match_mmdetection(short, tmp_path_factory):
    """Score threshold, per-level top 1000, decode and clip, drop empty: the candidate count before NMS."""
    from ssd.box_coder import BoxCoder

    spec, golden, _, (locs, confs) = golden_run(short, tmp_path_factory)
    recipe = spec.postprocess
    hits = _hits_per_level(confs.float(), recipe.score_threshold, recipe.candidates_per_level,
                           spec.anchors.level_sizes)
    boxes = BoxCoder.from_spec(spec).decode(locs)[hits.image, hits.box].clamp(0.0, 1.0)
    nonempty = int(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).sum())
    # Scores within float rounding of 0.02 or of the 1000th pair could flip; none do for this image.
    assert abs(nonempty - int(golden["pre_nms_count"])) <= 2


def test_coco_class_order_is_mmdetections():
    assert MMDET_COCO_CLASSES == COCO_NAMES
    for spec in MODELS.values():
        assert spec.classes.names == COCO_NAMES and spec.num_classes == 81


# ---------------------------------------------------------------------------------------------------------------
# Specs, registry, fine-tuning


def test_networks_registry_and_specs():
    for network, spec in ((SSDVGG16, MMDET_SSD300), (SSDVGG16, MMDET_SSD512), (SSDLiteMobileNetV2, MMDET_SSDLITE320)):
        entry = get_entry(spec.name)
        assert entry.network is network and entry.spec is spec
    for short, spec in MODELS.items():
        layout = mmdet_layout(short)
        assert spec.anchors.num_anchors == sum(np.load(GOLDEN / f"{short}_golden.npz")["anchors_count"])
        assert spec.box_coder.max_log_size == pytest.approx(abs(math.log(16 / 1000)))
        assert spec.input.mean == tuple(layout["data_preprocessor"]["mean"])
        assert spec.input.std == tuple(float(s) for s in layout["data_preprocessor"]["std"])
        assert spec.input.size == layout["image"]["img_shape"][0] and spec.input.resize == "bilinear"
        cfg = layout["test_cfg"]
        pp = spec.postprocess
        assert (pp.score_threshold, pp.iou_threshold, pp.max_detections, pp.candidates_per_level) == (
            cfg["score_thr"], cfg["nms"]["iou_threshold"], cfg["max_per_img"], cfg["nms_pre"])
        assert pp.clip_boxes and pp.drop_empty and not pp.suppress_equal
        assert get_entry(spec.name).weights["coco"].urls == (layout["checkpoint_url"],)


def test_checkpoint_table():
    for spec in MODELS.values():
        entry = get_entry(spec.name)
        assert list(entry.weights) == ["coco"] and entry.default_weights == "coco"
        info = entry.weights["coco"]
        assert info.urls[0].endswith("/" + info.file_name)
        assert info.file_name.endswith(f"-{info.sha256}.pth") and len(info.sha256) == 8
        assert info.classes == spec.classes and info.classes.num_classes == 81
    # The published accuracy belongs to the weights, not to the architecture.
    assert [get_entry(s.name).weights["coco"].meta["accuracy"]["mAP"] for s in MODELS.values()] == [
        0.255, 0.295, 0.213]
    assert all("accuracy" not in s.meta for s in MODELS.values())


@pytest.mark.parametrize("cls, spec", [(SSDVGG16, MMDET_SSD300), (SSDVGG16, MMDET_SSD512),
                                       (SSDLiteMobileNetV2, MMDET_SSDLITE320)])
def test_num_classes_gives_new_heads(cls, spec):
    # Shapes only, so on the meta device: no memory, no arithmetic.
    with torch.device("meta"):
        model = cls(spec.with_classes(spec.classes.numbered(20))).eval()
    size = spec.input.size
    with torch.no_grad():
        locs, confs = model(torch.zeros(2, 3, size, size, device="meta"))
    assert locs.shape == (2, 4, spec.anchors.num_anchors) and confs.shape == (2, 21, spec.anchors.num_anchors)
    assert model.spec.num_classes == 21


def test_num_classes_argument():
    model = SSDLiteMobileNetV2(num_classes=5)
    assert model.spec.num_classes == 5 and model.names == ["class_1", "class_2", "class_3", "class_4"]
    assert "accuracy" not in model.meta  # no published weights, no published AP
    assert SSDVGG16().spec is MMDET_SSD300
    with pytest.raises(ValueError, match="num_classes: expected 81 to match spec, got 5"):
        SSDVGG16(MMDET_SSD512, num_classes=5)
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 2"):
        SSDVGG16(num_classes=1)
    with pytest.raises(TypeError, match="num_classes: expected an integer"):
        SSDVGG16(num_classes=3.0)
    with pytest.raises(ValueError, match="expected 300 or 512 for SSDVGG16, got 320"):
        SSDVGG16(MMDET_SSDLITE320)
    with pytest.raises(TypeError, match="spec: expected a DetectorSpec, got str"):
        SSDLiteMobileNetV2("ssdlite")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion on look-alike files


def _pre_v2_14(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VGG state dict under the key names of mmdetection before 2.14 (what upgrade_ssd_version.py reads)."""
    old = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("neck.extra_layers."):
            key = f"backbone.extra.{int(parts[2]) * 2 + int(parts[3])}.{parts[-1]}"
        elif key == "neck.l2_norm.weight":
            key = "backbone.l2_norm.weight"
        elif key.startswith("bbox_head."):
            key = f"bbox_head.{parts[1]}.{parts[2]}.{parts[-1]}"
        old[key] = value
    return old


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_pre_v2_14_key_names_convert_like_current_ones(tmp_path, legacy):
    current = mmdet_state_dict("ssd300")
    old = _pre_v2_14(current)
    assert "backbone.extra.7.bias" in old and "bbox_head.cls_convs.5.weight" in old
    path = save_mmdet(tmp_path / "ssd300_coco_20200307-a92d2092.pth", old, legacy=legacy)
    ours = read_checkpoint(path, "ssd300_vgg16").state_dict
    expected = convert_mmdet_state_dict(current, MMDET_SSD300)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


def test_class_channels_move_background_first():
    state = mmdet_state_dict("ssd300")
    ours = convert_mmdet_state_dict(state, "ssd300_vgg16")
    mm_bias = state["bbox_head.cls_convs.1.0.bias"].reshape(6, 81)
    our_bias = ours["conf.1.bias"].reshape(6, 81)
    assert torch.equal(our_bias[:, 0], mm_bias[:, 80]) and torch.equal(our_bias[:, 1:], mm_bias[:, :80])
    assert torch.equal(ours["loc.1.weight"], state["bbox_head.reg_convs.1.0.weight"])
    lite = convert_mmdet_state_dict(mmdet_state_dict("ssdlite"), "ssdlite320_mobilenet_v2")
    # The depthwise ConvModule before the predictor has per-input channels: never permuted.
    assert torch.equal(lite["conf.0.0.1.weight"], mmdet_state_dict("ssdlite")["bbox_head.cls_convs.0.0.bn.weight"])


def test_identify():
    assert identify_mmdet(mmdet_state_dict("ssd300")) == ("ssd300_vgg16", 80)
    assert identify_mmdet(mmdet_state_dict("ssd512")) == ("ssd512_vgg16", 80)
    assert identify_mmdet(mmdet_state_dict("ssdlite")) == ("ssdlite320_mobilenet_v2", 80)
    assert identify_mmdet(_pre_v2_14(mmdet_state_dict("ssd300"))) == ("ssd300_vgg16", 80)
    assert identify_mmdet({"conv.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize("short, spec, found", [
    ("ssd300", MMDET_SSD512, "ssd300_vgg16"),
    ("ssd512", MMDET_SSD300, "ssd512_vgg16"),
    ("ssd300", MMDET_SSDLITE320, "ssd300_vgg16"),
    ("ssdlite", MMDET_SSD300, "ssdlite320_mobilenet_v2"),
])
def test_refuses_another_model(tmp_path, short, spec, found):
    path = save_mmdet(tmp_path / "other.pth", mmdet_state_dict(short), legacy=True)
    with pytest.raises(InvalidCheckpointError, match=rf"other\.pth.*expected an mmdetection {spec.name} "
                                                     rf"checkpoint, got one of {found}"):
        read_checkpoint(path, spec.name)


def test_refuses_another_family(tmp_path):
    nvidia_like = {"feature_extractor.feature_extractor.0.weight": torch.zeros(64, 3, 7, 7),
                   "conf.0.weight": torch.zeros(324, 1024, 3, 3)}
    torch.save({"model": nvidia_like, "epoch": 3}, tmp_path / "nvidia.pt")
    with pytest.raises(InvalidCheckpointError, match=r"nvidia\.pt.*expected an mmdetection checkpoint"):
        read_checkpoint(tmp_path / "nvidia.pt", "ssd300_vgg16")
    torch.save(nvidia_like, tmp_path / "bare.pt")
    with pytest.raises(InvalidCheckpointError, match=r"bare\.pt.*expected an mmdetection ssd300_vgg16 checkpoint, "
                                                     r"got an NVIDIA SSD300"):
        read_checkpoint(tmp_path / "bare.pt", "ssd300_vgg16")


def _with_classes(state: dict[str, torch.Tensor], foreground: int) -> dict[str, torch.Tensor]:
    """The state dict with predictors for ``foreground`` classes (81 -> foreground + 1 channels per anchor)."""
    out = dict(state)
    for key, value in state.items():
        if key.startswith("bbox_head.cls_convs.") and key.count(".") == 4 and ".conv." not in key:
            per_anchor = value.reshape(-1, 81, *value.shape[1:])[:, : foreground + 1]
            out[key] = per_anchor.reshape(-1, *value.shape[1:]).contiguous()
    return out


def test_another_class_count_loads_with_its_classes(tmp_path, hub_dir):
    voc = _with_classes(mmdet_state_dict("ssd300"), 20)
    path = save_mmdet(tmp_path / "ssd300_voc.pth", voc, legacy=True, meta=mmdet_meta(COCO_NAMES[:20]))
    expected = convert_mmdet_state_dict(voc, "ssd300_vgg16")["conf.0.weight"]
    # The class count comes from the weights, the names from mmdetection's meta['CLASSES'].
    model = build_model("ssd300_vgg16", checkpoint=str(path))
    assert model.spec.num_classes == 21 and model.names == list(COCO_NAMES[:20])
    assert torch.equal(model.state_dict()["conf.0.weight"], expected) and "accuracy" not in model.meta
    # Asking for its own count loads the same (it used to advise num_classes=21 and then refuse it).
    same = build_model("ssd300_vgg16", checkpoint=str(path), num_classes=21)
    assert same.names == model.names and torch.equal(same.state_dict()["conf.0.weight"], expected)
    # Another count: new class predictors, everything else from the file.
    tuned = build_model("ssd300_vgg16", checkpoint=str(path), num_classes=5)
    assert tuned.spec.num_classes == 5 and tuned.state_dict()["conf.0.weight"].shape[0] == 4 * 5
    assert torch.equal(tuned.state_dict()["loc.0.weight"], model.state_dict()["loc.0.weight"])
    # mmdetection 3.x keeps the names in meta['dataset_meta']['classes']; without names, they are numbered.
    v3 = save_mmdet(tmp_path / "v3.pth", voc, legacy=False, meta={"dataset_meta": {"classes": COCO_NAMES[:20]}})
    assert build_model("ssd300_vgg16", checkpoint=str(v3)).names == list(COCO_NAMES[:20])
    bare = save_mmdet(tmp_path / "bare.pth", voc, legacy=False, meta={})
    assert build_model("ssd300_vgg16", checkpoint=str(bare)).names == [f"class_{i}" for i in range(1, 21)]
    # A meta that contradicts the weights is refused before anything is built.
    path = save_mmdet(tmp_path / "liar.pth", voc, legacy=False)
    with pytest.raises(InvalidCheckpointError, match=r"liar\.pth.*class names list 80 classes, but its class "
                                                     r"predictor 'conf\.0\.weight' scores 20"):
        build_model("ssd300_vgg16", checkpoint=str(path))


def test_refuses_unsafe_meta_without_running_it(tmp_path):
    meta = {**mmdet_meta(), "time": datetime.datetime(2021, 8, 3, 1, 54, 28)}
    path = save_mmdet(tmp_path / "unsafe.pth", mmdet_state_dict("ssdlite"), legacy=True, meta=meta)
    with pytest.raises(InvalidCheckpointError, match=r"unsafe\.pth.*refused: it needs code to unpickle"):
        read_checkpoint(path, "ssdlite320_mobilenet_v2")


def test_accepts_numpy_scalars_in_meta(tmp_path):
    meta = {**mmdet_meta(), "seed": np.int64(42), "lr": np.float64(0.002)}
    path = save_mmdet(tmp_path / "numpy_meta.pth", mmdet_state_dict("ssdlite"), legacy=True, meta=meta)
    assert "conf.5.1.bias" in read_checkpoint(path, "ssdlite320_mobilenet_v2").state_dict


def test_refuses_malformed_files(tmp_path):
    state = mmdet_state_dict("ssdlite")
    with pytest.raises(InvalidCheckpointError, match=r"x\.pth.*expected an mmdetection checkpoint .*got list"):
        extract_mmdet([1, 2], "x.pth")
    with pytest.raises(InvalidCheckpointError, match=r"x\.pth.*non-tensor entries"):
        extract_mmdet({"meta": {}, "state_dict": {"a": 1}}, "x.pth")
    found = extract_mmdet({"meta": mmdet_meta(), "state_dict": state}, "x.pth")
    assert found.class_names == MMDET_COCO_CLASSES and found.state_dict.keys() == state.keys()
    extra = {**state, "bbox_head.loss_weight": torch.zeros(1)}
    with pytest.raises(InvalidCheckpointError, match=r"x\.pth.*unexpected keys for mmdetection "
                                                     r"ssdlite320_mobilenet_v2: bbox_head\.loss_weight"):
        convert_mmdet_state_dict(extra, MMDET_SSDLITE320, "x.pth")
    with pytest.raises(ValueError, match="spec_or_family: expected one of"):
        convert_mmdet_state_dict(state, "nvidia_ssd")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pth", "ssd300_vgg16")


@pytest.mark.parametrize("spec", list(MODELS.values()), ids=list(MODELS))
def test_gflops_in_meta_are_counted(spec):
    """meta['gflops'] is FlopCounterMode's count (2 per multiply-add), as for NVIDIA's SSD300; counted on 'meta'."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = get_entry(spec.name).network(spec).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, spec.input.size, spec.input.size, device="meta"))
    assert counter.get_total_flops() / 1e9 == pytest.approx(spec.meta["gflops"], abs=0.06)


# ---------------------------------------------------------------------------------------------------------------
# Published weights: cache, download with sha256 check, local files


@pytest.fixture(scope="module")
def ssdlite_bytes(tmp_path_factory) -> bytes:
    path = save_mmdet(tmp_path_factory.mktemp("lite") / "lite.pth", mmdet_state_dict("ssdlite"), legacy=True)
    return path.read_bytes()


def _publish_locally(monkeypatch, http_server, body: bytes, prefix: str) -> str:
    import dataclasses

    from helpers.checkpoints import serve_published

    table = serve_published(monkeypatch, http_server, "ssdlite320_mobilenet_v2")
    weights = dataclasses.replace(table["coco"], sha256=prefix)
    monkeypatch.setitem(get_entry("ssdlite320_mobilenet_v2").weights, "coco", weights)
    http_server.add(f"/coco/0/{weights.file_name}", body)
    return weights.file_name


def test_published_checkpoint_downloads_once_then_loads_from_cache(monkeypatch, http_server, hub_dir,
                                                                   ssdlite_bytes):
    import hashlib

    prefix = hashlib.sha256(ssdlite_bytes).hexdigest()[:8]
    file_name = _publish_locally(monkeypatch, http_server, ssdlite_bytes, prefix)
    model = build_model("ssdlite320_mobilenet_v2", progress=False)
    assert model.checkpoint_source.startswith("http://127.0.0.1")
    assert (hub_dir / "checkpoints" / file_name).read_bytes() == ssdlite_bytes
    # Published weights with their own classes: the published AP is this model's.
    assert model.meta["accuracy"]["mAP"] == 0.213 and model.meta["weights"] == "coco"
    again = build_model("ssdlite320_mobilenet_v2", progress=False)
    assert again.checkpoint_source == str(hub_dir / "checkpoints" / file_name)
    assert sum(http_server.hits.values()) == 1
    expected = convert_mmdet_state_dict(mmdet_state_dict("ssdlite"), MMDET_SSDLITE320)
    assert torch.equal(model.state_dict()["conf.3.1.weight"], expected["conf.3.1.weight"])
    # Re-headed for other classes, it is no longer the published model.
    assert "accuracy" not in build_model("ssdlite320_mobilenet_v2", num_classes=3, progress=False).meta


def test_published_checkpoint_with_a_wrong_hash_is_not_kept(monkeypatch, http_server, hub_dir, ssdlite_bytes):
    from ssd.weights import CheckpointUnavailableError

    _publish_locally(monkeypatch, http_server, ssdlite_bytes, "00000000")
    with pytest.raises(CheckpointUnavailableError, match="expected sha256 starting 00000000") as info:
        build_model("ssdlite320_mobilenet_v2", progress=False)
    assert "SSD_CHECKPOINT=/path/to/ssdlite_mobilenetv2" in str(info.value)
    assert not list((hub_dir / "checkpoints").iterdir())


def test_local_file_and_errors(tmp_path, hub_dir, ssdlite_bytes, monkeypatch):
    path = tmp_path / "mine.pth"
    path.write_bytes(ssdlite_bytes)
    model = build_model("ssdlite320_mobilenet_v2", checkpoint=path)
    assert model.checkpoint_source == str(path) and "accuracy" not in model.meta  # not known to be published
    # SSD_CHECKPOINT serves mmdetection's models as it serves NVIDIA's.
    monkeypatch.setenv("SSD_CHECKPOINT", str(path))
    assert build_model("ssdlite320_mobilenet_v2").checkpoint_source == str(path)
    with pytest.raises(InvalidCheckpointError, match=r"mine\.pth.*expected an mmdetection ssd300_vgg16 checkpoint"):
        build_model("ssd300_vgg16")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("ssd300_vgg16", checkpoint=tmp_path / "nope.pth")
