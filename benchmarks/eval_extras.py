"""What evaluation's extras cost beside COCOeval: per-class AP and PR curves (read from COCOeval's array), the
confusion matrix, and drawing ``pr_curve.png`` / ``confusion_matrix.png`` (``write_plots``).

A COCO-sized synthetic case, no model and no images: 80 classes, ``--images`` images (default 500) of 7 objects,
each object with 14 jittered detections (70% of its class), so 98 per image. Run:
``OMP_NUM_THREADS=1 python -m benchmarks.eval_extras --images 500``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time

import numpy as np


def synthetic(images: int, classes: int = 80, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    entries = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, images + 1)]
    anns, rows = [], []
    for image in entries:
        for _ in range(7):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(20, 140), rng.uniform(20, 130)
            cat = int(rng.integers(1, classes + 1))
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            for _ in range(14):
                jitter = rng.normal(0, 8, 4)
                rows.append([image["id"], x + jitter[0], y + jitter[1], w + abs(jitter[2]), h + abs(jitter[3]),
                             rng.random(), cat if rng.random() < 0.7 else int(rng.integers(1, classes + 1))])
    categories = [{"id": k, "name": f"class{k}"} for k in range(1, classes + 1)]
    return {"images": entries, "annotations": anns, "categories": categories}, np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()

    from pycocotools.cocoeval import COCOeval

    from ssd.evaluation import load_annotations
    from ssd.evaluation.metrics import confusion_matrix, per_class_ap, pr_curves
    from ssd.evaluation.plots import write_plots

    document, rows = synthetic(args.images)
    coco = load_annotations(document)
    timings = {}
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        evaluator = COCOeval(coco, coco.loadRes(rows), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        timings["COCOeval (evaluate, accumulate, summarize)"] = time.perf_counter() - started
    started = time.perf_counter()
    per_class_ap(evaluator), per_class_ap(evaluator, 0.5)
    curves = pr_curves(evaluator)
    timings["per-class AP and AP50, PR curves"] = time.perf_counter() - started
    started = time.perf_counter()
    confusion = confusion_matrix(coco, rows, sorted(coco.imgs))
    timings["confusion matrix"] = time.perf_counter() - started
    import matplotlib  # noqa: F401 - imported before timing the drawing: its import is a one-off cost

    with tempfile.TemporaryDirectory() as folder:
        for attempt in ("first", "second"):
            started = time.perf_counter()
            write_plots(folder, curves, confusion)
            timings[f"write_plots ({attempt} call)"] = time.perf_counter() - started
    print(f"{args.images} images, {len(rows)} detections, 80 classes")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
