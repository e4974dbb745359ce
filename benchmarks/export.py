"""Which way of running SSD300 is fastest on this CPU: eager PyTorch (fp32, channels_last, bf16), torch.compile,
onnxruntime and OpenVINO, per image at one batch size, for the network alone and for ``detect`` end to end.

    python -m benchmarks.export [--batch 8] [--repeats 3] [--threads N] [--no-compile] [--out FILE.md]

Needs the export extras (``pip install -r requirements-export.txt``); rows whose runtime is missing are skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.timing import median_seconds
from benchmarks.weights import detecting_model
from ssd.backends.plan import usable_cores
from ssd.io.files import atomic_open
from ssd.transforms import preprocess_for_detection

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# torch.compile of a ResNet-50 trunk is minutes on a small CPU; beyond this it is not "reasonable" here.
COMPILE_BUDGET_S = 300.0


def sample_photos(count: int) -> list[np.ndarray]:
    """``count`` images cycling through scikit-image's four photographs."""
    from skimage import data

    photos = [getattr(data, name)() for name in PHOTOS]
    return [photos[i % len(photos)] for i in range(count)]


def _batch(images: list[np.ndarray], spec: Any) -> torch.Tensor:
    return preprocess_for_detection([torch.from_numpy(p).permute(2, 0, 1) for p in images], spec.input)


def _eager(model: torch.nn.Module, channels_last: bool, bf16: bool) -> tuple[Callable[[torch.Tensor], Any], Any]:
    import copy

    net = copy.deepcopy(model).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> Any:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return net(x)

    return run, net


def measure_backends(batch: int = 8, repeats: int = 3, threads: int | None = None, compile_model: bool = True,
                     workdir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``{"name", "forward_ms", "detect_ms", "note"}``: per-image milliseconds at ``batch`` for the network
    (images already preprocessed) and for ``detect`` on in-memory photos (load, resize, network, decode, boxes)."""
    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    model = detecting_model()
    spec = model.spec
    images = sample_photos(batch)
    x = _batch(images, spec)
    rows: list[dict] = []

    def add(name: str, forward: Callable[[], Any] | None, detect: Callable[[], Any] | None, note: str = "") -> None:
        row = {"name": name, "forward_ms": None, "detect_ms": None, "note": note}
        if forward is not None:
            row["forward_ms"] = 1000 * median_seconds(forward, repeats, warmup=1) / batch
        if detect is not None:
            row["detect_ms"] = 1000 * median_seconds(detect, repeats, warmup=1) / batch
        rows.append(row)
        log(f"{name}: forward {row['forward_ms'] or float('nan'):.1f} ms/image, "
            f"detect {row['detect_ms'] or float('nan'):.1f} ms/image {note}")

    for name, cl, bf16, precision in (("eager fp32", False, False, None),
                                      ("eager fp32 + channels_last", True, False, None),
                                      ("eager bf16 autocast + channels_last", True, True, "bf16")):
        run, net = _eager(model, cl, bf16)
        add(name, lambda run=run: run(x),
            lambda net=net, precision=precision: net.detect(images, batch_size=batch, precision=precision))

    if compile_model:
        try:
            compiled = torch.compile(_eager(model, False, False)[1])
            started = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
            took = time.perf_counter() - started
            if took > COMPILE_BUDGET_S:
                raise TimeoutError(f"first call took {took:.0f} s")

            def run_compiled() -> None:
                with torch.inference_mode():
                    compiled(x)

            add("torch.compile fp32", run_compiled, None, f"(compile + first call {took:.0f} s)")
        except Exception as exc:  # noqa: BLE001 - a benchmark row, not a failure: report why it is missing
            rows.append({"name": "torch.compile fp32", "forward_ms": None, "detect_ms": None,
                         "note": f"failed: {type(exc).__name__}: {str(exc)[:120]}"})
            log(f"torch.compile fp32: {rows[-1]['note']}")

    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        try:
            from ssd.backends import OnnxBackend, OpenVinoBackend
            from ssd.export import export_onnx, export_openvino
            from ssd.inference import detect

            raw = export_onnx(model, pathlib.Path(folder) / "ssd.onnx")
            nms = export_onnx(model, pathlib.Path(folder) / "ssd-nms.onnx", nms=True)
        except ImportError as exc:
            log(f"export extras missing, ONNX/OpenVINO rows skipped: {exc}")
            return rows
        feed = x.numpy()
        try:
            runner = OnnxBackend(raw, threads=threads)
            add("onnxruntime fp32", lambda: runner.run(feed), lambda: detect(runner, images, batch_size=batch))
            in_graph = OnnxBackend(nms, threads=threads)
            add("onnxruntime fp32, NMS in graph", lambda: in_graph.run(feed),
                lambda: detect(in_graph, images, batch_size=batch))
        except ImportError as exc:
            log(f"onnxruntime rows skipped: {exc}")
        try:
            xml = export_openvino(model, pathlib.Path(folder) / "ssd.xml")
            for precision in ("fp32", "default"):
                ov = OpenVinoBackend(xml, precision=precision, threads=threads)
                # Shown as the precision OpenVINO actually chose (e.g. bf16 on AMX CPUs for "default").
                hint = getattr(ov.compiled.get_property("INFERENCE_PRECISION_HINT"), "get_type_name", str)()
                add(f"OpenVINO {precision} ({hint})", lambda ov=ov: ov.run(feed),
                    lambda ov=ov: detect(ov, images, batch_size=batch))
        except ImportError as exc:
            log(f"OpenVINO rows skipped: {exc}")
    return rows


def compare_memory_formats(names: tuple[str, ...] = PHOTOS, top: int = 5) -> list[dict]:
    """Per photo, whether channels_last fp32 gives the same top detections (labels, boxes to 1e-4 relative,
    scores to 1e-4) as contiguous fp32."""
    from skimage import data

    model = detecting_model()
    channels_last = _eager(model, True, False)[1]
    out = []
    for name in names:
        image = getattr(data, name)()
        a = model.detect(image)[0]
        b = channels_last.detect(image)[0]
        height, width = a.image_size
        scale = np.array([width, height, width, height], dtype=np.float32)
        n = min(top, len(a), len(b))
        same = (len(a) == len(b) and np.array_equal(a.labels[:n], b.labels[:n])
                and np.allclose(a.boxes[:n] / scale, b.boxes[:n] / scale, atol=1e-4, rtol=0)
                and np.allclose(a.scores[:n], b.scores[:n], atol=1e-4, rtol=0))
        worst = float(np.abs(a.boxes[:n] / scale - b.boxes[:n] / scale).max()) if n and len(a) == len(b) else None
        out.append({"photo": name, "detections": (len(a), len(b)), "same_top": bool(same), "worst_box": worst})
    return out


def render(rows: list[dict], formats: list[dict], batch: int, threads: int) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    best = min((r for r in rows if r["forward_ms"]), key=lambda r: r["forward_ms"], default=None)
    lines = [f"## Fastest on this machine (batch {batch}, {threads} thread(s), ms per image)", "",
             "| configuration | network ms/image | `detect` ms/image | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {ms(r['forward_ms'])} | {ms(r['detect_ms'])} | {r['note']} |" for r in rows]
    if best:
        lines += ["", f"Fastest network: {best['name']} ({best['forward_ms']:.1f} ms per image)."]
    lines += ["", "channels_last fp32 vs contiguous fp32, top detections on real photos:", ""]
    lines += [f"- {f['photo']}: {f['detections']} detections, same top: {f['same_top']}, worst box difference "
              f"{f['worst_box']}" for f in formats]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: this process's cores")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    threads = args.threads or usable_cores()
    started = time.perf_counter()
    rows = measure_backends(args.batch, args.repeats, threads, not args.no_compile)
    text = render(rows, compare_memory_formats(), args.batch, threads)
    text += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.out is not None:
        with atomic_open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
