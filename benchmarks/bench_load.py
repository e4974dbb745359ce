"""Time to build the model and load its checkpoint from the cache, in a cold process on the CPU.

    python benchmarks/bench_load.py [--repeats 3]

A checkpoint in NVIDIA's training format (made by the test suite's factory) is placed in a temporary torch.hub
cache under the published fp32 file name; each run is a fresh ``python`` process doing
``torch.hub.load(<checkout>, "nvidia_ssd", source="local")``, timed from process start, with the time spent
importing torch reported separately.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from checkpoint_factory import save_training_checkpoint

    with tempfile.TemporaryDirectory() as home:
        cache = Path(home) / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        checkpoint = save_training_checkpoint(cache / "nvidia_ssdpyt_fp32_190826.pt")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    result = measure_cold_load(parser.parse_args().repeats)
    print(f"cold process, checkpoint of {result['checkpoint_mb']:.0f} MB in the cache, median of {result['repeats']}:")
    print(f"  import torch:                                {result['import_torch_s']:.2f} s")
    print(f"  torch.hub.load(..., 'nvidia_ssd') from cache: {result['hub_load_s']:.2f} s (build + safe load)")
    print(f"  whole process:                               {result['process_s']:.2f} s")


if __name__ == "__main__":
    main()
