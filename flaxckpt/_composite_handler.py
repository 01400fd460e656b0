"""Several named items in one checkpoint, each in its own sub-directory."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

from flaxckpt import _errors, _formats, _metadata, _registry, _safe_json, _storage
from flaxckpt._args import Composite, JsonRestore, PyTreeRestore, StandardRestore
from flaxckpt._array_handler import ArrayCheckpointHandler
from flaxckpt._base_pytree_handler import BasePyTreeCheckpointHandler
from flaxckpt._handler import (AsyncCheckpointHandler, CheckpointHandler, Writer, args_type_for,
                               handler_for, register_with_handler, typestr)
from flaxckpt._json_handler import JsonCheckpointHandler
from flaxckpt._pytree_handler import PyTreeCheckpointHandler, StandardCheckpointHandler
from flaxckpt._registry import CheckpointHandlerRegistry, DefaultCheckpointHandlerRegistry
from flaxckpt._steps import LOCK_DIR, SNAPSHOTS_DIR

_HANDLERS_BY_TYPESTR = {cls.typestr: cls for cls in (
    PyTreeCheckpointHandler, StandardCheckpointHandler, JsonCheckpointHandler,
    ArrayCheckpointHandler, BasePyTreeCheckpointHandler)}
_NOT_ITEMS = (LOCK_DIR, SNAPSHOTS_DIR)
_DEFAULT_RESTORE_ARGS: dict[type, Any] = {PyTreeCheckpointHandler: PyTreeRestore,
                         StandardCheckpointHandler: StandardRestore,
                         JsonCheckpointHandler: JsonRestore}


class CompositeCheckpointHandler(AsyncCheckpointHandler):
  """Delegates each named item to its own handler.

  Handlers are given up front (``CompositeCheckpointHandler(state=handler)``), found in a
  ``handler_registry`` (by item name and args type, then by args type for any item), or inferred
  from the args type (``args.register_with_handler``) the first time an item is saved or
  restored; names alone (``CompositeCheckpointHandler('state', 'metadata')``) are enough.

  Raises:
    ValueError: a ``handler_registry`` is given together with item names or handlers.
  """

  def __init__(self, *item_names: str, handler_registry: CheckpointHandlerRegistry | None = None,
               composite_options: Any = None, **item_handlers: CheckpointHandler):
    del composite_options  # Orbax's; the checkpointer holds the options here.
    if handler_registry is not None and (item_names or item_handlers):
      raise ValueError('Both `handler_registry` and item names or handlers were provided. '
                       'Please specify only one of the two.')
    # A copy: registering more items later never changes the caller's registry.
    self._registry = (None if handler_registry is None
                      else DefaultCheckpointHandlerRegistry(handler_registry))
    self._handlers: dict[str, CheckpointHandler | None] = {n: None for n in item_names}
    self._handlers.update(item_handlers)
    if self._registry is not None:
      self._handlers.update(_registry.item_handlers(self._registry))
    for name in self._handlers:
      _storage.check_entry_name(name, 'Item name')
    # Without names (or with a registry), any item may be added.
    self._names_fixed = bool(self._handlers) and self._registry is None

  @property
  def handler_registry(self) -> CheckpointHandlerRegistry | None:
    return self._registry

  def accept_any_items(self) -> None:
    """Lets items other than those given be saved and restored (their handlers inferred)."""
    self._names_fixed = False

  @property
  def item_handlers(self) -> dict[str, CheckpointHandler | None]:
    return dict(self._handlers)

  def typestrs(self) -> dict[str, str]:
    return {n: typestr(h) for n, h in self._handlers.items() if h is not None}

  def _handler(self, name: str, args: Any) -> CheckpointHandler:
    if self._registry is not None:
      found = _registry.lookup(self._registry, name, args)
      if found is not None:
        self._handlers[name] = found
        return found
    if self._names_fixed and name not in self._handlers:
      raise KeyError(f'Item {name!r} is not one of this handler\'s items '
                     f'{sorted(self._handlers)}.')
    handler = self._handlers.get(name)
    if handler is None:
      handler = handler_for(args)()
      self._handlers[name] = handler
    elif not isinstance(handler, handler_for(args)):
      expected = args_type_for(handler, for_save=True)
      raise TypeError(
          f'Item {name!r} is handled by {type(handler).__name__}, which does not take '
          f'{type(args).__name__}; pass {expected.__name__ if expected else "its own args"} '
          '(or the matching restore args) for it.')
    return handler

  def async_save(self, directory: pathlib.Path, args: Composite) -> Writer:
    directory = _storage.as_path(directory)
    writers: list[tuple[Any, CheckpointHandler, Writer]] = []
    for name, item_args in args.items():
      if item_args is None:
        continue
      handler = self._handler(name, item_args)
      item_dir = directory / name
      _storage.make_dirs(item_dir)
      if isinstance(handler, AsyncCheckpointHandler):
        writers.append((item_dir, handler, handler.async_save(item_dir, args=item_args)))
      else:
        writers.append((item_dir, handler, functools.partial(handler.save, item_dir,
                                                             args=item_args)))

    def write() -> None:
      for _, _, writer in writers:
        writer()

    return write

  def finalize(self, directory: pathlib.Path) -> None:
    """Finalizes and marks each saved item (on the primary, once every process has written)."""
    directory = _storage.as_path(directory)
    for name in _storage.list_names(directory):
      handler = self._handlers.get(name)
      item_dir = directory / name
      if handler is None or not _storage.is_dir(item_dir):
        continue
      handler.finalize(item_dir)
      _storage.write_text(item_dir / _metadata.COMMIT_SUCCESS_FILE,
                          _metadata.commit_message(item_dir))

  def restore(self, directory: pathlib.Path, args: Composite | None = None) -> Composite:
    directory = _storage.as_path(directory)
    if not _storage.is_dir(directory):
      raise FileNotFoundError(f'No checkpoint at {directory}: the path does not exist.')
    if args is None or not len(args):
      args = Composite({n: None for n in item_names(directory)})
    saved_handlers = _saved_item_handlers(directory)
    results = {}
    for name, item_args in args.items():
      item_dir = _storage.check_inside(directory / name, directory)
      if not _storage.is_dir(item_dir):
        raise _errors.MissingKeysError(
            f'{directory}: no item {name!r} in this checkpoint; it holds '
            f'{item_names(directory)}.')
      handler = self._handlers.get(name)
      if item_args is None:
        if handler is None:
          handler = _infer_handler(item_dir, saved_handlers.get(name))
          self._handlers[name] = handler
        item_args = _DEFAULT_RESTORE_ARGS.get(type(handler), lambda: None)()
      else:
        handler = self._handler(name, item_args)
      results[name] = handler.restore(item_dir, args=item_args)
    return Composite(results)

  def metadata(self, directory: pathlib.Path) -> Composite:
    directory = _storage.as_path(directory)
    saved = _saved_item_handlers(directory)
    out = {}
    for name in item_names(directory):
      handler = self._handlers.get(name) or _infer_handler(directory / name, saved.get(name))
      out[name] = handler.metadata(directory / name)
    return Composite(out)

  def close(self) -> None:
    for handler in self._handlers.values():
      if handler is not None:
        handler.close()


def item_names(directory: pathlib.Path) -> list[str]:
  """The items of a composite checkpoint: its sub-directories, except reader locks."""
  return [n for n in _storage.list_names(directory)
          if _storage.is_dir(directory / n) and not n.startswith('.') and n not in _NOT_ITEMS]


def _saved_item_handlers(directory: pathlib.Path) -> dict[str, str]:
  path = directory / _metadata.CHECKPOINT_METADATA_FILE
  if not _storage.is_file(path):
    return {}
  try:
    handlers = _safe_json.read(path).get('item_handlers')
  except ValueError:
    return {}
  return handlers if isinstance(handlers, dict) else {}


def _infer_handler(item_dir: pathlib.Path, typestr: str | None) -> CheckpointHandler:
  """Picks a handler from the recorded class name, else from the files present.

  Orbax before 0.5 recorded no handler and wrote no ``_METADATA``: its PyTree items hold the
  aggregate ``checkpoint`` msgpack file (beside per-leaf zarr directories or OCDBT files), its
  JSON items one JSON file (``metadata`` by default).
  """
  names = [n for n in _storage.list_names(item_dir) if n != _metadata.COMMIT_SUCCESS_FILE]
  lone_file = len(names) == 1 and _storage.is_file(item_dir / names[0])
  if typestr:
    for known, cls in _HANDLERS_BY_TYPESTR.items():
      if typestr == known or typestr.rsplit('.', 1)[-1] == known.rsplit('.', 1)[-1]:
        if cls is JsonCheckpointHandler and lone_file:  # 'metrics/metrics', not 'metadata'.
          return JsonCheckpointHandler(names[0])
        return cls()
  if _storage.is_file(item_dir / _metadata.METADATA_FILE):
    return PyTreeCheckpointHandler()
  if lone_file and not (names[0] == _metadata.LEGACY_AGGREGATE_FILE
                        and not _starts_like_json(item_dir / names[0])):
    return JsonCheckpointHandler(names[0])
  if _formats.is_pytree_dir(item_dir):
    return PyTreeCheckpointHandler()
  raise _errors.NotACheckpointError(
      f'{item_dir}: cannot tell which handler wrote this item (no recorded handler, no '
      f'_METADATA, files {names[:10]}); pass explicit restore args for it.')


def _starts_like_json(path: pathlib.Path) -> bool:
  """Whether a file opens like a JSON document (a msgpack map opens with a byte >= 0x80)."""
  head = _storage.read_head(path, 64).lstrip()
  return bool(head) and head[:1] in b'{["-0123456789tfn'


register_with_handler(CompositeCheckpointHandler, for_save=True, for_restore=True)(Composite)
