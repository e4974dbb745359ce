"""The command line: ``ssd COMMAND ...`` (the console script) and ``python -m ssd COMMAND ...``.

The only package with argparse. Each command is one module of this package with

- ``register(subparsers)``: adds its subcommand(s) with ``subparsers.add_parser(...)`` (a :class:`~.common.Parser`,
  so errors keep the one style) and ``set_defaults(run=...)``, the function that runs it from the parsed arguments
  and returns the exit status;
- module-level imports free of torch: heavy imports go inside the run functions, so that ``ssd --help`` and
  ``ssd --version`` stay fast.

Adding a command is that module plus its name in :data:`COMMANDS`. Shared options (``--model``, ``--checkpoint``,
``--device``, ``--precision``, ``--half``, ``--batch-size``, ``--workers``) come from :mod:`ssd.cli.common`. What
the commands run lives below (ssd.inference, ssd.evaluation, ssd.training, ssd.export) and takes plain arguments.

Exit status of every command: 0 done; 1 the run failed after it started, or left inputs out (they are listed);
2 a usage error (one ``error: ...`` line on stderr), found before any work where possible; 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from .. import __version__
from .common import Parser, prog

__all__ = ["COMMANDS", "build_parser", "main"]

# The command modules, in the order `ssd --help` lists them; one line per module.
COMMANDS = (
    "detect",
    "evaluate",
    "train",  # train and make-shapes
    "export",
    "convert",
    "benchmark",
)

DESCRIPTION = ("SSD object detectors: detect, evaluate, fine-tune, export, convert data and benchmark (COCO classes by "
               "default).")

EPILOG = """\
examples:
  ssd detect                                   the bundled sample photos, into ./ssd-out
  ssd detect photos/ --classes person,dog      only people and dogs
  ssd evaluate --images val2017 --annotations instances_val2017.json
  ssd make-shapes --out shapes --images 64 && ssd train --images shapes/images \\
      --annotations shapes/annotations.json --out run --epochs 2
  ssd export --out model.onnx

'ssd COMMAND --help' describes a command; `python -m ssd ...` is the same command line.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``ssd`` parser with every command of :data:`COMMANDS` registered (imports no torch)."""
    parser = Parser(prog=prog(), description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)
