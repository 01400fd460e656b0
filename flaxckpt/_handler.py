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
  def save(self, directory: pathlib.Path, args: Any) -> None:
    """Writes the item into ``directory`` (which exists and is empty)."""

  @abc.abstractmethod
  def restore(self, directory: pathlib.Path, args: Any = None) -> Any:
    """Reads the item from ``directory``."""

  def metadata(self, directory: pathlib.Path) -> Any:
    """Describes what ``directory`` holds without reading array data."""
    return None

  def finalize(self, directory: pathlib.Path) -> None:
    """Runs after every write has finished, before the checkpoint is committed."""
    del directory  # Nothing to finalize unless a handler says otherwise.

  def close(self) -> None:
    """Releases resources."""
    return None  # Nothing held unless a handler says otherwise.


class AsyncCheckpointHandler(CheckpointHandler):
  """A handler whose writes can run on a background thread."""

  @abc.abstractmethod
  def async_save(self, directory: pathlib.Path, args: Any) -> Writer:
    """Copies what must be copied from the caller, returns the rest of the save to run later."""

  def save(self, directory: pathlib.Path, args: Any) -> None:
    self.async_save(directory, args)()


def typestr(handler: CheckpointHandler) -> str:
  """The handler name recorded in ``_CHECKPOINT_METADATA``: Orbax's class path for our own
  handlers, ``module.Class`` for a user's (as Orbax records it)."""
  return handler.typestr or f'{type(handler).__module__}.{type(handler).__qualname__}'


class AbstractCheckpointer(abc.ABC):
  """What every checkpointer offers (Orbax's base class): ``isinstance(x, AbstractCheckpointer)``
  holds for ``Checkpointer``, ``AsyncCheckpointer`` and their subclasses."""

  @abc.abstractmethod
  def save(self, directory: Any, *args: Any, **kwargs: Any) -> None:
    """Saves an item to ``directory``, atomically."""

  @abc.abstractmethod
  def restore(self, directory: Any, *args: Any, **kwargs: Any) -> Any:
    """Restores the item saved in ``directory``."""

  def metadata(self, directory: Any) -> Any:
    """Describes what ``directory`` holds without reading array data."""
    del directory
    return None

  def close(self) -> None:
    """Waits for pending work and releases resources."""
    return None  # Nothing held unless a checkpointer says otherwise.


_SAVE_HANDLERS: dict[type, type[CheckpointHandler]] = {}
_RESTORE_HANDLERS: dict[type, type[CheckpointHandler]] = {}


def register_with_handler(handler_cls: type[CheckpointHandler], for_save: bool = False,
                          for_restore: bool = False) -> Callable[[type], type]:
  """Class decorator linking an args class to the handler that consumes it.

  Example:
    >>> @flaxckpt.args.register_with_handler(MyHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class MySave(flaxckpt.args.CheckpointArgs):
    ...   item: Any

  Raises:
    ValueError: neither ``for_save`` nor ``for_restore`` is set.
    TypeError: the decorated class is not a ``CheckpointArgs`` subclass.
  """
  if not for_save and not for_restore:
    raise ValueError('`for_save` and `for_restore` cannot both be False.')

  def decorator(args_cls: type) -> type:
    if not (isinstance(args_cls, type) and issubclass(args_cls, CheckpointArgs)):
      raise TypeError(f'{args_cls} must subclass `CheckpointArgs` in order to be registered.')
    if for_save:
      _SAVE_HANDLERS[args_cls] = handler_cls
    if for_restore:
      _RESTORE_HANDLERS[args_cls] = handler_cls
    return args_cls

  return decorator


def registered_handler(args: type | CheckpointArgs) -> type[CheckpointHandler] | None:
  """The handler class registered for an args class (or its bases), or None."""
  args_type = args if isinstance(args, type) else type(args)
  for cls in args_type.__mro__:
    if cls in _SAVE_HANDLERS:
      return _SAVE_HANDLERS[cls]
    if cls in _RESTORE_HANDLERS:
      return _RESTORE_HANDLERS[cls]
  return None


def handler_for(args: CheckpointArgs) -> type[CheckpointHandler]:
  """The handler class registered for an args object's type."""
  handler = registered_handler(args)
  if handler is None:
    raise TypeError(f'No handler is registered for args of type {type(args).__name__}; '
                    'register one with args.register_with_handler.')
  return handler


def args_type_for(handler: CheckpointHandler | type[CheckpointHandler],
                  for_save: bool) -> type | None:
  """The args class registered for a handler, used to adapt the older call forms."""
  registry = _SAVE_HANDLERS if for_save else _RESTORE_HANDLERS
  handler_type = handler if isinstance(handler, type) else type(handler)
  for cls in handler_type.__mro__:
    for args_cls, handler_cls in registry.items():
      if handler_cls is cls:
        return args_cls
  return None


def get_registered_handler_cls(args: type | CheckpointArgs) -> type[CheckpointHandler]:
  """The handler class registered for an args class (Orbax's name).

  Raises:
    ValueError: none is registered.
  """
  handler = registered_handler(args)
  if handler is None:
    raise ValueError(f'Unable to find registered `CheckpointHandler` for {args}. Use '
                     '`register_with_handler`.')
  return handler


def get_registered_args_cls(handler: CheckpointHandler | type[CheckpointHandler]
                            ) -> tuple[type, type]:
  """The ``(save, restore)`` args classes registered for a handler (Orbax's name).

  Raises:
    ValueError: either is missing.
  """
  save, restore = args_type_for(handler, True), args_type_for(handler, False)
  if save is None or restore is None:
    raise ValueError(f'Unable to find registered `CheckpointArgs` for '
                     f'{"save" if save is None else "restore"} for {handler}.')
  return save, restore


def has_registered_args(handler: CheckpointHandler | type[CheckpointHandler]) -> bool:
  """Whether a handler has both save and restore args classes registered."""
  return (args_type_for(handler, True) is not None
          and args_type_for(handler, False) is not None)
