"""Checkpoints: the published tables, the cache, downloads, safe loading and key conversion."""
from .checkpoints import (
    VARIANTS,
    CheckpointUnavailableError,
    CheckpointVariant,
    InvalidCheckpointError,
    cache_dir,
    load_into,
    read_state_dict,
    resolve_state_dict,
)

__all__ = [
    "VARIANTS",
    "CheckpointUnavailableError",
    "CheckpointVariant",
    "InvalidCheckpointError",
    "cache_dir",
    "load_into",
    "read_state_dict",
    "resolve_state_dict",
]
