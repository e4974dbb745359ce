"""What a checkpoint says about its classes, read without loading its tensors into memory."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

__all__ = ["HEAD_PREFIX", "load_except_heads", "read_checkpoint_classes"]


def read_checkpoint_classes(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """``(class_names, category_ids)`` stored by :func:`ssd.training.loop.train`, or None when the file has none.

    The file is opened with ``weights_only=True`` (nothing in it runs) and ``mmap=True``, so the tensors stay on
    disk: only the small pickled header is read, and the state dict is loaded once, by the caller. Files this
    cannot read (legacy formats, NVIDIA's own checkpoints, which need extra allowed globals) carry no class
    metadata of ours, so they give None as well; reading their weights is the caller's job and reports errors.
    """
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile):
        return None
    if not isinstance(obj, dict):
        return None
    names, ids = obj.get("class_names"), obj.get("category_ids")
    if not (isinstance(names, (list, tuple)) and isinstance(ids, (list, tuple))) or not names:
        return None
    if len(names) != len(ids) or not all(isinstance(n, str) for n in names):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return tuple(names), tuple(ids)


# The classification heads: the only tensors whose shape depends on the classes.
HEAD_PREFIX = "conf."


def load_except_heads(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, *,
                      new_heads: bool = False) -> dict[str, int]:
    """Load ``state_dict`` into ``model``, leaving the classification heads at their initialisation when they
    cannot be reused: ``new_heads`` (other classes) or a shape that does not fit (another number of classes).

    Everything else must fit exactly, so a checkpoint of another architecture is still refused. Returns
    ``{"loaded": n, "skipped": m}`` counted over the model's state dict entries.

    Raises:
        InvalidCheckpointError: a tensor outside the heads is missing, unexpected or of another shape.
    """
    from .checkpoints import InvalidCheckpointError

    own = model.state_dict()
    heads = [k for k in own if k.startswith(HEAD_PREFIX)]
    misfit = any(k not in state_dict or tuple(state_dict[k].shape) != tuple(own[k].shape) for k in heads)
    drop = new_heads or misfit
    body = {k: v for k, v in state_dict.items() if not (drop and k.startswith(HEAD_PREFIX))}
    expected = [k for k in own if not (drop and k.startswith(HEAD_PREFIX))]
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in own]
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(body[k].shape)}"
              for k in expected if k in body and body[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:8])}{f' (+{len(items) - 8} more)' if len(items) > 8 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", shapes))
                 if items]
        raise InvalidCheckpointError(f"checkpoint {source!r} does not fit SSD300 (ResNet-50): " + "; ".join(parts))
    model.load_state_dict(body, strict=False)
    return {"loaded": len(body), "skipped": len(own) - len(body)}
