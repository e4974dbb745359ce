"""Checkpoints: the published tables, the cache, downloads, safe loading and key conversion."""
from .checkpoints import (
    VARIANTS,
    CheckpointUnavailableError,
    CheckpointVariant,
    InvalidCheckpointError,
    cache_dir,
    check_fits,
    checkpoint_policy,
    load_into,
    read_state_dict,
    resolve_state_dict,
    url_cache_name,
)

__all__ = [
    "VARIANTS",
    "CheckpointUnavailableError",
    "CheckpointVariant",
    "InvalidCheckpointError",
    "cache_dir",
    "check_fits",
    "checkpoint_policy",
    "load_into",
    "read_state_dict",
    "resolve_state_dict",
    "url_cache_name",
]
