"""YOLO-format datasets (Ultralytics' layout), read into the library's one COCO structure.

A data file (``DATA.yaml``) as Ultralytics writes it::

    path: ../datasets/shapes   # the dataset root; relative paths are relative to this YAML file's folder
    train: images/train        # a folder of images (searched recursively), a .txt list of images, or a list
    val: images/val
    names: [circle, square]    # or {0: circle, 1: square}; `nc`, when given, must equal the number of names

Each image ``.../images/.../NAME.jpg`` has its labels in ``.../labels/.../NAME.txt`` (the last ``images`` folder of
its path replaced by ``labels``), one object a line: ``class cx cy w h``, the class index (0..K-1) and the box's
centre and size as fractions (0..1) of the image's width and height. A missing or empty label file is an image
without objects (kept, as background).

The labels are converted to a COCO detection dict (:func:`yolo_to_coco`) and validated by the one parser,
:func:`ssd.data.coco_format.parse_annotations`: training, evaluation and ``python -m ssd convert --from yolo --to
coco`` all see the same thing. Class ``c`` becomes category id ``c + 1`` (so label ``c + 1`` of the library's one
label rule, 0 being background); a box becomes ``[x, y, w, h] = [(cx - w/2) * W, (cy - h/2) * H, w * W, h * H]``
in pixels of the upright picture (EXIF orientation applied, as every loader of the library applies it), computed in
float64 in that order.

Untrusted input: the YAML file must be a regular file of at most :data:`MAX_DATA_YAML_BYTES`, is parsed with PyYAML's
safe loader with aliases refused (a "billion laughs" file cannot expand), and must have the shape above. Label and
list files are regular files of at most :data:`MAX_LABEL_BYTES`. Bad label lines (a wrong field count, a value that is
not a number or lies outside 0..1, a class the names do not have) are reported with their file and line number,
all of them counted in one ``ValueError``.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..io.files import write_json
from ..io.images import ImageLoadError, is_image_file, read_capped_file, upright_size
from .coco_format import CocoAnnotations, parse_annotations

__all__ = [
    "MAX_DATA_YAML_BYTES",
    "MAX_LABEL_BYTES",
    "YoloData",
    "YoloDataError",
    "YoloSplit",
    "convert_yolo_to_coco",
    "label_path",
    "load_yolo_split",
    "read_data_yaml",
    "read_label_file",
    "yolo_to_coco",
]

# Ultralytics' coco.yaml is 3 KB with 80 names; a megabyte holds tens of thousands of class names.
MAX_DATA_YAML_BYTES = 2**20
# A label (or image list) file: a line is about 40 bytes, so 64 MiB is over a million boxes (or listed images).
MAX_LABEL_BYTES = 64 * 2**20
MAX_CLASSES = 100_000
_EXAMPLES = 5  # bad label lines quoted in the error (all are counted)
_SPLITS = ("train", "val", "test")


class YoloDataError(ValueError):
    """A YOLO data file, image list or label file that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class YoloData:
    """A parsed data file: where it is, the dataset root, each split's entries (resolved paths of folders or
    ``.txt`` image lists) and the class names (index order)."""

    yaml: pathlib.Path
    root: pathlib.Path
    splits: Mapping[str, tuple[pathlib.Path, ...]]
    names: tuple[str, ...]


@dataclass(frozen=True)
class YoloSplit:
    """One split converted and validated: the COCO set (``annotations.dataset()`` is the COCO dict), the folder its
    ``file_name`` entries are relative to, and counts for the one-line summary."""

    annotations: CocoAnnotations
    images_dir: pathlib.Path
    split: str
    boxes: int
    missing_labels: int

    def summary(self) -> str:
        images = len(self.annotations.images)
        return (f"{self.split}: {images} image(s), {self.boxes} box(es) of {len(self.annotations.categories)} "
                f"class(es); {self.missing_labels} image(s) without a label file (no objects)")


# --------------------------------------------------------------------------------------------------------------
# Files


def _read_text(path: pathlib.Path, what: str, limit: int) -> str:
    """A small text file, under the library's guards: regular file, size cap, UTF-8."""
    name = f"{what} {os.fspath(path)!r}"
    data = read_capped_file(path, name, kind=what, limit=limit, error=YoloDataError)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YoloDataError(f"{name}: expected UTF-8 text, got bytes that are not (at byte {exc.start})") from None


def _yaml_loader() -> type:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """PyYAML's safe loader without aliases (``*name``): data files never need them, and refusing them is
        what keeps a small file from expanding into billions of entries."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a data file",
                                                  event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_data_yaml(path: str | os.PathLike[str]) -> YoloData:
    """Parse and check an Ultralytics data file (see the module docstring).

    Raises:
        FileNotFoundError / IsADirectoryError: the path does not exist / is a folder.
        YoloDataError (ValueError): not a regular file, too large, not YAML, or not of the expected shape (the
            message names the file and the key).
        ImportError: PyYAML is not installed.
    """
    try:
        import yaml
    except ImportError:
        raise ImportError("YOLO data files need PyYAML (pip install pyyaml)") from None
    path = pathlib.Path(path)
    name = f"data file {os.fspath(path)!r}"
    text = _read_text(path, "data file", MAX_DATA_YAML_BYTES)
    try:
        document = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise YoloDataError(f"{name}: expected YAML, got {detail}") from None
    except RecursionError:
        raise YoloDataError(f"{name}: expected YAML, got nesting too deep to parse") from None
    if not isinstance(document, Mapping):
        raise YoloDataError(f"{name}: expected a mapping with 'train', 'val' and 'names', got "
                            f"{type(document).__name__}")
    root = _root(document, path, name)
    names = _names(document, name)
    splits = {}
    for split in _SPLITS:
        if document.get(split) is not None:
            splits[split] = _split_entries(document[split], root, f"{name}: {split!r}")
    if not splits:
        raise YoloDataError(f"{name}: expected at least one of 'train', 'val', 'test', got none")
    return YoloData(path, root, splits, names)


def _root(document: Mapping[str, Any], path: pathlib.Path, name: str) -> pathlib.Path:
    value = document.get("path")
    if value is None:
        return path.parent
    if not isinstance(value, str) or not value.strip():
        raise YoloDataError(f"{name}: expected 'path' to be a folder name, got {value!r}")
    root = pathlib.Path(value).expanduser()
    return root if root.is_absolute() else path.parent / root


def _names(document: Mapping[str, Any], name: str) -> tuple[str, ...]:
    raw = document.get("names")
    if isinstance(raw, Mapping):
        keys = list(raw)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(
                range(len(keys))):
            raise YoloDataError(f"{name}: expected 'names' keys to be the class indices 0..{len(keys) - 1}, got "
                                f"{_some([repr(k) for k in keys])}")
        values = [raw[k] for k in range(len(keys))]
    elif isinstance(raw, list):
        values = raw
    else:
        got = "nothing" if raw is None else type(raw).__name__
        raise YoloDataError(f"{name}: expected 'names' as a list or a mapping of index to name, got {got}")
    if not 1 <= len(values) <= MAX_CLASSES:
        raise YoloDataError(f"{name}: expected 1 to {MAX_CLASSES:,} names, got {len(values):,}")
    out = []
    for index, value in enumerate(values):
        # YAML reads `yes`, `no`, `on` as booleans: a class named so must be quoted.
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
            hint = " (quote it: YAML reads yes/no/on/off as true/false)" if isinstance(value, bool) else ""
            raise YoloDataError(f"{name}: names[{index}]: expected a non-empty class name, got {value!r}{hint}")
        out.append(str(value))
    nc = document.get("nc")
    if nc is not None and (isinstance(nc, bool) or nc != len(out)):
        raise YoloDataError(f"{name}: expected 'nc' to equal the number of names ({len(out)}), got {nc!r}")
    return tuple(out)


def _split_entries(value: Any, root: pathlib.Path, where: str) -> tuple[pathlib.Path, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise YoloDataError(f"{where}: expected a folder or .txt list of images (or a list of them), got {value!r}")
    return tuple(p if p.is_absolute() else root / p for p in (pathlib.Path(i).expanduser() for i in items))


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (f" ... and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


def _images_of(entry: pathlib.Path, where: str) -> list[pathlib.Path]:
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.is_file() and is_image_file(p))
    if entry.suffix.lower() == ".txt" and entry.exists():
        text = _read_text(entry, "image list", MAX_LABEL_BYTES)
        # As Ultralytics: a relative line is relative to the list file's folder.
        return [p if p.is_absolute() else entry.parent / p
                for p in (pathlib.Path(line.strip()) for line in text.splitlines() if line.strip())]
    raise YoloDataError(f"{where}: expected a folder of images or a .txt list of images, got {os.fspath(entry)!r}, "
                        f"{'which is neither' if entry.exists() else 'which does not exist'}")


def label_path(image: str | os.PathLike[str]) -> pathlib.Path:
    """Where the labels of ``image`` are: its path with the last ``images`` folder replaced by ``labels`` and the
    extension by ``.txt`` (Ultralytics' rule); beside the image when no folder is named ``images``."""
    image = pathlib.Path(image)
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return pathlib.Path(*parts).with_suffix(".txt")


def read_label_file(path: str | os.PathLike[str], num_classes: int,
                    problems: list[str] | None = None) -> list[tuple[int, float, float, float, float]]:
    """The objects of one label file: ``(class, cx, cy, w, h)`` per valid line (empty lines skipped).

    Bad lines are described (``path:line: expected ..., got ...``) and appended to ``problems``, when given, and
    left out; without ``problems``, the first one raises :class:`YoloDataError`.
    """
    path = pathlib.Path(path)
    text = _read_text(path, "label file", MAX_LABEL_BYTES)
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = _line_problem(fields, num_classes)
        if problem is not None:
            message = f"{os.fspath(path)}:{number}: {problem}"
            if problems is None:
                raise YoloDataError(message)
            problems.append(message)
            continue
        out.append((int(float(fields[0])), *(float(v) for v in fields[1:])))
    return out


def _line_problem(fields: list[str], num_classes: int) -> str | None:
    if len(fields) != 5:
        hint = " (a segmentation polygon? only boxes are read)" if len(fields) > 5 and len(fields) % 2 else ""
        return f"expected 5 fields 'class cx cy w h', got {len(fields)}{hint}"
    try:
        cls = float(fields[0])
    except ValueError:
        cls = math.nan
    if not (cls.is_integer() and 0 <= cls < num_classes):
        return f"expected a class index 0..{num_classes - 1} (the data file has {num_classes} names), got {fields[0]!r}"
    for key, text in zip(("cx", "cy", "w", "h"), fields[1:]):
        try:
            value = float(text)
        except ValueError:
            return f"expected {key} to be a number, got {text!r}"
        if not 0.0 <= value <= 1.0:  # NaN fails too
            return f"expected {key} in 0..1 (a fraction of the image's size), got {text!r}"
    return None


# --------------------------------------------------------------------------------------------------------------
# Conversion


def yolo_to_coco(data: YoloData, split: str) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """The COCO dict of one split (not yet validated: see :func:`load_yolo_split`) and how many of its images have
    no label file.

    Raises:
        YoloDataError (ValueError): the split is not in the data file, it has no image, an image cannot be read, or
            label lines are bad (all counted, the first few quoted with file and line).
    """
    where = f"data file {os.fspath(data.yaml)!r}"
    if split not in data.splits:
        raise YoloDataError(f"{where}: expected a {split!r} entry, got only {', '.join(map(repr, data.splits))}")
    images = sorted({p for entry in data.splits[split] for p in _images_of(entry, f"{where}: {split!r}")})
    if not images:
        raise YoloDataError(f"{where}: {split!r}: expected at least one image, got none")
    num_classes = len(data.names)
    problems: list[str] = []
    coco_images, annotations = [], []
    missing = 0
    for image_id, image in enumerate(images, start=1):
        try:
            width, height = upright_size(image)
        except (ImageLoadError, OSError) as exc:
            raise YoloDataError(f"{where}: {split!r}: {exc}") from None
        coco_images.append({"id": image_id, "file_name": _file_name(image, data.root), "width": width,
                            "height": height})
        labels = label_path(image)
        if not labels.exists():
            missing += 1
            continue
        for cls, cx, cy, w, h in read_label_file(labels, num_classes, problems):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    if problems:
        raise YoloDataError(f"{len(problems)} bad label line(s) in {split!r} of {where}: "
                            + "; ".join(problems[:_EXAMPLES]) + (" ..." if len(problems) > _EXAMPLES else ""))
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(data.names)]
    return {"images": coco_images, "annotations": annotations, "categories": categories}, missing


def _file_name(image: pathlib.Path, root: pathlib.Path) -> str:
    """Relative to the root when the image is under it (the usual case), else the absolute path (a .txt list may
    name images anywhere; joined to the root, an absolute path stays itself)."""
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        return os.fspath(image.resolve())


def load_yolo_split(data_yaml: str | os.PathLike[str] | YoloData, split: str = "val") -> YoloSplit:
    """One split of a YOLO dataset as a validated COCO set (:func:`yolo_to_coco`, then
    :func:`ssd.data.coco_format.parse_annotations` with sizes required, as training needs them)."""
    data = data_yaml if isinstance(data_yaml, YoloData) else read_data_yaml(data_yaml)
    coco, missing = yolo_to_coco(data, split)
    parsed = parse_annotations(coco, require_size=True, name=f"{split!r} of data file {os.fspath(data.yaml)!r}")
    return YoloSplit(parsed, data.root, split, len(parsed.annotations), missing)


def convert_yolo_to_coco(data_yaml: str | os.PathLike[str] | YoloData, split: str,
                         out: str | os.PathLike[str]) -> YoloSplit:
    """Write one split of a YOLO dataset as a COCO JSON file (atomically) for ``ssd evaluate`` / ``ssd train``:
    give them ``--annotations OUT --images ROOT`` (``YoloSplit.images_dir``)."""
    converted = load_yolo_split(data_yaml, split)
    out = pathlib.Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"out {os.fspath(out)!r}: expected a JSON file name, got a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, converted.annotations.dataset(), indent=None)
    return converted
