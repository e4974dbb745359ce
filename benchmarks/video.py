"""What video costs: ``ssd detect video.mp4`` against in-process ``detect`` over the same decoded frames, and the peak
memory of a long video.

    OMP_NUM_THREADS=1 python -m benchmarks --suite video [--frames 48] [--size 320x240] [--long 2000]

Speed: a video of ``--frames`` frames (scikit-image's photos sliding sideways, H.264) goes through the command line
(decode, batched detect, drawing, H.264 encode, JSON Lines) at fp32 and bf16, each in a fresh process; the same
frames, decoded beforehand, go through in-process ``detect`` (``keep_images=False``) in a fresh process too. Both
loops are timed without model loading, first batch included in both. The overhead of the video path is the
difference of the two loops, as a share of the network's own time (``detect``'s ``inference`` stage).

Memory: ``ssd detect`` on videos of 200 and ``--long`` small (160 x 120) frames, SSDLite (untrained; its speed and
memory do not depend on the weights), reporting each process's peak RSS (``resource.getrusage``): memory bounded by
the batch means the two peaks agree.

Needs PyAV (the ``[video]`` extra). The NVIDIA model has random weights with detecting heads (benchmarks/weights.py),
saved to a temporary checkpoint, so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_video(path: pathlib.Path, frames: int, width: int, height: int, fps: int = 25) -> pathlib.Path:
    """``frames`` frames of scikit-image's photos, a ``width`` x ``height`` window sliding across each."""
    import av
    from PIL import Image
    from skimage import data

    photos = [np.asarray(Image.fromarray(p).resize((2 * width, height))) for p in
              (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            photo, offset = photos[(i // 50) % 4], (i % 50) * width // 50
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[:, offset:offset + width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


IN_PROCESS = """
    import json, sys, time, av, torch
    from ssd.inference.detect import detect
    from ssd.inference.drawing import render
    from ssd.io.video import VideoWriter
    from ssd.registry import build_model
    video, precision, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    started = time.perf_counter()
    with av.open(video) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    decoded = time.perf_counter()
    model = build_model("nvidia_ssd")
    started_detect = time.perf_counter()
    found = detect(model, frames, batch_size=batch, precision=None if precision == "fp32" else precision,
                   keep_images=False)
    detected = time.perf_counter()
    height, width = frames[0].shape[:2]
    with VideoWriter(out, 25, width, height) as writer:
        for pixels, result in zip(frames, found):
            writer.write(np.asarray(render(pixels, result.boxes, result.labels.tolist(), result.captions())))
    encoded = time.perf_counter()
    print(json.dumps({"frames": len(found), "seconds": detected - started_detect, "decode": decoded - started,
                      "encode": encoded - detected, "inference": found.times["inference"] * len(found) / 1000.0}))
""".replace("import json, sys, time, av, torch", "import json, sys, time, av, numpy as np, torch")

PEAK = """
    import resource, sys
    import ssd.cli
    status = ssd.cli.main(sys.argv[1:])
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    sys.exit(status)
"""


def _run(args: list[str], env: dict) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def bench_speed(folder: pathlib.Path, frames: int, width: int, height: int, batch: int, env: dict,
                repeats: int) -> None:
    video = make_video(folder / "video.mp4", frames, width, height)
    print(f"{frames} frames of {width}x{height} H.264, batch size {batch}, CPU, OMP_NUM_THREADS="
          f"{env.get('OMP_NUM_THREADS', 'unset')}; best of {repeats}, the two commands alternating:")
    for precision in ("fp32", "bf16"):
        cli, inner = [], []
        for _ in range(repeats):
            out = _run(["-m", "ssd", "detect", str(video), "--out", str(folder / f"out-{precision}"), "--precision",
                        precision, "--batch-size", str(batch)], env)
            match = re.search(r"(\d+) frame\(s\) in ([\d.]+) s", out)
            cli.append((float(match.group(2)), int(match.group(1))))
            inner.append(json.loads(_run(["-c", textwrap.dedent(IN_PROCESS), str(video), precision, str(batch),
                                          str(folder / "inner.mp4")], env).strip().splitlines()[-1]))
        cli_s, cli_frames = min(cli)
        best = min(inner, key=lambda row: row["seconds"])
        overhead = (cli_s - best["seconds"]) / best["inference"]
        parts = (best["decode"] + best["encode"]) / best["inference"]
        print(f"  {precision}: ssd detect {cli_frames / cli_s:5.2f} frames/s ({cli_s:6.1f} s); in-process detect "
              f"{best['frames'] / best['seconds']:5.2f} frames/s ({best['seconds']:6.1f} s, network "
              f"{best['inference']:6.1f} s); difference {overhead:+.1%} of the network time. Measured alone: decode "
              f"{best['decode']:.2f} s + draw and encode {best['encode']:.2f} s = {parts:.1%} of the network time")


def bench_memory(folder: pathlib.Path, counts: list[int], batch: int, env: dict) -> None:
    from ssd.registry import build_model

    checkpoint = folder / "ssdlite.pt"
    torch.save(build_model("ssdlite320_mobilenet_v2", pretrained=False).state_dict(), checkpoint)
    print(f"peak RSS of ssd detect (ssdlite320_mobilenet_v2, 160x120 frames, batch size {batch}):")
    for count in counts:
        video = make_video(folder / f"long-{count}.mp4", count, 160, 120)
        out = _run(["-c", textwrap.dedent(PEAK), "detect", str(video), "--out", str(folder / f"long-{count}"),
                    "--model", "ssdlite320_mobilenet_v2", "--checkpoint", str(checkpoint), "--batch-size",
                    str(batch)], env)
        peak = int(re.search(r"peak_rss_kb (\d+)", out).group(1))
        rate = re.search(r"\(([\d.]+) frames/s\)", out).group(1)
        print(f"  {count:5d} frames: peak RSS {peak / 1024:7.1f} MiB ({rate} frames/s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=48, help="frames of the speed video (default 48)")
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the speed video (default 320x240)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--long", type=int, default=2000, help="frames of the long video (default 2000; 0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command (default 2; the best counts)")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    from benchmarks.weights import detecting_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        checkpoint = folder / "detecting.pt"
        torch.save(detecting_model().state_dict(), checkpoint)
        env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "PYTHONPATH": str(REPO),
               "TORCH_HOME": str(folder / "torch")}
        if not args.skip_speed:
            bench_speed(folder, args.frames, width, height, args.batch_size, env, args.repeats)
        if args.long:
            bench_memory(folder, [200, args.long], args.batch_size, env)


if __name__ == "__main__":
    main()
