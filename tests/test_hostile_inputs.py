"""Hostile inputs, end to end: files that are not files, decoders that raise anything, lying pixels, rotated photos,
models that must not change, memory that must stay bounded, and a command line that never eats its own output.

Everything runs on real files in temporary folders; the command line runs as ``python -m ssd`` subprocesses.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features
from skimage import data

from ssd.backends.plan import channels_last_copy
from ssd.cli import main
from ssd.compat.nvidia import prepare_input
from ssd.inference.detect import detect
from ssd.inference.runs import JsonReport
from ssd.io.files import atomic_path, write_json
from ssd.io.images import ImageLoadError, load_image, load_rgb, load_uint8, readable_extensions
from ssd.models import NVIDIA_SSD300, SSD300
from ssd.models.base import Detector
from ssd.models.spec import MAX_DETECTIONS_LIMIT

from helpers import REPO
from helpers.checkpoints import detecting_state_dict, save_detecting_checkpoint
from helpers.detections import assert_detect_results_agree, raw_outputs_recorder

CHELSEA = data.chelsea()  # 300 x 451: landscape, so a rotation shows in the shape


def write_picture(path: pathlib.Path, pixels: np.ndarray, **options) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def rotated_jpeg(path: pathlib.Path) -> pathlib.Path:
    """chelsea stored landscape, with EXIF orientation 6: viewers show it turned 90 degrees clockwise (portrait)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return write_picture(path, CHELSEA, format="JPEG", quality=95, exif=exif.tobytes())


class StubDetector(Detector):
    """NVIDIA's spec on a network that costs nothing: for the tests of memory, warnings and non-finite outputs.

    ``forward`` gives fixed predictions: nothing found by default; with ``nan_boxes``, ten confident "person"
    anchors of which the first five have NaN offsets.
    """

    def __init__(self, nan_boxes: bool = False) -> None:
        super().__init__(NVIDIA_SSD300)
        self.conv = torch.nn.Conv2d(3, 1, 1)  # detect reads device and dtype from the first convolution
        self.nan_boxes = nan_boxes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = self.spec.anchors.num_anchors
        locs = torch.zeros(x.shape[0], 4, anchors)
        confs = torch.zeros(x.shape[0], self.spec.num_classes, anchors)
        if self.nan_boxes:
            confs[:, 1, :10] = 20.0
            locs[:, :, :5] = float("nan")
        return locs, confs


@pytest.fixture(scope="module")
def model() -> SSD300:
    net = SSD300().eval()
    net.load_state_dict(detecting_state_dict())
    return net


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.timeout(20)
def test_fifo_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: reading would block forever
    with pytest.raises(ImageLoadError, match="expected a regular image file, got a FIFO") as info:
        load_rgb(fifo)
    assert str(fifo) in str(info.value)


@pytest.mark.timeout(20)
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_device_is_refused_without_reading():
    with pytest.raises(ImageLoadError, match="/dev/zero: expected a regular image file, got a character device"):
        load_uint8("/dev/zero")


@pytest.mark.parametrize("error", [RuntimeError("decoder state"), NotImplementedError("no such mode"),
                                   MemoryError(), AttributeError("'NoneType' object has no attribute 'x'")])
def test_any_decoder_failure_is_image_load_error(tmp_path, monkeypatch, error):
    path = write_picture(tmp_path / "chelsea.png", CHELSEA)

    def load(self):
        raise error

    # Pillow's decoders can raise these on hostile bytes (a lying header asks for gigabytes: MemoryError); raising
    # them from the real load() of a real file stands in for finding such a file for each.
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageLoadError, match="is not a readable image") as info:
        load_uint8(path)
    assert str(path) in str(info.value) and isinstance(info.value.__cause__, type(error))


def test_header_parser_failure_is_image_load_error(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    path = write_picture(tmp_path / "chelsea.png", CHELSEA)

    def broken_open(self):
        raise RuntimeError("parser gave up")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", broken_open)
    with pytest.raises(ImageLoadError, match="RuntimeError: parser gave up") as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_postscript_is_refused_without_running_ghostscript(tmp_path):
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n%%EOF\n")
    with pytest.raises(ImageLoadError, match="drawing.eps is not a readable image: PostScript/EPS is not decoded"):
        load_uint8(eps)


@pytest.mark.parametrize("source", [
    torch.full((3, 8, 8), 200.0),
    torch.from_numpy(CHELSEA).permute(2, 0, 1).float(),  # the classic mistake: 0..255 as float
    np.full((8, 8, 3), 200.0, np.float32),
])
def test_float_pixels_in_0_255_are_refused_not_rescaled(source, model):
    with pytest.raises(ValueError, match=r"expected float pixel values in \[0, 1\], got values in \[.*divide by 255"):
        load_rgb(source)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detect(model, source)


@pytest.mark.parametrize("source", [
    torch.tensor([[[0.5, float("nan")]]]).expand(3, 1, 2),
    np.array([[[0.2, 0.2, np.nan]]]),
    np.array([[[0.2, 0.2, np.inf]]], np.float32),
])
def test_non_finite_pixels_are_refused(source):
    with pytest.raises(ValueError, match="got (NaN|infinite) values"):
        load_rgb(source)


def test_pil_image_whose_file_was_closed(tmp_path):
    path = write_picture(tmp_path / "chelsea.png", CHELSEA)
    with Image.open(path) as lazy:
        pass  # the with-block closed its file before anything was read
    loaded = Image.open(path)
    loaded.load()
    loaded.close()  # Pillow drops the pixels on close(), loaded or not
    for closed in (lazy, loaded):
        with pytest.raises(ImageLoadError, match="the PIL image was closed .* before its pixels were read"):
            load_rgb(closed)
    with Image.open(path) as read_in_time:
        read_in_time.load()
    np.testing.assert_array_equal(load_rgb(read_in_time), CHELSEA)  # loaded inside the block: still usable


def test_float_tiff_in_0_255_says_the_expected_range(tmp_path):
    path = write_picture(tmp_path / "camera.tif", data.camera().astype(np.float32))
    with pytest.raises(ImageLoadError, match=r"camera.tif: expected float pixel values in \[0, 1\], got values in "
                                              r"\[0, 255\] \(0..255 data stored as floats"):
        load_uint8(path)
    good = write_picture(tmp_path / "unit.tif", data.camera().astype(np.float32) / 255)
    assert load_uint8(good)[0].shape == (512, 512, 3)


def test_exif_orientation_is_applied_by_detect_and_not_by_the_seed_helpers(tmp_path, model):
    path = rotated_jpeg(tmp_path / "rotated.jpg")
    stored = load_rgb(path)
    assert stored.shape == (300, 451, 3)  # NVIDIA's helpers: pixels as stored, like skimage.io.imread
    assert load_image(path).shape == (300, 451, 3)
    np.testing.assert_array_equal(prepare_input(path), prepare_input(stored))
    upright, _ = load_uint8(path)  # detect's loader: as viewers show it
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))
    [found], [reference] = detect(model, [path]), detect(model, [np.ascontiguousarray(np.rot90(stored, k=-1))])
    assert found.image_size == (451, 300) and len(found) > 0
    np.testing.assert_allclose(found.boxes, reference.boxes, atol=1e-3)
    assert np.all(found.boxes[:, 2] <= 300) and np.all(found.boxes[:, 3] <= 451)


def test_folder_extensions_include_jfif_and_avif_when_readable():
    assert {".jfif", ".jpe"} <= readable_extensions()
    assert (".avif" in readable_extensions()) == bool(features.check("avif"))


# ------------------------------------------------------------------------------------------------ detect


def test_detect_leaves_a_training_model_in_training_mode_with_its_buffers(model):
    trained = SSD300()
    trained.load_state_dict(model.state_dict())
    trained.train()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    modes = [m.training for m in trained.modules()]
    [found] = detect(trained, CHELSEA)
    assert trained.training and [m.training for m in trained.modules()] == modes
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm running stats and counters included
    [reference] = detect(model, CHELSEA)
    np.testing.assert_array_equal(found.labels, reference.labels)
    np.testing.assert_allclose(found.boxes, reference.boxes, atol=1e-4)


@pytest.mark.timeout(300)
def test_four_threads_on_one_model_agree_with_sequential_calls(model):
    inputs = [CHELSEA, data.astronaut()[::2, ::2]]
    raw, hook = raw_outputs_recorder(channels_last_copy(model))
    sequential = [detect(model, [image])[0] for image in inputs]
    hook.remove()
    start = threading.Barrier(4)  # all four threads call detect together, not one after another

    def work(k: int) -> list:
        start.wait()
        return detect(model, inputs[k % 2:] + inputs[:k % 2], batch_size=2 - k // 2)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    # What goes wrong when threads share state is another image's detections, or a mix: hundreds of pixels off.
    # Batches of 1 and 2 run other kernels, and threads that set torch's thread count at once may leave a pass with
    # another count: raw outputs below 1e-3 apart (the bound the single-thread tests measure well inside; the actual
    # figure depends on the CPU), carried through the decoding as in tests/helpers/detections.py.
    bound = [(1e-3, 1e-3)] * len(inputs)
    max_offset = float(torch.cat([r[0] for r in raw]).abs().max()) + 1e-3
    for k, found in enumerate(results):
        assert_detect_results_agree(found, sequential[k % 2:] + sequential[:k % 2], bound, model.spec.box_coder,
                                    max_offset=max_offset, label=f"thread {k}")


def test_numeric_arguments_accept_numpy_and_torch_scalars(model):
    [plain] = detect(model, CHELSEA, threshold=0.3, iou_threshold=0.5, max_detections=5, batch_size=2)
    [numpy] = detect(model, CHELSEA, threshold=np.float32(0.3), iou_threshold=np.float64(0.5),
                     max_detections=np.int64(5), batch_size=np.int32(2))
    [tensor] = detect(model, CHELSEA, threshold=torch.tensor(0.3), iou_threshold=torch.tensor(0.5),
                      max_detections=torch.tensor(5), batch_size=torch.tensor(2))
    for found in (numpy, tensor):
        np.testing.assert_array_equal(found.labels, plain.labels)
        np.testing.assert_allclose(found.boxes, plain.boxes, atol=1e-4)
    assert 0 < len(plain) <= 5


@pytest.mark.parametrize(("argument", "value", "error"), [
    ("threshold", float("nan"), ValueError),
    ("threshold", np.float32("inf"), ValueError),
    ("threshold", 1.0, ValueError),
    ("iou_threshold", torch.tensor(float("nan")), ValueError),
    ("iou_threshold", float("-inf"), ValueError),
    ("max_detections", float("inf"), TypeError),
    ("max_detections", MAX_DETECTIONS_LIMIT + 1, ValueError),
    ("batch_size", float("nan"), TypeError),
    ("batch_size", np.int64(0), ValueError),
])
def test_bad_numbers_are_refused_naming_detects_argument(argument, value, error):
    stub = StubDetector()
    with pytest.raises(error, match=f"^{argument}: expected"):
        detect(stub, CHELSEA, **{argument: value})


def test_any_iterable_of_images_works_generators_included(model, tmp_path):
    path = write_picture(tmp_path / "chelsea.png", CHELSEA)
    from_list = detect(model, [path, CHELSEA])
    from_generator = detect(model, (image for image in [path, CHELSEA]))
    from_map = detect(model, map(pathlib.Path, [str(path)]))
    assert len(from_generator) == 2 and len(from_map) == 1
    for got, expected in zip(from_generator + from_map, from_list):
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-4)


@pytest.mark.timeout(300)
def test_memory_is_bounded_by_the_batch_not_the_input(tmp_path):
    photo = np.ascontiguousarray(np.tile(data.astronaut(), (2, 2, 1))[:600, :800])  # 600 x 800 x 3: 1.4 MB
    path = write_picture(tmp_path / "big.jpg", photo, quality=90)
    decoded = photo.nbytes
    stub = StubDetector()
    paths = [path] * 200  # 200 decodes: 288 MB if they were all kept
    tracemalloc.start()
    try:
        found = detect(stub, paths, batch_size=4, keep_images=False)
        _, bounded_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        kept = detect(stub, paths[:20], batch_size=4)
        _, kept_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(found) == 200 and all(d.image is None for d in found)
    # Two batches of four are in memory at once (the running one and the one loading), plus decoding buffers.
    assert bounded_peak < 16 * decoded, f"peak {bounded_peak / 2**20:.0f} MB for 200 images of {decoded / 2**20:.1f} MB"
    # The measurement does see decoded images: keeping 20 of them costs at least 20 of them.
    assert all(d.image is not None for d in kept) and kept_peak > 19 * decoded


@pytest.mark.timeout(300)
def test_preprocessing_peaks_well_below_five_times_the_decoded_batch(tmp_path):
    # Measured in a fresh process: ru_maxrss is the process's high-water mark, and torch allocations (which
    # tracemalloc does not see) count in it.
    script = """
import resource, numpy as np, torch
from ssd.models import NVIDIA_SSD300
from ssd.transforms import preprocess_for_detection
images = [np.random.default_rng(i).integers(0, 256, (2000, 3000, 3), dtype=np.uint8) for i in range(4)]
tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in images]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
preprocess_for_detection(tensors, NVIDIA_SSD300.input)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / sum(a.nbytes for a in images))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    extra = float(done.stdout.strip())
    # On top of the decoded images themselves: one uint8 copy (the contiguous batch) and the small resized floats.
    assert extra < 2.0, f"preprocessing peaked at {extra:.2f}x the decoded input on top of it"


def test_half_model_on_the_cpu_warns():
    stub = StubDetector().half()
    with pytest.warns(UserWarning, match="float16 weights on the CPU"):
        detect(stub, CHELSEA)


def test_non_finite_network_outputs_never_become_detections():
    [found] = detect(StubDetector(nan_boxes=True), CHELSEA, threshold=0.5)
    assert len(found) > 0 and np.isfinite(found.boxes).all() and np.isfinite(found.scores).all()
    json.loads(found.to_json())


def test_save_without_a_suffix_returns_the_path_it_wrote(tmp_path, model):
    [found] = detect(model, CHELSEA)
    written = found.save(tmp_path / "pic")
    assert written == tmp_path / "pic.png" and written.is_file()
    assert Image.open(written).size == (451, 300)
    assert found.save(tmp_path / "pic.jpg") == tmp_path / "pic.jpg"
    # A suffix Pillow cannot write gets PNG, said in the name.
    assert found.save(tmp_path / "pic.xyz") == tmp_path / "pic.xyz.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic.jpg", "pic.png", "pic.xyz.png"]  # no temporary file


def test_json_writer_refuses_non_finite_numbers(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "report.json", {"score": float("nan")})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_atomic_path_renames_onto_the_target_with_open_s_mode(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        torch.save({"x": 1}, tmp)  # a writer that wants a file name
        assert target.read_bytes() == b"old"  # nothing published before the block ends
    assert torch.load(target, weights_only=True) == {"x": 1}
    assert list(tmp_path.iterdir()) == [target]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_path_failure_leaves_no_temporary_file_and_the_target_untouched(tmp_path, error):
    target = tmp_path / "report.json"
    target.write_text("keep me")
    with pytest.raises(error), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise error
    assert target.read_text() == "keep me" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(error), atomic_path(tmp_path / "new.json") as tmp:
        raise error
    assert list(tmp_path.iterdir()) == [target]


def test_training_metrics_log_non_finite_numbers_as_null(tmp_path):
    from ssd.training.outputs import write_metrics

    path = tmp_path / "metrics.jsonl"
    write_metrics(path, {"step": 3, "loss": float("nan"), "lr": float("inf"), "ok": 0.5})
    [line] = path.read_text().splitlines()
    assert json.loads(line, parse_constant=lambda token: pytest.fail(token)) == {"step": 3, "loss": None,
                                                                                  "lr": None, "ok": 0.5}


# ------------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_detecting_checkpoint(tmp_path_factory.mktemp("ckpt") / "detecting.pt")


def run_cli(args: list[str], cwd: pathlib.Path, checkpoint: pathlib.Path | str,
            timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ssd", "detect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def strict_json(path: pathlib.Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.timeout(400)
def test_cli_run_over_a_hostile_folder(tmp_path, checkpoint):
    small = np.ascontiguousarray(CHELSEA[::2, ::2])
    photos = tmp_path / "photos"
    write_picture(photos / "chelsea.jpg", small)
    write_picture(photos / "coffee.jfif", data.coffee()[::3, ::3], format="JPEG")
    if ".avif" in readable_extensions():
        write_picture(photos / "rocket.avif", data.rocket()[::3, ::3], format="AVIF")
    long_name = "x" * 240 + ".png"  # "<stem>-2.png" of it would exceed the 255-byte file name limit
    write_picture(photos / "sub" / long_name, small)
    write_picture(photos / "sub2" / long_name, small)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (photos / "notes.txt").write_text("not an image")
    os.mkfifo(photos / "pipe.png")  # in the folder (skipped by the scan) and named explicitly (refused unread)
    # Left by an earlier run: must not be read as input, must not be overwritten by anything but our pictures.
    write_picture(photos / "ssd-out" / "old.png", small)
    (photos / "ssd-out" / "chelsea.jpg").mkdir()  # a folder where chelsea's picture should go: it cannot be saved
    devices = ["/dev/zero"] if os.path.exists("/dev/zero") else []

    done = run_cli([".", "pipe.png", *devices], cwd=photos, checkpoint=checkpoint)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    report = strict_json(photos / "ssd-out" / "detections.json")
    files = sorted(pathlib.Path(image["file"]).name for image in report["images"])
    expected = ["chelsea.jpg", "coffee.jfif", long_name, long_name]
    if ".avif" in readable_extensions():
        expected.append("rocket.avif")
    assert files == sorted(expected)
    assert not any("ssd-out" in image["file"] for image in report["images"])
    errors = {pathlib.Path(s["file"]).name: s["error"] for s in report["skipped"]}
    assert "not a readable image" in errors["broken.png"]
    assert "got a FIFO" in errors["pipe.png"]
    if devices:
        assert "got a character device" in errors["zero"]
    assert errors["chelsea.jpg"].startswith("picture not saved")
    pictures = {pathlib.Path(i["file"]).name + ("" if "sub2" not in i["file"] else "#2"): i["picture"]
                for i in report["images"]}
    assert pictures["chelsea.jpg"] is None  # its detections are kept all the same
    assert len({pictures[long_name], pictures[long_name + "#2"]}) == 2
    for image in report["images"]:
        if image["picture"] is not None:
            assert (photos / "ssd-out" / image["picture"]).is_file() and len(image["picture"]) <= 255
    assert "2 non-image file(s) in the folders ignored" in done.stdout  # notes.txt and the FIFO
    np.testing.assert_array_equal(load_rgb(photos / "ssd-out" / "old.png"), small)


@pytest.mark.timeout(200)
def test_cli_refuses_bad_options_before_loading_the_model(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    image = write_picture(photos / "cat.png", CHELSEA[::4, ::4])
    original = image.read_bytes()
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    cases = [
        (["cat.png", "--out", str(a_file)], "--out: expected a folder, got the existing file"),
        ([".", "--out", "."], "which is the input folder '.'"),
        ([str(photos), "--out", str(photos / "sub" / "..")], "which is the input folder"),
        (["cat.png", "--out", "."], "which holds the input 'cat.png'"),
        (["cat.png", "--threshold", "1"], "--threshold: expected a number in [0, 1), got 1.0"),
        (["cat.png", "--threshold", "nan"], "--threshold: expected a number in [0, 1), got nan"),
        (["cat.png", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["cat.png", "--device", "cuda"], "--device: expected a device this machine has, got 'cuda'"))
    # No checkpoint exists: had the model been loaded first, the error would be about the checkpoint instead.
    missing = tmp_path / "no-such-checkpoint.pt"
    # Two cases as real processes (the exit status and stderr a shell sees), the rest in this process (fast).
    for args, message in cases[1:2] + cases[4:5]:
        done = run_cli(args, cwd=photos, checkpoint=missing)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip().splitlines() == [done.stderr.strip()], (args, done.stderr)  # one line
        assert done.stderr.startswith("error: ") and message in done.stderr, (args, done.stderr)
    monkeypatch.chdir(photos)
    monkeypatch.setenv("SSD_CHECKPOINT", str(missing))
    for args, message in cases:
        assert main(["detect", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert image.read_bytes() == original and a_file.read_text() == "keep me"
    assert sorted(p.name for p in photos.iterdir()) == ["cat.png"]  # no output folder was made


def test_report_is_rewritten_as_results_come_and_a_failed_rewrite_does_not_stop_the_run(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setattr(JsonReport, "SAVE_EVERY_S", 0.0)  # rewrite on every result
    path = tmp_path / "detections.json"
    report = JsonReport(path, {"model": "m"}, 3, [("gone.png", "no such file or folder")])
    report.add(2, {"file": "c.png"})
    assert strict_json(path) == {"model": "m", "images": [{"file": "c.png"}],
                                 "skipped": [{"file": "gone.png", "error": "no such file or folder"}]}
    report.add(0, {"file": "a.png"})
    assert [i["file"] for i in strict_json(path)["images"]] == ["a.png", "c.png"]  # input order, not finish order
    broken = JsonReport(tmp_path / "missing-folder" / "detections.json", {}, 1, [])
    broken.add(0, {"file": "a.png"})  # cannot be written: a warning, not an exception
    assert "warning: could not update" in capsys.readouterr().err and broken.done == [{"file": "a.png"}]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_ctrl_c_keeps_the_results_so_far(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    for k in range(40):
        write_picture(photos / f"img{k:02d}.png", CHELSEA[::3, ::3])
    out = tmp_path / "out"
    env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # SIG_DFL in the child whatever the parent's disposition: an inherited SIG_IGN would make Ctrl-C a no-op.
    proc = subprocess.Popen([sys.executable, "-m", "ssd", "detect", str(photos), "--out", str(out),
                             "--batch-size", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = ""
        while "): " not in first:  # the first "img00.png (151x100): ..." line: one image is done
            first = proc.stdout.readline()
            assert first, "the run ended before printing any result"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted:" in stderr and "Traceback" not in stderr
    report = strict_json(out / "detections.json")
    assert 1 <= len(report["images"]) < 40
    for image in report["images"]:
        assert (out / image["picture"]).is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".tmp-*"))
