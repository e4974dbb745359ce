"""The seed-compatible helpers as users call them: through ``utils`` and the hub's processing entrypoint."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

import utils
from ssd.data.coco import COCO_CATEGORY_IDS, COCO_NAMES, category_id, label_name

SEED_HELPERS = ("load_image", "rescale", "crop_center", "normalize", "prepare_input", "prepare_tensor",
                "decode_results", "pick_best", "get_coco_object_dictionary")


def test_facade_offers_every_seed_helper():
    helpers = utils.Processing()
    for name in SEED_HELPERS:
        assert callable(getattr(helpers, name)), name
    assert "decode_results" in repr(helpers)


@pytest.mark.parametrize("image", [0, 1])
def test_decode_results_through_the_facade_is_nvidias(decode_golden, image):
    locs = torch.from_numpy(decode_golden["locs"]).float()
    confs = torch.from_numpy(decode_golden["confs"]).float()
    before = (locs.clone(), confs.clone())
    boxes, labels, scores = utils.decode_results((locs, confs))[image]
    np.testing.assert_array_equal(labels, decode_golden[f"labels_{image}"])
    np.testing.assert_allclose(scores, decode_golden[f"scores_{image}"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(boxes, decode_golden[f"boxes_{image}"], rtol=0, atol=1e-6)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and scores.dtype == np.float32
    assert torch.equal(locs, before[0]) and torch.equal(confs, before[1])


def test_pick_best_keeps_scores_above_threshold_and_is_empty_safe(decode_golden):
    locs = torch.from_numpy(decode_golden["locs"]).float()
    confs = torch.from_numpy(decode_golden["confs"]).float()
    result = utils.decode_results((locs, confs))[0]
    boxes, labels, scores = utils.pick_best(result, 0.5)
    assert len(scores) == int((result[2] > 0.5).sum()) > 0 and (scores > 0.5).all()
    np.testing.assert_array_equal(boxes, result[0][result[2] > 0.5])
    np.testing.assert_array_equal(labels, result[1][result[2] > 0.5])
    nothing = utils.pick_best(result, 1.0)
    assert nothing[0].shape == (0, 4) and nothing[1].shape == (0,) and nothing[2].shape == (0,)

    background = torch.zeros(1, 81, 8732)
    background[:, 0] = 20.0  # every box certainly background
    empty = utils.decode_results((torch.zeros(1, 4, 8732), background))[0]
    assert empty[0].shape == (0, 4) and len(empty[1]) == len(empty[2]) == 0
    assert [len(part) for part in utils.pick_best(empty, 0.4)] == [0, 0, 0]
    with pytest.raises(ValueError, match=r"\[boxes, labels, scores\]"):
        utils.pick_best([np.zeros((0, 4))], 0.4)


def test_coco_names_need_no_network_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("network used to name COCO classes")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    names = utils.get_coco_object_dictionary()
    assert list(tmp_path.iterdir()) == []
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush" and len(set(names)) == 80
    names.append("changed")  # a copy: callers cannot corrupt the table
    assert len(utils.get_coco_object_dictionary()) == 80


def test_coco_category_ids_run_1_to_90_with_gaps():
    assert len(COCO_CATEGORY_IDS) == len(COCO_NAMES) == 80
    assert list(COCO_CATEGORY_IDS) == sorted(set(COCO_CATEGORY_IDS))
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[-1] == 90
    assert set(range(1, 91)) - set(COCO_CATEGORY_IDS) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert (label_name(1), category_id(1)) == ("person", 1)
    assert (label_name(80), category_id(80)) == ("toothbrush", 90)
    for bad in (0, 81):
        with pytest.raises(ValueError, match="expected an integer in 1..80"):
            label_name(bad)
        with pytest.raises(ValueError, match="expected an integer in 1..80"):
            category_id(bad)


@pytest.mark.parametrize(("inputs", "match"), [
    ([], "at least one"),
    ([np.zeros((300, 300, 3)), np.zeros((200, 300, 3))], "of one shape"),
    ([np.zeros((300, 300))], "H x W x 3"),
])
def test_prepare_tensor_rejects_bad_inputs(inputs, match):
    with pytest.raises(ValueError, match=match):
        utils.prepare_tensor(inputs)
