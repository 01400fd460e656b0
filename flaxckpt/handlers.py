"""Checkpoint handlers and handler registries, as in ``orbax.checkpoint.handlers``."""

from flaxckpt._array_handler import ArrayCheckpointHandler
from flaxckpt._array_handler import ArrayRestore as ArrayRestoreArgs
from flaxckpt._array_handler import ArraySave as ArraySaveArgs
from flaxckpt._base_pytree_handler import (BasePyTreeCheckpointHandler, BasePyTreeRestoreArgs,
                                           BasePyTreeSaveArgs)
from flaxckpt._composite_handler import CompositeCheckpointHandler
from flaxckpt._handler import AsyncCheckpointHandler, CheckpointHandler
from flaxckpt._json_handler import JsonCheckpointHandler
from flaxckpt._pytree_handler import PyTreeCheckpointHandler, StandardCheckpointHandler
from flaxckpt._registry import (AlreadyExistsError, CheckpointHandlerRegistry,
                                DefaultCheckpointHandlerRegistry, NoEntryError,
                                create_default_handler_registry)
from flaxckpt._args import Composite as CompositeArgs
from flaxckpt._args import Composite as CompositeResults
from flaxckpt._args import JsonRestore as JsonRestoreArgs
from flaxckpt._args import JsonSave as JsonSaveArgs
from flaxckpt._args import PyTreeRestore as PyTreeRestoreArgs
from flaxckpt._args import PyTreeSave as PyTreeSaveArgs
from flaxckpt._args import StandardRestore as StandardRestoreArgs
from flaxckpt._args import StandardSave as StandardSaveArgs

__all__ = [
    'AlreadyExistsError', 'ArrayCheckpointHandler', 'ArrayRestoreArgs', 'ArraySaveArgs',
    'AsyncCheckpointHandler', 'BasePyTreeCheckpointHandler', 'BasePyTreeRestoreArgs',
    'BasePyTreeSaveArgs', 'CheckpointHandler', 'CheckpointHandlerRegistry', 'CompositeArgs',
    'CompositeCheckpointHandler', 'CompositeResults', 'DefaultCheckpointHandlerRegistry',
    'JsonCheckpointHandler',
    'JsonRestoreArgs', 'JsonSaveArgs', 'NoEntryError', 'PyTreeCheckpointHandler',
    'PyTreeRestoreArgs', 'PyTreeSaveArgs', 'StandardCheckpointHandler', 'StandardRestoreArgs',
    'StandardSaveArgs', 'create_default_handler_registry',
]
