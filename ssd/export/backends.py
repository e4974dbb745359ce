"""Exported detectors with the PyTorch models' ``detect`` API: onnxruntime and OpenVINO runners.

Loading, batching, preprocessing (``ssd.transforms``), post-processing (``ssd.postprocess``) and the
``Detections`` results are the library's own, shared with ``model.detect``; only the network (and, for graphs
exported with ``nms=True``, the post-processing) runs in the other runtime. The spec comes from the file's
metadata, so a file made for another input size, or by someone else, is refused rather than run wrongly.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..inference.detect import _is_iterable_of_images, detect_with, detection_recipe
from ..inference.detections import Detections
from ..inference.plan import thread_plan
from ..io.images import ImageSource
from ..models.spec import DetectorSpec, PostProcessSpec
from ..postprocess import Decoded, postprocess_decoded
from .metadata import PREFIX, require, spec_from_metadata

__all__ = ["BACKENDS", "ExportedDetector", "OnnxDetector", "OpenVinoDetector", "load_detector"]

BACKENDS = ("auto", "onnxruntime", "openvino")
OPENVINO_PRECISIONS = ("fp32", "bf16", "default")
_RAW_OUTPUTS = ("boxes", "scores")
_NMS_OUTPUTS = ("det_boxes", "det_scores", "det_labels", "num_detections")


def _check_file(path: Any, suffixes: tuple[str, ...]) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path to a {' or '.join(suffixes)} file, got {type(path).__name__}")
    path = pathlib.Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: expected a {' or '.join(suffixes)} file, got suffix {path.suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected an exported model file, got no such file")
    return path


def _check_input_shape(where: str, dims: list[Any], spec: DetectorSpec) -> None:
    """The graph's ``images`` input must be N x 3 x S x S for the S its metadata declares."""
    size = spec.input.size
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if len(fixed) != 4 or fixed[1] not in (3, None) or fixed[2] != size or fixed[3] != size:
        shown = " x ".join("?" if d is None else str(d) for d in fixed)
        raise ValueError(f"{where}: expected input 'images' of shape N x 3 x {size} x {size} (the input size its "
                         f"metadata declares), got {shown}")


def _onnx_metadata(path: pathlib.Path) -> dict[str, str]:
    onnx = require("onnx", "reading ONNX files")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file at all
        raise ValueError(f"{path}: expected an ONNX model, got a file onnx cannot parse ({exc})") from exc
    return {p.key: p.value for p in proto.metadata_props}


def _check_onnx_opset(where: str, path: pathlib.Path) -> None:
    """Every op of the graph must exist in the opset the file declares: a file whose declared opset is too old
    for its ops is refused by name here instead of failing deep inside a runtime."""
    onnx = require("onnx", "reading ONNX files")
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError(f"{where}: expected an ONNX graph importing the default opset, got none")
    needed = {}
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in needed:
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset, "")
            needed[node.op_type] = None
        except onnx.defs.SchemaError:
            try:
                since = onnx.defs.get_schema(node.op_type).since_version
            except onnx.defs.SchemaError:
                since = "?"
            raise ValueError(f"{where}: expected an opset that has every op of the graph, got opset {opset}, too old "
                             f"for {node.op_type} (opset {since} or newer); re-export with --opset 17") from None


class ExportedDetector:
    """A detector loaded from an exported file: ``detect``/``detect_iter`` as on the PyTorch models.

    Attributes:
        path: the file. spec: the :class:`DetectorSpec` rebuilt from its metadata. backend: the runtime's name.
        outputs: "decoded" (boxes/scores; post-processing here, every recipe option honoured) or "nms" (in the
            graph with ``nms_recipe``; threshold and max_detections can only tighten it).
    """

    backend = ""

    def __init__(self, path: pathlib.Path, spec: DetectorSpec, outputs: str, nms_recipe: PostProcessSpec | None
                 ) -> None:
        self.path = path
        self.spec = spec
        self.outputs = outputs
        self.nms_recipe = nms_recipe

    @property
    def names(self) -> list[str]:
        return list(self.spec.classes.names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, model={self.spec.name!r}, outputs={self.outputs!r})"

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        """The graph's outputs by name for an N x 3 x S x S float32 batch."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph on a preprocessed batch; returns its outputs as tensors, in the graph's order."""
        out = self.run(np.ascontiguousarray(images.detach().cpu().float().numpy()))
        order = _RAW_OUTPUTS if self.outputs == "decoded" else _NMS_OUTPUTS
        return tuple(torch.from_numpy(np.asarray(out[name])) for name in order)

    def _runner(self, recipe: PostProcessSpec):
        if self.outputs == "decoded":
            def run_decoded(batch: torch.Tensor) -> Decoded:
                boxes, scores = self(batch)
                return postprocess_decoded(boxes, scores, self.spec, recipe)
            return run_decoded
        baked = self.nms_recipe
        if recipe.iou_threshold != baked.iou_threshold:
            raise ValueError(f"iou_threshold: expected {baked.iou_threshold} (fixed in {self.path}, exported with "
                             f"--nms) or None, got {recipe.iou_threshold}")
        if recipe.score_threshold < baked.score_threshold or recipe.max_detections > baked.max_detections:
            raise ValueError(f"threshold, max_detections: expected at least {baked.score_threshold} and at most "
                             f"{baked.max_detections} (fixed in {self.path}, exported with --nms), got "
                             f"{recipe.score_threshold} and {recipe.max_detections}")

        def run_nms(batch: torch.Tensor) -> Decoded:
            boxes, scores, labels, counts = self(batch)
            k = recipe.max_detections
            # Rows are by descending score: a stricter threshold or a smaller K only shortens each image's list.
            counts = torch.minimum(counts, (scores > recipe.score_threshold).sum(dim=1)).clamp(max=k)
            keep = torch.arange(k)[None, :] < counts[:, None]
            return Decoded(torch.where(keep[..., None], boxes[:, :k], 0.0), torch.where(keep, labels[:, :k], 0),
                           torch.where(keep, scores[:, :k], 0.0), counts)
        return run_nms

    def detect_iter(self, images: Iterable[ImageSource], *, threshold: float | None = None,
                    iou_threshold: float | None = None, max_detections: int | None = None, batch_size: int = 8,
                    precision: str | None = None, keep_images: bool = True, skip_errors: bool = False
                    ) -> Iterator[tuple[int, Detections | Exception]]:
        """As :func:`ssd.inference.detect_iter`, through this runtime. The arguments are checked now, not when
        the first result is asked for."""
        if precision not in (None, "fp32"):
            raise ValueError(f"precision: expected None or 'fp32' for an exported model (OpenVINO's is chosen "
                             f"with load_detector(..., precision=...)), got {precision!r}")
        spec = self.spec
        if self.outputs == "nms":
            # The defaults are what the graph does; explicit values are checked against it.
            spec = dataclasses.replace(spec, detect_postprocess=self.nms_recipe)
        recipe = detection_recipe(spec, threshold, iou_threshold, max_detections)
        runner = self._runner(recipe)
        return detect_with(runner, self.spec, images, batch_size=batch_size, keep_images=keep_images,
                           skip_errors=skip_errors, load_workers=thread_plan().load_workers)

    def detect(self, images: Any, threshold: float | None = None, iou_threshold: float | None = None,
               max_detections: int | None = None, batch_size: int = 8, precision: str | None = None,
               keep_images: bool = True) -> list[Detections]:
        """As :func:`ssd.inference.detect` (one ``Detections`` per image, in input order), through this runtime."""
        single = not isinstance(images, (list, tuple)) and not _is_iterable_of_images(images)
        found = self.detect_iter([images] if single else images, threshold=threshold, iou_threshold=iou_threshold,
                                 max_detections=max_detections, batch_size=batch_size, precision=precision,
                                 keep_images=keep_images)
        return [result for _, result in found]


class OnnxDetector(ExportedDetector):
    """An exported .onnx file run by onnxruntime (CPU unless ``providers`` says otherwise)."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        ort = require("onnxruntime", "running ONNX models")
        path = _check_file(path, (".onnx",))
        where = str(path)
        # Our metadata and the opset first: a foreign or damaged file gets its own message, not a runtime's.
        spec, outputs, nms = spec_from_metadata(_onnx_metadata(path), where)
        _check_onnx_opset(where, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else thread_plan().intra_op
        # Spinning threads burn the cores a loader or a neighbouring process needs; waiting costs ~nothing here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(where, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
            raise ValueError(f"{where}: expected an ONNX model onnxruntime can load, got {exc}") from exc
        super().__init__(path, spec, outputs, nms)
        images = next((i for i in session.get_inputs() if i.name == "images"), None)
        if images is None:
            raise ValueError(f"{where}: expected an input named 'images', got {[i.name for i in session.get_inputs()]}")
        _check_input_shape(where, list(images.shape), spec)
        self.session = session

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {"images": batch})))


class OpenVinoDetector(ExportedDetector):
    """An OpenVINO IR (.xml with its .bin) or an exported .onnx file run by OpenVINO on the CPU.

    ``precision``: "fp32" (the default: float32 inference, results as PyTorch's), "bf16", or "default"
    (OpenVINO's own choice: bf16 on CPUs with AMX/AVX-512 BF16).
    """

    backend = "openvino"

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int | None = None,
                 device: str = "CPU") -> None:
        ov = require("openvino", "running OpenVINO models")
        path = _check_file(path, (".xml", ".onnx"))
        where = str(path)
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(map(repr, OPENVINO_PRECISIONS))}, "
                             f"got {precision!r}")
        if path.suffix.lower() == ".onnx":
            spec_from_metadata(_onnx_metadata(path), where)
            _check_onnx_opset(where, path)
        core = ov.Core()
        try:
            model = core.read_model(where)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ValueError(f"{where}: expected a model OpenVINO can read, got {exc}") from exc
        spec, outputs, nms = spec_from_metadata(self._metadata(model, path), where)
        super().__init__(path, spec, outputs, nms)
        try:
            images = model.input("images")
        except RuntimeError:
            raise ValueError(f"{where}: expected an input named 'images', got "
                             f"{[sorted(i.get_names()) for i in model.inputs]}") from None
        shape = images.get_partial_shape()
        _check_input_shape(where, [d.get_length() if d.is_static else None for d in shape], spec)
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads if threads is not None else thread_plan().intra_op}
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "bf16"
        self.precision = precision
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()

    @staticmethod
    def _metadata(model: Any, path: pathlib.Path) -> dict[str, str]:
        if path.suffix.lower() == ".onnx":
            return _onnx_metadata(path)
        info = model.get_rt_info()
        # RTMap supports keys() but not `in`.
        entries = info["ssd_metadata"] if "ssd_metadata" in list(info.keys()) else {}
        return {key: str(value.astype(str)) if hasattr(value, "astype") else str(value)
                for key, value in dict(entries).items() if key.startswith(PREFIX)}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.request.infer({"images": batch})
        return {output.get_any_name(): self.request.get_tensor(output).data.copy()
                for output in self.compiled.outputs}


def load_detector(path: str | os.PathLike, backend: str = "auto", **options: Any) -> ExportedDetector:
    """Load an exported model: a .onnx file (onnxruntime; OpenVINO with ``backend='openvino'``, or under "auto"
    when only OpenVINO is installed) or an OpenVINO .xml. ``options`` go to the backend's class (``threads``,
    and ``precision`` for OpenVINO).

    Raises:
        ValueError: the file was not exported by this library, declares another input size than its graph takes,
            or declares an opset too old for its ops; each message names the file.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path to a .onnx or .xml file, got {type(path).__name__}")
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in (".onnx", ".xml"):
        raise ValueError(f"{path}: expected a .onnx or OpenVINO .xml file, got suffix {suffix!r}")
    if suffix == ".xml":
        if backend == "onnxruntime":
            raise ValueError(f"{path}: expected a .onnx file for backend 'onnxruntime', got an OpenVINO .xml")
        return OpenVinoDetector(path, **options)
    if backend == "auto":
        import importlib.util

        backend = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "openvino"
    return OnnxDetector(path, **options) if backend == "onnxruntime" else OpenVinoDetector(path, **options)
