"""Argument classes for save and restore, as in ``orbax.checkpoint.args``."""

from flaxckpt._args import (Composite, JsonRestore, JsonSave, PyTreeRestore, PyTreeSave,
                            StandardRestore, StandardSave)
from flaxckpt._handler import CheckpointArgs

__all__ = ['CheckpointArgs', 'Composite', 'JsonRestore', 'JsonSave', 'PyTreeRestore',
           'PyTreeSave', 'StandardRestore', 'StandardSave']
