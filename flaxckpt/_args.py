"""Save and restore argument objects, one pair per handler (``flaxckpt.args``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from flaxckpt import _storage
from flaxckpt._handler import CheckpointArgs


@dataclasses.dataclass(frozen=True)
class PyTreeSave(CheckpointArgs):
  """Save a pytree with ``PyTreeCheckpointHandler``.

  Attributes:
    item: the tree (jax/numpy arrays, Python scalars, strings, None and empty containers).
    save_args: a tree of ``SaveArgs`` matching ``item`` (missing leaves use defaults).
    custom_metadata: any JSON value, stored in ``_METADATA``.
  """
  item: Any
  save_args: Any = None
  ocdbt_target_data_file_size: int | None = None
  custom_metadata: Any = None


@dataclasses.dataclass(frozen=True)
class PyTreeRestore(CheckpointArgs):
  """Restore a pytree with ``PyTreeCheckpointHandler``.

  Attributes:
    item: target tree giving the result's structure (concrete or abstract leaves), or None
      for the tree as stored.
    restore_args: a tree of ``RestoreArgs`` relative to the result tree.
    transforms: maps result keys (regexes over '/'-joined paths) to ``Transform``s; any dict,
      even ``{}``, lets target entries missing from the checkpoint keep their target value.
    transforms_default_to_original: with ``transforms``, a result key no transform matches
      comes from the checkpoint's same key (True) or keeps its target value (False).
    verify_checksums: check every whole chunk read against the crc32c recorded at save
      (``ChecksumError`` on a mismatch); checkpoints without checksums restore unchecked.
    legacy_transform_fn: Orbax's older transform hook, ``fn(item, structure, param_infos)``
      returning the result tree and its param infos; not combinable with ``transforms``.
    partial_restore: restore only the keys ``item`` holds; target keys the checkpoint lacks
      keep their target value.
  """
  item: Any = None
  restore_args: Any = None
  transforms: Mapping[str, Any] | None = None
  transforms_default_to_original: bool = True
  legacy_transform_fn: Any = None
  partial_restore: bool = False
  strict: bool = True
  verify_checksums: bool = True


@dataclasses.dataclass(frozen=True)
class StandardSave(CheckpointArgs):
  """Save a pytree with ``StandardCheckpointHandler``."""
  item: Any
  save_args: Any = None
  custom_metadata: Any = None


@dataclasses.dataclass(frozen=True)
class StandardRestore(CheckpointArgs):
  """Restore a pytree with ``StandardCheckpointHandler``.

  Attributes:
    item: concrete or abstract (``jax.ShapeDtypeStruct``) target; None restores as stored.
    strict: with False, arrays whose target shape differs are padded or truncated.
    verify_checksums: as for ``PyTreeRestore``.
  """
  item: Any = None
  strict: bool = True
  verify_checksums: bool = True


@dataclasses.dataclass(frozen=True)
class JsonSave(CheckpointArgs):
  """Save a JSON-serializable object with ``JsonCheckpointHandler``."""
  item: Any


@dataclasses.dataclass(frozen=True)
class JsonRestore(CheckpointArgs):
  """Restore a JSON object with ``JsonCheckpointHandler``."""
  item: Any = None


class Composite(CheckpointArgs, Mapping):
  """Named per-item args (and restore results); both ``c.state`` and ``c['state']`` work."""

  def __init__(self, *args: Any, **items: Any):
    self._items = dict(*args, **items)
    for name in self._items:
      _storage.check_entry_name(name, 'Composite item name')
      if name.startswith('_'):
        raise ValueError(f'Composite item names cannot start with "_": {name!r}')

  def __getattr__(self, name: str) -> Any:
    items = self.__dict__.get('_items', {})
    if name in items:
      return items[name]
    raise AttributeError(f'Composite has no item {name!r}; it has {sorted(items)}.')

  def __getitem__(self, name: str) -> Any:
    return self._items[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Composite) and self._items == other._items

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    return f'CompositeArgs({dict(sorted(self._items.items()))!r})'
