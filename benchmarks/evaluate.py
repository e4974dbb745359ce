"""Evaluation throughput: ``evaluate`` against ``detect`` on the same images, fp32 and bf16, 0 and 2 data-loader
workers, the PyTorch backend against the onnxruntime and OpenVINO ones (when the export extras are installed), and
``torchrun`` with 2 processes against 1 (whole command, startup included).

The images are the minicoco golden set repeated to ``--images`` (default 24) under new ids, scored with the
golden minicoco weights (no download). Run with ``OMP_NUM_THREADS`` set to the threads each process may use.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.weights import detecting_state_dict
from ssd.evaluation import evaluate
from ssd.inference.detect import detect
from ssd.registry import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINICOCO = ROOT / "tests" / "data" / "golden" / "minicoco"  # its photographs and truths, read as data


def make_set(root: pathlib.Path, count: int) -> tuple[pathlib.Path, pathlib.Path]:
    """The minicoco images copied to ``count`` files, and an annotation file listing each copy with its truths."""
    data = json.loads((MINICOCO / "instances.json").read_text())
    images_dir = root / "images"
    images_dir.mkdir()
    images, annotations = [], []
    originals = sorted(data["images"], key=lambda i: i["id"])
    for n in range(count):
        source = originals[n % len(originals)]
        name = f"{n:04d}_{source['file_name']}"
        shutil.copy(MINICOCO / "images" / source["file_name"], images_dir / name)
        images.append({**source, "id": 1000 + n, "file_name": name})
        for ann in data["annotations"]:
            if ann["image_id"] == source["id"]:
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": 1000 + n})
    path = root / "instances.json"
    path.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return images_dir, path


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def in_process(model: torch.nn.Module, images_dir: pathlib.Path, annotations: pathlib.Path,
               repeats: int) -> list[dict]:
    """Every configuration ``repeats`` times, round-robin (a shared machine's load drifts; interleaving spreads
    it over all of them), reporting the median images/s of each."""
    paths = sorted(images_dir.iterdir())
    bf16 = copy.deepcopy(model).to(memory_format=torch.channels_last)  # what the CLI runs for --precision bf16
    # One untimed pass: first-call allocations and oneDNN kernel selection are not what a long evaluation pays.
    detect(model, paths[:2], keep_images=False)

    def run_evaluate(net: object, precision: str | None, workers: int) -> dict:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            result = evaluate(net, images_dir, annotations, workers=workers, precision=precision, progress=False,
                              verbose=False)
        total = time.perf_counter() - start
        return {"images": result.images, "images_per_second": result.images_per_second,
                "with_cocoeval_per_second": result.images / total, "ap": result.ap}

    def run_detect(net: torch.nn.Module, precision: str) -> dict:
        start = time.perf_counter()
        found = detect(net, paths, precision=precision, keep_images=False)
        seconds = time.perf_counter() - start
        return {"images": len(found), "images_per_second": len(found) / seconds, "with_cocoeval_per_second": None,
                "ap": None}

    configs = {}
    for precision, net in (("fp32", model), ("bf16", bf16)):
        for workers in (0, 2):
            configs[f"evaluate {precision}, {workers} workers"] = (run_evaluate, (net, precision, workers))
        configs[f"detect {precision} (threshold 0.4)"] = (run_detect, (net, precision))
    for name, backend in exported_backends(model, images_dir.parent).items():
        configs[f"evaluate {name}, 0 workers"] = (run_evaluate, (backend, None, 0))
    samples: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (fn, args) in configs.items():
            samples[name].append(fn(*args))
    rows = []
    for name, runs in samples.items():
        row = {"run": name, **runs[0], "images_per_second": statistics.median(r["images_per_second"] for r in runs)}
        if runs[0]["with_cocoeval_per_second"] is not None:
            row["with_cocoeval_per_second"] = statistics.median(r["with_cocoeval_per_second"] for r in runs)
        rows.append(row)
    return rows


def exported_backends(model: torch.nn.Module, folder: pathlib.Path) -> dict[str, object]:
    """The model exported and loaded as onnxruntime and OpenVINO fp32 backends, those whose packages are here."""
    made: dict[str, object] = {}
    try:
        from ssd.backends import load_exported
        from ssd.export import export_onnx

        path = export_onnx(model, folder / "bench.onnx")
        made["onnxruntime fp32"] = load_exported(path, "onnxruntime")
        made["OpenVINO fp32"] = load_exported(path, "openvino")
    except ImportError as exc:
        print(f"export extras missing, some backend rows skipped: {exc}", file=sys.stderr)
    return made


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(checkpoint: pathlib.Path, images_dir: pathlib.Path, annotations: pathlib.Path,
              root: pathlib.Path) -> list[dict]:
    """The whole ``evaluate`` command: one plain process, then torchrun with 2 processes."""
    env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    args = ["evaluate", "--images", str(images_dir), "--annotations", str(annotations), "--no-progress"]
    launchers = {
        "python -m ssd evaluate (1 process)": [sys.executable, "-m", "ssd"],
        "torchrun --nproc-per-node 2": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                                        "-m", "ssd"],
    }
    rows = []
    for name, launcher in launchers.items():
        out = root / name.split()[0]
        start = time.perf_counter()
        subprocess.run([*launcher, *args, "--out", str(out)], cwd=ROOT, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append({"run": name, "images": metrics["images"], "wall_s": wall, "loop_s": metrics["seconds"],
                     "overhead_s": wall - metrics["seconds"], "images_per_second": metrics["images_per_second"],
                     "ap": metrics["stats"][0]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="images in the set (minicoco repeated)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each in-process configuration (median)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the numbers here")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        images_dir, annotations = make_set(root, options.images)
        # Speed does not depend on the weights' values: the benchmarks' own detecting weights, NVIDIA's format.
        checkpoint = root / "detecting.pt"
        torch.save({"model": detecting_state_dict()}, checkpoint)
        model = build_model("nvidia_ssd", checkpoint=str(checkpoint))
        local = in_process(model, images_dir, annotations, options.repeats)
        launched = processes(checkpoint, images_dir, annotations, root)
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s) per process (OMP_NUM_THREADS={threads})")
    print(f"{options.images} images (minicoco repeated), batch size 8, CPU, median of {options.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| run | images/s (inference) | images/s (with COCOeval) | AP |")
    print("| --- | --- | --- | --- |")
    for row in local:
        with_eval = f"{row['with_cocoeval_per_second']:.2f}" if row["with_cocoeval_per_second"] else "-"
        ap = f"{row['ap']:.4f}" if row["ap"] is not None else "-"
        print(f"| {row['run']} | {row['images_per_second']:.2f} | {with_eval} | {ap} |")
    print("\n| command | wall s | inference s | overhead s (start, load, gather, COCOeval) | images/s (inference) "
          "| AP |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in launched:
        print(f"| {row['run']} | {row['wall_s']:.1f} | {row['loop_s']:.1f} | {row['overhead_s']:.1f} | "
              f"{row['images_per_second']:.2f} | {row['ap']:.4f} |")
    if options.json is not None:
        options.json.write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "in_process": local,
                                            "processes": launched}, indent=2))


if __name__ == "__main__":
    main()
