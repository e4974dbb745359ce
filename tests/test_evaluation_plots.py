"""What evaluation measures beyond COCO's 12 numbers: per-class AP and PR curves read from COCOeval's own precision
array, the confusion matrix on a hand-built case whose counts are known, the plot files, the stage lines and the
command's plot options."""
from __future__ import annotations

import contextlib
import io
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from ssd.cli import main  # noqa: E402
from ssd.data.synthetic import make_shapes_dataset  # noqa: E402
from ssd.evaluation import evaluate, load_annotations  # noqa: E402
from ssd.evaluation.metrics import confusion_matrix, per_class_ap, pr_curves  # noqa: E402
from ssd.registry import build_model  # noqa: E402

from helpers import GOLDEN  # noqa: E402

ANNOTATIONS = GOLDEN / "minicoco" / "instances.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jittered_results(coco: COCO, seed: int = 0) -> list[dict]:
    """Detections near every ground-truth box, some with the wrong class, plus false alarms: curves with shape."""
    rng = np.random.default_rng(seed)
    cats = sorted(coco.cats)
    out = []
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(2):
            shift = rng.uniform(-0.3, 0.3, 2) * [w, h]
            cat = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))
            out.append({"image_id": ann["image_id"], "category_id": cat, "score": float(rng.random()),
                        "bbox": [x + shift[0], y + shift[1], w, h]})
    return out


@pytest.fixture(scope="module")
def accumulated() -> COCOeval:
    coco = load_annotations(ANNOTATIONS)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(_jittered_results(coco)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_pr_curves_are_cocoevals_precision_array(accumulated):
    precision = accumulated.eval["precision"][:, :, :, 0, -1]  # area 'all', 100 detections
    curves = pr_curves(accumulated)
    names = [accumulated.cocoGt.cats[c]["name"] for c in accumulated.params.catIds]
    assert list(curves.per_class50) == [n for k, n in enumerate(names) if (precision[:, :, k] > -1).any()]
    for k, name in enumerate(names):
        if name in curves.per_class50:
            np.testing.assert_array_equal(curves.per_class50[name], precision[0, :, k])
            np.testing.assert_array_equal(curves.per_class[name], precision[:, :, k].mean(axis=0))
    np.testing.assert_array_equal(curves.recall, accumulated.params.recThrs)
    # The all-class curves average to COCO's own AP50 and AP (summarize's means of the same slice); float64 sums
    # of at most 10 x 101 x K terms in another order differ by a few ulps.
    assert curves.ap50 == pytest.approx(accumulated.stats[1], rel=1e-12)
    assert curves.ap == pytest.approx(accumulated.stats[0], rel=1e-12)
    assert 0.05 < curves.ap < 0.95  # a curve with shape, not all zeros or ones


def test_per_class_ap_averages_the_same_slice(accumulated):
    precision = accumulated.eval["precision"][:, :, :, 0, -1]
    ap, ap50, ap75 = per_class_ap(accumulated), per_class_ap(accumulated, 0.5), per_class_ap(accumulated, 0.75)
    with_truth = [k for k in range(precision.shape[2]) if (precision[:, :, k] > -1).any()]
    assert 0 < len(with_truth) < precision.shape[2]  # minicoco lists all 80 categories; a few have boxes
    assert len(ap) == len(ap50) == len(with_truth)
    for k in with_truth:
        name = accumulated.cocoGt.cats[accumulated.params.catIds[k]]["name"]
        assert ap[name] == precision[:, :, k].mean()
        assert ap50[name] == precision[0, :, k].mean() and ap75[name] == precision[5, :, k].mean()
    # A category with ground truth has no -1 in its slice, so the per-class means average to COCO's numbers.
    assert np.mean(list(ap50.values())) == pytest.approx(accumulated.stats[1], rel=1e-12)
    with pytest.raises(ValueError, match="iou_threshold: expected one of COCOeval's thresholds .* got 0.45"):
        per_class_ap(accumulated, 0.45)


def _hand_built() -> tuple[COCO, np.ndarray]:
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    images = [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 200},
              {"id": 2, "file_name": "b.jpg", "width": 200, "height": 200},
              {"id": 3, "file_name": "c.jpg", "width": 200, "height": 200}]
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 100]},  # cat, found as cat
        {"image_id": 1, "category_id": 7, "bbox": [100, 100, 100, 100]},  # dog, taken for a cat
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 50, 50]},  # dog, missed (its detection scores 0.2)
        {"image_id": 2, "category_id": 3, "bbox": [100, 0, 100, 100], "iscrowd": 1},  # crowd: not counted
        {"image_id": 3, "category_id": 3, "bbox": [0, 0, 100, 100]},  # cat, two detections: one matches
    ]
    for i, a in enumerate(anns, start=1):
        a.update(id=i, area=a["bbox"][2] * a["bbox"][3], iscrowd=a.get("iscrowd", 0))
    coco = load_annotations({"images": images, "annotations": anns, "categories": cats})
    rows = np.array([
        # image, x, y, w, h, score, category
        [1, 0, 0, 100, 100, 0.9, 3],  # IoU 1 with the cat: cat -> cat
        [1, 100, 100, 100, 90, 0.8, 3],  # IoU 0.9 with the dog: dog -> cat
        [1, 0, 150, 40, 40, 0.7, 7],  # on nothing: background -> dog
        [2, 0, 0, 50, 50, 0.2, 7],  # score 0.2 is not above 0.25: ignored, the dog is missed
        [2, 120, 20, 40, 40, 0.9, 7],  # inside the crowd region: not scored
        [3, 0, 0, 100, 100, 0.6, 3],  # the cat
        [3, 0, 0, 100, 60, 0.95, 7],  # IoU 0.6 with the same cat, but the first pair has IoU 1: background -> dog
    ], dtype=np.float64)
    return coco, rows


def test_confusion_matrix_hand_built_case():
    coco, rows = _hand_built()
    result = confusion_matrix(coco, rows, [1, 2, 3])
    assert result.labels == ["cat", "dog", "background"]
    assert (result.iou_threshold, result.score_threshold) == (0.45, 0.25)
    # rows: true cat, dog, background; columns: predicted cat, dog, background
    np.testing.assert_array_equal(result.matrix, [[2, 0, 0],
                                                  [1, 0, 1],
                                                  [0, 2, 0]])
    # With the score threshold below 0.2 the missed dog is found. Above 0.9 (strictly: 0.9 itself is out) only the
    # 0.95 dog detection is left; matching ignores classes, so it takes the cat of image 3 for a dog.
    np.testing.assert_array_equal(confusion_matrix(coco, rows, [1, 2, 3], score_threshold=0.1).matrix,
                                  [[2, 0, 0], [1, 1, 0], [0, 2, 0]])
    np.testing.assert_array_equal(confusion_matrix(coco, rows, [1, 2, 3], score_threshold=0.9).matrix,
                                  [[0, 1, 1], [0, 0, 2], [0, 0, 0]])
    # A strict IoU threshold of 0.95 leaves the dog (IoU 0.9) unmatched: missed, and its detection a false alarm.
    np.testing.assert_array_equal(confusion_matrix(coco, rows, [1, 2, 3], iou_threshold=0.95).matrix,
                                  [[2, 0, 0], [0, 0, 2], [1, 2, 0]])
    assert confusion_matrix(coco, rows, [1]).matrix.sum() == 3  # only the images asked for
    with pytest.raises(ValueError, match="detections: expected category ids of the ground truth, got 1 others: 9"):
        confusion_matrix(coco, np.array([[1, 0, 0, 5, 5, 0.9, 9]]), [1])
    with pytest.raises(ValueError, match=r"iou_threshold: expected a number in \[0, 1\), got 1.5"):
        confusion_matrix(coco, rows, [1], iou_threshold=1.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, 3, image_size=(96, 96), seed=3), root / "images"


@pytest.fixture(scope="module")
def small_model():
    # Untrained: what matters here is the files and their agreement with COCOeval, not the accuracy.
    return build_model("ssdlite320_mobilenet_v2", pretrained=False, class_names=["circle", "square", "triangle"])


def test_evaluate_writes_plots_and_reports_stages(small_model, shapes, tmp_path, capsys):
    annotations, images = shapes
    result = evaluate(small_model, images, annotations, out_dir=tmp_path, plots=True, progress=True, verbose=False)
    printed = capsys.readouterr().out
    for stage in ("evaluate: reading annotations", "evaluate: 3 images, ", "evaluate: detecting 3 images",
                  "evaluate: scoring ", "evaluate: wrote pr_curve.png, confusion_matrix.png, confusion_matrix.json"):
        assert stage in printed
    for name in ("pr_curve.png", "confusion_matrix.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary files, none left behind
    saved = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert saved["classes"] == ["circle", "square", "triangle", "background"]
    assert saved["matrix"] == result.confusion.matrix.tolist()
    assert (saved["iou_threshold"], saved["score_threshold"]) == (0.45, 0.25)
    # Every true object is counted once, in its row (matched, confused or missed).
    truth = load_annotations(annotations)
    per_class = [len(truth.getAnnIds(catIds=[c])) for c in sorted(truth.cats)]
    assert result.confusion.matrix[:3].sum(axis=1).tolist() == per_class
    assert result.pr_curves.ap == pytest.approx(result.stats[0], rel=1e-12, abs=1e-15)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["per_class_ap50"] == result.per_class_ap50 and set(result.per_class_ap50) == set(result.per_class_ap)
    # A folder of its own for the plots; by default (plots=False) none are written, even with out_dir.
    evaluate(small_model, images, annotations, plots=tmp_path / "plots", progress=False)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion_matrix.json", "confusion_matrix.png", "pr_curve.png"]
    quiet = evaluate(small_model, images, annotations, out_dir=tmp_path / "none", progress=False)  # plots=False
    assert quiet.plots == [] and not (tmp_path / "none" / "pr_curve.png").exists()
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match=r"confusion_score: expected a number in \[0, 1\), got -0.1"):
        evaluate(small_model, images, annotations, confusion_score=-0.1, progress=False)


def test_evaluate_command_plot_options(small_model, shapes, tmp_path, monkeypatch, capsys):
    import ssd.registry

    monkeypatch.setattr(ssd.registry, "build_model", lambda name, **options: small_model)
    annotations, images = shapes
    base = ["evaluate", "--model", "ssdlite320_mobilenet_v2", "--images", str(images), "--annotations",
            str(annotations), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--no-plots", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "a" / "pr_curve.png").exists() and (tmp_path / "a" / "metrics.json").exists()
    assert main([*base, "--out", str(tmp_path / "b"), "--confusion-iou", "0.6", "--confusion-score", "0.5"]) == 0
    assert json.loads((tmp_path / "b" / "confusion_matrix.json").read_text())["iou_threshold"] == 0.6
    assert "pr_curve.png, confusion_matrix.png, confusion_matrix.json in" in capsys.readouterr().out
    assert main([*base, "--confusion-score", "1"]) == 2
    assert "--confusion-score: expected a number in [0, 1), got 1.0" in capsys.readouterr().err
    assert main(["evaluate", "--images", str(images)]) == 2
    assert "--images/--annotations: expected both (or --data DATA.yaml), got only one" in capsys.readouterr().err
    assert main([*base, "--split", "train"]) == 2
    assert "--split: expected with --data DATA.yaml, got --split train alone" in capsys.readouterr().err
