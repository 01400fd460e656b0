"""One array or scalar per checkpoint (``ArrayCheckpointHandler``), in Orbax's layout.

Orbax stores the value as a one-leaf PyTree ``{<checkpoint_name>: value}`` (default name
``checkpoint``) without OCDBT: ``_METADATA`` plus the zarr array ``<checkpoint_name>/``. Either
library reads what the other writes.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from flaxckpt._args import PyTreeRestore, PyTreeSave
from flaxckpt._handler import AsyncCheckpointHandler, CheckpointArgs, Writer, register_with_handler
from flaxckpt._pytree_handler import PyTreeCheckpointHandler

_DEFAULT_NAME = 'checkpoint'


class ArrayCheckpointHandler(AsyncCheckpointHandler):
  """Saves and restores a single array (numpy or jax) or scalar.

  Args:
    checkpoint_name: the name of the array inside the checkpoint (default ``checkpoint``).

  Example:
    >>> ckptr = flaxckpt.Checkpointer(flaxckpt.ArrayCheckpointHandler())
    >>> ckptr.save(path, args=flaxckpt.args.ArraySave(np.arange(8)))
    >>> ckptr.restore(path, args=flaxckpt.args.ArrayRestore())
  """

  typestr = 'orbax.checkpoint._src.handlers.array_checkpoint_handler.ArrayCheckpointHandler'

  def __init__(self, checkpoint_name: str | None = None):
    self._name = checkpoint_name or _DEFAULT_NAME
    self._pytree = PyTreeCheckpointHandler(use_ocdbt=False)

  def async_save(self, directory: pathlib.Path, args: ArraySave) -> Writer:
    item = args.item
    if not (isinstance(item, (np.ndarray, jax.Array, np.number, int, float))):
      raise TypeError(f'ArraySave for {directory}: expected an array or a scalar, got '
                      f'{type(item).__name__}.')
    save_args = None if args.save_args is None else {self._name: args.save_args}
    return self._pytree.async_save(directory, PyTreeSave({self._name: item},
                                                         save_args=save_args))

  def restore(self, directory: pathlib.Path, args: ArrayRestore | None = None) -> Any:
    args = args or ArrayRestore()
    item = None if args.item is None else {self._name: args.item}
    restore_args = None if args.restore_args is None else {self._name: args.restore_args}
    tree = self._pytree.restore(directory, PyTreeRestore(item=item, restore_args=restore_args))
    return tree[self._name]

  def metadata(self, directory: pathlib.Path) -> Any:
    return self._pytree.metadata(directory)[self._name]

  def finalize(self, directory: pathlib.Path) -> None:
    self._pytree.finalize(directory)


@register_with_handler(ArrayCheckpointHandler, for_save=True)
@dataclasses.dataclass(frozen=True)
class ArraySave(CheckpointArgs):
  """Save one array or scalar with ``ArrayCheckpointHandler``.

  Attributes:
    item: a numpy or jax array, or a Python or numpy scalar.
    save_args: a ``SaveArgs`` for it.
  """
  item: Any
  save_args: Any = None


@register_with_handler(ArrayCheckpointHandler, for_restore=True)
@dataclasses.dataclass(frozen=True)
class ArrayRestore(CheckpointArgs):
  """Restore the array or scalar of an ``ArrayCheckpointHandler`` checkpoint.

  Attributes:
    item: unused by Orbax beyond the older call form; a target whose type the result takes.
    restore_args: a ``RestoreArgs`` (``ArrayRestoreArgs`` for a sharded jax array).
  """
  item: Any = None
  restore_args: Any = None
