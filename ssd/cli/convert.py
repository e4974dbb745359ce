"""``ssd convert``: a dataset from one annotation format to another (today: a YOLO-format split to a COCO file)."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from .common import fail

__all__ = ["register", "run"]

DESCRIPTION = """Write one split of a YOLO-format dataset (Ultralytics' data file: path, train, val, names; images/
and labels/ folders of 'class cx cy w h' lines) as a COCO JSON file, for evaluate --annotations (with --images the
dataset root it prints). Bad label lines are reported with their file and line."""


def register(subparsers: Any) -> None:
    """Add ``convert`` to the ``ssd`` command line."""
    convert = subparsers.add_parser("convert", help="convert a YOLO-format dataset split to a COCO annotation file",
                                    description=DESCRIPTION)
    convert.add_argument("--from", dest="source_format", required=True, choices=("yolo",), help="input format")
    convert.add_argument("--to", dest="target_format", required=True, choices=("coco",), help="output format")
    convert.add_argument("--data", required=True, type=pathlib.Path, metavar="DATA.yaml", help="the YOLO data file")
    convert.add_argument("--split", default="val", choices=("train", "val", "test"), help="which split (default val)")
    convert.add_argument("--out", required=True, type=pathlib.Path, metavar="FILE.json", help="the COCO file to write")
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``convert --from yolo --to coco``: 0 on success, 2 (one line on stderr) on bad input."""
    from ..data.yolo import convert_yolo_to_coco

    try:
        converted = convert_yolo_to_coco(args.data, args.split, args.out)
    except (OSError, ValueError, ImportError) as exc:
        return fail(exc)
    print(converted.summary())
    print(f"wrote {args.out}; its images are in {converted.images_dir} (evaluate --images {converted.images_dir} "
          f"--annotations {args.out})")
    return 0
