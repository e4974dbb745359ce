"""NVIDIA's published notebook code (tests/data/seed_notebook.md), run as published against this repository."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from helpers import REPO
from helpers.checkpoints import save_detecting_checkpoint

# Runs notebooks, README code, packaging or subprocesses: minutes (make test-fast leaves it out).
pytestmark = pytest.mark.slow

SEED = REPO / "tests" / "data" / "seed_notebook.md"


def seed_code_blocks() -> list[str]:
    """The Python cells of the published notebook (the %%bash pip cell is skipped)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", SEED.read_text(), flags=re.S)
    return [b for b in blocks if not b.lstrip().startswith("%%bash")]


def test_seed_notebook_runs_unchanged_but_for_the_repository(tmp_path, hub_dir, monkeypatch, http_server):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("SSD_CHECKPOINT", str(save_detecting_checkpoint(tmp_path / "ckpt.pt")))
    # The three COCO photos cannot be fetched here: the same URLs' paths are served from 127.0.0.1.
    photos = {"000000397133.jpg": data.astronaut(), "000000037777.jpg": data.coffee(),
              "000000252219.jpg": data.chelsea()}
    for name, pixels in photos.items():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
        http_server.add(f"/val2017/{name}", buffer.getvalue(), headers={"Content-Type": "image/jpeg"})

    code = "\n".join(seed_code_blocks())
    published_load = r"torch\.hub\.load\('NVIDIA/DeepLearningExamples:torchhub', (.*)\)"
    assert len(re.findall(published_load, code)) == 2
    code = re.sub(published_load, lambda m: f"torch.hub.load({str(REPO)!r}, {m.group(1)}, source='local')", code)
    substitutions = [("http://images.cocodataset.org/val2017/", http_server.url("/val2017/"))]
    if not torch.cuda.is_available():  # the notebook asks for a GPU runtime; this machine has none
        substitutions.append(("ssd_model.to('cuda')", "ssd_model.to('cpu')"))
    for published, local in substitutions:
        assert published in code, published
        code = code.replace(published, local)

    namespace: dict = {}
    plt.close("all")
    exec(compile(code, str(SEED), "exec"), namespace)  # noqa: S102 - the published notebook is the test input

    assert namespace["tensor"].shape == (3, 3, 300, 300)
    assert len(namespace["classes_to_labels"]) == 80
    best = namespace["best_results_per_input"]
    assert len(best) == 3 and all(len(b[0]) >= 1 for b in best)
    figures = [plt.figure(n) for n in plt.get_fignums()]
    assert len(figures) == 3
    drawn = [len(fig.axes[0].patches) for fig in figures]
    assert drawn == [len(b[0]) for b in best] and min(drawn) >= 1
    texts = [t.get_text() for fig in figures for t in fig.axes[0].texts]
    assert any(t.startswith("person") for t in texts)
    np.testing.assert_array_less(-1.0001, namespace["inputs"][0])  # seed normalization: [-1, 1]
    plt.close("all")


def test_seed_code_blocks_are_the_published_ones():
    blocks = seed_code_blocks()
    assert len(blocks) == 9
    assert "decode_results(detections_batch)" in "".join(blocks)


@pytest.mark.parametrize("fp16", [False, True])
def test_prepare_tensor_defaults_to_an_available_device(fp16):
    from utils import prepare_tensor

    tensor = prepare_tensor([np.zeros((300, 300, 3)), np.ones((300, 300, 3))], fp16)
    assert tensor.shape == (2, 3, 300, 300)
    assert tensor.dtype == (torch.float16 if fp16 else torch.float32)
    assert tensor.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tensor[1].min() == 1
