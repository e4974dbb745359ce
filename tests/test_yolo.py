"""YOLO-format data (Ultralytics' layout) on disk: the data file, labels converted into the one COCO structure (boxes
equal to the arithmetic), bad label lines named by file and line, hostile YAML, ``convert --from yolo --to coco``
in a real process, and ``train`` / ``evaluate --data``."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from ssd.cli import main
from ssd.data import yolo
from ssd.data.coco_format import CocoDetectionDataset
from ssd.data.yolo import YoloDataError, convert_yolo_to_coco, label_path, load_yolo_split, read_data_yaml

from helpers import REPO

NAMES = ["person", "cat", "cup"]
# image name -> (skimage photo, size WxH to save, EXIF orientation, label lines)
IMAGES = {
    "train/astronaut.jpg": ("astronaut", (80, 60), 1, ["0 0.5 0.5 0.4 0.6", "2 0.25 0.75 0.1 0.2"]),
    "train/chelsea.png": ("chelsea", (90, 60), 1, ["1 0.6 0.4 0.5 0.5"]),
    "train/coffee.jpg": ("coffee", (64, 48), 6, ["2 0.5 0.5 0.5 0.5"]),  # stored 64 x 48, upright 48 x 64
    "train/rocket.jpg": ("rocket", (50, 70), 1, None),  # no label file: background
    "val/chelsea.jpg": ("chelsea", (70, 50), 1, ["1 0.5 0.5 0.8 0.8", "", "0 0.1 0.1 0.2 0.2"]),
    "val/astronaut.jpg": ("astronaut", (60, 60), 1, ["0 0.5 0.5 0.6 0.9"]),
}


def _write_dataset(root: pathlib.Path, names: object = None) -> pathlib.Path:
    for name, (photo, size, orientation, lines) in IMAGES.items():
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(getattr(skdata, photo)()).convert("RGB").resize(size)
        if orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = orientation
            picture.save(path, exif=exif)
        else:
            picture.save(path)
        if lines is not None:
            labels = label_path(path)
            labels.parent.mkdir(parents=True, exist_ok=True)
            labels.write_text("\n".join(lines) + "\n")
    names = NAMES if names is None else names
    if isinstance(names, dict):  # YAML's own mapping, integer keys as Ultralytics writes them
        text = "\n" + "".join(f"  {k}: {v}\n" for k, v in names.items())
    else:
        text = json.dumps(names) + "\n"
    data = root / "data.yaml"
    data.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {text}")
    return data


@pytest.fixture()
def dataset(tmp_path) -> pathlib.Path:
    return _write_dataset(tmp_path / "set")


def test_label_path_is_ultralytics_rule():
    assert label_path("/d/images/train/a.jpg") == pathlib.Path("/d/labels/train/a.txt")
    assert label_path("/images/d/images/x/a.b.png") == pathlib.Path("/images/d/labels/x/a.b.txt")
    assert label_path("/d/pics/a.jpg") == pathlib.Path("/d/pics/a.txt")


def test_conversion_gives_the_arithmetic_boxes(dataset, tmp_path):
    out = tmp_path / "out" / "train.json"
    split = convert_yolo_to_coco(dataset, "train", out)
    coco = json.loads(out.read_text())
    assert split.images_dir == dataset.parent and split.missing_labels == 1 and split.boxes == 4
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == NAMES
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]  # class c is category c + 1
    images = {i["file_name"]: i for i in coco["images"]}
    assert sorted(images) == sorted(f"images/{n}" for n in IMAGES if n.startswith("train/"))
    assert (images["images/train/coffee.jpg"]["width"], images["images/train/coffee.jpg"]["height"]) == (48, 64)
    for name, (_, size, orientation, lines) in IMAGES.items():
        if not name.startswith("train/"):
            continue
        image = images[f"images/{name}"]
        width, height = size if orientation == 1 else size[::-1]
        assert (image["width"], image["height"]) == (width, height)
        got = [(a["category_id"], a["bbox"]) for a in coco["annotations"] if a["image_id"] == image["id"]]
        want = []
        for line in lines or []:
            cls, cx, cy, w, h = (float(v) for v in line.split())
            want.append((int(cls) + 1, [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]))
        assert got == want  # exactly: the same float64 arithmetic
    # The training dataset reads the file through the one parser; its boxes are the same, as x1 y1 x2 y2.
    train = CocoDetectionDataset(out, split.images_dir)
    assert train.class_names == NAMES and len(train) == 4 and train.stats["images_without_boxes"] == 1
    index = [i for i in range(len(train)) if train.image_path(i).name == "coffee.jpg"][0]
    pixels, target = train[index]
    assert tuple(pixels.shape) == (3, 64, 48)  # upright, as the declared size says
    np.testing.assert_allclose(target["boxes"].numpy(), [[12, 16, 36, 48]])
    assert target["labels"].tolist() == [3]


def test_names_as_mapping_and_list_files(tmp_path):
    data = _write_dataset(tmp_path / "set", names={0: "person", 1: "cat", 2: "cup"})
    listing = tmp_path / "set" / "val.txt"
    listing.write_text("./images/val/chelsea.jpg\n\n" + str(tmp_path / "set/images/val/astronaut.jpg") + "\n")
    data.write_text(data.read_text().replace("val: images/val", "val: val.txt") + "nc: 3\n")
    parsed = read_data_yaml(data)
    assert parsed.names == tuple(NAMES)
    split = load_yolo_split(parsed, "val")
    assert sorted(i["file_name"] for i in split.annotations.images) == ["images/val/astronaut.jpg",
                                                                       "images/val/chelsea.jpg"]
    assert split.boxes == 3  # the empty line is skipped


@pytest.mark.parametrize("line, problem", [
    ("0 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3", "expected 5 fields 'class cx cy w h', got 7 (a segmentation polygon?"),
    ("3 0.5 0.5 0.2 0.2", "expected a class index 0..2 (the data file has 3 names), got '3'"),
    ("cat 0.5 0.5 0.2 0.2", "expected a class index 0..2 (the data file has 3 names), got 'cat'"),
    ("-1 0.5 0.5 0.2 0.2", "expected a class index 0..2"),
    ("1 0.5 1.5 0.2 0.2", "expected cy in 0..1 (a fraction of the image's size), got '1.5'"),
    ("1 0.5 0.5 -0.2 0.2", "expected w in 0..1"),
    ("1 0.5 0.5 0.2 nan", "expected h in 0..1 (a fraction of the image's size), got 'nan'"),
    ("1 0.5 x 0.2 0.2", "expected cy to be a number, got 'x'"),
])
def test_bad_label_lines_name_file_and_line(dataset, line, problem):
    labels = dataset.parent / "labels" / "val" / "chelsea.txt"
    labels.write_text(f"1 0.5 0.5 0.8 0.8\n{line}\n")
    with pytest.raises(YoloDataError) as error:
        load_yolo_split(dataset, "val")
    assert f"{labels}:2: {problem}" in str(error.value)
    assert str(error.value).startswith("1 bad label line(s) in 'val' of data file")


def test_every_bad_line_is_counted(dataset):
    labels = dataset.parent / "labels" / "val" / "astronaut.txt"
    labels.write_text("".join(f"{i} 0.5 0.5 0.1 0.1\n" for i in range(10)))  # classes 3..9 are unknown
    message = str(pytest.raises(YoloDataError, load_yolo_split, dataset, "val").value)
    assert message.startswith("7 bad label line(s)") and f"{labels}:4: " in message and f"{labels}:9:" not in message


@pytest.mark.parametrize("text, problem", [
    ("a: &x [1]\nnames: *x\ntrain: images/train\n", "aliases (*name) are not accepted"),
    ("train: images/train\n", "expected 'names' as a list or a mapping of index to name, got nothing"),
    ("train: images/train\nnames: [a, b]\nnc: 3\n", "expected 'nc' to equal the number of names (2), got 3"),
    ("train: images/train\nnames: {0: a, 2: b}\n", "expected 'names' keys to be the class indices 0..1"),
    ("train: images/train\nnames: [a, yes]\n", "names[1]: expected a non-empty class name, got True (quote it"),
    ("names: [a]\n", "expected at least one of 'train', 'val', 'test', got none"),
    ("- just\n- a list\n", "expected a mapping with 'train', 'val' and 'names', got list"),
    ("train: [unclosed\n", "expected YAML, got"),
])
def test_bad_data_files(tmp_path, text, problem):
    path = tmp_path / "data.yaml"
    path.write_text(text)
    with pytest.raises(YoloDataError, match=None) as error:
        read_data_yaml(path)
    assert problem in str(error.value) and str(path) in str(error.value)


def test_data_file_guards(tmp_path, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("names: [a]\ntrain: x\n" + "#" * 2000 + "\n")
    monkeypatch.setattr(yolo, "MAX_DATA_YAML_BYTES", 1000)
    with pytest.raises(YoloDataError, match="expected a data file of at most 1,000 bytes, got 2,0"):
        read_data_yaml(big)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(YoloDataError, match="expected a regular data file, got a FIFO"):
        read_data_yaml(fifo)  # refused before a byte is read: this does not hang
    with pytest.raises(FileNotFoundError, match="expected a data file, got a path that does not exist"):
        read_data_yaml(tmp_path / "missing.yaml")


def test_convert_command_in_a_process(dataset, tmp_path):
    out = tmp_path / "val.json"
    done = subprocess.run([sys.executable, "-m", "ssd", "convert", "--from", "yolo", "--to", "coco", "--data",
                           str(dataset), "--split", "val", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "val: 2 image(s), 3 box(es) of 3 class(es)" in done.stdout and f"wrote {out}" in done.stdout
    assert len(json.loads(out.read_text())["annotations"]) == 3
    (dataset.parent / "labels" / "val" / "chelsea.txt").write_text("1 0.5 0.5 0.8\n")
    bad = subprocess.run([sys.executable, "-m", "ssd", "convert", "--from", "yolo", "--to", "coco", "--data",
                          str(dataset), "--out", str(tmp_path / "bad.json")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and not (tmp_path / "bad.json").exists()
    assert bad.stderr.count("\n") == 1 and "chelsea.txt:1: expected 5 fields" in bad.stderr


@pytest.mark.timeout(600)
def test_train_and_evaluate_with_data(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--model", "ssdlite320_mobilenet_v2", "--checkpoint", "none",
            "--out", str(out), "--epochs", "1", "--batch-size", "2", "--max-iterations-per-epoch", "1",
            "--device", "cpu", "--no-augment", "--workers", "0"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "YOLO data train: 4 image(s), 4 box(es)" in printed and "YOLO data val: 2 image(s), 3 box(es)" in printed
    assert (out / "data" / "train.json").is_file() and (out / "data" / "val.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "validation" for r in records)  # the val split validated
    assert main(["train", "--data", str(dataset), "--images", str(dataset.parent), "--out", str(tmp_path / "x")]) == 2
    assert "--data: expected alone" in capsys.readouterr().err
    # The trained checkpoint scores the val split straight from the YOLO files.
    assert main(["evaluate", "--model", "ssdlite320_mobilenet_v2", "--checkpoint", str(out / "last.pt"),
                 "--data", str(dataset), "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 2 and set(metrics["per_class_ap"]) == {"person", "cat"}
    assert (tmp_path / "eval" / "confusion_matrix.json").is_file()
