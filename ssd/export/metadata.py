"""What an exported file says about its model: the spec as JSON metadata, written at export and read at load.

The keys are plain strings in the ONNX ``metadata_props`` (and in an OpenVINO IR's ``rt_info``), so any tool can
read them; :func:`spec_from_metadata` rebuilds the :class:`DetectorSpec` that the library's pre- and
post-processing need, so an exported model detects exactly as the network it came from.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

from ..models.spec import AnchorSpec, BoxCoderSpec, ClassSpec, DetectorSpec, InputSpec, PostProcessSpec

__all__ = ["FORMAT_VERSION", "MissingExportPackage", "metadata_for", "require", "spec_from_metadata"]

# Bumped when the graph's inputs/outputs or these keys change meaning; a loader refuses versions it does not know.
FORMAT_VERSION = 1
PREFIX = "ssd."
REQUIREMENTS = "requirements-export.txt"


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
    return spec, outputs, nms
