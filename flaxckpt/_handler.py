"""Handler interfaces, the args base class and the registry linking them.

A handler knows how to write and read one kind of item inside a directory that a Checkpointer
prepares and commits; it never renames or commits itself.
"""

from __future__ import annotations

import abc
import pathlib
from collections.abc import Callable
from typing import Any

# The remaining work of a save after the caller's data has been copied to host memory; a
# Checkpointer runs it inline, an AsyncCheckpointer on its background thread.
Writer = Callable[[], None]


class CheckpointArgs:
  """Base class of save/restore argument objects (``flaxckpt.args``)."""


class CheckpointHandler(abc.ABC):
  """Saves and restores one item in a directory."""

  # The class path Orbax records in _CHECKPOINT_METADATA for the equivalent handler, so Orbax
  # managers reading our checkpoints pick the right handler.
  typestr: str = ''

  @abc.abstractmethod
  def save(self, directory: pathlib.Path, args: CheckpointArgs) -> None:
    """Writes the item into ``directory`` (which exists and is empty)."""

  @abc.abstractmethod
  def restore(self, directory: pathlib.Path, args: CheckpointArgs | None = None) -> Any:
    """Reads the item from ``directory``."""

  def metadata(self, directory: pathlib.Path) -> Any:
    """Describes what ``directory`` holds without reading array data."""
    return None

  def finalize(self, directory: pathlib.Path) -> None:
    """Runs after every write has finished, before the checkpoint is committed."""

  def close(self) -> None:
    """Releases resources."""


class AsyncCheckpointHandler(CheckpointHandler):
  """A handler whose writes can run on a background thread."""

  @abc.abstractmethod
  def async_save(self, directory: pathlib.Path, args: CheckpointArgs) -> Writer:
    """Copies what must be copied from the caller, returns the rest of the save to run later."""

  def save(self, directory: pathlib.Path, args: CheckpointArgs) -> None:
    self.async_save(directory, args)()


_SAVE_HANDLERS: dict[type, type[CheckpointHandler]] = {}
_RESTORE_HANDLERS: dict[type, type[CheckpointHandler]] = {}


def register_with_handler(handler_cls: type[CheckpointHandler], for_save: bool = False,
                          for_restore: bool = False) -> Callable[[type], type]:
  """Class decorator linking an args class to the handler that consumes it."""

  def decorator(args_cls: type) -> type:
    if for_save:
      _SAVE_HANDLERS[args_cls] = handler_cls
    if for_restore:
      _RESTORE_HANDLERS[args_cls] = handler_cls
    return args_cls

  return decorator


def handler_for(args: CheckpointArgs) -> type[CheckpointHandler]:
  """The handler class registered for an args object's type."""
  for cls in type(args).__mro__:
    if cls in _SAVE_HANDLERS:
      return _SAVE_HANDLERS[cls]
    if cls in _RESTORE_HANDLERS:
      return _RESTORE_HANDLERS[cls]
  raise TypeError(f'No handler is registered for args of type {type(args).__name__}.')


def args_type_for(handler: CheckpointHandler, for_save: bool) -> type | None:
  """The args class registered for a handler, used to adapt the older call forms."""
  registry = _SAVE_HANDLERS if for_save else _RESTORE_HANDLERS
  for cls in type(handler).__mro__:
    for args_cls, handler_cls in registry.items():
      if handler_cls is cls:
        return args_cls
  return None
