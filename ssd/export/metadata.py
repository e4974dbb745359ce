"""What an exported file says about its model: the spec as JSON metadata, written at export and read at load.

The keys are plain strings in the ONNX ``metadata_props`` (and in an OpenVINO IR's ``rt_info``), so any tool can
read them; :func:`spec_from_metadata` rebuilds the :class:`DetectorSpec` that the library's pre- and
post-processing need, so an exported model detects exactly as the network it came from.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
from typing import Any

from ..models.spec import AnchorSpec, BoxCoderSpec, ClassSpec, DetectorSpec, InputSpec, PostProcessSpec

__all__ = ["FORMAT_VERSION", "MAX_ANCHORS", "MAX_CLASSES", "MAX_INPUT_SIZE", "MissingExportPackage", "metadata_for",
           "require", "spec_from_metadata"]

# Bumped when the graph's inputs/outputs or these keys change meaning; a loader refuses versions it does not know.
FORMAT_VERSION = 1
PREFIX = "ssd."
REQUIREMENTS = "requirements-export.txt"
# Bounds on what a file's metadata may declare, so that a damaged or hostile file is refused at load time instead
# of asking for an absurd allocation later: an input side of 4096 pixels (13.7x SSD300's; one float32 image is then
# 201 MB), a million default boxes (SSD512 has 24,564) and 10,000 classes (COCO has 80, LVIS 1,203).
MAX_INPUT_SIZE = 4096
MAX_ANCHORS = 1_000_000
MAX_CLASSES = 10_000


class MissingExportPackage(ImportError):
    """An optional export/runtime package (onnx, onnxruntime, openvino) is not installed."""


def require(module: str, purpose: str) -> Any:
    """Import an optional package, or raise an ImportError that says how to install the extras."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExportPackage(
            f"{module}: expected the package installed for {purpose}, got ImportError ({exc}); "
            f"install the export extras with `pip install -r {REQUIREMENTS}`"
        ) from exc


def _recipe_dict(recipe: PostProcessSpec) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def metadata_for(spec: DetectorSpec, outputs: str, nms_recipe: PostProcessSpec | None = None) -> dict[str, str]:
    """The metadata of a file exported from a model with ``spec``; ``outputs`` is "decoded" or "nms"."""
    inp = spec.input
    meta = {
        "format_version": str(FORMAT_VERSION),
        "model": spec.name,
        "description": spec.description,
        "outputs": outputs,
        "class_names": json.dumps(list(spec.classes.names)),
        "category_ids": json.dumps(list(spec.classes.category_ids)),
        "input": json.dumps({"size": inp.size, "mean": list(inp.mean), "std": list(inp.std),
                             "value_range": inp.value_range, "resize": inp.resize}),
        "anchors": json.dumps(dataclasses.asdict(spec.anchors)),
        "box_coder": json.dumps(dataclasses.asdict(spec.box_coder)),
        "postprocess": json.dumps(_recipe_dict(spec.postprocess)),
        "detect_postprocess": json.dumps(_recipe_dict(spec.detect_postprocess)),
    }
    if nms_recipe is not None:
        meta["nms"] = json.dumps(_recipe_dict(nms_recipe))
    return {PREFIX + key: value for key, value in meta.items()}


def _tuples(value: Any) -> Any:
    """JSON lists back to the (nested) tuples the frozen specs hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def spec_from_metadata(meta: dict[str, str], where: str) -> tuple[DetectorSpec, str, PostProcessSpec | None]:
    """``(spec, outputs, nms_recipe)`` from a file's metadata; errors name ``where`` (the file).

    Raises:
        ValueError: the file was not exported by this library, or by a newer format, or its metadata is damaged.
    """
    if PREFIX + "format_version" not in meta:
        raise ValueError(f"{where}: expected a model exported by `python -m ssd export` (with {PREFIX}* metadata), "
                         "got a file without it")
    version = meta[PREFIX + "format_version"]
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{where}: expected export format version {FORMAT_VERSION}, got {version!r}; "
                         "re-export the model with this version of the library")
    try:
        get = {key[len(PREFIX):]: value for key, value in meta.items() if key.startswith(PREFIX)}
        inp = json.loads(get["input"])
        spec = DetectorSpec(
            name=get["model"],
            description=get.get("description", ""),
            anchors=AnchorSpec(**{k: _tuples(v) for k, v in json.loads(get["anchors"]).items()}),
            box_coder=BoxCoderSpec(**json.loads(get["box_coder"])),
            classes=ClassSpec(tuple(json.loads(get["class_names"])), tuple(json.loads(get["category_ids"]))),
            input=InputSpec(size=int(inp["size"]), mean=tuple(inp["mean"]), std=tuple(inp["std"]),
                            value_range=float(inp["value_range"]), resize=inp["resize"]),
            postprocess=PostProcessSpec(**json.loads(get["postprocess"])),
            detect_postprocess=PostProcessSpec(**json.loads(get["detect_postprocess"])),
        )
        outputs = get["outputs"]
        nms = PostProcessSpec(**json.loads(get["nms"])) if "nms" in get else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: expected complete {PREFIX}* metadata, got a damaged entry ({exc!r})") from exc
    if outputs not in ("decoded", "nms") or (outputs == "nms") != (nms is not None):
        raise ValueError(f"{where}: expected {PREFIX}outputs 'decoded', or 'nms' with its recipe, got {outputs!r}")
    _check_bounds(spec, where)
    return spec, outputs, nms


def _finite(values: Any, count: int, positive: bool = False) -> bool:
    if not isinstance(values, tuple) or len(values) != count:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
               for v in values)


def _check_bounds(spec: DetectorSpec, where: str) -> None:
    """The values a file declares must be usable: the specs check their structure, this their sizes and numbers."""
    inp, anchors, coder, classes = spec.input, spec.anchors, spec.box_coder, spec.classes
    problems = []
    if isinstance(inp.size, bool) or not isinstance(inp.size, int) or not 1 <= inp.size <= MAX_INPUT_SIZE:
        problems.append(f"an input size of 1 to {MAX_INPUT_SIZE} pixels, got {inp.size!r}")
    if not _finite(inp.mean, 3):
        problems.append(f"3 finite input means, got {inp.mean!r}")
    if not _finite(inp.std, 3, positive=True):
        problems.append(f"3 finite positive input standard deviations, got {inp.std!r}")
    if not _finite((inp.value_range,), 1, positive=True):
        problems.append(f"a finite positive input value range, got {inp.value_range!r}")
    sizes = anchors.feature_sizes
    if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in sizes) or not all(
            isinstance(r, tuple) and all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in r)
            for r in anchors.aspect_ratios):
        problems.append(f"positive integer feature sizes and aspect ratios, got {sizes!r} and "
                        f"{anchors.aspect_ratios!r}")
    elif anchors.num_anchors > MAX_ANCHORS:
        problems.append(f"at most {MAX_ANCHORS} default boxes, got {anchors.num_anchors}")
    for name in ("steps", "min_sizes", "max_sizes"):
        if not _finite(getattr(anchors, name), len(sizes), positive=True):
            problems.append(f"finite positive anchor {name}, got {getattr(anchors, name)!r}")
    if not _finite((coder.center_variance, coder.size_variance), 2, positive=True) or (
            coder.max_log_size is not None and not _finite((coder.max_log_size,), 1)):
        problems.append(f"finite positive box coder variances, got {coder!r}")
    if len(classes.names) > MAX_CLASSES or not all(isinstance(n, str) for n in classes.names) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in classes.category_ids):
        problems.append(f"at most {MAX_CLASSES} class names (strings) with integer category ids, got "
                        f"{len(classes.names)} classes")
    if problems:
        raise ValueError(f"{where}: expected metadata with {problems[0]}")
