"""flaxckpt: Orbax-compatible checkpoints for Flax and JAX, with less overhead.

``import flaxckpt as ocp`` runs code written for ``orbax.checkpoint``; the files on disk are
Orbax's format, so either library reads what the other writes.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from flaxckpt import args, multihost, utils
from flaxckpt._checkpointer import (AsyncCheckpointer, Checkpointer, PyTreeCheckpointer,
                                    StandardCheckpointer)
from flaxckpt._composite_handler import CompositeCheckpointHandler
from flaxckpt._errors import (AsyncSaveError, BarrierTimeoutError, CheckpointError,
                              CheckpointExistsError, ChecksumError,
                              IncompleteCheckpointError, LimitExceededError, MissingKeysError,
                              NameCollisionError, NotACheckpointError, StructureMismatchError,
                              UnsafeCheckpointError, UnsupportedLeafError)
from flaxckpt._handler import AsyncCheckpointHandler, CheckpointHandler
from flaxckpt._json_handler import JsonCheckpointHandler
from flaxckpt._pytree_handler import PyTreeCheckpointHandler, StandardCheckpointHandler
from flaxckpt._transforms import Transform
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs, SaveArgs

if _TYPE_CHECKING:  # Imported on first use (see _LAZY_NAMES); spelled out for type checkers.
  from flaxckpt import checkpoint_utils, type_handlers
  from flaxckpt._manager import CheckpointManager, CheckpointManagerOptions

__version__ = '0.1.0'

__all__ = [
    'ArrayRestoreArgs', 'AsyncCheckpointHandler', 'AsyncCheckpointer', 'AsyncSaveError',
    'BarrierTimeoutError',
    'CheckpointError', 'CheckpointExistsError', 'CheckpointHandler', 'CheckpointManager',
    'CheckpointManagerOptions', 'Checkpointer', 'ChecksumError',
    'CompositeCheckpointHandler', 'IncompleteCheckpointError', 'JsonCheckpointHandler',
    'LimitExceededError', 'MissingKeysError', 'NameCollisionError', 'NotACheckpointError',
    'PyTreeCheckpointHandler',
    'PyTreeCheckpointer', 'RestoreArgs', 'SaveArgs', 'StandardCheckpointHandler',
    'StandardCheckpointer', 'StructureMismatchError', 'Transform', 'UnsafeCheckpointError',
    'UnsupportedLeafError',
    'args', 'checkpoint_utils', 'multihost', 'test_utils', 'type_handlers', 'utils',
    # Imported on first use (below).
    'AbstractCheckpointer', 'ArrayCheckpointHandler', 'AsyncOptions', 'BasePyTreeCheckpointHandler',
    'CheckpointHandlerRegistry', 'DefaultCheckpointHandlerRegistry', 'FileOptions', 'Future',
    'MultiprocessingOptions', 'PLACEHOLDER', 'RestoreTransform', 'apply_transformations',
    'merge_trees', 'aggregate_handlers', 'checkpoint_manager', 'checkpoint_managers',
    'checkpointers', 'future', 'handlers', 'logging', 'metadata', 'object_store', 'options',
    'path', 'step',
    'transform_utils', 'tree',
]

_LAZY_SUBMODULES = ('test_utils', 'legacy', 'aggregate_handlers', 'checkpoint_manager',
                    'checkpoint_utils', 'type_handlers',
                    'checkpoint_managers', 'checkpointers', 'future', 'handlers', 'logging',
                    'metadata', 'object_store', 'options', 'path', 'step', 'transform_utils',
                    'tree')

# Top-level names defined in submodules, imported on first use: {name: module}.
_LAZY_NAMES = {
    # The manager, its options and policies: only code that manages steps pays for them.
    'CheckpointManager': 'flaxckpt._manager',
    'CheckpointManagerOptions': 'flaxckpt._manager',
    'AbstractCheckpointer': 'flaxckpt._handler',
    'ArrayCheckpointHandler': 'flaxckpt.handlers',
    'BasePyTreeCheckpointHandler': 'flaxckpt.handlers',
    'CheckpointHandlerRegistry': 'flaxckpt.handlers',
    'DefaultCheckpointHandlerRegistry': 'flaxckpt.handlers',
    'AsyncOptions': 'flaxckpt.options',
    'MultiprocessingOptions': 'flaxckpt.options',
    'FileOptions': 'flaxckpt.options',
    'Future': 'flaxckpt.future',
    'PLACEHOLDER': 'flaxckpt.transform_utils',
    'apply_transformations': 'flaxckpt.transform_utils',
    'merge_trees': 'flaxckpt.transform_utils',
    'RestoreTransform': 'flaxckpt.transform_utils',
}


def __getattr__(name: str) -> _Any:
  """Imports the manager and the less used submodules (and the names they define) only when
  first used, which keeps ``import flaxckpt`` cheap."""
  if name in _LAZY_SUBMODULES:
    return _importlib.import_module(f'flaxckpt.{name}')
  if name in _LAZY_NAMES:
    return getattr(_importlib.import_module(_LAZY_NAMES[name]), name)
  raise AttributeError(f'module "flaxckpt" has no attribute {name!r}')
