"""What every command of the command line shares: the parser class (one error style), the shared options (declared
once here, so that ``--precision`` or ``--batch-size`` mean the same in every command) and the error line.

This module imports no torch (nor numpy): building the parsers is what ``ssd --help`` and ``ssd --version`` cost.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, NoReturn

__all__ = ["PRECISIONS", "Parser", "UsageError", "add_batch_size", "add_checkpoint", "add_device", "add_half",
           "add_model", "add_precision", "add_timeout", "add_workers", "autocast", "check_int", "fail", "prog"]

USAGE_STATUS = 2  # argparse's own status for a usage error; every command uses it for bad arguments and inputs
PRECISIONS = ("fp32", "bf16", "fp16")


class UsageError(Exception):
    """A bad argument or input found by a command: printed as one ``error:`` line, exit status 2."""


def prog() -> str:
    # The same parser serves the `ssd` console script and `python -m ssd`; usage lines name what was typed.
    return "python -m ssd" if pathlib.Path(sys.argv[0]).name == "__main__.py" else "ssd"


def fail(message: Any, status: int = USAGE_STATUS) -> int:
    """Print ``message`` as the one error line of a command (with ``[rank R] `` under torchrun); returns ``status``.

    One line whatever the message carried (a list of URLs tried, a runtime's multi-line error): scripts read the
    last line of stderr.
    """
    prefix = ""
    if "torch" in sys.modules:  # under torchrun the rank is worth naming; without torch there is no run to name
        from ..distributed import rank_label

        try:
            prefix = rank_label()
        except ValueError:  # a WORLD_SIZE that is not a number: reported by the command itself
            prefix = ""
    print(f"error: {prefix}{' '.join(str(message).split())}", file=sys.stderr)
    return status


class Parser(argparse.ArgumentParser):
    """argparse with the commands' error style: ``error: MESSAGE (see 'ssd detect --help')`` on one line of stderr
    and exit status 2, instead of argparse's usage block followed by ``prog: error: ...``."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')")
        raise SystemExit(USAGE_STATUS)


# The shared options. Each is declared here once; a command picks its default and, where it has more to say, adds
# a sentence (``extra``) to the common help text.

def add_model(parser: argparse.ArgumentParser, *, files: bool = True, default: str = "nvidia_ssd") -> None:
    """``--model NAME`` (a registered model), or with ``files`` also an exported .onnx / OpenVINO .xml file; with
    ``files`` the ``--backend`` choice for such a file comes with it."""
    from ..registry import list_models  # no torch: the registry's table is plain data

    names = ", ".join(list_models())
    if files:
        parser.add_argument("--model", default=default, metavar="NAME_OR_FILE",
                            help=f"{names} (default {default}), or an exported .onnx / OpenVINO .xml file")
        parser.add_argument("--backend", choices=("auto", "onnxruntime", "openvino"), default=None,
                            help="runtime for --model FILE (default: onnxruntime for .onnx, openvino for .xml); with "
                                 "a model name only auto: the fastest installed backend whose detections agree with "
                                 "fp32 on a check image (OpenVINO, else bf16 on CPUs with native bf16, else fp32), "
                                 "and says which")
    else:
        parser.add_argument("--model", choices=list_models(), default=default, metavar="NAME",
                            help=f"{names} (default {default})")


def add_checkpoint(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument("--checkpoint", default=None, metavar="PATH_OR_URL",
                        help="checkpoint file or URL (default: SSD_CHECKPOINT, else the model's published weights)"
                             + (f"; {extra}" if extra else ""))


def add_device(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--device", default=default,
                        help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")


def add_precision(parser: argparse.ArgumentParser, extra: str = "") -> None:
    """``--precision``: autocast, the same in every command (half weights are ``--half``)."""
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default); bf16 autocast (recent CPUs and GPUs); fp16 autocast (CUDA)"
                             + (f"; {extra}" if extra else ""))


def autocast(precision: str) -> str | None:
    """What the library's ``precision=`` gets for ``--precision`` and ``--half``: None for fp32 (the weights' own
    dtype: float32, or float16 with ``--half``), else the autocast dtype's name."""
    return None if precision == "fp32" else precision


def add_half(parser: argparse.ArgumentParser) -> None:
    """``--half``: half-precision weights, as ``model_math='fp16'`` / ``half=True`` in Python."""
    parser.add_argument("--half", action="store_true",
                        help="half-precision (fp16) weights and inputs, like model_math='fp16' in Python (CUDA)")


def add_batch_size(parser: argparse.ArgumentParser, default: int, extra: str = "") -> None:
    parser.add_argument("--batch-size", type=int, default=default, metavar="N",
                        help=f"images per forward pass (default {default})" + (f"; {extra}" if extra else ""))


def add_workers(parser: argparse.ArgumentParser, default: int | None, extra: str) -> None:
    parser.add_argument("--workers", type=int, default=default, metavar="N",
                        help=f"data-loader processes decoding and resizing images ({extra})")


def add_timeout(parser: argparse.ArgumentParser, default: float = 30.0) -> None:
    parser.add_argument("--timeout", type=float, default=default, metavar="MINUTES",
                        help=f"under torchrun: how long a process waits for the others at each exchange before it "
                             f"stops with an error (default {default:g})")


def check_int(name: str, value: int | None, minimum: int) -> int | None:
    """``value`` when it is None or at least ``minimum``; else a :class:`UsageError` naming the option."""
    if value is not None and value < minimum:
        raise UsageError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value
