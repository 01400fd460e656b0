"""Checkpointers, as in ``orbax.checkpoint.checkpointers``."""

from flaxckpt._checkpointer import (AsyncCheckpointer, Checkpointer, PyTreeCheckpointer,
                                    StandardCheckpointer)
from flaxckpt._handler import AbstractCheckpointer

__all__ = ['AbstractCheckpointer', 'AsyncCheckpointer', 'Checkpointer', 'PyTreeCheckpointer',
           'StandardCheckpointer']
