"""The command line as one package: ``--version``/``--help`` without torch, one error style, and detect's options
that mirror the Python API (--classes/--classes-by, --iou, --max-det, --agnostic-nms, --save-crop, --save-txt,
--save-csv, --show), each checked on real photos with a checkpoint that detects (a person and cats)."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ssd.boxes import box_iou
from ssd.cli import COMMANDS, build_parser, main
from ssd.data.coco import COCO_CATEGORY_IDS, COCO_NAMES

from helpers import REPO
from helpers.checkpoints import save_detecting_checkpoint

NO_TORCH = """
import sys, time
started = time.perf_counter()
sys.argv = ["ssd", *sys.argv[1:]]
from ssd.cli import main
try:
    main()
except SystemExit as exit:
    code = exit.code
took = time.perf_counter() - started
print("TORCH" if "torch" in sys.modules else "NO-TORCH", "NUMPY" if "numpy" in sys.modules else "NO-NUMPY",
      f"{took:.3f}", code, file=sys.stderr)
"""


def _run_bare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [["--version"], ["--help"], *[[name, "--help"] for name in
                                                                 ("detect", "evaluate", "train", "make-shapes",
                                                                  "export")]])
def test_version_and_help_import_no_torch(args):
    done = _run_bare(*args)
    *_, last = done.stderr.strip().splitlines()
    torch_loaded, numpy_loaded, _, code = last.split()
    assert (torch_loaded, numpy_loaded, code) == ("NO-TORCH", "NO-NUMPY", "0"), done.stderr
    if args == ["--version"]:
        assert done.stdout.strip() == f"ssd {__import__('ssd').__version__}"
    else:
        assert done.stdout.startswith("usage: ssd")


def test_version_answers_within_a_second_as_a_process():
    # The whole process, interpreter start included; 1 s is what the issue asks. The machine running the suite may
    # be busy, so the best of three runs counts.
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ssd", "--version"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        best = min(best, time.perf_counter() - started)
        assert done.returncode == 0, done.stderr
    assert best < 1.0, best


def test_every_command_is_registered_once_and_shares_the_options():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps the subparsers here
    assert list(commands) == ["detect", "evaluate", "train", "make-shapes", "export", "convert", "benchmark"]
    assert COMMANDS == ("detect", "evaluate", "train", "export", "convert", "benchmark")
    for name in ("detect", "evaluate", "train"):
        options = {o for action in commands[name]._actions for o in action.option_strings}
        assert {"--model", "--checkpoint", "--device", "--precision", "--batch-size"} <= options, name
    assert {"--batch-size", "--batch"} <= {o for a in commands["export"]._actions for o in a.option_strings}
    for name in ("detect", "evaluate"):
        options = {o for action in commands[name]._actions for o in action.option_strings}
        assert "--half" in options


@pytest.mark.parametrize(("argv", "message"), [
    (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "error: the following arguments are required: COMMAND"),
    (["detect", "--precision", "fp64"], "error: argument --precision: invalid choice: 'fp64'"),
    (["convert", "--from", "csv", "--to", "coco", "--data", "d.yaml", "--out", "a.json"],
     "error: argument --from: invalid choice: 'csv'"),
    (["export", "--batch-size", "x", "--out", "m.onnx"], "error: argument --batch-size/--batch: invalid int value"),
    (["export", "--model", "yolo", "--out", "m.onnx"], "error: argument --model: invalid choice: 'yolo'"),
])
def test_usage_errors_are_one_line_and_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert "usage:" not in err


def test_evaluate_needs_annotations_with_images_or_data(capsys):
    # Not argparse's "required": --data DATA.yaml stands for both, so the command checks the pair itself.
    assert main(["evaluate", "--images", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --images/--annotations: expected both (or --data DATA.yaml), got only one\n"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_detecting_checkpoint(tmp_path_factory.mktemp("ckpt") / "detecting.pt")


@pytest.fixture()
def detect(checkpoint, monkeypatch, photos, tmp_path):
    """``ssd detect PHOTOS ARGS --out OUT`` in this process; returns (status, OUT, detections.json or None)."""
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))

    def run(*args: str) -> tuple[int, pathlib.Path, dict | None]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        code = main(["detect", str(photos / "chelsea.png"), str(photos / "astronaut.jpg"), "--out", str(out),
                     "--device", "cpu", *args])
        report = out / "detections.json"
        return code, out, json.loads(report.read_text()) if report.exists() else None

    return run


def _names(report: dict) -> list[list[str]]:
    return [[d["name"] for d in image["detections"]] for image in report["images"]]


def test_saved_crops_labels_and_csv_agree_with_the_report(detect, photos):
    code, out, report = detect("--save-crop", "--save-txt", "--save-csv", "--max-det", "4")
    assert code == 0
    assert [len(names) for names in _names(report)] == [4, 4]  # --max-det
    # CSV: one row per detection of the report, in its order, the box as x1 y1 x2 y2 pixels.
    with open(out / "detections.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    expected = [(image["file"], d["name"], d["category_id"], d["score"], d["bbox"])
                for image in report["images"] for d in image["detections"]]
    assert len(rows) == len(expected) == 8
    for row, (file, name, category, score, (x, y, w, h)) in zip(rows, expected):
        assert (row["file"], row["name"], int(row["category_id"]), float(row["score"])) == (file, name, category,
                                                                                             score)
        np.testing.assert_allclose([float(row[k]) for k in ("x1", "y1", "x2", "y2")], [x, y, x + w, y + h],
                                   atol=0.011)  # both rounded to 2 decimals
    # YOLO labels: class = label - 1 = its line in classes.txt; the centre and size normalised by the image.
    classes = (out / "labels" / "classes.txt").read_text().splitlines()
    assert classes == list(COCO_NAMES)
    for image in report["images"]:
        stem = pathlib.PurePath(image["picture"]).stem
        lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
        assert len(lines) == len(image["detections"])
        for line, found in zip(lines, image["detections"]):
            index, cx, cy, w, h, score = line.split()
            x, y, bw, bh = found["bbox"]
            assert classes[int(index)] == found["name"] and float(score) == pytest.approx(found["score"], abs=1e-4)
            # The report's bbox is rounded to 0.01 px; the label file's fields to 1e-6 of the side.
            np.testing.assert_allclose([float(cx) * image["width"], float(cy) * image["height"],
                                        float(w) * image["width"], float(h) * image["height"]],
                                       [x + bw / 2, y + bh / 2, bw, bh], atol=0.01 + 1e-6 * 512)
    # Crops: a folder per class, one picture per object, of the box's size, in the input's format.
    crops = sorted((out / "crops").rglob("*.*"))
    assert len(crops) == 8 and {p.parent.name for p in crops} == {"person", "cat"}
    person = Image.open(out / "crops" / "person" / "chelsea-0.png")
    x, y, w, h = report["images"][0]["detections"][0]["bbox"]
    assert abs(person.size[0] - w) <= 2 and abs(person.size[1] - h) <= 2  # whole pixels covering the box
    original = np.asarray(Image.open(photos / "chelsea.png"))
    x1, y1 = int(np.floor(x)), int(np.floor(y))
    assert np.array_equal(np.asarray(person), original[y1:y1 + person.size[1], x1:x1 + person.size[0]])
    assert Image.open(out / "crops" / "cat" / "astronaut-1.jpg").format == "JPEG"


def test_classes_by_name_label_and_coco_id_select_the_same_objects(detect):
    _, _, everything = detect("--no-pictures")
    assert {"person", "cat"} <= {name for names in _names(everything) for name in names}
    cat_label = COCO_NAMES.index("cat") + 1  # 16
    cat_id = COCO_CATEGORY_IDS[cat_label - 1]  # 17, which as a label would be dog
    assert (cat_label, cat_id) == (16, 17)
    runs = [detect("--no-pictures", "--classes", "cat"), detect("--no-pictures", "--classes", str(cat_label)),
            detect("--no-pictures", "--classes", str(cat_id), "--classes-by", "coco-id")]
    for code, _, report in runs:
        assert code == 0
        assert all(set(names) == {"cat"} for names in _names(report))
        assert report["images"] == runs[0][2]["images"]
    # Cats only: the person no longer takes one of the --max-det places.
    _, _, two = detect("--no-pictures", "--classes", "person,cat", "--max-det", "2")
    assert all(sorted(names) == ["cat", "person"] for names in _names(two))
    _, _, dog = detect("--no-pictures", "--classes", str(cat_id))  # 17 as a label is dog: none here
    assert _names(dog) == [[], []]


def _pixel_boxes(image: dict) -> torch.Tensor:
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in image["detections"])])


def test_iou_and_agnostic_nms(detect):
    _, _, default = detect("--no-pictures", "--max-det", "200")
    _, _, loose = detect("--no-pictures", "--max-det", "200", "--iou", "0.95")
    _, _, agnostic = detect("--no-pictures", "--max-det", "200", "--agnostic-nms", "--iou", "0.3")
    _, _, strict = detect("--no-pictures", "--max-det", "200", "--iou", "0.3")
    for plain, more, alone, per_class in zip(default["images"], loose["images"], agnostic["images"],
                                             strict["images"]):
        assert len(more["detections"]) > len(plain["detections"])  # a higher IoU threshold suppresses less
        # Agnostic: no two kept boxes overlap above the threshold, whatever their classes, while per class they do.
        iou = box_iou(_pixel_boxes(alone), _pixel_boxes(alone)).fill_diagonal_(0)
        assert iou.max() <= 0.3 + 1e-3  # the bbox fields are rounded to 0.01 px
        iou = box_iou(_pixel_boxes(per_class), _pixel_boxes(per_class)).fill_diagonal_(0)
        assert iou.max() > 0.3
        kept = {(d["name"], tuple(d["bbox"])) for d in alone["detections"]}
        assert kept < {(d["name"], tuple(d["bbox"])) for d in per_class["detections"]}


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "unicorn"], "error: --classes: expected names of this model's classes"),
    (["--classes", "0"], "error: --classes: expected labels 1..80 (label 0 is background), got 0"),
    (["--classes", "12", "--classes-by", "coco-id"], "error: --classes: expected category ids of this model's "
                                                     "classes (1-11, 13-25,"),
    (["--classes", "cat,,dog"], "error: --classes: expected class names or numbers separated by commas"),
    (["--iou", "0"], "error: --iou: expected a number in (0, 1]"),
    (["--max-det", "0"], "error: --max-det: expected an integer >= 1"),
    (["--half", "--model", "m.onnx"], "error: --half: expected none with an exported --model file"),
    (["--precision", "fp16", "--model", "m.onnx"], "error: --precision: expected fp32 (or bf16 with OpenVINO) for an "
                                                   "exported --model file, got fp16"),
])
def test_bad_detect_options_are_one_line_before_any_output(detect, capsys, args, message):
    code, out, _ = detect(*args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_show_without_a_display_says_so_before_any_work(detect, monkeypatch, capsys):
    if not sys.platform.startswith("linux"):
        pytest.skip("the display check is Linux's DISPLAY / WAYLAND_DISPLAY")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    code, out, _ = detect("--show")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --show: expected a display") and err.count("\n") == 1
    assert not out.exists()


def test_backend_with_a_model_name_is_refused(detect, capsys):
    code, out, _ = detect("--backend", "onnxruntime")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --backend: expected it only with an exported --model file")
    assert not out.exists()


def test_export_half_is_for_openvino_only(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "m.onnx"), "--half"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --half: expected --format openvino (ONNX files are written in fp32), got --format onnx\n"
    assert list(tmp_path.iterdir()) == []


def test_out_naming_a_file_is_refused_before_any_work(checkpoint, photos, tmp_path, monkeypatch, capsys):
    import ssd.registry

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before --out was checked")

    monkeypatch.setattr(ssd.registry, "build_model", refuse)
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep")
    for argv in (["detect", str(photos / "chelsea.png"), "--out", str(a_file)],
                 ["evaluate", "--images", str(photos), "--annotations", str(a_file), "--out", str(a_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out: expected a folder") and str(a_file) in err, err
    assert a_file.read_text() == "keep"


def test_streaming_run_writes_csv_and_labels_too(detect):
    code, out, _ = detect("--jsonl", "--save-csv", "--save-txt", "--no-pictures", "--max-det", "3")
    assert code == 0
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    with open(out / "detections.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert [(r["file"], r["name"]) for r in rows] == [(record["file"], d["name"]) for record in records
                                                     for d in record["detections"]]
    assert len(rows) == 6
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["astronaut.txt", "chelsea.txt", "classes.txt"]


# The Python API behind the options.

def test_yolo_lines_are_label_minus_one_and_normalised():
    from ssd import Detections

    found = Detections(np.array([[10, 20, 50, 80], [0, 0, 200, 100]], dtype=np.float32),
                       np.array([0.9, 0.5], dtype=np.float32), np.array([17, 1]), (100, 200))
    # Box 1: centre (30, 50) and size 40 x 60 in a 200 x 100 image; label 17 (dog) is class 16.
    assert found.to_yolo_txt() == ("16 0.150000 0.500000 0.200000 0.600000 0.9000\n"
                                   "0 0.500000 0.500000 1.000000 1.000000 0.5000\n")
    assert found.to_yolo_txt(scores=False).splitlines()[1] == "0 0.500000 0.500000 1.000000 1.000000"
    assert COCO_NAMES[16] == found.names[0] == "dog"


@pytest.fixture(scope="module")
def model(checkpoint):
    import ssd

    return ssd.build_model("nvidia_ssd", checkpoint=str(checkpoint))


def test_speed_is_per_image_and_shares_add_up_to_the_totals(model):
    images = [data.chelsea(), data.astronaut(), data.coffee()]
    results = model.detect(images, batch_size=2)  # batches of 2 and 1
    totals = results.stage_times
    for stage in ("preprocess", "inference", "postprocess"):
        shares = [found.speed[stage] for found in results]
        assert sum(shares) == pytest.approx(1000.0 * getattr(totals, stage), rel=1e-9, abs=1e-9)
    # The first batch's forward pass is split evenly between its two images; the third had one to itself.
    assert results[0].speed["inference"] == results[1].speed["inference"]
    assert results[0].speed["preprocess"] == results[1].speed["preprocess"]
    lines = str(results).splitlines()
    assert lines[2].startswith("image 3/3: ") and f"{results[2].speed['inference']:.1f} ms inference" in lines[2]


def test_classes_by_coco_id_and_agnostic_in_the_api(model):
    cat = model.detect(data.chelsea(), classes=["cat"])[0]
    by_id = model.detect(data.chelsea(), classes=[17], classes_by="coco-id")[0]
    by_label = model.detect(data.chelsea(), classes=[16])[0]
    assert len(cat) > 0 and set(cat.names) == {"cat"}
    for other in (by_id, by_label):
        np.testing.assert_array_equal(other.boxes, cat.boxes)
    with pytest.raises(ValueError, match="classes_by: expected one of label, coco-id, got 'name'"):
        model.detect(data.chelsea(), classes=[17], classes_by="name")
    with pytest.raises(ValueError, match=r"classes: expected category ids of this model's classes \(1-11, 13-25"):
        model.detect(data.chelsea(), classes=[12], classes_by="coco-id")  # 12 is one of COCO's unused ids
    plain = model.detect(data.chelsea(), iou_threshold=0.3, max_detections=200)[0]
    agnostic = model.detect(data.chelsea(), iou_threshold=0.3, max_detections=200, agnostic=True)[0]
    overlap = box_iou(torch.from_numpy(agnostic.boxes), torch.from_numpy(agnostic.boxes)).fill_diagonal_(0)
    assert overlap.max() <= 0.3 + 1e-5 < box_iou(torch.from_numpy(plain.boxes),
                                                 torch.from_numpy(plain.boxes)).fill_diagonal_(0).max()
    assert 0 < len(agnostic) < len(plain)
    with pytest.raises(TypeError, match="agnostic: expected True or False"):
        model.detect(data.chelsea(), agnostic="yes")


def test_a_killed_runs_temporaries_in_out_are_swept_and_a_live_ones_kept(checkpoint, monkeypatch, photos, tmp_path):
    # What a SIGKILL in mid-write leaves: the atomic writes' ".NAME.*.tmp" beside pictures, crops and label files.
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    out = tmp_path / "out"
    (out / "crops" / "cat").mkdir(parents=True)
    stale = [out / ".chelsea.png.k1ll3d.tmp", out / "crops" / "cat" / ".chelsea-0.png.x.tmp"]
    young = out / ".astronaut.jpg.wr1t1ng.tmp"  # another run may be writing it now
    mine = out / "notes.tmp"  # not an atomic write's name: the user's
    hour_ago = time.time() - 3601
    for path in (*stale, young, mine):
        path.write_bytes(b"partial")
    for path in (*stale, mine):
        os.utime(path, (hour_ago, hour_ago))
    assert main(["detect", str(photos / "chelsea.png"), "--out", str(out), "--device", "cpu", "--save-crop"]) == 0
    assert not any(path.exists() for path in stale)
    assert young.exists() and mine.exists()
    assert (out / "chelsea.png").is_file()
