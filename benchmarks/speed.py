"""Issue 22's CPU figures in one run: post-processing before/after on many candidates, ``detect`` against the
forward pass at fp32 and bf16, every format of ``ssd benchmark`` (onnxruntime, OpenVINO fp32/bf16/INT8), INT8's
accuracy cost, and the forward pass on 1 and 2 threads with and without a busy process beside it.

    python -m benchmarks --suite speed [-- --quick]

Prints Markdown for benchmarks/RESULTS.md. The post-processing "before" is the implementation of commit
``BEFORE`` (read with ``git show``; skipped outside a git checkout).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from skimage import data, transform

from benchmarks.bench import cpu_has_bf16, cpu_name
from benchmarks.contention import busy_process
from benchmarks.timing import median_seconds
from benchmarks.weights import detecting_state_dict
from ssd.backends import PyTorchBackend, load
from ssd.backends.base import input_format
from ssd.benchmark import format_table, run_benchmark
from ssd.evaluation import evaluate
from ssd.export import export_openvino, export_openvino_int8
from ssd.inference.detect import detect
from ssd.postprocess import postprocess
from ssd.registry import build_model
from ssd.transforms import preprocess_for_detection

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEFORE = "1370c07"  # the last commit with the fixed-point NMS
MINICOCO = ROOT / "tests" / "data" / "golden" / "minicoco"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")



def _old_postprocess():
    """``ssd.postprocess`` as of ``BEFORE``, imported as a module of the ssd package (its relative imports)."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE}:ssd/postprocess.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("ssd._postprocess_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "ssd"
    exec(compile(source, f"{BEFORE}:ssd/postprocess.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def photos_640x480(count: int) -> list[np.ndarray]:
    pool = [transform.resize(getattr(data, n)(), (480, 640), preserve_range=True).astype(np.uint8) for n in PHOTOS]
    return [pool[i % len(pool)] for i in range(count)]


def measure_postprocess(repeats: int) -> list[dict]:
    """Many candidates: SSDLite (random weights, so every class passes) at torchvision's evaluation threshold
    0.001, 4 photos; and NVIDIA's evaluation recipe on a detecting SSD300's output for 8 photos."""
    old = _old_postprocess()
    rows = []
    torch.manual_seed(0)
    lite = build_model("tv_ssdlite320_mobilenet_v3_large", pretrained=False).eval()
    ssd300 = build_model("nvidia_ssd", pretrained=False).eval()
    ssd300.load_state_dict(detecting_state_dict())
    for name, model, count in (("SSDLite, threshold 0.001, 300 per class", lite, 4),
                               ("SSD300 (NVIDIA recipe, threshold 0.05)", ssd300, 8)):
        tensors = [torch.from_numpy(p).permute(2, 0, 1) for p in photos_640x480(count)]
        batch = preprocess_for_detection(tensors, model.spec.input)
        with torch.inference_mode():
            outputs = model(batch)
        spec = model.spec
        new = postprocess(outputs, spec)
        row = {"case": name, "images": count, "candidates": int(new.counts.sum()),
               "after_ms": 1e3 * median_seconds(lambda o=outputs, s=spec: postprocess(o, s), repeats, warmup=1) / count}
        if old is not None:
            before = old.postprocess(outputs, spec)
            row["identical"] = all(torch.equal(a, b) for a, b in zip(new, before))
            slow = median_seconds(lambda o=outputs, s=spec: old.postprocess(o, s), max(1, repeats // 2), warmup=1)
            row["before_ms"] = 1e3 * slow / count
        rows.append(row)
    return rows


def measure_detect_vs_forward(batch: int, repeats: int) -> list[dict]:
    model = build_model("nvidia_ssd", pretrained=False).eval()
    model.load_state_dict(detecting_state_dict())
    photos = photos_640x480(batch)
    rows = []
    for precision in ("fp32", "bf16"):
        backend = load(model, precision=precision)
        dtype, memory_format = input_format(backend)
        tensors = [torch.from_numpy(p).permute(2, 0, 1) for p in photos]
        x = preprocess_for_detection(tensors, model.spec.input, dtype=dtype, memory_format=memory_format)
        # Alternated, so that a change in the machine's load hits both alike.
        forward, whole = [], []
        backend(x)
        detect(backend, photos, batch_size=batch, keep_images=False)
        for _ in range(repeats):
            started = time.perf_counter()
            backend(x)
            forward.append(time.perf_counter() - started)
            started = time.perf_counter()
            found = detect(backend, photos, batch_size=batch, keep_images=False)
            whole.append(time.perf_counter() - started)
        rows.append({"precision": precision, "batch": batch, "forward_ips": batch / statistics.median(forward),
                     "detect_ips": batch / statistics.median(whole), "detections": sum(len(f) for f in found),
                     "times": found.times})
    return rows


def write_calibration(folder: pathlib.Path, count: int) -> pathlib.Path:
    """``count`` JPEGs: random crops of scikit-image's photographs and the minicoco photos, some flipped."""
    rng = np.random.default_rng(0)
    sources = [getattr(data, n)() for n in PHOTOS] + [np.asarray(Image.open(p).convert("RGB"))
                                                      for p in sorted((MINICOCO / "images").glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def minicoco_checkpoint(path: pathlib.Path) -> pathlib.Path:
    """The weights behind tests/data/golden/minicoco/nvidia_eval.json (the tests' recipe)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from helpers.checkpoints import save_minicoco_checkpoint
    finally:
        sys.path.pop(0)
    return save_minicoco_checkpoint(path)


def measure_int8_accuracy(folder: pathlib.Path, calibration: pathlib.Path) -> list[dict]:
    model = build_model("nvidia_ssd", checkpoint=str(minicoco_checkpoint(folder / "minicoco.pt"))).eval()
    fp32 = export_openvino(model, folder / "fp32.xml")
    int8 = export_openvino_int8(model, folder / "int8.xml", calibration)
    rows = []
    for name, backend in (("PyTorch fp32", PyTorchBackend(model, "fp32")),
                          ("OpenVINO fp32", load(fp32, precision="fp32")),
                          ("OpenVINO bf16", load(fp32, precision="bf16")),
                          ("OpenVINO INT8", load(int8, precision="default"))):
        result = evaluate(backend, MINICOCO / "images", MINICOCO / "instances.json", progress=False, verbose=False)
        rows.append({"backend": name, "ap": result.stats[0], "ap50": result.stats[1]})
    return rows


def measure_threads(repeats: int, batch: int) -> list[dict]:
    model = build_model("nvidia_ssd", pretrained=False).eval()
    model.load_state_dict(detecting_state_dict())
    tensors = [torch.from_numpy(p).permute(2, 0, 1) for p in photos_640x480(batch)]
    rows = []
    for busy in (False, True):
        for threads in (1, 2):
            backend = PyTorchBackend(model, "fp32", threads=threads)
            dtype, memory_format = input_format(backend)
            x = preprocess_for_detection(tensors, model.spec.input, dtype=dtype, memory_format=memory_format)
            if busy:
                with busy_process():
                    seconds = median_seconds(lambda backend=backend, x=x: backend(x), repeats, warmup=1)
            else:
                seconds = median_seconds(lambda backend=backend, x=x: backend(x), repeats, warmup=1)
            rows.append({"busy": busy, "threads": threads, "ms_per_image": 1e3 * seconds / batch,
                         "load": os.getloadavg()[0]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--calibration-images", type=int, default=120)
    options = parser.parse_args(argv)
    repeats = 2 if options.quick else 3
    print(f"- {cpu_name()}, {os.cpu_count()} logical cores, bf16 instructions: {cpu_has_bf16()}, torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"- Python {platform.python_version()}, torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}, "
          f"load average at start {os.getloadavg()[0]:.1f}\n", flush=True)

    print("## Post-processing, many candidates (ms per image)\n")
    print("| case | detections kept | before | after | speed-up | identical |\n| --- | --- | --- | --- | --- | --- |")
    for r in measure_postprocess(repeats):
        before = r.get("before_ms")
        print(f"| {r['case']} | {r['candidates']} | {before:.1f} | {r['after_ms']:.1f} | {before / r['after_ms']:.1f}x"
              f" | {r.get('identical')} |" if before else f"| {r['case']} | {r['candidates']} | - | "
              f"{r['after_ms']:.1f} | - | - |", flush=True)

    print("\n## detect against the forward pass (SSD300, 8 in-memory 640 x 480 photos, batch 8)\n")
    print("| precision | forward images/s | detect images/s | detect / forward | stage ms/image |\n"
          "| --- | --- | --- | --- | --- |")
    for r in measure_detect_vs_forward(8, repeats):
        t = r["times"]
        print(f"| {r['precision']} | {r['forward_ips']:.2f} | {r['detect_ips']:.2f} | "
              f"{r['detect_ips'] / r['forward_ips']:.0%} | {t} |", flush=True)

    with tempfile.TemporaryDirectory(prefix="ssd-speed-") as tmp:
        folder = pathlib.Path(tmp)
        calibration = write_calibration(folder / "calibration", options.calibration_images)
        checkpoint = folder / "detecting.pt"
        torch.save({"model": detecting_state_dict()}, checkpoint)
        print("\n## Formats (`ssd benchmark`, SSD300 with the benchmarks' detecting weights, batch 8, 16 photos)\n")
        rows = run_benchmark("nvidia_ssd", checkpoint=str(checkpoint), formats="pytorch,bf16,onnx,openvino,"
                             "openvino-bf16,int8", calibration=calibration, batch_size=8, batches=2)
        print("```\n" + format_table(rows, 8) + "\n```", flush=True)
        print(f"\n## INT8 accuracy cost (minicoco: 6 photos, the golden minicoco weights; calibration "
              f"{options.calibration_images} crops)\n")
        print("| backend | AP | AP50 |\n| --- | --- | --- |")
        for r in measure_int8_accuracy(folder, calibration):
            print(f"| {r['backend']} | {r['ap']:.4f} | {r['ap50']:.4f} |", flush=True)

    print("\n## Forward threads (SSD300 fp32 channels_last, batch 1; ms per image)\n")
    print("| beside it | 1 thread | 2 threads | 2 / 1 speed-up |\n| --- | --- | --- | --- |")
    rows = measure_threads(repeats, 1)
    for busy in (False, True):
        one, two = (next(r for r in rows if r["busy"] == busy and r["threads"] == t) for t in (1, 2))
        print(f"| {'a busy process' if busy else 'nothing of ours'} (load {two['load']:.1f}) | "
              f"{one['ms_per_image']:.0f} | {two['ms_per_image']:.0f} | "
              f"{one['ms_per_image'] / two['ms_per_image']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
