"""What a training run shows and writes for people: the progress bar, the line per epoch, ``results.csv``,
``results.png`` and (optionally) TensorBoard event files.

``metrics.jsonl`` (:mod:`ssd.training.outputs`) is the record of a run; ``results.csv`` and ``results.png`` are
views of it, rebuilt from it after every epoch (:func:`write_results`), so that a resumed run's views continue the
killed run's without repeats (the metrics are trimmed on resume) and a view can always be redrawn from the metrics
alone. Both are written atomically (:func:`ssd.io.files.atomic_path`): a reader never sees half a file.

Everything here runs on rank 0 only; :class:`Reporter` with ``main=False`` does nothing. Its ``seconds`` and
``epoch_seconds`` attributes add up the time spent in its own calls, in all and per epoch, so that a run can say
what its reporting cost (``train``'s summary; benchmarks/RESULTS.md).
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..io.files import atomic_open, atomic_path

__all__ = ["CSV_COLUMNS", "Reporter", "check_tensorboard", "epoch_line", "finite", "format_seconds", "read_epochs",
           "validation_record", "write_results", "write_results_csv", "write_results_png"]

# One row per epoch; mAP and AP50 are empty for an epoch without validation.
CSV_COLUMNS = ("epoch", "iteration", "loss", "lr", "images_per_second", "seconds", "mAP", "AP50")
TENSORBOARD_FOLDER = "tensorboard"


def finite(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite (metrics.jsonl is strict JSON: what does not exist is null)."""
    return value if math.isfinite(value) else None


def validation_record(result: object) -> dict[str, Any]:
    """``mAP``, ``stats`` and ``per_class_ap`` from what ``validate`` returned: a mapping, or an object with ``stats``
    (and ``per_class_ap``, as :class:`ssd.evaluation.EvalResult` has)."""
    if isinstance(result, Mapping):
        stats = result.get("stats")
        mean_ap = result.get("mAP", stats[0] if stats is not None and len(stats) else None)
        per_class = result.get("per_class_ap")
    else:
        stats = getattr(result, "stats", None)
        mean_ap = stats[0] if stats is not None and len(stats) else None
        per_class = getattr(result, "per_class_ap", None)
    if mean_ap is None:
        raise TypeError(f"validate: expected a mapping with 'mAP' or a result with 'stats', got {result!r}")
    record: dict[str, Any] = {"mAP": finite(float(mean_ap))}
    if stats is not None:
        record["stats"] = [finite(float(v)) for v in stats]
        if len(stats) > 1:
            record["AP50"] = finite(float(stats[1]))  # COCOeval's second number: AP at IoU 0.5
    if per_class is not None:
        if not isinstance(per_class, Mapping):
            raise TypeError(f"validate: expected per_class_ap as a mapping of class name to AP, got "
                            f"{type(per_class).__name__}")
        record["per_class_ap"] = {str(name): finite(float(ap)) for name, ap in per_class.items()}
    return record


def check_tensorboard() -> None:
    """Raise ImportError naming the extra when TensorBoard's writer cannot be imported."""
    try:
        import tensorboard  # noqa: F401 - only whether it is there
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ImportError("tensorboard: expected the tensorboard package for --tensorboard (TrainConfig.tensorboard), "
                          "got none installed; install the extra with pip install 'ssd-hub[tensorboard]' (or pip "
                          "install tensorboard)") from None


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m``; below a minute ``12.3s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def read_epochs(metrics_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per epoch from ``metrics.jsonl`` (columns :data:`CSV_COLUMNS`), the last record of an epoch winning;
    lines that are not JSON objects (a torn last line) are skipped."""
    rows: dict[int, dict[str, Any]] = {}
    try:
        lines = pathlib.Path(metrics_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            continue
        kind = record.get("type")
        row = rows.setdefault(record["epoch"], {name: None for name in CSV_COLUMNS} | {"epoch": record["epoch"]})
        if kind == "epoch":
            for name in ("iteration", "loss", "lr", "images_per_second", "seconds"):
                row[name] = record.get(name)
        elif kind == "validation":
            stats = record.get("stats") or []
            row["mAP"] = record.get("mAP")
            row["AP50"] = record.get("AP50", stats[1] if len(stats) > 1 else None)
    return [rows[epoch] for epoch in sorted(rows) if rows[epoch]["iteration"] is not None]


def write_results_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """``results.csv``: a header of :data:`CSV_COLUMNS` and one row per epoch (empty cells for missing values)."""
    with atomic_open(path, "w", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(name) is None else row[name] for name in CSV_COLUMNS])


def write_results_png(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "") -> None:
    """``results.png``: loss, learning rate, mAP and AP50 against the epoch, four small panels (about 640 x 480
    pixels). Drawn on a Figure of its own with the Agg canvas: no pyplot state, safe beside notebooks and threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    # Fixed margins: the constrained layout engine would double the cost of every redraw.
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.87, wspace=0.3, hspace=0.6)
    FigureCanvasAgg(figure)
    panels = (("loss", "mean loss"), ("lr", "learning rate (last iteration)"), ("mAP", "val mAP@[.5:.95]"),
              ("AP50", "val AP50"))
    epochs = [row["epoch"] for row in rows]
    for index, (key, label) in enumerate(panels):
        axes = figure.add_subplot(2, 2, index + 1)
        points = [(e, row[key]) for e, row in zip(epochs, rows) if row.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.5)
        else:
            axes.text(0.5, 0.5, "no validation" if key in ("mAP", "AP50") else "no data", ha="center",
                      va="center", transform=axes.transAxes, color="grey")
        axes.set_title(label, fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        # Plain numbers on the ticks: matplotlib's offset text ("1e-4") would sit on the panel's title.
        axes.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    if title:
        figure.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def write_results(metrics_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], title: str = "") -> None:
    """Rebuild ``out_dir/results.csv`` and ``out_dir/results.png`` from ``metrics_path`` (``metrics.jsonl``)."""
    rows = read_epochs(metrics_path)
    out_dir = pathlib.Path(out_dir)
    write_results_csv(rows, out_dir / "results.csv")
    write_results_png(rows, out_dir / "results.png", title)


class Reporter:
    """Rank 0's progress bar, epoch lines, result files and TensorBoard scalars for one call of ``train``.

    Args:
        out_dir: the run's folder.
        main: whether this is rank 0; the others report nothing.
        log: receives the one-line messages (the line per epoch); None for none.
        progress: show a tqdm bar per epoch on stderr.
        tensorboard: write TensorBoard scalars to ``out_dir/tensorboard``.
        fresh: a fresh run (not resumed): an earlier run's event files are removed.
        title: the title of ``results.png`` (the model's name).
    """

    def __init__(self, out_dir: pathlib.Path, *, main: bool, log: Callable[[str], None] | None, progress: bool,
                 tensorboard: bool, fresh: bool, title: str = "") -> None:
        self.out_dir, self.main, self.log, self.title = out_dir, main, log, title
        self.progress = progress and main
        self.seconds = 0.0  # time spent in this object's calls (the reporting overhead)
        self.epoch_seconds: list[float] = []  # of it, per epoch (bar, line, files, TensorBoard; one-time imports too)
        self._counted = 0.0
        self._bar: Any = None
        self._writer: Any = None
        if main and tensorboard:
            started = time.perf_counter()
            from torch.utils.tensorboard import SummaryWriter

            folder = out_dir / TENSORBOARD_FOLDER
            if fresh and folder.is_dir():
                shutil.rmtree(folder)  # an earlier run's curves would mix with this one's
            self._writer = SummaryWriter(log_dir=str(folder))
            self.seconds += time.perf_counter() - started

    def say(self, message: str) -> None:
        if not (self.main and self.log is not None):
            return
        if self._bar is not None:
            # Printed above the bar, which tqdm then redraws (a plain print would tear it).
            from tqdm.auto import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                self.log(message)
        else:
            self.log(message)

    def start_epoch(self, epoch: int, epochs: int, iterations: int) -> None:
        if not self.progress:
            return
        started = time.perf_counter()
        from tqdm.auto import tqdm

        self._bar = tqdm(total=iterations, desc=f"epoch {epoch}/{epochs - 1}", unit="it", file=sys.stderr,
                         dynamic_ncols=True, leave=False)
        self.seconds += time.perf_counter() - started

    def iteration(self, iteration: int, loss: float, lr: float, images_per_second: float | None,
                  logged: bool) -> None:
        """One optimisation step done; ``logged``: it is one of the iterations written to the metrics."""
        if not self.main:
            return
        started = time.perf_counter()
        if self._bar is not None:
            speed = f", {images_per_second:.1f} img/s" if images_per_second is not None else ""
            self._bar.set_postfix_str(f"it {iteration}, loss {loss:.4f}, lr {lr:.3g}{speed}", refresh=False)
            self._bar.update(1)
        if self._writer is not None and logged:
            self._writer.add_scalar("train/loss", loss, iteration)
            self._writer.add_scalar("train/lr", lr, iteration)
            if images_per_second is not None:
                self._writer.add_scalar("train/images_per_second", images_per_second, iteration)
        self.seconds += time.perf_counter() - started

    def end_epoch(self) -> None:
        if self._bar is not None:
            started = time.perf_counter()
            self._bar.close()
            self._bar = None
            self.seconds += time.perf_counter() - started

    def epoch_done(self, line: str, loss: float, validation: Mapping[str, Any] | None, iteration: int,
                   metrics_path: pathlib.Path) -> None:
        """The epoch's ``line`` (see :func:`epoch_line`), the result files rebuilt from the metrics, and the epoch's
        TensorBoard scalars."""
        if not self.main:
            return
        started = time.perf_counter()
        self.say(line)
        write_results(metrics_path, self.out_dir, self.title)
        if self._writer is not None:
            self._writer.add_scalar("epoch/loss", loss, iteration)
            if validation is not None:
                for key in ("mAP", "AP50"):
                    if validation.get(key) is not None:
                        self._writer.add_scalar(f"val/{key}", validation[key], iteration)
                for name, ap in (validation.get("per_class_ap") or {}).items():
                    if ap is not None:
                        self._writer.add_scalar(f"val_ap/{name}", ap, iteration)
            self._writer.flush()
        self.seconds += time.perf_counter() - started
        self.epoch_seconds.append(self.seconds - self._counted)
        self._counted = self.seconds

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def epoch_line(epoch: int, last_epoch: int, loss: float, seconds: float, validation: Mapping[str, Any] | None,
               improved: bool, eta_seconds: float, saved: str) -> str:
    """``epoch 3 done: loss 2.1345, validation: mAP 0.4120 (best), AP50 0.7010, 12.3s, ETA 1m26s; saved ...``
    (epochs count from 0, as in the metrics and checkpoints; ``last_epoch`` is the run's last)."""
    parts = [f"epoch {epoch} done: loss {loss:.4f}"]
    if validation is not None:
        parts.append(f"validation: mAP {_number(validation.get('mAP'))}{' (best)' if improved else ''}, "
                     f"AP50 {_number(validation.get('AP50'))}")
    parts.append(format_seconds(seconds))
    if epoch < last_epoch:
        parts.append(f"ETA {format_seconds(eta_seconds)}")
    return ", ".join(parts) + f"; saved {saved}"


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
