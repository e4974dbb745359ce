"""Time to build the model and load its checkpoint from the cache, in a cold process on the CPU.

    python -m benchmarks --suite load

A checkpoint in NVIDIA's training format (random weights, benchmarks/weights.py) is placed in a temporary torch.hub
cache under the published fp32 file name; each run is a fresh ``python`` process doing
``torch.hub.load(<checkout>, "nvidia_ssd", source="local")``, timed from process start, with the time spent
importing torch reported separately.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import time, json
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
model = torch.hub.load({root!r}, "nvidia_ssd", source="local")
t2 = time.perf_counter()
print(json.dumps({{"import_torch_s": t1 - t0, "hub_load_s": t2 - t1, "source": model.checkpoint_source}}))
"""


def measure_cold_load(repeats: int = 3) -> dict:
    from benchmarks.weights import detecting_state_dict

    with tempfile.TemporaryDirectory() as home:
        cache = Path(home) / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        # Saved the way NVIDIA's training saves it: the weights under "model" beside the training state.
        checkpoint = cache / "nvidia_ssdpyt_fp32_190826.pt"
        torch.save({"epoch": 65, "iteration": 120000, "model": detecting_state_dict()}, checkpoint)
        env = {**os.environ, "TORCH_HOME": home}
        env.pop("SSD_CHECKPOINT", None)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT))], env=env, capture_output=True,
                                  text=True, check=True)
            total = time.perf_counter() - start
            runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": total})
        size_mb = checkpoint.stat().st_size / 1e6
    if not all(r["source"].endswith("nvidia_ssdpyt_fp32_190826.pt") for r in runs):
        raise RuntimeError(f"the model did not load the cached checkpoint: {runs}")
    return {"checkpoint_mb": size_mb, "repeats": repeats,
            **{key: statistics.median(r[key] for r in runs) for key in ("import_torch_s", "hub_load_s", "process_s")}}
