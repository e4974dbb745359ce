"""COCO evaluation (``ssd.evaluation``), ``python -m ssd evaluate``, and scale-out with torchrun (evaluate, and
detect streaming JSON Lines), against the minicoco golden set scored by NVIDIA's own evaluation code."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ssd import distributed
from ssd.cli import main
from ssd.evaluation import STAT_NAMES, CocoImages, EvalResult, category_map, evaluate, load_annotations
from ssd.inference.jsonl import JsonlWriter, merge_parts, read_records
from ssd.models.spec import ClassSpec
from ssd.models.ssd300_resnet50 import NVIDIA_SSD300
from ssd.registry import build_model

from helpers import GOLDEN, REPO
from helpers.checkpoints import save_minicoco_checkpoint
from helpers.processes import torchrun

MINICOCO = GOLDEN / "minicoco"
IMAGES = MINICOCO / "images"
ANNOTATIONS = MINICOCO / "instances.json"
NVIDIA = json.loads((MINICOCO / "nvidia_eval.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_minicoco_checkpoint(tmp_path_factory.mktemp("ckpt") / "minicoco.pt")


@pytest.fixture(scope="module")
def model(checkpoint):
    return build_model("nvidia_ssd", checkpoint=str(checkpoint))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> tuple[EvalResult, pathlib.Path]:
    """One single-process fp32 CPU evaluation of minicoco, with its output folder."""
    out = tmp_path_factory.mktemp("eval-1")
    return evaluate(model, IMAGES, ANNOTATIONS, out_dir=out, progress=False, verbose=False), out


@pytest.fixture()
def fast_cli(model, monkeypatch):
    """The CLI building the module's model instead of loading a checkpoint again."""
    import ssd.registry

    monkeypatch.setattr(ssd.registry, "build_model", lambda name, **options: model)


def annotations() -> dict:
    return json.loads(ANNOTATIONS.read_text())


def write_json(path: pathlib.Path, payload) -> pathlib.Path:
    path.write_text(json.dumps(payload))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Golden parity and outputs


def test_golden_parity_with_nvidia_evaluation(reference):
    result, _ = reference
    assert len(result.stats) == 12
    # The stats rank the detections by score, and these test weights give image 100 about 40 detections of one
    # class whose scores lie within 6e-7 of each other (a few float32 ulps of the softmax): their order, and with it
    # which of them COCOeval counts first, follows the convolution kernels (torch 2.5 and 2.14 on one CPU order them
    # differently). Swapping two such detections moves one category's precision at a few recall points of one IoU
    # threshold; over the one category with medium objects and COCO's 10 thresholds that is a few 1e-3 of AP_medium
    # (torch 2.5: 1.1e-3 from NVIDIA's, torch 2.14: 7.7e-4). A real regression (a box, a score, a threshold or the
    # protocol) moves these stats by far more, and the detections themselves are compared exactly in test_decode.
    np.testing.assert_allclose(result.stats, NVIDIA["stats"], atol=3e-3, rtol=0)
    assert result.images == NVIDIA["num_images_scored"] == 6
    assert len(result.detections) == NVIDIA["num_detections"]
    assert result.metrics()["AP"] == result.ap == result.stats[0]
    assert result.images_per_second > 0 and result.seconds > 0
    # Only categories with truths get a row; the table and COCO's summary are kept for printing.
    assert set(result.per_class_ap) == {"dog", "baseball bat", "banana", "potted plant"}
    assert result.summary.count("\n") == 12 and "Average Precision" in result.summary


def test_outputs_are_written_atomically_with_the_documented_keys(reference):
    result, out = reference
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "metrics.json"]  # no temp files left
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"stats", "per_class_ap", "model", "checkpoint", "images", "seconds"} <= set(metrics)
    assert metrics["stats"] == result.stats and metrics["stat_names"] == list(STAT_NAMES)
    assert metrics["model"] == "nvidia_ssd" and metrics["checkpoint"].endswith("minicoco.pt")
    assert metrics["images"] == 6 and metrics["per_class_ap"] == result.per_class_ap
    detections = json.loads((out / "detections.json").read_text())
    assert detections == result.detections
    first = detections[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score"} and len(first["bbox"]) == 4
    # By image id, then by descending score; boxes are not clipped to the picture (NVIDIA's protocol).
    ids = [d["image_id"] for d in detections]
    assert ids == sorted(ids)
    widths = {i["id"]: i["width"] for i in annotations()["images"]}
    assert any(d["bbox"][0] < 0 or d["bbox"][0] + d["bbox"][2] > widths[d["image_id"]] for d in detections)


def test_category_ids_are_mapped_back_to_the_files_own_ids(model, reference, tmp_path):
    # The same set with every category renumbered: matched by name, written with the file's ids, same score.
    data = annotations()
    for category in data["categories"]:
        category["id"] += 1000
    for ann in data["annotations"]:
        ann["category_id"] += 1000
    result = evaluate(model, IMAGES, write_json(tmp_path / "renumbered.json", data), progress=False, verbose=False)
    assert result.stats == reference[0].stats
    assert {d["category_id"] for d in result.detections} == {d["category_id"] + 1000
                                                             for d in reference[0].detections}


def test_bf16_channels_last_runs_the_same_pipeline(model, tmp_path):
    import copy

    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    data = annotations()
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (100, 101)]
    result = evaluate(fast, IMAGES, write_json(tmp_path / "two.json", data), precision="bf16", progress=False,
                      verbose=False)
    assert result.images == 2 and len(result.stats) == 12 and all(-1 <= s <= 1 for s in result.stats)
    assert {d["image_id"] for d in result.detections} == {100, 101}


def test_a_float_resize_rule_is_evaluated_on_whole_images(model, tmp_path):
    # torch_bilinear (torchvision's models) has no lossless uint8 form: the workers ship the images whole, and the
    # evaluation resizes them in the main process as detect does, in batches of mixed sizes.
    import copy
    from dataclasses import replace

    other = copy.deepcopy(model)
    other.spec = replace(model.spec, input=replace(model.spec.input, resize="torch_bilinear"))
    sample = CocoImages(IMAGES, ANNOTATIONS, input_spec=other.spec.input)[0]
    assert sample.error is None and tuple(sample.pixels.shape) == (3, sample.height, sample.width) != (3, 300, 300)
    data = annotations()
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (100, 101)]
    assert len({(i["width"], i["height"]) for i in data["images"]}) == 2
    result = evaluate(other, IMAGES, write_json(tmp_path / "two.json", data), batch_size=2, progress=False,
                      verbose=False)
    assert result.images == 2 and {d["image_id"] for d in result.detections} == {100, 101}


# ---------------------------------------------------------------------------------------------------------------
# The command line, one process and torchrun


def test_cli_with_workers_matches_the_api(reference, fast_cli, tmp_path, capsys):
    code = main(["evaluate", "--images", str(IMAGES), "--annotations", str(ANNOTATIONS), "--out", str(tmp_path),
                 "--workers", "2", "--batch-size", "4", "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stats"] == reference[0].stats
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 6 and out.count("Average Recall") == 6
    assert "dog " in out and "images/s" in out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_evaluate_gives_the_single_process_stats(reference, checkpoint, tmp_path):
    done = torchrun("evaluate", "--images", str(IMAGES), "--annotations", str(ANNOTATIONS), "--out", str(tmp_path),
                    "--no-progress", checkpoint=checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    result, out = reference
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stats"] == result.stats and metrics["world_size"] == 2 and metrics["images"] == 6
    # The same detections. The processes run one intra-op thread, this one maybe more, so scores agree to float
    # rounding only, and these weights give many near-equal scores whose order (and so a cut at 200) may differ.
    theirs = json.loads((tmp_path / "detections.json").read_text())
    assert len(theirs) == len(result.detections)

    def keys(detections):
        return {(d["image_id"], d["category_id"], *(round(v) for v in d["bbox"])) for d in detections}

    assert len(keys(theirs) & keys(result.detections)) >= 0.99 * len(keys(result.detections))
    assert done.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1  # rank 0 alone prints


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_error_on_one_rank_stops_every_rank(checkpoint, tmp_path):
    images, path = _set_with_broken_and_missing(tmp_path)
    data = json.loads(path.read_text())
    data["images"] = [i for i in data["images"] if i["file_name"] != "missing.jpg"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 102]
    done = torchrun("evaluate", "--images", str(images), "--annotations", str(write_json(path, data)), "--out",
                    str(tmp_path / "o"), "--no-progress", checkpoint=checkpoint)
    # Rank 1 reads the broken image; rank 0 would wait for it at the gather, but the error travels with the results.
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # Both ranks hold the error; whichever exits first makes torchrun stop the other, perhaps before it prints.
    assert any(line.startswith(("error: [rank 0] ", "error: [rank 1] ")) for line in errors), done.stderr[-3000:]
    assert all("broken.jpg is not a readable image" in line for line in errors), errors
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_detect_streams_json_lines_per_rank(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(IMAGES.iterdir())[:4]:
        shutil.copy(source, photos)
    out = tmp_path / "out"
    done = torchrun("detect", str(photos), "--out", str(out), checkpoint=checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(str(p) for p in photos.iterdir())
    parts = [read_records(out / f"detections.rank{r}.jsonl") for r in (0, 1)]
    assert [r["file"] for r in parts[0]] == files[0::2] and [r["file"] for r in parts[1]] == files[1::2]
    merged = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["file"] for r in merged] == files
    assert all(set(r) == {"file", "width", "height", "picture", "detections"} for r in merged)
    assert any(r["detections"] for r in merged)
    pictures = sorted(p.name for p in out.iterdir() if p.suffix in (".jpg", ".png"))  # the inputs' own formats
    assert pictures == sorted(r["picture"] for r in merged) and len(pictures) == 4
    assert not (out / "detections.json").exists()


def _lines(path: pathlib.Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_json_lines_survive_a_killed_run_and_resume(checkpoint, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for copy in range(2):  # 8 images, so the run is surely still going when it is killed after 2
        for source in sorted(IMAGES.iterdir())[: 6 - 2 * copy]:
            shutil.copy(source, photos / f"{copy}_{source.name}")
    out = tmp_path / "out"
    part = out / "detections.rank0.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSD_CHECKPOINT": str(checkpoint)}
    env.pop("WORLD_SIZE", None)
    process = subprocess.Popen([sys.executable, "-m", "ssd", "detect", str(photos), "--out", str(out), "--jsonl",
                                "--batch-size", "1", "--no-pictures"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(_lines(part)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(60)
    before = _lines(part)
    assert 2 <= len(before) < 8, "the run should have been killed part-way"
    assert not (out / "detections.jsonl").exists()
    kept = [json.loads(line) for line in before]  # every line a flushed line is a whole record
    # A torn last line, as a kill in the middle of a write leaves, is dropped and cut off on resume.
    with open(part, "a") as fp:
        fp.write('{"file": "' + str(photos / "torn"))

    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    assert main(["detect", str(photos), "--out", str(out), "--resume", "--no-pictures", "--batch-size", "4"]) == 0
    assert f"resuming: {len(kept)} image(s) already done" in capsys.readouterr().out
    after = _lines(part)
    assert after[: len(before)] == before  # nothing done twice, nothing rewritten
    assert sorted(json.loads(line)["file"] for line in after) == sorted(str(p) for p in photos.iterdir())
    merged = read_records(out / "detections.jsonl")
    assert [r["file"] for r in merged] == sorted(str(p) for p in photos.iterdir())


def test_single_process_detect_still_writes_detections_json(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(IMAGES / "000_chelsea.jpg", folder)
    assert main(["detect", str(folder), "--out", str(tmp_path / "out"), "--no-pictures"]) == 0
    report = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [i["picture"] for i in report["images"]] == [None]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.json"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the input


def _set_with_broken_and_missing(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(IMAGES / "000_chelsea.jpg", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = annotations()
    keep = {100: "000_chelsea.jpg", 101: "broken.jpg", 102: "missing.jpg"}
    data["images"] = [{**i, "file_name": keep[i["id"]]} for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    return images, write_json(tmp_path / "set.json", data)


def test_missing_and_corrupt_images_raise_or_are_counted(model, tmp_path):
    images, path = _set_with_broken_and_missing(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 missing: missing\.jpg"):
        evaluate(model, images, path, progress=False, verbose=False)
    data = json.loads(path.read_text())
    data["images"] = [i for i in data["images"] if i["file_name"] != "missing.jpg"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 102]
    without_missing = write_json(tmp_path / "no-missing.json", data)
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        evaluate(model, images, without_missing, progress=False, verbose=False)

    # Through worker processes: the decoding error travels back to this process as a value, not a crash.
    result = evaluate(model, images, path, progress=False, verbose=False, skip_errors=True, out_dir=tmp_path / "o",
                      workers=2)
    assert result.images == 1
    assert sorted(pathlib.Path(f).name for f, _ in result.skipped) == ["broken.jpg", "missing.jpg"]
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert len(metrics["skipped"]) == 2 and metrics["images"] == 1


def _bad_annotation_cases(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, type, str]]:
    data = annotations()
    unknown = annotations()
    unknown["categories"].append({"id": 500, "name": "unicorn"})
    unknown["annotations"][0]["category_id"] = 500
    dangling = annotations()
    dangling["annotations"][0]["category_id"] = 12  # a COCO gap: no such category in the file
    contradicting = annotations()
    for category in contradicting["categories"]:
        if category["id"] == 18:
            category["name"] = "hound"  # COCO's id of "dog", under a name the model does not know
    not_json = tmp_path / "not.json"
    not_json.write_text("{ this is not json")
    return {
        "missing file": (tmp_path / "nowhere.json", FileNotFoundError, "does not exist"),
        "directory": (tmp_path, IsADirectoryError, "got a directory"),
        "invalid json": (not_json, ValueError, "invalid JSON"),
        "not an object": (write_json(tmp_path / "list.json", []), ValueError, "got a JSON list"),
        "no images key": (write_json(tmp_path / "nokey.json", {"annotations": []}), ValueError, "under 'images'"),
        "empty annotations": (write_json(tmp_path / "empty.json", {**data, "annotations": []}), ValueError,
                              "empty annotation set"),
        "no images": (write_json(tmp_path / "noimages.json", {**data, "images": [], "annotations": []}), ValueError,
                      "at least one image"),
        "unknown category": (write_json(tmp_path / "unknown.json", unknown), ValueError, "500 'unicorn'"),
        "contradicting name": (write_json(tmp_path / "contradicting.json", contradicting), ValueError,
                               "agree with the model's for the same ids, got 1 that do not: 18 'hound'"),
        "dangling category": (write_json(tmp_path / "dangling.json", dangling), ValueError, "got 12"),
        "bad bbox": (write_json(tmp_path / "bbox.json", {**data, "annotations": [{**data["annotations"][0],
                                                                                   "bbox": [1, 2]}]}),
                     ValueError, "'bbox' of 4 numbers"),
    }


CASES = ["missing file", "directory", "invalid json", "not an object", "no images key", "empty annotations",
         "no images", "unknown category", "contradicting name", "dangling category", "bad bbox"]


@pytest.mark.parametrize("case", CASES)
def test_bad_annotation_files(model, tmp_path, case):
    path, error, message = _bad_annotation_cases(tmp_path)[case]
    with pytest.raises(error, match=message) as caught:
        evaluate(model, IMAGES, path, progress=False, verbose=False)
    assert path.name in str(caught.value)


@pytest.mark.parametrize("case", ["missing file", "invalid json", "empty annotations", "unknown category",
                                  "contradicting name"])
def test_cli_bad_annotations_one_line_and_status_2(fast_cli, tmp_path, capsys, case):
    path, _, message = _bad_annotation_cases(tmp_path)[case]
    code = main(["evaluate", "--images", str(IMAGES), "--annotations", str(path), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err and path.name in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_images_one_line_and_status_2(fast_cli, tmp_path, capsys):
    images, path = _set_with_broken_and_missing(tmp_path)
    for folder, expected in ((tmp_path / "absent", "absent"), (images, "missing.jpg")):
        assert main(["evaluate", "--images", str(folder), "--annotations", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err
    assert main(["evaluate", "--images", str(images), "--annotations", str(path), "--batch-size", "0"]) == 2
    assert "--batch-size: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["evaluate", "--images", str(images), "--annotations", str(path), "--device", "gpu7"]) == 2
    assert "error: --device: expected cpu, cuda or cuda:N, got 'gpu7'" in capsys.readouterr().err


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        evaluate(model, IMAGES, ANNOTATIONS, batch_size=0)
    with pytest.raises(TypeError, match="workers: expected an integer, got 1.5"):
        evaluate(model, IMAGES, ANNOTATIONS, workers=1.5)
    with pytest.raises(TypeError, match="model: expected a detector"):
        evaluate(torch.nn.Conv2d(3, 3, 1), IMAGES, ANNOTATIONS)
    with pytest.raises(ValueError, match="device: expected cpu, cuda or cuda:N, got 'gpu0'"):
        evaluate(model, IMAGES, ANNOTATIONS, device="gpu0")
    with pytest.raises(TypeError, match="annotations: expected a path"):
        evaluate(model, IMAGES, 42)


# ---------------------------------------------------------------------------------------------------------------
# Pieces: category matching, the dataset, JSON Lines, distributed helpers


def test_category_map_by_id_by_name_and_errors():
    coco = NVIDIA_SSD300.classes
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
    assert category_map(coco, cats) == {17: 18, 1: 1}
    # Own numbering 1..n with COCO names: ids 1 and 2 exist in COCO too, but the names say otherwise.
    assert category_map(coco, [{"id": 1, "name": "dog"}, {"id": 2, "name": "Person"}]) == {17: 1, 1: 2}
    # Known ids whose names contradict them without naming another class (VOC's "tvmonitor" for COCO's "tv"): an
    # error, not a silent match by id.
    with pytest.raises(ValueError, match=r"agree with the model's .* 72 'tvmonitor' \(the model's 72 is 'tv'\)"):
        category_map(coco, [{"id": 72, "name": "tvmonitor"}, {"id": 1, "name": "person"}])
    assert category_map(coco, [{"id": 72, "name": "TV"}, {"id": 1, "name": "person"}]) == {63: 72, 1: 1}
    with pytest.raises(ValueError, match=r"1 unknown: 500 'unicorn'"):
        category_map(coco, [{"id": 1, "name": "person"}, {"id": 500, "name": "unicorn"}])
    numbered = ClassSpec.numbered(3)
    assert category_map(numbered, [{"id": 2, "name": "zebra"}, {"id": 3, "name": "okapi"}]) == {2: 2, 3: 3}
    named = ClassSpec(("cat", "dog"), (1, 2))
    assert category_map(named, [{"id": 7, "name": "dog"}]) == {2: 7}
    with pytest.raises(ValueError, match="one category per class name"):
        category_map(named, [{"id": 7, "name": "dog"}, {"id": 8, "name": "DOG"}])


def test_dataset_skips_images_without_annotations(tmp_path):
    data = annotations()
    data["images"].append({"id": 99, "file_name": "000_chelsea.jpg", "width": 451, "height": 300})
    coco = load_annotations(data)
    plain = CocoImages(IMAGES, coco)
    assert plain.image_ids == [100, 101, 102, 103, 104, 105] and len(plain) == 6
    assert CocoImages(IMAGES, coco, include_empty=True).image_ids[0] == 99
    sample = plain[0]
    assert sample.error is None and sample.pixels.dtype == torch.uint8
    assert tuple(sample.pixels.shape) == (3, 300, 451) and (sample.height, sample.width) == (300, 451)
    resized = CocoImages(IMAGES, coco, input_spec=NVIDIA_SSD300.input)[0]
    assert tuple(resized.pixels.shape) == (3, 300, 300)
    wrong = annotations()
    wrong["images"][0]["width"] = 452
    sample = CocoImages(IMAGES, load_annotations(wrong))[0]
    assert isinstance(sample.error, ValueError) and "expected a 452 x 300 image" in str(sample.error)


def test_dataset_batches_through_a_data_loader():
    from torch.utils.data import DataLoader

    from ssd.evaluation import CocoBatch, collate_samples

    resized = CocoImages(IMAGES, ANNOTATIONS, input_spec=NVIDIA_SSD300.input)
    batches = list(DataLoader(resized, batch_size=4, collate_fn=collate_samples))
    assert all(isinstance(b, CocoBatch) for b in batches) and [len(b.samples) for b in batches] == [4, 2]
    assert batches[0].pixels.shape == (4, 3, 300, 300) and batches[0].samples[0].pixels is None
    # Without resizing, photos of several sizes cannot be stacked: the batch stays a list of samples.
    mixed = next(iter(DataLoader(CocoImages(IMAGES, ANNOTATIONS), batch_size=2, collate_fn=collate_samples)))
    assert isinstance(mixed, list) and [s.image_id for s in mixed] == [100, 101]


def test_json_lines_reading_repair_and_merge(tmp_path):
    part = tmp_path / "detections.rank0.jsonl"
    with JsonlWriter(part) as writer:
        writer.write({"file": "a", "detections": []})
        writer.write({"file": "b", "error": "unreadable"})
    with open(part, "a") as fp:
        fp.write('{"file": "c", "detec')
    assert [r["file"] for r in read_records(part)] == ["a", "b"]
    assert part.read_text().endswith('"detec')
    read_records(part, repair=True)
    assert part.read_text().endswith("}\n")
    with JsonlWriter(tmp_path / "detections.rank3.jsonl") as writer:
        writer.write({"file": "b", "detections": [1]})
        writer.write({"file": "z", "detections": []})  # not among the inputs any more
    merged = merge_parts(tmp_path, ["b", "a"], [{"file": "gone", "error": "no such file"}])
    assert merged == [{"file": "b", "detections": [1]}, {"file": "a", "detections": []},
                      {"file": "gone", "error": "no such file"}]
    assert read_records(tmp_path / "detections.jsonl") == merged


def test_distributed_helpers_in_one_process(monkeypatch):
    assert distributed.shard(list(range(7)), 1, 3) == [1, 4] and distributed.shard("abcde", 0, 2) == ["a", "c", "e"]
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[0, 2\), got 2"):
        distributed.shard([1, 2], 2, 2)
    assert distributed.gather_to_main({"x": 1}) == [{"x": 1}] and distributed.broadcast_from_main(5) == 5
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer environment variable, got 'two'"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is False
    distributed.barrier()
    distributed.cleanup()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device_for_rank("cuda") == torch.device("cuda", 3)
    assert distributed.device_for_rank("cpu") == torch.device("cpu")


def test_every_device_argument_is_checked_in_one_place(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto") == distributed.resolve_device(None)
    with pytest.raises(ValueError, match="--device: expected cpu, cuda or cuda:N, got 'gpu7'"):
        distributed.resolve_device("gpu7", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device: expected a device this machine has, got 'cuda' \(CUDA is not"):
        distributed.resolve_device("cuda")
    with pytest.raises(ValueError, match="device: expected a device this machine has, got 'cuda'"):
        distributed.setup(torch.device("cuda"))
    assert distributed.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="--device: expected cuda:0 to cuda:1, got 'cuda:2'"):
        distributed.resolve_device("cuda:2", "--device")


def test_no_detections_at_all_scores_zero():
    from ssd.evaluation.coco import _coco_eval

    coco = load_annotations(ANNOTATIONS)
    stats, per_class, summary = _coco_eval(coco, np.empty((0, 7)), sorted(coco.imgs))
    assert stats[0] == 0.0 and stats[8] == 0.0 and set(per_class.values()) == {0.0}
    assert summary.count("\n") == 12


@pytest.mark.parametrize("rule", ["antialias", "bilinear"])
def test_resize_uint8_gives_the_pixels_preprocessing_normalises(rule):
    from dataclasses import replace

    from ssd.transforms import preprocess_for_detection, resize_uint8

    spec = replace(NVIDIA_SSD300.input, resize=rule)
    image = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3, 97, 141), dtype=np.uint8))
    small = resize_uint8(image, spec)
    assert small.dtype == torch.uint8 and small.shape == (3, 300, 300)
    torch.testing.assert_close(preprocess_for_detection([small], spec),
                               preprocess_for_detection([image], spec), rtol=0, atol=0)
    with pytest.raises(ValueError, match="image: expected a 3 x H x W uint8 CPU tensor"):
        resize_uint8(image.float(), spec)
