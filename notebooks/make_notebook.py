"""Write notebooks/ssd_inference.ipynb from the cells below, so that the notebook is reviewed as code.

    python notebooks/make_notebook.py [OUTPUT.ipynb]
    python notebooks/make_notebook.py --execute [OUTPUT.ipynb]   # also run it, keeping its outputs (figures)
    python notebooks/make_notebook.py --repo owner/name   # name the GitHub repository everywhere, then rewrite

The committed notebook's cells must equal what this script writes (tests/test_notebook.py checks it). Its outputs,
if any, come from one complete ``--execute`` run with NVIDIA's published weights (downloaded on first use, or
``SSD_CHECKPOINT``), so that GitHub's preview shows real detections. Cells have fixed ids, by which the tests find
them.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

# The one place naming the GitHub repository: the Colab badge and the default of REPO in the notebook use it.
GITHUB_REPO = "OWNER/REPO"
NOTEBOOK_PATH = "notebooks/ssd_inference.ipynb"
DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parent / "ssd_inference.ipynb"

SEED_URLS = [
    "http://images.cocodataset.org/val2017/000000397133.jpg",
    "http://images.cocodataset.org/val2017/000000037777.jpg",
    "http://images.cocodataset.org/val2017/000000252219.jpg",
]


def _md(cell_id: str, text: str):
    cell = new_markdown_cell(text.strip("\n"))
    cell.id = cell_id
    return cell


def _code(cell_id: str, source: str):
    cell = new_code_cell(source.strip("\n"))
    cell.id = cell_id
    return cell


def cells() -> list:
    badge = (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/{NOTEBOOK_PATH})"
    )
    urls = "".join(f'    "{url}",\n' for url in SEED_URLS)
    return [
        _md("title", f"""
# SSD300 (ResNet-50) object detection with torch.hub

{badge}

NVIDIA's **Single Shot MultiBox Detector**, trained on COCO, loaded from this repository with `torch.hub`. It follows
NVIDIA's published notebook step by step (Part 1), then does the same with one call (Part 2).

Unlike the original, this notebook runs on a CPU as well as on a GPU: a GPU is used when there is one (on Colab:
*Runtime → Change runtime type → GPU*), in half precision (fp16); on a CPU the model runs in fp32.
"""),
        _md("model", """
### The model

SSD300 takes a 300 x 300 image and predicts, for each of 8732 default boxes, a box offset and a score for each of
the 80 COCO classes (plus background). The backbone is a ResNet-50 instead of the paper's VGG: conv5_x, avgpool, fc
and softmax are removed and conv4_x uses stride 1. Five extra convolutional layers follow, and six detection heads
(with BatchNorm after each convolution) read the last conv4_x layer and the five extra layers.
See [SSD: Single Shot MultiBox Detector](https://arxiv.org/abs/1512.02325) and
[NVIDIA's SSD for PyTorch](https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Detection/SSD).
"""),
        _md("install-md", """
## Setup

On Colab the cell below installs the few extra packages (image loading, resizing, drawing). Elsewhere it does
nothing: install `requirements.txt` of this repository into your environment instead.
"""),
        _code("install", """
import subprocess
import sys

if "google.colab" in sys.modules:  # only on Colab; the equivalent of %pip install -q ...
    packages = ["numpy", "scipy", "scikit-image", "matplotlib", "requests", "tqdm"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)
"""),
        _md("repo-md", """
**Where the code comes from.** Run from a checkout (this folder or the repository's root), the notebook loads that
checkout. Elsewhere (Colab) `REPO` names the GitHub repository that holds `hubconf.py` (`"owner/name"`, or
`"owner/name:branch"`). The `SSD_REPO` environment variable overrides both.
"""),
        _code("config", f"""
import os

import torch

import pathlib
import subprocess

# A local checkout when the notebook runs inside one (from notebooks/ or the root), else the GitHub repository.
here = pathlib.Path.cwd()
checkout = next((str(p) for p in (here, here.parent) if (p / "hubconf.py").is_file()), None)
REPO = os.environ.get("SSD_REPO") or checkout or "{GITHUB_REPO}"

# A local checkout is loaded as it is; from GitHub, torch.hub asks to trust the repository's code first.
source = {{"source": "local"}} if os.path.isdir(REPO) else {{"trust_repo": True}}

device = "cuda" if torch.cuda.is_available() else "cpu"
precision = "fp16" if device == "cuda" else "fp32"  # half precision is fast on GPUs only
print(f"repository: {{REPO}}, device: {{device}}, precision: {{precision}}")
"""),
        _md("checkpoint-md", """
**The weights.** The first load downloads NVIDIA's published COCO checkpoint (about 200 MB) and keeps it in
`torch.hub.get_dir()/checkpoints` (by default `~/.cache/torch/hub/checkpoints`); later loads read it from there.
`precision='fp16'` loads the mixed-precision checkpoint, converts the weights to half precision and keeps BatchNorm
in float32 (no Apex needed). To work offline, point the `SSD_CHECKPOINT` environment variable (or the
`checkpoint=` argument) at a checkpoint file you already have.
"""),
        _code("load-model", """
ssd_model = torch.hub.load(REPO, "nvidia_ssd", model_math=precision, **source)
"""),
        _md("part1", """
## Part 1: step by step, as in NVIDIA's notebook

The processing utilities have the names and meaning of NVIDIA's: load and resize the images, run the network,
decode its 8732 boxes per image, keep the confident ones, and name their classes.
"""),
        _code("load-utils", """
utils = torch.hub.load(REPO, "nvidia_ssd_processing_utils", **source)
"""),
        _md("eval-md", "Prepare the model for inference, on the device chosen above."),
        _code("to-device", """
ssd_model.to(device)
ssd_model.eval()
print(f"SSD300 on {device} in {precision}")
"""),
        _md("samples-md", """
The sample images are the first few test images of the COCO dataset; you can also list paths to your own images
here (or set `SSD_SAMPLE_URLS` to comma-separated URLs or paths). When the first one cannot be downloaded (no
internet), scikit-image's bundled photos are used instead: `prepare_input` and `detect` accept numpy arrays too.
"""),
        _code("samples", f"""
from skimage import data

uris = [
{urls}]
if os.environ.get("SSD_SAMPLE_URLS"):
    uris = [uri.strip() for uri in os.environ["SSD_SAMPLE_URLS"].split(",") if uri.strip()]

try:  # one quick download tells whether the sample images can be reached
    utils.load_image(uris[0], timeout=3)
except (OSError, ValueError) as error:
    print(f"Note: the sample images cannot be loaded ({{error}});\\n"
          "using scikit-image's bundled photos (astronaut, coffee, chelsea) instead.")
    uris = [data.astronaut(), data.coffee(), data.chelsea()]
"""),
        _md("prepare-md", "Format the images to comply with the network input and convert them to a tensor."),
        _code("prepare", """
inputs = [utils.prepare_input(uri) for uri in uris]
tensor = utils.prepare_tensor(inputs, precision == "fp16")
"""),
        _md("run-md", "Run the SSD network to perform object detection."),
        _code("run", """
with torch.no_grad():
    detections_batch = ssd_model(tensor)
"""),
        _md("decode-md", """
By default, the raw output of the network contains, per input image, 8732 boxes with their localization and class
probability distribution. Keep only the reasonable detections (confidence > 40%) in a more comprehensive format.
"""),
        _code("decode", """
results_per_input = utils.decode_results(detections_batch)
best_results_per_input = [utils.pick_best(results, 0.40) for results in results_per_input]
"""),
        _md("classes-md", """
The model was trained on COCO; this gives the names of its 80 classes (shipped with the code: nothing to download).
"""),
        _code("classes", """
classes_to_labels = utils.get_coco_object_dictionary()
"""),
        _md("draw-md", """
Finally, visualize the detections. As in NVIDIA's notebook, they are drawn on the 300 x 300 network input
(boxes are relative to it, hence the `* 300`); unlike it, each box is clipped to the picture first.
"""),
        _code("draw", """
from matplotlib import pyplot as plt
import matplotlib.patches as patches

for image_idx in range(len(best_results_per_input)):
    fig, ax = plt.subplots(1)
    # Show original, denormalized image...
    image = inputs[image_idx] / 2 + 0.5
    ax.imshow(image)
    # ...with detections
    bboxes, classes, confidences = best_results_per_input[image_idx]
    for idx in range(len(bboxes)):
        # Clipped to the picture: the one change to NVIDIA's cell, whose boxes can run past the image's edges.
        left, bot, right, top = bboxes[idx].clip(0, 1)
        x, y, w, h = [val * 300 for val in [left, bot, right - left, top - bot]]
        rect = patches.Rectangle((x, y), w, h, linewidth=1, edgecolor="r", facecolor="none")
        ax.add_patch(rect)
        ax.text(x, y, "{} {:.0f}%".format(classes_to_labels[classes[idx] - 1], confidences[idx] * 100),
                bbox=dict(facecolor="white", alpha=0.5))
plt.show()
"""),
        _md("part2", """
## Part 2: the same in one call

`ssd_model.detect` takes one image or a list (paths, URLs, PIL images, numpy arrays or tensors) and returns one
`Detections` per image, highest score first. Its boxes are `(x1, y1, x2, y2)` in the **original image's pixels**,
so they can be drawn on (or cropped from) the photo itself. The whole image is used (resized to 300 x 300, no crop)
and normalized with the ImageNet mean and standard deviation, as in training. `threshold=0.4` is the default.
"""),
        _code("detect", """
detections = ssd_model.detect(uris)
for d in detections:
    d.plot()
    print(d)
plt.show()
"""),
        _md("results-md", """
Each `Detections` has `.boxes`, `.scores`, `.labels` and `.names`; `.to_dict()` (or `.to_json()`) gives them in a
JSON-ready form, with COCO category ids, and `.save("out.png")` writes the annotated picture at full resolution.
"""),
        _code("results", """
detections[0].to_dict()["detections"][:3]
"""),
        _md("references", """
### References

- [SSD: Single Shot MultiBox Detector](https://arxiv.org/abs/1512.02325)
- [Speed/accuracy trade-offs for modern convolutional object detectors](https://arxiv.org/abs/1611.10012)
- [SSD for PyTorch on NGC](https://ngc.nvidia.com/catalog/model-scripts/nvidia:ssd_for_pytorch)
- [SSD for PyTorch on GitHub](https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Detection/SSD)
"""),
    ]


def build() -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells())
    nb.metadata = {
        "accelerator": "GPU",
        "colab": {"name": "ssd_inference.ipynb", "provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every text that names the repository; `--repo owner/name` rewrites them all, this constant included.
NAMED_IN = ("README.md", "hubconf.py", "docs/*.md", "notebooks/make_notebook.py")


def set_repository(name: str) -> list[pathlib.Path]:
    """Replace :data:`GITHUB_REPO` by ``name`` wherever the repository is named; returns the files changed."""
    if name.count("/") != 1 or not all(part.strip() for part in name.split("/")) or '"' in name:
        raise SystemExit(f"--repo: expected owner/name, got {name!r}")
    changed = []
    for pattern in NAMED_IN:
        for path in sorted(ROOT.glob(pattern)):
            text = path.read_text()
            if GITHUB_REPO in text:
                path.write_text(text.replace(GITHUB_REPO, name))
                changed.append(path)
    return changed


def execute(nb: nbformat.NotebookNode, workdir: pathlib.Path) -> None:
    """Run ``nb`` top to bottom in a fresh python3 kernel started in ``workdir``; a failing cell raises."""
    import nbclient  # a test dependency (requirements-dev.txt), needed only here

    metadata = nbformat.from_dict(nb.metadata)
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    # The kernel records its Python version in language_info: keep the metadata this script writes, so that a run
    # changes outputs only.
    nb.metadata = metadata


def write(nb: nbformat.NotebookNode, output: pathlib.Path) -> None:
    # Through a temporary file, so an interrupted write leaves no truncated notebook. By hand: this script also runs
    # without the library on its path (see --repo).
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            nbformat.write(nb, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make_notebook.py", description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", type=pathlib.Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the notebook (default: {NOTEBOOK_PATH})")
    parser.add_argument("--execute", action="store_true",
                        help="run the notebook (from notebooks/, so it loads this checkout) and keep its outputs")
    parser.add_argument("--repo", metavar="OWNER/NAME",
                        help="name the GitHub repository in every file that names it, then regenerate")
    args = parser.parse_args(argv[1:])
    if args.repo is not None:
        for path in set_repository(args.repo):
            print(f"named {args.repo} in {path.relative_to(ROOT)}")
        # Regenerate from the rewritten script, so the notebook's badge and REPO follow.
        return subprocess.call([sys.executable, __file__])
    if not args.output.parent.is_dir():
        # Checked first: an --execute run takes minutes before it writes anything.
        parser.error(f"output: expected a path in an existing folder, got {str(args.output)!r}")
    nb = build()
    if args.execute:
        execute(nb, DEFAULT_OUTPUT.parent)
    write(nb, args.output)
    print(f"wrote {args.output}" + (" with its outputs" if args.execute else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
