"""Handler registries: which handler saves and restores an item, by item name and args type.

A ``CompositeCheckpointHandler`` (and so a ``CheckpointManager``) given a registry asks it first
for an item's handler, ``(item name, args type)`` then ``(None, args type)``, and only then the
global table that ``args.register_with_handler`` fills.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Protocol, runtime_checkable

from flaxckpt._handler import (CheckpointArgs, CheckpointHandler, args_type_for,
                               registered_handler)

__all__ = ['AlreadyExistsError', 'CheckpointHandlerRegistry', 'DefaultCheckpointHandlerRegistry',
           'NoEntryError', 'create_default_handler_registry']

ArgsType = type[CheckpointArgs] | CheckpointArgs
HandlerRegistryMapping = MutableMapping[tuple[str | None, type[CheckpointArgs]],
                                        CheckpointHandler]


class AlreadyExistsError(ValueError):
  """An entry for this item and args type is already in the registry."""


class NoEntryError(KeyError):
  """No entry for this item and args type is in the registry."""


@runtime_checkable
class CheckpointHandlerRegistry(Protocol):
  """What a handler registry offers (Orbax's protocol)."""

  def add(self, item: str | None, args: ArgsType,
          handler: CheckpointHandler | type[CheckpointHandler] | None = None) -> None:
    """Adds an entry."""

  def get(self, item: str | None, args: ArgsType) -> CheckpointHandler:
    """The handler of an entry."""

  def has(self, item: str | None, args: ArgsType) -> bool:
    """Whether an entry exists."""

  def get_all_entries(self) -> HandlerRegistryMapping:
    """Every entry, ``{(item, args type): handler}``."""


def _args_type(args: ArgsType) -> type[CheckpointArgs]:
  return args if isinstance(args, type) else type(args)


class DefaultCheckpointHandlerRegistry(CheckpointHandlerRegistry):
  """A registry held in a dict.

  Example:
    >>> registry = flaxckpt.handlers.DefaultCheckpointHandlerRegistry()
    >>> registry.add('state', flaxckpt.args.StandardSave)    # the globally registered handler
    >>> registry.add('state', flaxckpt.args.StandardRestore)
    >>> registry.add('dataset', DatasetSave, DatasetHandler())
    >>> registry.add(None, DatasetRestore, DatasetHandler)   # any item restored with these args
    >>> mngr = flaxckpt.CheckpointManager(path, handler_registry=registry)

  Args:
    other_registry: a registry whose entries this one starts with.
  """

  def __init__(self, other_registry: CheckpointHandlerRegistry | None = None):
    self._registry: dict[tuple[str | None, type[CheckpointArgs]], CheckpointHandler] = {}
    if other_registry is not None:
      for (item, args_type), handler in other_registry.get_all_entries().items():
        self.add(item, args_type, handler)

  def add(self, item: str | None, args: ArgsType,
          handler: CheckpointHandler | type[CheckpointHandler] | None = None) -> None:
    """Adds the handler of ``item`` (None: any item) for args of type ``args``.

    Args:
      item: the item name, or None for an entry that serves every item without its own.
      args: the args class (or an instance of it).
      handler: a handler, a handler class (instantiated with no arguments), or None for the
        class ``args.register_with_handler`` linked to ``args``.

    Raises:
      AlreadyExistsError: the entry exists.
      ValueError: no handler is given and none is registered for ``args``, or the handler
        class cannot be constructed without arguments.
    """
    args_type = _args_type(args)
    if self.has(item, args_type):
      raise AlreadyExistsError(f'Entry for item={item} and args_type={args_type} already '
                               'exists in the registry.')
    if handler is None:
      handler = registered_handler(args_type)
      if handler is None:
        raise ValueError(
            f'No handler given for item={item} and args_type={args_type}, and none is '
            'registered for that args type (args.register_with_handler); pass a handler.')
    if isinstance(handler, type):
      try:
        handler = handler()
      except TypeError as e:
        raise ValueError(f'The handler {handler!r} for item={item} and '
                         f'args_type={args_type} cannot be constructed without arguments; '
                         'pass an instance.') from e
    if not isinstance(handler, CheckpointHandler):
      raise TypeError(f'Expected a CheckpointHandler for item={item}, got '
                      f'{type(handler).__name__}.')
    self._registry[(item, args_type)] = handler

  def get(self, item: str | None, args: ArgsType) -> CheckpointHandler:
    """The handler of ``(item, type of args)``.

    Raises:
      NoEntryError: no such entry.
    """
    args_type = _args_type(args)
    if (item, args_type) in self._registry:
      return self._registry[(item, args_type)]
    raise NoEntryError(f'No entry for item={item} and args_ty={args_type} in the registry.')

  def has(self, item: str | None, args: ArgsType) -> bool:
    return (item, _args_type(args)) in self._registry

  def get_all_entries(self) -> HandlerRegistryMapping:
    return self._registry

  def __repr__(self) -> str:
    return f'DefaultCheckpointHandlerRegistry({self._registry})'


def create_default_handler_registry(
    **items_to_handlers: CheckpointHandler) -> DefaultCheckpointHandlerRegistry:
  """A registry with each item's handler under both its save and its restore args classes."""
  registry = DefaultCheckpointHandlerRegistry()
  for item, handler in items_to_handlers.items():
    for for_save in (True, False):
      args_type = args_type_for(handler, for_save)
      if args_type is not None:
        registry.add(item, args_type, handler)
  return registry


def lookup(registry: CheckpointHandlerRegistry, item: str,
           args: CheckpointArgs) -> CheckpointHandler | None:
  """The registry's handler for an item's args: its own entry, else the any-item one."""
  for name in (item, None):
    if registry.has(name, args):
      return registry.get(name, args)
  return None


def item_handlers(registry: CheckpointHandlerRegistry) -> dict[str, CheckpointHandler]:
  """The handlers the registry names items for (the first entry of each item)."""
  out: dict[str, CheckpointHandler] = {}
  for (item, _), handler in registry.get_all_entries().items():
    if item is not None and item not in out:
      out[item] = handler
  return out
