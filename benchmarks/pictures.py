"""What pictures cost: one annotated picture per image (matplotlib PNG, as the CLI drew them before, vs Pillow PNG and
JPEG), and `python -m ssd detect` on 16 JPEGs vs the same work in-process.

    OMP_NUM_THREADS=1 python -m benchmarks --suite pictures [--cli-repo OTHER_CHECKOUT]

The network has random weights (saved to a temporary checkpoint that SSD_CHECKPOINT points at), so nothing is
downloaded; its speed does not depend on the weights. ``--cli-repo`` times the command line of another checkout
(e.g. an older commit, for a before/after) on the same inputs.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from benchmarks.timing import median_seconds
from ssd.inference.detections import Detections
from ssd.inference.drawing import draw_boxes
from ssd.models import SSD300

REPO = pathlib.Path(__file__).resolve().parents[1]


def matplotlib_png(found: Detections, path: pathlib.Path) -> None:
    """The former ``save_figure_of``: a figure at the image's resolution, drawn with draw_boxes, saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = found.image_size
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    draw_boxes(ax, found.image, found.boxes, found.labels.tolist(), found.captions(),
               linewidth=max(1.0, min(height, width) / 250))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    figure.savefig(path, dpi=100)


def sample_detections() -> Detections:
    image = np.asarray(Image.fromarray(data.astronaut()).resize((640, 480)))
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 400, size=(8, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(40, 200, size=(8, 2))], axis=1).astype(np.float32)
    boxes = np.clip(boxes, 0, [640, 480, 640, 480]).astype(np.float32)
    return Detections(boxes, np.linspace(0.99, 0.5, 8, dtype=np.float32), np.arange(1, 9), (480, 640), "bench",
                      image)


def bench_pictures(folder: pathlib.Path, repeats: int) -> None:
    found = sample_detections()
    rows = [
        ("matplotlib PNG (before)", lambda: matplotlib_png(found, folder / "mpl.png")),
        ("Pillow PNG", lambda: found.save(folder / "pil.png")),
        ("Pillow JPEG q90", lambda: found.save(folder / "pil.jpg")),
    ]
    print(f"one annotated 640x480 picture, 8 boxes (median of {repeats}):")
    for name, fn in rows:
        print(f"  {name:<24} {1000 * median_seconds(fn, repeats, warmup=2):7.1f} ms")


def bench_cli(folder: pathlib.Path, cli_repos: list[pathlib.Path]) -> None:
    photos = folder / "photos"
    photos.mkdir()
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for i in range(16):
        Image.fromarray(sources[i % 4]).save(photos / f"photo{i:02d}.jpg", quality=90)
    torch.manual_seed(0)
    checkpoint = folder / "random.pt"
    torch.save(SSD300().state_dict(), checkpoint)
    env = {**os.environ, "SSD_CHECKPOINT": str(checkpoint)}
    print("16 JPEGs (512x512, 300x451, 400x600, 427x640), batch size 8, fp32, CPU:")
    for repo in cli_repos:
        out = folder / f"cli-{abs(hash(repo))}"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ssd", "detect", str(photos), "--out", str(out)],
                              cwd=repo, env={**env, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the command line of {repo} failed:\n{done.stderr}")
        inner = done.stdout.strip().splitlines()[-1]
        print(f"  python -m ssd detect ({repo}): {wall:6.2f} s wall, {1000 * wall / 16:6.0f} ms/image  [{inner}]")
    os.environ["SSD_CHECKPOINT"] = str(checkpoint)
    from ssd.registry import build_model

    start = time.perf_counter()
    model = build_model("nvidia_ssd")
    built = time.perf_counter()
    batch = model.detect(sorted(photos.iterdir()), batch_size=8)
    detected = time.perf_counter()
    batch.save(folder / "inprocess")
    saved = time.perf_counter()
    print(f"  in-process: build {built - start:5.2f} s, detect {detected - built:5.2f} s "
          f"({1000 * (detected - built) / 16:4.0f} ms/image), save {saved - detected:5.2f} s "
          f"({1000 * (saved - detected) / 16:4.1f} ms/image); detect's own split: "
          + ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in batch.times.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cli-repo", action="append", type=pathlib.Path, default=[],
                        help="also time this checkout's command line (repeatable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bench_pictures(pathlib.Path(tmp), args.repeats)
        bench_cli(pathlib.Path(tmp), [*args.cli_repo, REPO])


if __name__ == "__main__":
    main()
