"""Pictures of detections: labelled boxes over the image, drawn with matplotlib."""
from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np


def class_color(label: int) -> tuple[float, float, float]:
    """A stable, distinct colour per class label."""
    from matplotlib import colormaps

    return colormaps["tab20"](int(label) % 20)[:3]


def draw_boxes(ax, image: np.ndarray | None, boxes: np.ndarray, labels: Sequence[int], captions: Sequence[str],
               linewidth: float = 2.0):
    """Draw ``image`` (H x W x 3) and one labelled rectangle per box (x1, y1, x2, y2 in pixels) on ``ax``."""
    from matplotlib.patches import Rectangle

    if image is not None:
        ax.imshow(image)
    for (x1, y1, x2, y2), label, caption in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), labels, captions):
        color = class_color(label)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=linewidth, edgecolor=color, facecolor="none"))
        # Above the box, unless that would leave the picture; then just inside its top edge.
        ax.text(x1, y1, caption, fontsize=8, color="black", va="bottom" if y1 > 14 else "top",
                bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "linewidth": 0})
    ax.set_axis_off()
    return ax


def save_figure_of(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int], captions: Sequence[str],
                   path: str | os.PathLike, dpi: int = 100) -> pathlib.Path:
    """Write the annotated picture at the image's own resolution; no GUI backend is involved.

    The format follows the suffix; a path without one gets ``.png`` appended. Returns the path actually written.
    The file appears whole or not at all (written beside it, then renamed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    if not path.suffix:
        # matplotlib would append ".png" itself and we would return a path that does not exist.
        path = path.with_name(path.name + ".png")
    fmt = path.suffix[1:].lower()
    height, width = image.shape[:2]
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    draw_boxes(ax, image, boxes, labels, captions, linewidth=max(1.0, min(height, width) / 250))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"path: expected a picture suffix ({', '.join('.' + k for k in sorted(supported))}), "
                         f"got {path.suffix!r} in {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            figure.savefig(out, dpi=dpi, format=fmt)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
    return path
