"""Weights: one resolution order and cache for every model (:mod:`.checkpoints`), the one safe loader
(:mod:`.loader`), one reader of checkpoint contents (:mod:`.formats`) and each family's converter (:mod:`.nvidia`,
:mod:`.mmdet`). Models are built with :func:`ssd.build_model`; these are the pieces behind it."""
from .checkpoints import CheckpointUnavailableError
from .formats import TRAIN_FORMAT, Checkpoint, read_checkpoint
from .loader import InvalidCheckpointError, load_file

__all__ = ["TRAIN_FORMAT", "Checkpoint", "CheckpointUnavailableError", "InvalidCheckpointError", "load_file",
           "read_checkpoint"]
