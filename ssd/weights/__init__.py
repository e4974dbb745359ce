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
from .mmdet import (
    MMDET_CHECKPOINTS,
    MMDetCheckpointInfo,
    convert_mmdet_state_dict,
    load_mmdet_state_dict,
    load_mmdet_weights,
    resolve_mmdet_state_dict,
)

__all__ = [
    "MMDET_CHECKPOINTS",
    "VARIANTS",
    "CheckpointUnavailableError",
    "CheckpointVariant",
    "InvalidCheckpointError",
    "MMDetCheckpointInfo",
    "cache_dir",
    "check_fits",
    "checkpoint_policy",
    "convert_mmdet_state_dict",
    "load_into",
    "load_mmdet_state_dict",
    "load_mmdet_weights",
    "read_state_dict",
    "resolve_mmdet_state_dict",
    "resolve_state_dict",
    "url_cache_name",
]
