"""Argument classes for save and restore, as in ``orbax.checkpoint.args``."""

from flaxckpt._args import (Composite, JsonRestore, JsonSave, PyTreeRestore, PyTreeSave,
                            StandardRestore, StandardSave)
from flaxckpt._array_handler import ArrayRestore, ArraySave
from flaxckpt._handler import (CheckpointArgs, get_registered_args_cls, get_registered_handler_cls,
                               has_registered_args, register_with_handler)

__all__ = ['ArrayRestore', 'ArraySave', 'CheckpointArgs', 'Composite', 'JsonRestore', 'JsonSave',
           'PyTreeRestore', 'PyTreeSave', 'StandardRestore', 'StandardSave',
           'get_registered_args_cls', 'get_registered_handler_cls', 'has_registered_args',
           'register_with_handler']
