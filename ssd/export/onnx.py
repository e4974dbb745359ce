"""Export a detector to ONNX (and, through it, OpenVINO): decoding in the graph, the spec in the file's metadata.

The graph takes ``images`` (N x 3 x S x S float32, preprocessed as the spec says) and gives ``boxes`` (N x A x 4,
x1 y1 x2 y2 relative to the input, unclipped, decoded with the spec's box coder) and ``scores`` (N x A x C,
softmax, background at 0). With ``nms=True`` the family's post-processing follows in the graph (ONNX
NonMaxSuppression, class-wise) and the outputs are fixed-size padded detections instead: ``det_boxes`` N x K x 4,
``det_scores`` N x K, ``det_labels`` N x K int64 (0 on padding rows) and ``num_detections`` N int64.
"""
from __future__ import annotations

import copy
import os
import pathlib
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backends.base import is_detector, local_spec
from ..box_coder import BoxCoder
from ..io.files import atomic_path, sweep_stale
from ..models.base import Detector
from ..models.spec import DetectorSpec, PostProcessSpec, check_int
from .metadata import metadata_for, require

__all__ = ["MIN_OPSET", "DecodingWrapper", "export_onnx", "export_openvino", "export_program", "export_torchscript"]

# NonMaxSuppression, ScatterND/GatherND, Clip with tensor bounds and TopK with a tensor k: all there from opset 11.
MIN_OPSET = 11
EXPORTERS = ("auto", "torchscript", "dynamo")


class DecodingWrapper(nn.Module):
    """``images -> (boxes N x A x 4, scores N x A x C)``: the network plus decoding and softmax, so that an
    exported graph needs none of this library to be read. Anchors are constant buffers (graph initializers).

    Decoding is :meth:`ssd.box_coder.BoxCoder.decode` and the scores :func:`ssd.postprocess.class_scores`'s
    softmax, so PyTorch runs of this module give their values to float32 rounding.
    """

    def __init__(self, model: Detector) -> None:
        super().__init__()
        spec = _spec_of(model)
        self.model = model
        self.spec = spec
        self.box_coder = BoxCoder.from_spec(spec)
        centres, sizes = self.box_coder.default_boxes()
        self.register_buffer("centres", centres.clone())  # 2 x A; own copies, not the shared cache
        self.register_buffer("sizes", sizes.clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        locs, confs = self.model(images)
        boxes = self.box_coder.decode(locs, (self.centres, self.sizes))
        scores = confs.float().permute(0, 2, 1).softmax(dim=-1)
        return boxes, scores


def _spec_of(model: Any) -> DetectorSpec:
    # By what it is, not by isinstance: a model of another copy of this package (torch.hub's) exports too.
    if not is_detector(model):
        raise TypeError(f"model: expected a detector of this library (an nn.Module with a .spec), "
                        f"got {type(model).__name__}")
    return local_spec(model.spec, "model.spec")


def _export_copy(model: nn.Module) -> nn.Module:
    """A float32, evaluation-mode copy: the caller's model (its dtype, mode, memory format) is never touched."""
    return copy.deepcopy(model).float().eval().to(device="cpu", memory_format=torch.contiguous_format)


# Temporary folders of an export (the raw graph in the system's temporary folder, the OpenVINO staging folder beside
# the output) carry the exporting process's id and this host's tag in their names, so that the next export removes
# a killed export's at once: one whose process is gone on this host. A live export's are never touched; anything
# matching but unattributable (another host sharing /tmp, the output's own temporary file) goes after
# STALE_EXPORT_S, the download cache's and training's rule.
TEMPORARY_PREFIX = "ssd-export-"
STALE_EXPORT_S = 3600.0


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temporary_folder(beside: pathlib.Path | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder in the system's temporary folder, or hidden beside the output ``beside``."""
    prefix = f"{TEMPORARY_PREFIX}{os.getpid()}-{_host_tag()}-"
    if beside is None:
        return tempfile.TemporaryDirectory(prefix=prefix)
    return tempfile.TemporaryDirectory(prefix="." + prefix, dir=beside.parent)


def _writer_gone(path: pathlib.Path) -> bool:
    """Whether the export that made ``path`` (``[.]ssd-export-<pid>-<host>-...``) has ended, as far as this host
    can tell; False when unsure."""
    parts = path.name.lstrip(".")[len(TEMPORARY_PREFIX):].split("-")
    if os.name != "posix" or len(parts) < 3 or not parts[0].isdigit() or parts[1] != _host_tag():
        return False  # on Windows, os.kill(pid, 0) would end the process
    pid = int(parts[0])
    if pid == os.getpid():
        return False  # another thread's export, alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def sweep_stale_exports(path: str | os.PathLike) -> list[pathlib.Path]:
    """Remove what killed exports left: their temporary folders in the system's temporary folder and beside
    ``path``, and ``path``'s own temporary files (see :data:`STALE_EXPORT_S`). Returns the paths removed."""
    path = pathlib.Path(path)
    removed = sweep_stale(tempfile.gettempdir(), (TEMPORARY_PREFIX + "*",), STALE_EXPORT_S, folders=True,
                          dead=_writer_gone)
    return removed + sweep_stale(path.parent, ("." + TEMPORARY_PREFIX + "*", f".{path.name}.*.tmp"), STALE_EXPORT_S,
                                 folders=True, dead=_writer_gone)


def _check_destination(path: str | os.PathLike, suffixes: tuple[str, ...], name: str = "path") -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path, got {type(path).__name__}")
    path = pathlib.Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{name}: expected a file ending in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise OSError(f"{name}: expected a file to write, got the folder {str(path)!r}")
    parent = path.parent
    if not parent.is_dir():
        raise OSError(f"{name}: expected an existing folder to write {path.name} in, got {str(parent)!r} "
                      "which does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"{name}: expected a writable folder, got {str(parent)!r} (permission denied)")
    return path


def _check_opset(opset: Any) -> int:
    onnx = require("onnx", "ONNX export")
    newest = min(onnx.defs.onnx_opset_version(), 21)
    opset = check_int("opset", opset, 1)
    if opset < MIN_OPSET:
        raise ValueError(f"opset: expected {MIN_OPSET} or newer (NonMaxSuppression, ScatterND and TopK with a "
                         f"tensor k need it), got {opset}")
    if opset > newest:
        raise ValueError(f"opset: expected at most {newest} (the newest this onnx package and exporter know), "
                         f"got {opset}")
    return opset


def _torch_export(wrapper: nn.Module, example: torch.Tensor, target: str, opset: int, dynamic_batch: bool,
                  exporter: str) -> str:
    """Run torch's ONNX exporter; returns which one produced the file.

    The TorchScript-based exporter is tried first under "auto": it takes ~3 s for SSD300 where the dynamo one
    takes ~25 s, and it writes the requested opset directly instead of converting down from 18.
    """
    names = {"input_names": ["images"], "output_names": ["boxes", "scores"], "opset_version": opset}
    errors = []
    if exporter in ("auto", "torchscript"):
        axes = {"images": {0: "N"}, "boxes": {0: "N"}, "scores": {0: "N"}} if dynamic_batch else None
        try:
            with warnings.catch_warnings():
                # Deprecated in favour of dynamo, but still the faster and more predictable path where present.
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, (example,), target, dynamo=False, dynamic_axes=axes, **names)
            return "torchscript"
        except Exception as exc:  # noqa: BLE001 - any exporter failure falls through to the other exporter
            if exporter == "torchscript":
                raise
            errors.append(exc)
    shapes = ({0: torch.export.Dim("N", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False,
                                    external_data=False, **names)
    program.save(target)
    return "dynamo"


def _nms_nodes(spec: DetectorSpec, recipe: PostProcessSpec, opset: int, batch_dim: Any) -> tuple[list, list, list]:
    """Nodes, initializers and outputs that turn ``boxes``/``scores`` into padded detections by ``recipe``.

    Candidates are capped first (per class, or per feature map over (anchor, class) pairs) by masking the others
    to -1, which no score threshold lets through; then clipping and empty-box removal where the recipe says,
    class-wise NonMaxSuppression, and the best ``max_detections`` over all classes from a dense score tensor.
    ONNX's NMS drops IoU > threshold; NVIDIA's recipe drops IoU >= threshold, which differs only on exact ties.
    """
    onnx = require("onnx", "ONNX export")
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    n_anchors, n_fg = spec.anchors.num_anchors, spec.num_classes - 1

    def const(value: Any, dtype: Any) -> str:
        name = f"nms_const_{len(inits)}"
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(kind: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> Any:
        names = [f"nms_{kind.lower()}_{len(nodes)}_{i}" for i in range(outputs)]
        nodes.append(helper.make_node(kind, inputs, names, **attrs))
        return names if outputs > 1 else names[0]

    def sl(x: str, start: int, end: int, axis: int) -> str:
        return op("Slice", [x, const([start], np.int64), const([end], np.int64), const([axis], np.int64)])

    def unsqueeze(x: str, axis: int) -> str:
        if opset >= 13:
            return op("Unsqueeze", [x, const([axis], np.int64)])
        return op("Unsqueeze", [x], axes=[axis])

    def minus_one_like(x: str) -> str:
        return op("ConstantOfShape", [op("Shape", [x])], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1]))

    def top_k_mask(x: str, k: int, axis: int) -> str:
        values, indices = op("TopK", [x, const([k], np.int64)], 2, axis=axis)
        return op("ScatterElements", [minus_one_like(x), indices, values], axis=axis)

    scores = op("Transpose", [sl("scores", 1, n_fg + 1, 2)], perm=[0, 2, 1])  # N x (C-1) x A
    if recipe.candidates_per_class is not None:
        scores = top_k_mask(scores, min(recipe.candidates_per_class, n_anchors), 2)
    else:
        parts, start = [], 0
        for size in spec.anchors.level_sizes:
            flat = op("Reshape", [sl(scores, start, start + size, 2), const([0, -1], np.int64)])
            kept = top_k_mask(flat, min(recipe.candidates_per_level, n_fg * size), 1)
            parts.append(op("Reshape", [kept, const([0, n_fg, size], np.int64)]))
            start += size
        scores = op("Concat", parts, axis=2)
    boxes = "boxes"
    if recipe.clip_boxes:
        boxes = op("Clip", [boxes, const(0.0, np.float32), const(1.0, np.float32)])
    if recipe.drop_empty:
        wh = op("Sub", [sl(boxes, 2, 4, 2), sl(boxes, 0, 2, 2)])
        zero = const(0.0, np.float32)
        nonempty = op("And", [op("Greater", [sl(wh, 0, 1, 2), zero]), op("Greater", [sl(wh, 1, 2, 2), zero])])
        nonempty = op("Transpose", [nonempty], perm=[0, 2, 1])  # N x 1 x A, broadcast over the classes
        scores = op("Where", [nonempty, scores, const(-1.0, np.float32)])
    selected = op("NonMaxSuppression", [boxes, scores, const([n_anchors], np.int64),
                                        const([recipe.iou_threshold], np.float32),
                                        const([recipe.score_threshold], np.float32)])  # M x (image, class, box)
    dense = op("ScatterND", [minus_one_like(scores), selected, op("GatherND", [scores, selected])])
    flat = op("Reshape", [dense, const([0, -1], np.int64)])
    k = min(recipe.max_detections, n_fg * n_anchors)
    values, indices = op("TopK", [flat, const([k], np.int64)], 2, axis=1)
    valid = op("Greater", [values, const(-0.5, np.float32)])
    labels = op("Add", [op("Div", [indices, const(n_anchors, np.int64)]), const(1, np.int64)])
    box_index = op("Tile", [unsqueeze(op("Mod", [indices, const(n_anchors, np.int64)]), 2),
                            const([1, 1, 4], np.int64)])
    picked = op("GatherElements", [boxes, box_index], axis=1)
    nodes.append(helper.make_node("Where", [unsqueeze(valid, 2), picked, const(0.0, np.float32)], ["det_boxes"]))
    nodes.append(helper.make_node("Where", [valid, values, const(0.0, np.float32)], ["det_scores"]))
    nodes.append(helper.make_node("Where", [valid, labels, const(0, np.int64)], ["det_labels"]))
    as_int = op("Cast", [valid], to=TensorProto.INT64)
    if opset >= 13:
        nodes.append(helper.make_node("ReduceSum", [as_int, const([1], np.int64)], ["num_detections"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [as_int], ["num_detections"], axes=[1], keepdims=0))
    outputs = [
        helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, [batch_dim, k, 4]),
        helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, [batch_dim, k]),
        helper.make_tensor_value_info("det_labels", TensorProto.INT64, [batch_dim, k]),
        helper.make_tensor_value_info("num_detections", TensorProto.INT64, [batch_dim]),
    ]
    del onnx
    return nodes, inits, outputs


def build_onnx(model: nn.Module, *, opset: int = 17, nms: bool = False, batch: int = 1, dynamic_batch: bool = True,
               recipe: PostProcessSpec | None = None, exporter: str = "auto",
               log: Callable[[str], None] | None = None) -> Any:
    """The checked ``onnx.ModelProto`` that :func:`export_onnx` writes (see there for the arguments)."""
    onnx = require("onnx", "ONNX export")
    spec = _spec_of(model)
    opset = _check_opset(opset)
    batch = check_int("batch", batch, 1, 4096)
    if not isinstance(nms, bool):
        raise TypeError(f"nms: expected True or False, got {nms!r}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch: expected True or False, got {dynamic_batch!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter: expected one of {', '.join(map(repr, EXPORTERS))}, got {exporter!r}")
    recipe = spec.detect_postprocess if recipe is None else recipe
    if not isinstance(recipe, PostProcessSpec):
        raise TypeError(f"recipe: expected a PostProcessSpec, got {type(recipe).__name__}")

    wrapper = DecodingWrapper(_export_copy(model)).eval()
    size = spec.input.size
    example = torch.zeros(batch, 3, size, size)
    say = log if log is not None else (lambda message: None)
    started = time.perf_counter()
    with _temporary_folder() as folder:
        target = os.path.join(folder, "raw.onnx")
        with torch.no_grad():
            used = _torch_export(wrapper, example, target, opset, dynamic_batch, exporter)
        proto = onnx.load(target)
    say(f"trace: {spec.name} through torch's {used} ONNX exporter, opset {opset} "
        f"({time.perf_counter() - started:.1f} s)")
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ValueError(f"opset: expected the {used} exporter to write opset {opset}, got {got}; try another opset")
    batch_dim: Any = "N" if dynamic_batch else batch
    if nms:
        nodes, inits, outputs = _nms_nodes(spec, recipe, opset, batch_dim)
        proto.graph.node.extend(nodes)
        proto.graph.initializer.extend(inits)
        del proto.graph.output[:]
        proto.graph.output.extend(outputs)
    del proto.metadata_props[:]
    for key, value in metadata_for(spec, "nms" if nms else "decoded", recipe if nms else None).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "ssd (torch.hub SSD detectors)"
    proto.doc_string = f"{spec.name}: {spec.description}"
    started = time.perf_counter()
    onnx.checker.check_model(proto)
    say(f"check: the graph{' with NMS' if nms else ''} and its metadata pass onnx.checker "
        f"({time.perf_counter() - started:.1f} s)")
    return proto


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = 17, nms: bool = False, batch: int = 1,
                dynamic_batch: bool = True, recipe: PostProcessSpec | None = None,
                exporter: str = "auto", log: Callable[[str], None] | None = None) -> pathlib.Path:
    """Write ``model`` as an ONNX file with decoding (and with ``nms``, post-processing) in the graph.

    Args:
        model: any detector of this library (``model.spec`` says its anchors, coder, classes and input); a float32
            copy is exported, the model itself is not modified.
        path: the .onnx file to write (atomically: a temporary file renamed into place).
        opset: the ONNX opset, 11 or newer.
        nms: put the post-processing into the graph (outputs ``det_boxes``, ``det_scores``, ``det_labels``,
            ``num_detections``, padded to ``recipe.max_detections``); else the graph outputs ``boxes``/``scores``.
        batch: the batch size of the example input (and the fixed batch size when not ``dynamic_batch``).
        dynamic_batch: leave the batch dimension free.
        recipe: the post-processing baked in with ``nms`` (default ``spec.detect_postprocess``, as ``detect``).
        exporter: "auto" (TorchScript-based where this torch has it, else dynamo), "torchscript" or "dynamo".
        log: called with a line per stage done (trace, check), for a command's progress.

    Returns:
        The path written. The file's ``metadata_props`` carry the spec (``ssd.*`` keys), which
        :func:`ssd.load` (:mod:`ssd.backends`) reads back.
    """
    path = _check_destination(path, (".onnx",))
    sweep_stale_exports(path)
    proto = build_onnx(model, opset=opset, nms=nms, batch=batch, dynamic_batch=dynamic_batch, recipe=recipe,
                       exporter=exporter, log=log)
    onnx = require("onnx", "ONNX export")
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def export_openvino(model: nn.Module, path: str | os.PathLike, *, opset: int = 17, nms: bool = False,
                    batch: int = 1, dynamic_batch: bool = True, recipe: PostProcessSpec | None = None,
                    compress_to_fp16: bool = False, transform: Callable[[Any], Any] | None = None,
                    log: Callable[[str], None] | None = None) -> pathlib.Path:
    """Write ``model`` as an OpenVINO IR (``path`` .xml plus its .bin beside it), converted from the ONNX graph
    of :func:`export_onnx`, with the same metadata in its ``rt_info``. Weights stay float32 unless
    ``compress_to_fp16`` (OpenVINO then still computes in the device's default precision). ``transform``, when
    given, turns the converted ``openvino.Model`` into the one written (INT8 quantization:
    :func:`ssd.export.int8.export_openvino_int8`); the metadata is set on its result. ``log`` is called with a line
    per stage done (trace, check, optimise: OpenVINO's conversion)."""
    ov = require("openvino", "OpenVINO export")
    path = _check_destination(path, (".xml",))
    sweep_stale_exports(path)
    proto = build_onnx(model, opset=opset, nms=nms, batch=batch, dynamic_batch=dynamic_batch, recipe=recipe,
                       log=log)
    with _temporary_folder(path) as folder:
        source = os.path.join(folder, "model.onnx")
        require("onnx", "OpenVINO export").save(proto, source)
        started = time.perf_counter()
        converted = ov.convert_model(source)
        if log is not None:
            log(f"optimise: OpenVINO's model conversion ({time.perf_counter() - started:.1f} s)")
        if transform is not None:
            converted = transform(converted)
        for entry in proto.metadata_props:
            converted.set_rt_info(entry.value, ["ssd_metadata", entry.key])
        staged = pathlib.Path(folder) / path.name
        ov.save_model(converted, str(staged), compress_to_fp16=compress_to_fp16)
        # The .bin first: an .xml in place always has its weights beside it.
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike, *, batch: int = 1) -> pathlib.Path:
    """Write the decoding wrapper traced with ``torch.jit.trace`` (``images -> (boxes, scores)``), spec in the
    archive's extra files as ``ssd_metadata.json``. Tracing fixes no batch size: the graph has no
    batch-dependent control flow."""
    import json

    path = _check_destination(path, (".pt", ".pth", ".ts"))
    sweep_stale_exports(path)
    spec = _spec_of(model)
    batch = check_int("batch", batch, 1, 4096)
    wrapper = DecodingWrapper(_export_copy(model)).eval()
    example = torch.zeros(batch, 3, spec.input.size, spec.input.size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp),
                       _extra_files={"ssd_metadata.json": json.dumps(metadata_for(spec, "decoded"))})
    return path


def export_program(model: nn.Module, path: str | os.PathLike, *, batch: int = 2, max_batch: int = 1024
                   ) -> pathlib.Path:
    """Write the decoding wrapper as a ``torch.export`` program (.pt2; ``torch.export.load(path).module()``),
    batch dimension dynamic in [1, max_batch], spec in the archive's extra file ``ssd_metadata.json``."""
    import json

    path = _check_destination(path, (".pt2",))
    sweep_stale_exports(path)
    spec = _spec_of(model)
    # torch.export specialises a dimension whose example size is 1, so the example batch is at least 2.
    batch = check_int("batch", batch, 2, max_batch)
    wrapper = DecodingWrapper(_export_copy(model)).eval()
    example = torch.zeros(batch, 3, spec.input.size, spec.input.size)
    program = torch.export.export(wrapper, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("N", min=1, max=max_batch)},))
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp),
                          extra_files={"ssd_metadata.json": json.dumps(metadata_for(spec, "decoded"))})
    return path
