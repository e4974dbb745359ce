"""Exported models as backends: ONNX files run by onnxruntime, OpenVINO IRs (and ONNX files) run by OpenVINO.

Only the network (and, for graphs exported with ``--nms``, the post-processing) runs in the other runtime; loading,
batching, preprocessing (``ssd.transforms``), post-processing (``ssd.postprocess``) and the results are the
library's, through the same consumers as the PyTorch model (``ssd.detect``, ``ssd.evaluate``, the command line).

A file is checked when it loads, and every message names it: this library's metadata (the spec, with bounded values:
:func:`ssd.export.metadata.spec_from_metadata`), an opset that has every op of the graph, an input ``images`` of the
declared size, and the outputs the metadata promises (their names and ranks, and the sizes the spec fixes wherever the
graph states them). A failure inside the runtime while it runs (an allocation, a kernel) and outputs of the wrong
shape are a :class:`~ssd.backends.BackendError` naming the file, not the runtime's traceback.
"""
from __future__ import annotations

import os
import pathlib
import threading
from typing import Any

import numpy as np
import torch

from ..export.metadata import PREFIX, require, spec_from_metadata
from ..models.spec import DetectorSpec, PostProcessSpec
from .base import BackendError
from .plan import thread_plan

__all__ = ["EXPORTED_SUFFIXES", "OPENVINO_PRECISIONS", "RUNTIMES", "ExportedBackend", "OnnxBackend",
           "OpenVinoBackend", "load_exported"]

RUNTIMES = ("auto", "onnxruntime", "openvino")
EXPORTED_SUFFIXES = (".onnx", ".xml")
OPENVINO_PRECISIONS = ("fp32", "bf16", "default")
OUTPUT_NAMES = {"decoded": ("boxes", "scores"), "nms": ("det_boxes", "det_scores", "det_labels", "num_detections")}

Dims = list[int | None]  # a graph's stated shape: a size, or None where it is dynamic


def _check_file(path: Any, suffixes: tuple[str, ...]) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path to a {' or '.join(suffixes)} file, got {type(path).__name__}")
    path = pathlib.Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: expected a {' or '.join(suffixes)} file, got suffix {path.suffix!r}")
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file" if not path.exists() else "not a regular file"
        raise FileNotFoundError(f"{path}: expected an exported model file, got {what}")
    return path


def _shape_text(dims: Dims) -> str:
    return " x ".join("?" if d is None else str(d) for d in dims) or "a scalar"


def _check_input_shape(where: str, dims: Dims, spec: DetectorSpec) -> None:
    """The graph's ``images`` input must be N x 3 x S x S for the S its metadata declares."""
    size = spec.input.size
    if len(dims) != 4 or dims[1] not in (3, None) or dims[2] != size or dims[3] != size:
        raise ValueError(f"{where}: expected input 'images' of shape N x 3 x {size} x {size} (the input size its "
                         f"metadata declares), got {_shape_text(dims)}")


def _expected_outputs(spec: DetectorSpec, kind: str) -> dict[str, Dims]:
    """Each output's shape as the spec fixes it (None: free). K, the padded detection count of an ``"nms"``
    graph, is at most its recipe's ``max_detections``: checked separately."""
    anchors, classes = spec.anchors.num_anchors, spec.num_classes
    if kind == "decoded":
        return {"boxes": [None, anchors, 4], "scores": [None, anchors, classes]}
    return {"det_boxes": [None, None, 4], "det_scores": [None, None], "det_labels": [None, None],
            "num_detections": [None]}


def _check_outputs(where: str, found: dict[str, Dims | None], spec: DetectorSpec, kind: str,
                   nms: PostProcessSpec | None) -> None:
    """The graph's outputs must be those its metadata's ``outputs`` kind promises, with the right ranks and the
    spec's sizes where the graph states them (A default boxes, C classes with background, K <= max_detections)."""
    expected = _expected_outputs(spec, kind)
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(f"{where}: expected outputs {', '.join(expected)} (its metadata says outputs {kind!r}), "
                         f"got {', '.join(sorted(found)) or 'none'}")
    # spec_from_metadata gives an "nms" graph its recipe (and refuses one without).
    what = (f"{spec.anchors.num_anchors} default boxes, {spec.num_classes - 1} classes + background"
            if kind == "decoded" else f"at most {nms.max_detections} detections")
    counts = set()
    for name, want in expected.items():
        have = found[name]
        if have is None:
            continue  # the graph states no shape for it: checked when it runs
        if len(have) != len(want) or any(w is not None and h is not None and w != h for w, h in zip(want, have)):
            raise ValueError(f"{where}: expected output {name!r} of shape {_shape_text(want)} (N images, {what}), "
                             f"got {_shape_text(have)}")
        if kind == "nms" and len(have) > 1 and have[1] is not None:
            counts.add(have[1])
    if counts and (len(counts) > 1 or max(counts) > nms.max_detections):
        raise ValueError(f"{where}: expected padded detections of one length K <= {nms.max_detections} (the recipe "
                         f"in its metadata), got outputs of shapes "
                         f"{', '.join(_shape_text(found[n] or []) for n in expected)}")


def _onnx_proto(path: pathlib.Path) -> Any:
    onnx = require("onnx", "reading ONNX files")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file at all
        raise ValueError(f"{path}: expected an ONNX model, got a file onnx cannot parse ({exc})") from exc


def _onnx_metadata(proto: Any) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _check_onnx_opset(where: str, proto: Any) -> None:
    """Every op of the graph must exist in the opset the file declares: a file whose declared opset is too old
    for its ops is refused by name here instead of failing deep inside a runtime."""
    onnx = require("onnx", "reading ONNX files")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError(f"{where}: expected an ONNX graph importing the default opset, got none")
    checked = set()
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in checked:
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset, "")
            checked.add(node.op_type)
        except onnx.defs.SchemaError:
            try:
                since = onnx.defs.get_schema(node.op_type).since_version
            except onnx.defs.SchemaError:
                since = "?"
            raise ValueError(f"{where}: expected an opset that has every op of the graph, got opset {opset}, too old "
                             f"for {node.op_type} (opset {since} or newer); re-export with --opset 17") from None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] + (" ..." if len(text) > 500 else "") or type(exc).__name__


class ExportedBackend:
    """What the ONNX and OpenVINO backends share: the file, its spec, the output kind, and running a batch.

    Attributes:
        path: the file. spec: the :class:`DetectorSpec` rebuilt from its metadata. outputs: ``"decoded"``
            (boxes/scores; the library's post-processing follows, every recipe option honoured) or ``"nms"``
            (post-processing in the graph with ``nms_recipe``; a threshold or detection count can only tighten it).
        runtime: ``"onnxruntime"`` or ``"openvino"``. precision: the runtime's inference precision.

    Batches and outputs are on the CPU (``device``), float32. A graph exported with a static batch size runs any
    batch, in pieces of its size. Several threads may call one backend.
    """

    runtime = ""
    device = torch.device("cpu")
    input_dtype = torch.float32
    memory_format = torch.contiguous_format

    def __init__(self, path: pathlib.Path, spec: DetectorSpec, outputs: str, nms_recipe: PostProcessSpec | None,
                 input_dims: Dims, precision: str) -> None:
        self.path = path
        self.spec = spec
        self.outputs = outputs
        self.nms_recipe = nms_recipe
        self.precision = precision
        self.static_batch = input_dims[0]
        self.load_workers = thread_plan().load_workers

    @property
    def names(self) -> list[str]:
        return list(self.spec.classes.names)

    @property
    def source(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, model={self.spec.name!r}, outputs={self.outputs!r}, "
                f"precision={self.precision!r})")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        """The graph's outputs by name for an N x 3 x S x S float32 array, as the runtime gives them."""
        raise NotImplementedError

    def _pieces(self, batch: np.ndarray) -> list[np.ndarray]:
        step = self.static_batch
        if step is None or batch.shape[0] == step:
            return [batch]
        pieces = [batch[i:i + step] for i in range(0, batch.shape[0], step)]
        if pieces[-1].shape[0] < step:  # zero images fill the last piece; their outputs are dropped
            last = np.zeros((step, *batch.shape[1:]), dtype=batch.dtype)
            last[: pieces[-1].shape[0]] = pieces[-1]
            pieces[-1] = last
        return pieces

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs (``OUTPUT_NAMES[outputs]``, in that order) for a preprocessed batch, as CPU tensors.

        Raises:
            BackendError: the runtime failed, or gave outputs of other shapes than the spec says; names the file.
        """
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        names = OUTPUT_NAMES[self.outputs]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for piece in self._pieces(array):
            try:
                found = self.run(piece)
                values = [np.asarray(found[name]) for name in names]
            except Exception as exc:  # every runtime raises its own types: one error that names the file
                raise BackendError(f"{self.path}: {self.runtime} failed to run the graph on a batch of "
                                   f"{_shape_text(list(piece.shape))}: {_first_line(exc)}") from exc
            for part, value in zip(parts, values):
                part.append(value)
        count = array.shape[0]
        outputs = [np.concatenate(part)[:count] if len(part) > 1 else part[0] for part in parts]
        self._check_values(outputs, count)
        return tuple(torch.from_numpy(np.ascontiguousarray(value)) for value in outputs)

    def _check_values(self, outputs: list[np.ndarray], count: int) -> None:
        """What the graph gave must be what the spec says, whatever shapes the graph stated."""
        spec = self.spec
        if self.outputs == "decoded":
            boxes, scores = outputs
            wanted = [(boxes, (count, spec.anchors.num_anchors, 4)), (scores, (count, spec.anchors.num_anchors,
                                                                                spec.num_classes))]
            bad = [(n, v) for n, (v, shape) in zip(OUTPUT_NAMES["decoded"], wanted)
                   if v.shape != shape or not np.issubdtype(v.dtype, np.floating)]
            if bad:
                raise BackendError(f"{self.path}: expected outputs boxes {_shape_text(list(wanted[0][1]))} and scores "
                                   f"{_shape_text(list(wanted[1][1]))} (float), got "
                                   + ", ".join(f"{n} {_shape_text(list(v.shape))} {v.dtype}" for n, v in bad))
            return
        boxes, scores, labels, counts = outputs
        k = boxes.shape[1] if boxes.ndim == 3 else -1
        shapes_ok = (boxes.shape == (count, k, 4) and scores.shape == (count, k) and labels.shape == (count, k)
                     and counts.shape == (count,) and 0 <= k <= self.nms_recipe.max_detections)
        values_ok = (shapes_ok and np.issubdtype(labels.dtype, np.integer) and np.issubdtype(counts.dtype, np.integer)
                     and bool(((labels >= 0) & (labels < spec.num_classes)).all())
                     and bool(((counts >= 0) & (counts <= k)).all()))
        if not values_ok:
            raise BackendError(
                f"{self.path}: expected padded detections det_boxes N x K x 4, det_scores and det_labels N x K "
                f"(labels 0..{spec.num_classes - 1}), num_detections N (0..K), K <= "
                f"{self.nms_recipe.max_detections}, got shapes {_shape_text(list(boxes.shape))}, "
                f"{_shape_text(list(scores.shape))}, {_shape_text(list(labels.shape))}, "
                f"{_shape_text(list(counts.shape))}")


class OnnxBackend(ExportedBackend):
    """An exported .onnx file run by onnxruntime (on the CPU unless ``providers`` says otherwise; outputs come to
    the host either way). ``threads``: intra-op threads (default: the cores left by the image loaders)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        ort = require("onnxruntime", "running ONNX models")
        path = _check_file(path, (".onnx",))
        where = str(path)
        proto = _onnx_proto(path)
        # Our metadata and the opset first: a foreign or damaged file gets its own message, not a runtime's.
        spec, outputs, nms = spec_from_metadata(_onnx_metadata(proto), where)
        _check_onnx_opset(where, proto)
        del proto
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else thread_plan().intra_op
        # Spinning threads burn the cores a loader or a neighbouring process needs; waiting costs ~nothing here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime would also log each failure on stderr; it reaches the caller once, as our error naming the file.
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(where, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
            raise ValueError(f"{where}: expected an ONNX model onnxruntime can load, got {_first_line(exc)}") from exc
        images = next((i for i in session.get_inputs() if i.name == "images"), None)
        if images is None:
            raise ValueError(f"{where}: expected an input named 'images', got {[i.name for i in session.get_inputs()]}")
        dims = [d if isinstance(d, int) and d > 0 else None for d in images.shape]
        _check_input_shape(where, dims, spec)
        _check_outputs(where, {o.name: self._dims(o.shape) for o in session.get_outputs()}, spec, outputs, nms)
        super().__init__(path, spec, outputs, nms, dims, "fp32")
        self.session = session
        self._output_names = list(OUTPUT_NAMES[outputs])

    @staticmethod
    def _dims(shape: Any) -> Dims | None:
        if shape is None:
            return None
        return [d if isinstance(d, int) and d > 0 else None for d in shape]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # InferenceSession.run may be called from several threads at once.
        return dict(zip(self._output_names, self.session.run(self._output_names, {"images": batch})))


_CORE: Any = None
_CORE_LOCK = threading.Lock()


def _openvino_core(ov: Any) -> Any:
    """The process's one ``openvino.Core``: OpenVINO expects one per application (each holds its plugins and their
    thread pools), and several alive at once left the process crashing later, in a fork or a subprocess."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


class OpenVinoBackend(ExportedBackend):
    """An OpenVINO IR (.xml with its .bin) or an exported .onnx file run by OpenVINO.

    ``precision``: ``"fp32"`` (the default: float32 inference, results as PyTorch's), ``"bf16"``, or ``"default"``
    (OpenVINO's own choice: bf16 on CPUs with AMX/AVX-512 BF16). ``threads``: inference threads (default: the cores
    left by the image loaders). ``runtime_device``: OpenVINO's device name (``"CPU"``). Each calling thread gets its
    own infer request: one request shared by threads mixes their results.
    """

    runtime = "openvino"

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int | None = None,
                 runtime_device: str = "CPU") -> None:
        ov = require("openvino", "running OpenVINO models")
        path = _check_file(path, (".xml", ".onnx"))
        where = str(path)
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(map(repr, OPENVINO_PRECISIONS))}, "
                             f"got {precision!r}")
        metadata = None
        if path.suffix.lower() == ".onnx":
            # OpenVINO keeps no ONNX metadata: read it (and check the opset) from the file itself, first.
            proto = _onnx_proto(path)
            metadata = _onnx_metadata(proto)
            spec_from_metadata(metadata, where)
            _check_onnx_opset(where, proto)
            del proto
        core = _openvino_core(ov)
        try:
            model = core.read_model(where)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ValueError(f"{where}: expected a model OpenVINO can read, got {_first_line(exc)}") from exc
        spec, outputs, nms = spec_from_metadata(metadata if metadata is not None else self._metadata(model), where)
        try:
            images = model.input("images")
        except RuntimeError:
            raise ValueError(f"{where}: expected an input named 'images', got "
                             f"{[sorted(i.get_names()) for i in model.inputs]}") from None
        dims = self._dims(images.get_partial_shape()) or [None]
        _check_input_shape(where, dims, spec)
        found = {name: self._dims(output.get_partial_shape())
                 for output in model.outputs for name in output.get_names()}
        _check_outputs(where, found, spec, outputs, nms)
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads if threads is not None else thread_plan().intra_op}
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "bf16"
        try:
            compiled = core.compile_model(model, runtime_device, config)
        except Exception as exc:
            raise ValueError(f"{where}: expected a model OpenVINO can compile for {runtime_device}, got "
                             f"{_first_line(exc)}") from exc
        super().__init__(path, spec, outputs, nms, dims, precision)
        self.compiled = compiled
        self._ports = {name: output for output in compiled.outputs for name in output.get_names()}
        self._requests = threading.local()

    @staticmethod
    def _dims(shape: Any) -> Dims | None:
        if shape.rank.is_dynamic:
            return None
        return [d.get_length() if d.is_static else None for d in shape]

    @staticmethod
    def _metadata(model: Any) -> dict[str, str]:
        info = model.get_rt_info()
        # RTMap supports keys() but not `in`.
        entries = info["ssd_metadata"] if "ssd_metadata" in list(info.keys()) else {}
        return {key: str(value.astype(str)) if hasattr(value, "astype") else str(value)
                for key, value in dict(entries).items() if key.startswith(PREFIX)}

    def _request(self) -> Any:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        return request

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        request = self._request()  # this thread's own: its input and output tensors are its own
        request.infer({"images": batch})
        return {name: request.get_tensor(self._ports[name]).data.copy() for name in OUTPUT_NAMES[self.outputs]}


def load_exported(path: str | os.PathLike, backend: str = "auto", **options: Any) -> ExportedBackend:
    """Load an exported model as a backend: a .onnx file (onnxruntime; OpenVINO with ``backend='openvino'``, or
    under ``"auto"`` when only OpenVINO is installed) or an OpenVINO .xml. ``options`` go to the backend's class
    (``threads``; ``providers`` for onnxruntime; ``precision`` and ``runtime_device`` for OpenVINO).

    Raises:
        ValueError: the file was not exported by this library, or its metadata, input or outputs are not what the
            library writes; each message names the file. FileNotFoundError: no such file.
        ImportError: the runtime is not installed (the message says how to install it).
    """
    if backend not in RUNTIMES:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, RUNTIMES))}, got {backend!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path to a .onnx or .xml file, got {type(path).__name__}")
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in EXPORTED_SUFFIXES:
        raise ValueError(f"{path}: expected a .onnx or OpenVINO .xml file, got suffix {suffix!r}")
    if suffix == ".xml":
        if backend == "onnxruntime":
            raise ValueError(f"{path}: expected a .onnx file for backend 'onnxruntime', got an OpenVINO .xml")
        return OpenVinoBackend(path, **options)
    if backend == "auto":
        import importlib.util

        backend = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "openvino"
    return OnnxBackend(path, **options) if backend == "onnxruntime" else OpenVinoBackend(path, **options)
