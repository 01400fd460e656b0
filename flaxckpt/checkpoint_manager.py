"""``orbax.checkpoint.checkpoint_manager``: the manager and the names code imports beside it.

``from orbax.checkpoint.checkpoint_manager import CheckpointManager, CheckpointManagerOptions``
ports as ``from flaxckpt.checkpoint_manager import ...``.
"""

from __future__ import annotations

from flaxckpt._checkpointer import AsyncCheckpointer, Checkpointer
from flaxckpt._manager import (DEFAULT_ITEM, METRICS_ITEM, CheckpointManager,
                               CheckpointManagerOptions, StepAlreadyExistsError,
                               is_async_checkpointer)
from flaxckpt._policies import CheckpointInfo
from flaxckpt.options import AsyncOptions, FileOptions, MultiprocessingOptions

DEFAULT_ITEM_NAME = DEFAULT_ITEM
METRIC_ITEM_NAME = METRICS_ITEM
# The folder under a manager's root holding the run's metadata.
METADATA_ITEM_NAME = 'metadata'

__all__ = [
    'DEFAULT_ITEM_NAME', 'METADATA_ITEM_NAME', 'METRIC_ITEM_NAME', 'AsyncCheckpointer',
    'AsyncOptions', 'CheckpointInfo', 'CheckpointManager', 'CheckpointManagerOptions',
    'Checkpointer', 'FileOptions', 'MultiprocessingOptions', 'StepAlreadyExistsError',
    'is_async_checkpointer',
]
