"""What a checkpoint holds, read one way for every family: tensors under this package's key names, the classes the
file records, and the class count its weights predict.

Every file goes through :func:`ssd.weights.loader.load_file`. Our own training checkpoints (``ssd train``, format
:data:`TRAIN_FORMAT`) are read here for every model; anything else goes to the family's converter
(``to_state_dict(obj, source, spec)``). Then every tensor is checked (finite floating-point weights, backed by their
own data), the class count is read from the class predictor's shape, class names that disagree with it are refused,
and the tensors must fit the network built for that count, on the ``meta`` device: so nothing is allocated for a
model before its checkpoint is known to fit it.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..models.base import with_num_classes
from ..models.entry import ModelEntry
from ..models.spec import ClassSpec, DetectorSpec
from .loader import InvalidCheckpointError, load_file

__all__ = ["TRAIN_FORMAT", "Checkpoint", "read_checkpoint", "read_training_state"]

# Our training checkpoints: {"format", "model": model name, "state_dict", "class_names", "category_ids", ...}.
TRAIN_FORMAT = "ssd-train/2"
# Before models were named, ``ssd train`` trained NVIDIA's SSD300 only and kept its weights under "model".
_V1_FORMAT = "ssd300-train/1"
_V1_MODEL = "nvidia_ssd"
# What ``--resume`` needs beside the weights, and the type each must have.
_RESUME_KEYS = {"optimizer": Mapping, "scheduler": Mapping, "scaler": Mapping, "epoch": int, "iteration": int,
                "class_names": (list, tuple), "category_ids": (list, tuple)}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read for one model: checked tensors under our key names, and what it says of its classes.

    ``num_classes`` (background included) is read from the class predictor's shape; ``classes`` are the names and
    ids the file records (our training files, mmdetection's meta), which agree with it, or None when it records none.
    """

    state_dict: dict[str, torch.Tensor]
    classes: ClassSpec | None
    num_classes: int
    source: str


def entry_of(model: ModelEntry | str) -> ModelEntry:
    if isinstance(model, ModelEntry):
        return model
    from ..registry import get_entry

    return get_entry(model)


def converter(entry: ModelEntry) -> Any:
    """The module that reads ``entry``'s foreign files (``to_state_dict`` and ``LOAD_GLOBALS``)."""
    # Named relative to the package this one belongs to: ``ssd``, or its private name when torch.hub loads it beside
    # a caller's own ``ssd`` (read now: that renaming happens after import).
    return importlib.import_module(entry.converter, __name__.rsplit(".", 2)[0])


def read_checkpoint(path: str | os.PathLike[str], model: ModelEntry | str, *, name: str | None = None,
                    max_unpacked_bytes: int | None = None) -> Checkpoint:
    """Read a checkpoint file for ``model`` (a registered name or its entry), checked as the module docstring says.

    Accepts our training checkpoints of that model and the family's own formats (NVIDIA's training files, bare state
    dicts, mmdetection's ``.pth``). ``name`` calls the file otherwise in errors (a URL for a download).

    Raises:
        FileNotFoundError: no such file.
        InvalidCheckpointError: the file is unsafe, unreadable, of another model, or inconsistent; the message
            names the file (and the key at fault).
    """
    entry = entry_of(model)
    name = os.fspath(path) if name is None else name
    obj = load_file(path, extra_globals=converter(entry).LOAD_GLOBALS, name=name,
                    max_unpacked_bytes=max_unpacked_bytes)
    return parse_checkpoint(obj, entry, name)


def parse_checkpoint(obj: object, model: ModelEntry | str, source: str) -> Checkpoint:
    """:func:`read_checkpoint` on an object already loaded (with :func:`ssd.weights.loader.load_file`)."""
    entry = entry_of(model)
    trained_for = training_model(obj, source)
    if trained_for is not None:
        if trained_for != entry.name:
            raise InvalidCheckpointError(
                f"checkpoint {source!r} was written by ssd train for {trained_for}, not {entry.name}: load it with "
                f"the model {trained_for!r} (--model {trained_for}), or start {entry.name} from other weights"
            )
        state_dict = tensors(_training_weights(obj), source)
        classes = recorded_classes(obj, source)
    else:
        state_dict, classes = converter(entry).to_state_dict(obj, source, entry.spec)
    return checkpoint_of(state_dict, classes, entry, source)


def checkpoint_of(state_dict: dict[str, torch.Tensor], classes: ClassSpec | None, model: ModelEntry | str,
                  source: str) -> Checkpoint:
    """A :class:`Checkpoint` of checked tensors under our key names, once its class count is read from the class
    predictor, ``classes`` agree with it, and every tensor fits the network built for that count."""
    entry = entry_of(model)
    count = head_classes(state_dict, entry, source)
    if classes is not None and classes.num_classes != count:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: its class names list {len(classes.names)} classes, but its class predictor "
            f"{entry.class_predictor.format(level=0, param='weight')!r} scores {count - 1} (plus background); "
            f"refusing a file that contradicts itself"
        )
    check_fits(meta_network(entry, with_num_classes(entry.spec, count)), state_dict, source)
    return Checkpoint(state_dict, classes, count, source)


def _training_weights(obj: Mapping[str, Any]) -> object:
    """The state dict inside one of our training checkpoints (``training_model(obj)`` is not None)."""
    return obj.get("model") if obj.get("format") == _V1_FORMAT else obj.get("state_dict")


def training_model(obj: object, source: str) -> str | None:
    """The model an ``ssd train`` checkpoint was written for, or None when ``obj`` is not one of ours."""
    if not isinstance(obj, Mapping):
        return None
    fmt = obj.get("format")
    if fmt == _V1_FORMAT:
        return _V1_MODEL
    if fmt == TRAIN_FORMAT:
        name = obj.get("model")
        if not isinstance(name, str) or not name or len(name) > 100:
            raise InvalidCheckpointError(f"checkpoint {source!r}: key 'model': expected the model's name, got "
                                         f"{_brief(name)}")
        return name
    if isinstance(fmt, str) and fmt.startswith("ssd"):
        raise InvalidCheckpointError(f"checkpoint {source!r}: format {fmt[:40]!r} is not one this version reads "
                                     f"(expected {TRAIN_FORMAT!r} or {_V1_FORMAT!r})")
    return None


def recorded_classes(obj: Mapping[str, Any], source: str) -> ClassSpec | None:
    """The classes our training checkpoints record (``class_names``, ``category_ids``), checked; None if absent."""
    names, ids = obj.get("class_names"), obj.get("category_ids")
    if names is None and ids is None:
        return None
    if not (isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names)):
        raise InvalidCheckpointError(f"checkpoint {source!r}: key 'class_names': expected a list of names, got "
                                     f"{_brief(names)}")
    if not (isinstance(ids, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise InvalidCheckpointError(f"checkpoint {source!r}: key 'category_ids': expected a list of integers, got "
                                     f"{_brief(ids)}")
    try:
        return ClassSpec(tuple(names), tuple(ids))
    except ValueError as exc:
        raise InvalidCheckpointError(f"checkpoint {source!r}: {exc}") from None


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(obj: object) -> str:
    """What a loaded checkpoint object looks like, for errors that refuse it."""
    if not isinstance(obj, Mapping):
        return type(obj).__name__
    if isinstance(obj.get("state_dict"), Mapping) and isinstance(obj.get("meta"), Mapping):
        return "an mmdetection checkpoint (a dict with 'meta' and 'state_dict')"
    if isinstance(obj.get("model"), Mapping):
        return "a training checkpoint with a 'model' state dict"
    return f"a dict with keys such as {[str(k)[:40] for k in list(obj)[:3]]!r}"


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def strip_distributed_prefix(key: str) -> str:
    """Drop the ``module.`` (or ``module.1.``) prefix that DistributedDataParallel-wrapped saves carry."""
    for prefix in ("module.1.", "module."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def tensors(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict ``obj`` as checked tensors, without DistributedDataParallel's ``module.`` prefixes.

    A file holding both ``module.x`` and ``x`` is refused (loading either would silently drop the other), and every
    tensor must be model weights (see :func:`check_tensor`).
    """
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidCheckpointError(f"checkpoint {source!r}: expected a state dict of tensors, got {describe(obj)}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected a state dict of tensors, got non-tensor entries such as "
            f"{[str(k)[:40] for k in bad[:3]]!r}"
        )
    state: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, value in obj.items():
        stripped = strip_distributed_prefix(key)
        if stripped in state:
            raise InvalidCheckpointError(
                f"checkpoint {source!r}: keys {original[stripped]!r} and {key!r} both name {stripped!r}; "
                f"refusing to guess which one to load"
            )
        check_tensor(key, value, source)
        state[stripped] = value
        original[stripped] = key
    return state


def check_tensor(key: str, value: torch.Tensor, source: str) -> None:
    """Refuse a tensor that cannot be model weights: no data, the wrong kind of numbers, NaN/infinity, or a shape
    larger than its data (a stride-0 view of a few bytes could declare a head of any size)."""
    if value.device.type == "meta":
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r} is a meta tensor (a shape without data), not weights"
        )
    if value.layout != torch.strided:
        raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r}: expected a dense tensor, got {value.layout}")
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r}: expected weights backed by their own data, got shape "
            f"{tuple(value.shape)} over {value.untyped_storage().nbytes()} bytes (an expanded view)"
        )
    # BatchNorm's step counter is the one integer entry; a state dict converted wholesale with .half() turns it
    # into a float, which loads the same, so it is exempt from the dtype rule (not from the finiteness one).
    counter = key.rsplit(".", 1)[-1] == "num_batches_tracked"
    if not value.is_floating_point() and not counter:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r}: expected floating-point weights, got {value.dtype}"
        )
    if not value.is_floating_point():
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r}: expected finite weights, got {bad} NaN or infinite value(s)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Classes and fitting


def head_classes(state_dict: Mapping[str, torch.Tensor], entry: ModelEntry, source: str) -> int:
    """The class count (background included) the checkpoint's class predictor scores, from its weight's shape."""
    key = entry.class_predictor.format(level=0, param="weight")
    per_cell = entry.spec.anchors.boxes_per_location[0]
    weight = state_dict.get(key)
    if weight is not None and weight.ndim >= 2 and weight.shape[0] >= 2 * per_cell and weight.shape[0] % per_cell == 0:
        return weight.shape[0] // per_cell
    # Not a class predictor: say how the file differs from the published model (it may be another model's), or,
    # where only the predictor is wrong, what is wrong with it.
    check_fits(meta_network(entry, entry.spec), state_dict, source)
    shape = None if weight is None else tuple(weight.shape)
    raise InvalidCheckpointError(
        f"checkpoint {source!r}: key {key!r}: expected a class predictor of {per_cell} x (classes + 1) output "
        f"channels with at least one class, got shape {shape}"
    )


def stored_classes(checkpoint: Checkpoint, model: ModelEntry | str) -> ClassSpec:
    """The classes a checkpoint's heads score: those it records, else the published ones when the count is theirs
    (NVIDIA's and mmdetection's published files name none), else numbered ones."""
    if checkpoint.classes is not None:
        return checkpoint.classes
    published = entry_of(model).spec.classes
    if checkpoint.num_classes == published.num_classes:
        return published
    return ClassSpec.numbered(checkpoint.num_classes - 1)


def meta_network(entry: ModelEntry, spec: DetectorSpec) -> torch.nn.Module:
    """``entry``'s network for ``spec`` on the ``meta`` device: shapes and keys, no memory, no initialisation."""
    with torch.device("meta"):
        return entry.network(spec)


def check_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *,
               skip: tuple[str, ...] = ()) -> None:
    """Raise :class:`InvalidCheckpointError` naming ``source`` and the keys unless ``state_dict`` fits ``model``
    exactly (same keys, same shapes), leaving out the keys in ``skip``. Works on a model on the ``meta`` device."""
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    given = {k: v for k, v in state_dict.items() if k not in skip}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
                   for k in expected if k in given and given[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", wrong_shape)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label}: {', '.join(items[:8])}{more}")
        name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
        raise InvalidCheckpointError(f"checkpoint {source!r} does not fit {name}: " + "; ".join(parts))


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, entry: ModelEntry, *,
                 new_heads: bool, assign: bool = False) -> dict[str, int]:
    """Load ``state_dict`` (checked tensors under our key names) into ``model``: every tensor, or with ``new_heads``
    every tensor but the class predictors (left at their initialisation, for other classes). Whatever is loaded must
    fit exactly, or :class:`InvalidCheckpointError` names ``source`` and the keys.

    ``assign=True`` adopts the tensors instead of copying (for a model built on the ``meta`` device). Returns
    ``{"loaded": n, "skipped": m}`` counted over the model's state dict entries.
    """
    skip = entry.class_predictor_keys() if new_heads else ()
    check_fits(model, state_dict, source, skip=skip)
    body = {k: v for k, v in state_dict.items() if k not in skip}
    model.load_state_dict(body, strict=not new_heads, assign=assign)
    return {"loaded": len(body), "skipped": len(model.state_dict()) - len(body)}


def build_network(entry: ModelEntry, checkpoint: Checkpoint, spec: DetectorSpec) -> torch.nn.Module:
    """``entry``'s network for ``spec`` with the weights of ``checkpoint``, in float32.

    When the classes differ from the checkpoint's, the class predictors are new (the network's own initialisation,
    for fine-tuning); otherwise every value comes from the checkpoint, so the network is built on the ``meta`` device
    and adopts the loaded tensors (initialising weights that are overwritten anyway is a third of the load time).
    """
    new_heads = spec.classes.names != stored_classes(checkpoint, entry).names
    if new_heads:
        model = entry.network(spec)
        load_weights(model, checkpoint.state_dict, checkpoint.source, entry, new_heads=True)
    else:
        model = meta_network(entry, spec)
        load_weights(model, checkpoint.state_dict, checkpoint.source, entry, new_heads=False, assign=True)
    model.float()
    model.checkpoint_source = checkpoint.source
    return model


# ---------------------------------------------------------------------------------------------------------------
# Resuming training


def read_training_state(path: str | os.PathLike[str], model: str) -> dict[str, Any]:
    """The state ``train --resume`` continues from: an ``ssd train`` checkpoint of ``model`` with its optimizer.

    Returns the file's dict, its weights checked and under ``"state_dict"``. Every problem (unsafe, damaged or
    truncated file, another model, a key missing or of the wrong type) is one :class:`InvalidCheckpointError`
    naming the file.
    """
    source = os.fspath(path)
    obj = load_file(path)
    trained_for = training_model(obj, source)
    if trained_for is None:
        raise InvalidCheckpointError(f"checkpoint {source!r}: expected a training checkpoint written by ssd train "
                                     f"({TRAIN_FORMAT}), got {describe(obj)}; to start from its weights, pass it as "
                                     f"--checkpoint (init_checkpoint) instead")
    if trained_for != model:
        raise InvalidCheckpointError(f"checkpoint {source!r} was written by ssd train for {trained_for}, not "
                                     f"{model}: only a run of {trained_for} can resume it")
    state = dict(obj)  # a Mapping: training_model said so
    weights = _training_weights(state)
    if weights is None:
        raise InvalidCheckpointError(f"checkpoint {source!r}: its weights ('state_dict') are missing")
    state["state_dict"] = tensors(weights, source)
    if "optimizer" not in state:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected last.pt (with the optimizer state), got a checkpoint without it "
            "(best.pt?); start from it with init_checkpoint / --checkpoint instead")
    for key, kind in _RESUME_KEYS.items():
        if key not in state:
            raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r} is missing; it cannot be resumed")
        if not isinstance(state[key], kind) or (kind is int and (isinstance(state[key], bool) or state[key] < 0)):
            raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r}: got {_brief(state[key])}, which "
                                         "is not what ssd train writes; it cannot be resumed")
    best = state.get("best_map")
    if best is not None and (isinstance(best, bool) or not isinstance(best, int | float)):
        raise InvalidCheckpointError(f"checkpoint {source!r}: key 'best_map': expected a number or None, got "
                                     f"{_brief(best)}")
    recorded_classes(state, source)
    state["class_names"], state["category_ids"] = list(state["class_names"]), list(state["category_ids"])
    return state
