"""The one entry point of the benchmarks: ``python -m benchmarks [--suite NAME]`` (or ``python -m benchmarks``).

    python -m benchmarks                       # inference on CPU (about 3 minutes on 2 cores); writes RESULTS.md
    python -m benchmarks --device cuda         # GPU: adds fp16/bf16 autocast, half weights, batches up to 256
    python -m benchmarks --suite load          # cold-process torch.hub.load from the cache
    python -m benchmarks --suite decode        # the decoder alone, against NVIDIA's per-class loop
    python -m benchmarks --suite video         # ssd detect video.mp4 against in-process detect; peak memory
    python -m benchmarks --suite families      # every model: training (bf16) and evaluate (PyTorch, ONNX) images/s

Stages: the seed's ``prepare_input`` (against NVIDIA's pipeline), the ``detect`` preprocessing, the network's
forward pass per precision, memory format and batch size, ``decode_results`` (against a per-class loop), and
the whole ``detect`` call (against the raw forward pass at the same precision). Times are medians of repeated
runs after warm-up, reported per image and as images per second. Weights do not change speed; the model uses
random weights with detecting heads (benchmarks/weights.py) so that ``detect`` has boxes to decode.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the checkout importable, as ``python -m`` does
    sys.path.insert(0, str(ROOT))

from benchmarks.decode import measure_decode  # noqa: E402
from benchmarks.load import measure_cold_load  # noqa: E402
from benchmarks.prepare import measure_prepare_input  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from benchmarks.weights import detecting_model  # noqa: E402
from ssd.models import SSD300  # noqa: E402
from ssd.transforms import preprocess_for_detection, to_tensor_chw  # noqa: E402


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def sample_images(count: int) -> list[np.ndarray]:
    """``count`` in-memory 640 x 480 photos (scikit-image's, resized), as users' uint8 arrays."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [np.asarray(Image.fromarray(photos[i % 4]).resize((640, 480))) for i in range(count)]


def forward_configs(device: torch.device) -> list[tuple[str, torch.dtype | None, torch.dtype]]:
    """(name, autocast dtype or None, weight dtype) of each precision worth measuring on this device."""
    configs = [("fp32", None, torch.float32)]
    if device.type == "cuda":
        configs += [("fp16 autocast", torch.float16, torch.float32), ("bf16 autocast", torch.bfloat16, torch.float32),
                    ("fp16 weights", None, torch.float16)]
    else:
        configs += [("bf16 autocast", torch.bfloat16, torch.float32)]
    return configs


@functools.cache
def _base_model() -> SSD300:
    return detecting_model()


def bench_model(device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format) -> SSD300:
    """A fresh copy of the measured model (benchmarks/weights.py: random weights with detecting heads)."""
    return copy.deepcopy(_base_model()).to(device=device, dtype=dtype, memory_format=memory_format)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def measure_forward(device: torch.device, batches: list[int], quick: bool) -> list[dict]:
    rows = []
    for name, autocast_dtype, weight_dtype in forward_configs(device):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = bench_model(device, weight_dtype, fmt)
            for batch in batches:
                x = torch.randn(batch, 3, 300, 300, device=device, dtype=weight_dtype).contiguous(memory_format=fmt)
                ctx = autocast(device, autocast_dtype)

                def run(model=model, x=x, ctx=ctx) -> None:
                    with torch.inference_mode(), ctx:
                        model(x)

                work = batch * (1 if device.type == "cuda" else 0.2)  # rough seconds per call on a CPU
                repeats = 10 if device.type == "cuda" else max(2, min(5, int(6 / work)))
                if quick:
                    repeats = 2
                seconds = median_seconds(run, repeats, warmup=1 if device.type == "cpu" else 3, device=device)
                rows.append({"precision": name, "channels_last": channels_last, "batch": batch,
                             "ms_per_image": seconds * 1e3 / batch, "images_per_s": batch / seconds})
    return rows


def measure_detect(device: torch.device, batch: int, configs: list[tuple[str | None, bool]],
                   quick: bool) -> list[dict]:
    """The whole ``detect`` call on in-memory images next to the raw forward pass at the same settings.

    ``configs`` holds (precision, channels_last) pairs; ``detect`` follows the model's memory format.
    """
    images = sample_images(batch)
    repeats = 2 if quick else (10 if device.type == "cuda" else 4)
    rows = []
    for precision, channels_last in configs:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = bench_model(device, torch.float32, fmt)
        ctx = autocast(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
        x = torch.randn(batch, 3, 300, 300, device=device).contiguous(memory_format=fmt)

        def forward(x=x, ctx=ctx, model=model) -> None:
            with torch.inference_mode(), ctx:
                model(x)

        forward_s = median_seconds(forward, repeats, 1, device)
        detect_s = median_seconds(lambda p=precision, m=model: m.detect(images, batch_size=batch, precision=p),
                                  repeats, 1, device)
        tensors = [to_tensor_chw(image) for image in images]
        prep_s = median_seconds(lambda t=tensors, m=model: preprocess_for_detection(t, m.spec.input, device=device),
                                repeats * 3, 1, device)
        rows.append({"precision": precision or "fp32", "channels_last": channels_last, "batch": batch,
                     "forward_ms": forward_s * 1e3 / batch,
                     "detect_ms": detect_s * 1e3 / batch, "preprocess_ms": prep_s * 1e3 / batch,
                     "overhead": detect_s / forward_s - 1, "images_per_s": batch / detect_s})
    return rows


def machine(device: torch.device) -> list[str]:
    lines = [f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
             + (" (bf16 instructions: yes)" if cpu_has_bf16() else "")]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    import torchvision

    versions = f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    lines.append(f"- {versions}")
    lines.append(f"- Date: {datetime.date.today().isoformat()}")
    return lines


def render(device: torch.device, prep: dict, decode: dict, forward: list[dict], detect: list[dict],
           command: str) -> str:
    out = [f"# Benchmark results ({device.type.upper()})", "", f"Measured with `{command}`.", "", *machine(device), ""]
    out += ["## Preprocessing (per image)", "", "| stage | ours | baseline | ratio |", "| --- | --- | --- | --- |",
            f"| seed `prepare_input`, {prep['image']} | {prep['ours_s'] * 1e3:.2f} ms | "
            f"{prep['baseline_s'] * 1e3:.2f} ms (NVIDIA's skimage pipeline) | {prep['speedup']:.1f}x faster |"]
    for row in detect:
        if row["precision"] == "fp32" and not row["channels_last"]:
            out.append(f"| `detect` preprocessing (whole image to 300 x 300, batch {row['batch']} of 640 x 480 uint8) "
                       f"| {row['preprocess_ms']:.2f} ms | | |")
    out += ["", f"Largest difference between our `prepare_input` and the baseline: {prep['max_abs_diff']:.1e}.", ""]
    out += ["## Decoding (per image)", "",
            f"Batch of {decode['batch']} realistic outputs: {decode['candidates_per_image']:.0f} class scores above "
            f"0.05 per image over {decode['classes_per_image']:.0f} classes, {decode['detections_per_image']:.0f} "
            f"detections kept; on {decode['device']}.", "",
            "| decoder | ms per image |", "| --- | --- |",
            f"| `decode_results` (vectorized, whole batch) | {decode['decode_ms_per_image']:.3f} |",
            f"| per-class Python loop (NVIDIA's approach) | {decode['baseline_ms_per_image']:.3f} |", "",
            f"Ratio: {decode['speedup']:.1f}x faster; identical detections: {decode['identical_to_baseline']}.", ""]
    out += ["## Forward pass", "", "| precision | channels_last | batch | ms per image | images/s |",
            "| --- | --- | --- | --- | --- |"]
    out += [f"| {r['precision']} | {'yes' if r['channels_last'] else 'no'} | {r['batch']} | {r['ms_per_image']:.2f} | "
            f"{r['images_per_s']:.1f} |" for r in forward]
    fp32 = {r["batch"]: r["images_per_s"] for r in forward if r["precision"] == "fp32" and not r["channels_last"]}
    ratios = [f"batch {r['batch']}: {r['precision']}{' + channels_last' if r['channels_last'] else ''} "
              f"{r['images_per_s'] / fp32[r['batch']]:.2f}x" for r in forward
              if (r["precision"], r["channels_last"]) != ("fp32", False)]
    out += ["", "Throughput relative to fp32 (contiguous) at the same batch: " + "; ".join(ratios) + ".", ""]
    out += ["## Whole `detect` call (in-memory 640 x 480 images)", "",
            "| precision | channels_last | batch | raw forward ms/image | `detect` ms/image | overhead vs forward "
            "| `detect` images/s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['precision']} | {'yes' if r['channels_last'] else 'no'} | {r['batch']} | {r['forward_ms']:.2f} | "
            f"{r['detect_ms']:.2f} | {r['overhead'] * 100:+.1f}% | {r['images_per_s']:.1f} |" for r in detect]
    out += ["", "## Reading the numbers", ""]
    best = max(forward, key=lambda r: r["images_per_s"])
    out.append(f"- Fastest forward configuration: {best['precision']}"
               f"{' + channels_last' if best['channels_last'] else ''} at batch {best['batch']}, "
               f"{best['images_per_s']:.1f} images/s ({best['ms_per_image']:.1f} ms per image).")
    fp32_best = max((r for r in forward if r["precision"] == "fp32"), key=lambda r: r["images_per_s"])
    out.append(f"- fp32 is fastest at batch {fp32_best['batch']}"
               f"{' with channels_last' if fp32_best['channels_last'] else ''} ({fp32_best['ms_per_image']:.1f} ms "
               "per image).")
    plain = sorted((r for r in forward if (r["precision"], r["channels_last"]) == ("fp32", False)),
                   key=lambda r: r["batch"])
    if device.type == "cpu" and plain[-1]["ms_per_image"] > plain[0]["ms_per_image"]:
        out.append(f"- Contiguous fp32 slows down per image as the batch grows ({plain[0]['ms_per_image']:.0f} ms at "
                   f"batch {plain[0]['batch']}, {plain[-1]['ms_per_image']:.0f} ms at batch {plain[-1]['batch']}): "
                   "the activations no longer fit in the CPU's caches (layer3 alone is 38 x 38 x 1024 floats per "
                   "image). channels_last, or a small batch_size, avoids most of that.")
    worst = max(detect, key=lambda r: r["overhead"])
    out.append(f"- `detect` (loading from memory, resizing, decoding, boxes to pixels) costs at most "
               f"{worst['overhead'] * 100:+.1f}% over the raw forward pass at the same settings.")
    if device.type == "cpu":
        out.append("- No GPU was used for this file; `python -m benchmarks --device cuda` writes "
                   "`benchmarks/RESULTS-cuda.md`.")
    out.append("")
    return "\n".join(out)


def run_load(args: argparse.Namespace) -> None:
    result = measure_cold_load(2 if args.quick else 3)
    print(f"cold process, checkpoint of {result['checkpoint_mb']:.0f} MB in the cache, median of {result['repeats']}:")
    print(f"  import torch:                                {result['import_torch_s']:.2f} s")
    print(f"  torch.hub.load(..., 'nvidia_ssd') from cache: {result['hub_load_s']:.2f} s (build + safe load)")
    print(f"  whole process:                               {result['process_s']:.2f} s")


def run_decode(args: argparse.Namespace) -> None:
    result = measure_decode(batch=8, repeats=10 if args.quick else 50, device=args.device,
                            baseline_repeats=2 if args.quick else 5)
    print(f"device {result['device']}, batch {result['batch']}, {result['threads']} threads, "
          f"{result['candidates_per_image']:.0f} candidates per image")
    print(f"postprocess + split_detections: {result['decode_ms_per_image']:.3f} ms per image; per-class loop "
          f"{result['baseline_ms_per_image']:.3f} ms (x{result['speedup']:.1f}); identical: "
          f"{result['identical_to_baseline']}")


def run_prepare(args: argparse.Namespace) -> None:
    result = measure_prepare_input(repeats=5 if args.quick else 30)
    print(f"prepare_input on a {result['image']}: ours {result['ours_s'] * 1e3:.2f} ms, NVIDIA's pipeline "
          f"{result['baseline_s'] * 1e3:.2f} ms ({result['speedup']:.1f}x), max |difference| "
          f"{result['max_abs_diff']:.1e}")


def _module_suite(name: str):
    def run(args: argparse.Namespace) -> None:
        import importlib

        importlib.import_module(f"benchmarks.{name}").main(args.rest)

    return run


# Suites with options of their own: everything after the suite's name goes to it (``--suite export -- --help``).
MODULE_SUITES = ("models", "evaluate", "training", "export", "contention", "pictures", "video", "speed", "families")
SUITES = {"load": run_load, "decode": run_decode, "prepare": run_prepare,
          **{name: _module_suite(name) for name in MODULE_SUITES}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("inference", *SUITES), default="inference",
                        help="what to measure (default: inference, every stage, written to RESULTS.md)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and batches, for a smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the results (default: benchmarks/RESULTS.md, or RESULTS-cuda.md)")
    args, args.rest = parser.parse_known_args(argv)
    if args.rest and args.suite not in MODULE_SUITES:
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    if args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    if args.suite != "inference":
        SUITES[args.suite](args)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: expected a machine with CUDA, but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
    out = args.out or ROOT / "benchmarks" / ("RESULTS.md" if device.type == "cpu" else f"RESULTS-{device.type}.md")
    batches = [1, 8] if args.quick else ([1, 8, 32] if device.type == "cpu" else [1, 8, 32, 64, 128, 256])
    detect_batch = 8 if device.type == "cpu" else 256
    detect_configs: list[tuple[str | None, bool]] = (
        [(None, False), ("bf16", False), ("bf16", True)] if device.type == "cpu"
        else [(None, False), ("fp16", False), ("fp16", True), ("bf16", True)]
    )

    started = time.perf_counter()
    print("prepare_input ...", flush=True)
    prep = measure_prepare_input(repeats=5 if args.quick else 30)
    print("decode ...", flush=True)
    decode = measure_decode(batch=8, repeats=10 if args.quick else 50, device=str(device),
                            baseline_repeats=2 if args.quick else 5)
    print("forward ...", flush=True)
    forward = measure_forward(device, batches, args.quick)
    print("detect ...", flush=True)
    detect = measure_detect(device, detect_batch, detect_configs, args.quick)
    command = "python -m benchmarks" + (f" --device {args.device}" if device.type != "cpu" else "") + (
        " --quick" if args.quick else "")
    text = render(device, prep, decode, forward, detect, command)
    text += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
