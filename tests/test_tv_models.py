"""torchvision's SSD300 and SSDLite320 as a family: against torchvision's own model code, on the same weights.

torchvision's weights cannot be downloaded here: its models are built with ``weights=None, weights_backbone=None``
and given key-seeded weights that detect (tests/helpers/tv.py); ours read the same state dict from a file, through
the one checkpoint reader, as a user's ``torch.save(model.state_dict())`` or torchvision's published file would be.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from ssd.anchors import default_boxes
from ssd.box_coder import BoxCoder
from ssd.data.coco import COCO_CATEGORY_IDS, COCO_NAMES
from ssd.models.tv_ssd import TV_COCO_CLASSES, TV_SSD300, TV_SSDLITE320, TVSSD300VGG16, TVSSDLite320MobileNetV3
from ssd.registry import build_model, get_entry
from ssd.transforms import preprocess_for_detection
from ssd.weights import InvalidCheckpointError, read_checkpoint

from helpers import REPO, photo
from helpers.checkpoints import serve_published
from helpers.detections import (
    assert_same_detections,
    box_tolerance,
    float32_error,
    raw_delta,
    raw_outputs_recorder,
    rounding_bound,
    score_tolerance,
)
from helpers.tv import detecting_state_dict, torchvision_model

SPECS = {TV_SSD300.name: TV_SSD300, TV_SSDLITE320.name: TV_SSDLITE320}
NAMES = list(SPECS)
LITE = TV_SSDLITE320.name
EPS = torch.finfo(torch.float32).eps
PHOTOS = ("astronaut", "chelsea", "coffee")
NA_IDS = tuple(i for i in range(1, 91) if i not in COCO_CATEGORY_IDS)
# SSD300's VGG takes seconds an image here: its forward-pass tests run in the whole suite only (make test-fast
# leaves them out), SSDLite's in both.
NAMES_VGG_SLOW = [pytest.param(n, marks=pytest.mark.slow) if n == TV_SSD300.name else n for n in NAMES]


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """Per model: torchvision's state dict saved as torch.save(model.state_dict()) saves it."""
    folder = tmp_path_factory.mktemp("tv")
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = folder / f"{name}.pth"
            torch.save(detecting_state_dict(name), made[name])
        return made[name]

    return get


def _as_input(image: np.ndarray) -> torch.Tensor:
    """What torchvision's detection models take: a 3 x H x W float image in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def _torchvision_head_outputs(model: torch.nn.Module, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's own preprocessing, backbone and head, in our (N x 4 x A, N x C x A) layout."""
    batch = model.transform([_as_input(i) for i in images])[0].tensors
    head = model.head(list(model.backbone(batch).values()))
    return head["bbox_regression"].transpose(1, 2), head["cls_logits"].transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# The network, the default boxes and the box coder against torchvision's code


@pytest.mark.parametrize("name", NAMES_VGG_SLOW)
def test_raw_head_outputs_equal_torchvisions(name, tv_file):
    # SSD300's VGG on this CPU is ~1 s an image: one photo for it, two for SSDLite.
    images = [photo(p) for p in (PHOTOS[:1] if name == TV_SSD300.name else PHOTOS[:2])]
    theirs = torchvision_model(name, detecting_state_dict(name))
    ours = build_model(name, checkpoint=tv_file(name))
    with torch.inference_mode():
        expected = _torchvision_head_outputs(theirs, images)
        got = ours(preprocess_for_detection([torch.from_numpy(i).permute(2, 0, 1) for i in images], ours.spec.input))
    anchors, classes = ours.spec.anchors.num_anchors, ours.spec.num_classes
    assert got[0].shape == (len(images), 4, anchors) and got[1].shape == (len(images), classes, anchors) == (
        len(images), 91, anchors)
    batch = preprocess_for_detection([torch.from_numpy(i).permute(2, 0, 1) for i in images], ours.spec.input)
    rounding = float32_error(ours, batch)
    for ours_out, theirs_out, own_error in zip(got, expected, rounding):
        # The same float32 operations on the same inputs (the preprocessing is bit-identical, tests/test_transforms):
        # equal when the same kernels run. 1e-5 of the output's range (~80 float32 ulps of it) leaves room for a
        # convolution backend that sums in another order, which changes each output by a few ulps of the largest
        # partial sums; where the network amplifies rounding more than that (the key-seeded SSDLite: its float32
        # outputs are ~5e-4 from its float64 ones), by what its own measured rounding allows.
        spread = float(theirs_out.max() - theirs_out.min())
        error = float((ours_out - theirs_out).abs().max())
        bound = max(1e-5 * spread, rounding_bound(own_error, float(theirs_out.abs().max())))
        assert spread > 1.0 and error <= bound, f"{name}: max error {error} over a range of {spread} (bound {bound})"


def _torchvision_anchors(name: str) -> torch.Tensor:
    """torchvision's DefaultBoxGenerator output for our feature map sizes: A x 4 xyxy in input pixels."""
    from torchvision.models.detection.image_list import ImageList

    spec = SPECS[name]
    size = spec.input.size
    with torch.device("meta"):
        model = torchvision_model(name)
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    maps = [torch.zeros(1, 1, f, f) for f in spec.anchors.feature_sizes]
    return model.anchor_generator(images, maps)[0]


@pytest.mark.parametrize("name", NAMES)
def test_default_boxes_are_torchvisions(name):
    spec = SPECS[name]
    size = spec.anchors.image_size
    theirs = _torchvision_anchors(name).double()
    ours = default_boxes(spec.anchors, "xyxy").double() * size
    assert ours.shape == theirs.shape == (spec.anchors.num_anchors, 4)
    # torchvision rounds (c - w / 2) * size to float32, ours c - w / 2 (the same float32 centres and sizes, bit for
    # bit): one rounding of a value below 2 * size apart.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2 * EPS * size)


def test_anchor_specs_say_what_torchvision_computes():
    # SSDLite's steps are None in torchvision: its centres are (j + 0.5) / f on an f x f map, a step of 320 / f.
    assert TV_SSDLITE320.anchors.steps == tuple(320 / f for f in TV_SSDLITE320.anchors.feature_sizes)
    # torchvision clips the sizes only: SSD300's 10 x 10 map (step 32 is 320 pixels for 300) reaches past the edge.
    centres = default_boxes(TV_SSD300.anchors, "cxcywh")
    assert float(centres[:, :2].max()) == pytest.approx(9.5 / 9.375)
    assert float(centres[:, 2:].max()) == 1.0 and float(default_boxes(TV_SSDLITE320.anchors)[:, 2:].max()) == 1.0
    # That is AnchorSpec.clamp="sizes"; NVIDIA's clamp=True clamps the centres too.
    clamped_all = default_boxes(dataclasses.replace(TV_SSD300.anchors, clamp=True), "cxcywh")
    assert float(clamped_all[:, :2].max()) == 1.0 and torch.equal(clamped_all[:, 2:], centres[:, 2:])
    with pytest.raises(ValueError, match="AnchorSpec.clamp: expected True, False or 'sizes', got 'centres'"):
        dataclasses.replace(TV_SSD300.anchors, clamp="centres")


@pytest.mark.parametrize("name", NAMES)
def test_box_decoding_is_torchvisions_within_the_clamp(name):
    spec = SPECS[name]
    size = spec.anchors.image_size
    with torch.device("meta"):
        theirs = torchvision_model(name).box_coder  # plain arithmetic, no weights
    assert theirs.weights == (1 / spec.box_coder.center_variance,) * 2 + (1 / spec.box_coder.size_variance,) * 2
    assert theirs.bbox_xform_clip == spec.box_coder.max_log_size == math.log(1000 / 16)
    anchors = _torchvision_anchors(name)
    offsets = torch.randn(anchors.shape[0], 4, generator=torch.Generator().manual_seed(3)) * 3
    ours = BoxCoder.from_spec(spec).decode(offsets.t()[None])[0]
    # torchvision decodes in pixels from pixel anchors, we in fractions of the input: ~10 roundings each, of values
    # up to a box's far edge (below 30 x the input with these offsets).
    expected = theirs.decode_single(offsets, anchors) / size
    torch.testing.assert_close(ours, expected, rtol=0, atol=16 * EPS * float(expected.abs().max()))
    # The one difference: torchvision clamps the scaled log-size from above only; a box predicted smaller than 1/62.5
    # of its default box stays at 1/62.5 here (mmdetection's two-sided clamp, the coder's one rule). No object is
    # that small: the smallest default box is 21 pixels, so this is about a third of a pixel.
    tiny = torch.zeros(1, 4)
    tiny[0, 2:] = -30.0
    widths = anchors[:1, 2:] - anchors[:1, :2]
    their_size = (theirs.decode_single(tiny, anchors[:1])[0, 2:] - theirs.decode_single(tiny, anchors[:1])[0, :2])
    our_box = BoxCoder.from_spec(spec).decode(torch.zeros(1, 4, anchors.shape[0]).index_fill(1, torch.tensor([2, 3]),
                                                                                               -30.0))[0, 0]
    torch.testing.assert_close(their_size, widths[0] * math.exp(-6.0))
    torch.testing.assert_close((our_box[2:] - our_box[:2]) * size, widths[0] * 16 / 1000)


# ---------------------------------------------------------------------------------------------------------------
# detect against torchvision's detections


def _torchvision_detections(name: str, images: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], tuple]:
    """torchvision's detections, and its head's raw outputs in our (N x 4 x A, N x C x A) layout as it ran them."""
    model = torchvision_model(name, detecting_state_dict(name))
    head, hook = raw_outputs_recorder(model.head, lambda out: (out["bbox_regression"].transpose(1, 2).clone(),
                                                               out["cls_logits"].transpose(1, 2).clone()))
    with torch.inference_mode():
        found = model([_as_input(i) for i in images])
    hook.remove()
    [raw] = head
    return [{k: v.numpy() for k, v in f.items()} for f in found], raw


@pytest.mark.parametrize("name", NAMES_VGG_SLOW)
def test_detect_finds_torchvisions_detections_with_its_recipe(name, tv_file, monkeypatch):
    import ssd.backends.plan

    images = [photo(p) for p in PHOTOS]
    theirs, their_raw = _torchvision_detections(name, images)
    model = build_model(name, checkpoint=tv_file(name))
    # detect runs fp32 CPU models as a channels_last copy by default (faster; other convolution kernels, so logits
    # a few 1e-6 apart): here it runs the model's own layout, as torchvision's model does. test_detect_defaults
    # covers the default path.
    monkeypatch.setattr(ssd.backends.plan, "CPU_CHANNELS_LAST", False)
    recipe = model.spec.postprocess
    ours_raw, hook = raw_outputs_recorder(model)
    found = model.detect(images, threshold=recipe.score_threshold, iou_threshold=recipe.iou_threshold,
                         max_detections=recipe.max_detections, batch_size=len(images))
    hook.remove()
    # The same network on the same bits (the preprocessing is bit-identical, tests/test_transforms), but not
    # necessarily the same kernels: another CPU, thread count or batch may sum each convolution in another order
    # (on CI the scores moved by 5e-7). So the raw outputs' difference, as both runs computed them, is measured
    # (bounded as test_raw_head_outputs_equal_torchvisions bounds it) and carried through the post-processing.
    [ours_raw] = ours_raw
    loc_delta, conf_delta = raw_delta(ours_raw, their_raw)
    # Rounding, not a change: within what this network's own float32 error allows (or 1e-5 of the range, as the raw
    # test above).
    batch = preprocess_for_detection([torch.from_numpy(i).permute(2, 0, 1) for i in images], model.spec.input)
    for delta, theirs_out, own_error in zip((loc_delta, conf_delta), their_raw, float32_error(model, batch)):
        bound = max(1e-5 * float(theirs_out.max() - theirs_out.min()),
                    rounding_bound(own_error, float(theirs_out.abs().max())))
        assert delta <= bound, (name, delta, bound)
    score_tol = score_tolerance(conf_delta)
    max_offset = float(their_raw[0].abs().max())
    for ours, their, image, photo_name in zip(found, theirs, images, PHOTOS):
        # SSDLite keeps 300 detections of scores down to 0.001: near-ties among them may sort either way (on CI two
        # pairs swapped), and the 300th place may go to the other of two near-equal scores.
        box_tol = box_tolerance(loc_delta, max_offset, model.spec.box_coder, max(image.shape[:2]))
        assert len(ours.scores) > 0
        assert_same_detections(ours, their, score_tol=score_tol, box_tol=box_tol, cut=recipe.max_detections,
                               label=f"{name} {photo_name}")
    # The boosted classes lead; label k is COCO category id k, and the placeholders are never named as a class.
    assert {int(f.labels[0]) for f in found} <= {1, 17, 47}
    for ours in found:
        assert ours.category_ids == ours.labels.tolist()
        for label, class_name in zip(ours.labels.tolist(), ours.names):
            assert class_name == (f"N/A-{label}" if label in NA_IDS else COCO_NAMES[COCO_CATEGORY_IDS.index(label)])
    if name == LITE:  # 300 per image at score > 0.001: the placeholders' scores pass too, as in torchvision's
        assert any(set(f.labels.tolist()) & set(NA_IDS) for f in found)


def test_detect_defaults(tv_file):
    """``model.detect(images)`` as users call it (channels_last copy, scores above 0.4, 100 per image): torchvision's
    detections above 0.4, to the tolerance of the other convolution kernels."""
    from ssd.backends.plan import channels_last_copy

    images = [photo(p) for p in PHOTOS]
    model = build_model(LITE, checkpoint=tv_file(LITE))
    theirs, their_raw = _torchvision_detections(LITE, images)
    # The copy detect runs (cached per model), recorded as detect runs it.
    ours_raw, hook = raw_outputs_recorder(channels_last_copy(model))
    found = model.detect(images)
    hook.remove()
    assert len(ours_raw) == 1, "detect did not run the channels_last copy"
    loc_delta, conf_delta = raw_delta(ours_raw[0], their_raw)
    batch = preprocess_for_detection([torch.from_numpy(i).permute(2, 0, 1) for i in images], model.spec.input)
    for delta, theirs_out, own_error in zip((loc_delta, conf_delta), their_raw, float32_error(model, batch)):
        assert delta <= rounding_bound(own_error, float(theirs_out.abs().max())), delta  # rounding, not a change
    recipe = model.spec.detect_postprocess
    assert recipe.score_threshold == 0.4 and recipe.max_detections == 100
    max_offset = float(their_raw[0].abs().max())
    for ours, their, image, photo_name in zip(found, theirs, images, PHOTOS):
        keep = their["scores"] > recipe.score_threshold
        expected = {k: v[keep][: recipe.max_detections] for k, v in their.items()}
        assert len(expected["scores"]) > 0
        # A score within the tolerance of 0.4 may be kept by one run only; 100 found is a cut, as in the test above.
        assert_same_detections(ours, expected, score_tol=score_tolerance(conf_delta),
                               box_tol=box_tolerance(loc_delta, max_offset, model.spec.box_coder, max(image.shape[:2])),
                               cut=recipe.max_detections, threshold=recipe.score_threshold, label=photo_name)


# ---------------------------------------------------------------------------------------------------------------
# Specs, classes and the published weights, against torchvision's own declarations


@pytest.mark.parametrize("name", NAMES)
def test_specs_are_torchvisions_settings(name):
    spec = SPECS[name]
    with torch.device("meta"):
        model = torchvision_model(name)
    recipe = spec.postprocess
    assert (recipe.score_threshold, recipe.iou_threshold, recipe.max_detections, recipe.candidates_per_class) == (
        model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates)
    assert recipe.clip_boxes and not recipe.drop_empty and not recipe.suppress_equal
    transform = model.transform
    assert transform.fixed_size == (spec.input.size,) * 2 and transform.size_divisible == 1
    assert (tuple(transform.image_mean), tuple(transform.image_std)) == (spec.input.mean, spec.input.std)
    assert spec.input.value_range == 1.0 and spec.input.resize == "torch_bilinear"
    assert spec.matching_iou == model.proposal_matcher.high_threshold == 0.5
    assert model.anchor_generator.num_anchors_per_location() == list(spec.anchors.boxes_per_location)
    # The picture recipe is the published one with a higher threshold and fewer boxes.
    detect = spec.detect_postprocess
    assert detect.updated(score_threshold=recipe.score_threshold, max_detections=recipe.max_detections) == recipe


def _torchvision_weights(name: str):
    from torchvision.models.detection import SSD300_VGG16_Weights, SSDLite320_MobileNet_V3_Large_Weights

    return {TV_SSD300.name: SSD300_VGG16_Weights, LITE: SSDLite320_MobileNet_V3_Large_Weights}[name].COCO_V1


@pytest.mark.parametrize("name", NAMES)
def test_weights_table_is_torchvisions(name):
    published = _torchvision_weights(name)
    entry = get_entry(name)
    assert list(entry.weights) == ["coco"] and entry.default_weights == "coco" and entry.fallback_weights is None
    ours = entry.weights["coco"]
    assert ours.urls == (published.url,) and published.url.endswith("/" + ours.file_name)
    assert ours.file_name.endswith(f"-{ours.sha256}.pth") and len(ours.sha256) == 8
    assert ours.meta["accuracy"]["mAP"] == pytest.approx(published.meta["_metrics"]["COCO-val2017"]["box_map"] / 100)
    assert ours.classes == entry.spec.classes == TV_COCO_CLASSES
    categories = published.meta["categories"]
    assert categories[0] == "__background__" and len(categories) == TV_COCO_CLASSES.num_classes == 91
    for label, (theirs, ours_name) in enumerate(zip(categories[1:], TV_COCO_CLASSES.names), start=1):
        assert ours_name == (f"N/A-{label}" if theirs == "N/A" else theirs)
    with torch.device("meta"):
        network = entry.network(entry.spec)
    assert sum(p.numel() for p in network.parameters()) == published.meta["num_params"]
    assert "accuracy" not in entry.spec.meta


def test_classes_keep_coco_ids_and_placeholders_are_no_class():
    assert TV_COCO_CLASSES.category_ids == tuple(range(1, 91))
    names = dict(zip(TV_COCO_CLASSES.category_ids, TV_COCO_CLASSES.names))
    assert [names[i] for i in COCO_CATEGORY_IDS] == list(COCO_NAMES)
    assert [names[i] for i in NA_IDS] == [f"N/A-{i}" for i in NA_IDS] and len(NA_IDS) == 10
    assert len(set(TV_COCO_CLASSES.names)) == 90 and not set(TV_COCO_CLASSES.names[i - 1] for i in NA_IDS) & set(
        COCO_NAMES)
    pytest.importorskip("pycocotools")
    from ssd.evaluation.coco import category_map

    # A COCO annotation file maps by id: every COCO category to the label of its id; the placeholders to none.
    coco = [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_NAMES)]
    assert category_map(TV_COCO_CLASSES, coco) == {i: i for i in COCO_CATEGORY_IDS}


@pytest.mark.parametrize("name", NAMES)
def test_gflops_in_meta_are_counted(name):
    """meta['gflops'] is FlopCounterMode's count (2 per multiply-add), as for the other families; on 'meta'."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = SPECS[name]
    with torch.device("meta"):
        model = get_entry(name).network(spec).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, spec.input.size, spec.input.size, device="meta"))
    assert counter.get_total_flops() / 1e9 == pytest.approx(spec.meta["gflops"], abs=0.06)


# ---------------------------------------------------------------------------------------------------------------
# Files: the converter, the shared reader, torch.hub, fine-tuning, the published download


def test_reads_torchvisions_state_dicts_as_they_are(tv_file):
    for name in NAMES:
        found = read_checkpoint(tv_file(name), name)
        state = detecting_state_dict(name)
        assert found.state_dict.keys() == state.keys() and found.num_classes == 91 and found.classes is None
        assert all(torch.equal(found.state_dict[k], v) for k, v in state.items())
    # DistributedDataParallel's prefixes go, as for every family.
    state = detecting_state_dict(LITE)
    with_prefix = {f"module.{k}": v for k, v in state.items()}
    from ssd.weights.torchvision import to_state_dict

    converted, classes = to_state_dict(with_prefix, "ddp.pth", TV_SSDLITE320)
    assert converted.keys() == state.keys() and classes is None


def test_converter_refuses_other_families_files(tmp_path, tv_file):
    cases = {
        "nvidia.pt": ({"feature_extractor.feature_extractor.0.weight": torch.zeros(64, 3, 7, 7),
                       "conf.0.weight": torch.zeros(324, 1024, 3, 3)}, "an NVIDIA SSD300"),
        "mmdet_bare.pth": ({"backbone.features.0.weight": torch.zeros(64, 3, 3, 3),
                            "bbox_head.cls_convs.0.0.weight": torch.zeros(324, 512, 3, 3)}, "an mmdetection SSD"),
        "mmdet.pth": ({"meta": {"CLASSES": list(COCO_NAMES)},
                       "state_dict": {"neck.l2_norm.weight": torch.zeros(512)}}, "an mmdetection checkpoint"),
        "ours.pth": ({"loc.0.weight": torch.zeros(16, 512, 3, 3), "conf.0.weight": torch.zeros(324, 512, 3, 3)},
                     "a state dict of this package's NVIDIA or mmdetection models"),
        "nvidia_train.pt": ({"model": {"conf.0.weight": torch.zeros(1)}, "epoch": 3},
                            "a training checkpoint with a 'model' state dict"),
    }
    for file_name, (obj, what) in cases.items():
        torch.save(obj, tmp_path / file_name)
        for name in NAMES:
            wanted = "ssd300_vgg16" if name == TV_SSD300.name else "ssdlite320_mobilenet_v3_large"
            with pytest.raises(InvalidCheckpointError, match=rf"{file_name}.*expected a torchvision {wanted} state "
                                                             rf"dict.*got {what}"):
                read_checkpoint(tmp_path / file_name, name)
    # One torchvision SSD is not the other.
    with pytest.raises(InvalidCheckpointError, match=r"expected a torchvision ssd300_vgg16 state dict, got a "
                                                     r"torchvision ssdlite320_mobilenet_v3_large state dict"):
        read_checkpoint(tv_file(LITE), TV_SSD300.name)
    torch.save({"backbone.scale_weight": torch.ones(512), "head.classification_head.module_list.0.weight":
                torch.zeros(364, 512, 3, 3)}, tmp_path / "vgg.pth")
    with pytest.raises(InvalidCheckpointError, match=r"vgg\.pth.*expected a torchvision "
                                                     r"ssdlite320_mobilenet_v3_large state dict, got a torchvision "
                                                     r"ssd300_vgg16 state dict"):
        read_checkpoint(tmp_path / "vgg.pth", LITE)
    # And the other families say what a torchvision file is.
    with pytest.raises(InvalidCheckpointError, match="expected an mmdetection ssdlite320_mobilenet_v2 checkpoint, "
                                                     "got a torchvision SSD state dict"):
        read_checkpoint(tv_file(LITE), "ssdlite320_mobilenet_v2")


def test_hostile_files_are_refused_by_the_shared_reader(tmp_path):
    # torch.save(model) pickles torchvision's classes: refused unread, nothing in it runs.
    with torch.device("meta"):
        whole = torchvision_model(LITE)
    torch.save(whole.to_empty(device="cpu"), tmp_path / "whole_model.pth")
    with pytest.raises(InvalidCheckpointError, match=r"whole_model\.pth.*refused: it needs code to unpickle"):
        build_model(LITE, checkpoint=tmp_path / "whole_model.pth")
    # Weights that are not numbers.
    state = detecting_state_dict(LITE)
    key = "head.regression_head.module_list.2.1.bias"
    state[key] = state[key].clone().index_fill(0, torch.tensor([3]), float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(InvalidCheckpointError, match=rf"nan\.pth.*key '{key}': expected finite weights, got 1 NaN"):
        build_model(LITE, checkpoint=tmp_path / "nan.pth")


def test_hub_entrypoint_loads_a_local_torchvision_file(tv_file, hub_dir):
    path = tv_file(LITE)
    model = torch.hub.load(str(REPO), LITE, source="local", checkpoint=str(path))
    assert type(model).__name__ == "TVSSDLite320MobileNetV3" and not model.training
    assert model.checkpoint_source == str(path) and "accuracy" not in model.meta  # a file: not known to be published
    assert model.names == list(TV_COCO_CLASSES.names) and model.meta["model"] == LITE
    state = detecting_state_dict(LITE)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not (hub_dir / "checkpoints").exists()  # a local file is never copied into the cache


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_gives_new_heads_for_fine_tuning(name, tv_file, tmp_path):
    spec = SPECS[name]
    tuned = build_model(name, checkpoint=tv_file(name), num_classes=5)
    assert tuned.spec.num_classes == 5 and tuned.names == [f"class_{i}" for i in range(1, 5)]
    assert "accuracy" not in tuned.meta
    # The heads torchvision builds for num_classes=5: same keys and shapes, so its fine-tuned files load too.
    with torch.device("meta"):
        theirs = torchvision_model(name, num_classes=5).state_dict()
    own = tuned.state_dict()
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in theirs.items()}
    # Everything but the class predictors comes from the file.
    state = detecting_state_dict(name)
    predictors = set(get_entry(name).class_predictor_keys())
    assert len(predictors) == 12
    assert all(torch.equal(own[k], v) for k, v in state.items() if k not in predictors)
    with torch.device("meta"):
        meta_model = type(tuned)(tuned.spec).eval()
        locs, confs = meta_model(torch.zeros(2, 3, spec.input.size, spec.input.size, device="meta"))
    assert locs.shape == (2, 4, spec.anchors.num_anchors) and confs.shape == (2, 5, spec.anchors.num_anchors)
    if name == LITE:
        # A torchvision model fine-tuned on 4 classes: its count from the class predictor, its names numbered.
        small = {k: (torch.randn(v.shape) * 0.01 if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
                 for k, v in theirs.items()}
        torch.save(small, tmp_path / "four.pth")
        model = build_model(name, checkpoint=tmp_path / "four.pth")
        assert model.spec.num_classes == 5 and model.names == [f"class_{i}" for i in range(1, 5)]
        with torch.inference_mode():
            assert model(torch.zeros(1, 3, 320, 320))[1].shape == (1, 5, 3234)


def test_published_weights_download_once_then_load_from_the_cache(monkeypatch, http_server, hub_dir, tv_file):
    """The shared download path, with a stand-in for torchvision's file served on 127.0.0.1."""
    body = tv_file(LITE).read_bytes()
    table = serve_published(monkeypatch, http_server, LITE)
    weights = dataclasses.replace(table["coco"], sha256=hashlib.sha256(body).hexdigest()[:8])
    monkeypatch.setitem(get_entry(LITE).weights, "coco", weights)
    http_server.add(f"/coco/0/{weights.file_name}", body)
    model = build_model(LITE, progress=False)
    # Cached under torchvision's own file name: a file torchvision already downloaded is used as it is.
    cached = hub_dir / "checkpoints" / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
    assert weights.file_name == cached.name and cached.read_bytes() == body
    assert model.meta["accuracy"]["mAP"] == 0.213 and model.meta["weights"] == "coco"
    again = build_model(LITE, progress=False)
    assert again.checkpoint_source == str(cached) and sum(http_server.hits.values()) == 1
    assert "accuracy" not in build_model(LITE, num_classes=3, progress=False).meta


def test_networks_and_specs():
    for network, spec in ((TVSSD300VGG16, TV_SSD300), (TVSSDLite320MobileNetV3, TV_SSDLITE320)):
        entry = get_entry(spec.name)
        assert entry.network is network and entry.spec is spec and entry.converter == ".weights.torchvision"
    with pytest.raises(ValueError, match="num_classes: expected 91 to match spec, got 5"):
        TVSSD300VGG16(TV_SSD300, num_classes=5)
    with pytest.raises(ValueError, match="expected 6 levels for torchvision's SSDLite320, got 7"):
        TVSSDLite320MobileNetV3(get_entry("ssd512_vgg16").spec)
    with pytest.raises(TypeError, match="spec: expected a DetectorSpec, got str"):
        TVSSD300VGG16("ssd300")
