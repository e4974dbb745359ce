"""The pictures an evaluation writes: ``pr_curve.png`` and ``confusion_matrix.png`` (with ``confusion_matrix.json``).

Drawn on a bare ``matplotlib.figure.Figure``, rendered by matplotlib's Agg (PNG) canvas: pyplot is never imported,
so no window opens, no global backend is switched and nothing is left in pyplot's figure list (a training run
redrawing these every epoch does not leak figures). Files are written atomically (:func:`ssd.io.files.write_figure`).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from ..io.files import write_figure, write_json
from .metrics import ConfusionMatrix, PRCurves, top_classes

__all__ = ["CONFUSION_JSON", "CONFUSION_PNG", "PLOT_FILES", "PR_CURVE_PNG", "plot_confusion_matrix",
           "plot_pr_curves", "write_plots"]

PR_CURVE_PNG = "pr_curve.png"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
PLOT_FILES = (PR_CURVE_PNG, CONFUSION_PNG, CONFUSION_JSON)
TOP_CLASSES = 10  # classes drawn one by one on the PR curves (the best by AP); more would be unreadable
_ANNOTATE_UP_TO = 30  # the confusion matrix prints its counts in the cells up to this many classes


def plot_pr_curves(curves: PRCurves, path: str | os.PathLike[str]) -> None:
    """Two panels, IoU 0.5 and IoU 0.5:0.95: precision against recall over all classes (thick) and for the
    :data:`TOP_CLASSES` classes with the highest AP@[.5:.95] (thin), each labelled with its AP."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5.5), layout="constrained")
    axes = figure.subplots(1, 2)
    aps = {name: float(p.mean()) for name, p in curves.per_class.items()}
    shown = top_classes(aps, TOP_CLASSES)
    panels = ((axes[0], "IoU 0.5", curves.precision50, curves.per_class50),
              (axes[1], "IoU 0.5:0.95", curves.precision, curves.per_class))
    for ax, title, overall, per_class in panels:
        for name in shown:
            ax.plot(curves.recall, per_class[name], linewidth=1, label=f"{name} {per_class[name].mean():.3f}")
        if overall.size:
            ax.plot(curves.recall, overall, linewidth=3, color="tab:blue" if not shown else "black",
                    label=f"all classes {overall.mean():.3f} mAP")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=f"Precision-recall, {title}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    if len(curves.per_class) > len(shown):
        figure.suptitle(f"{len(shown)} of {len(curves.per_class)} classes drawn (highest AP@[.5:.95]); the thick "
                        "line averages all of them", fontsize="medium")
    write_figure(figure, path)


def plot_confusion_matrix(confusion: ConfusionMatrix, path: str | os.PathLike[str]) -> None:
    """The matrix as a heat map, coloured by the share of each true class's row (so rare and common classes read
    alike), with the counts in the cells for up to 30 classes."""
    from matplotlib.figure import Figure

    labels = confusion.labels
    n = len(labels)
    side = min(max(6.0, 0.2 * n + 3), 18.0)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = figure.subplots()
    counts = confusion.matrix.astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    # Nearest, coloured before resampling: one flat square per cell, and no smoothing pass over a picture of
    # millions of pixels (which made an 81-class matrix take seconds).
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", interpolation_stage="rgba")
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's row")
    font = "small" if n <= 15 else "x-small"
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix (IoU > {confusion.iou_threshold:g}, score > {confusion.score_threshold:g})")
    if n <= _ANNOTATE_UP_TO:
        for i in range(n):
            for j in range(n):
                if confusion.matrix[i, j]:
                    ax.text(j, i, str(int(confusion.matrix[i, j])), ha="center", va="center", fontsize=font,
                            color="white" if shares[i, j] > 0.5 else "black")
    write_figure(figure, path)


def write_plots(folder: str | os.PathLike[str], curves: PRCurves, confusion: ConfusionMatrix) -> list[pathlib.Path]:
    """``pr_curve.png``, ``confusion_matrix.png`` and ``confusion_matrix.json`` in ``folder`` (created if missing);
    returns their paths."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in PLOT_FILES]
    plot_pr_curves(curves, paths[0])
    plot_confusion_matrix(confusion, paths[1])
    write_json(paths[2], confusion.to_dict())
    return paths
