"""Tree-level metadata: ``_METADATA``'s per-leaf entries and the tree ``metadata()`` returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax


@dataclasses.dataclass
class ValueMetadataEntry:
  """One leaf's entry in ``_METADATA``.

  Attributes:
    value_type: how the leaf was saved ('jax.Array', 'np.ndarray', 'scalar', 'string', or an
      empty-node type such as 'Dict' or 'None').
    skip_deserialize: the value is not in array storage (an empty node, or a value stored in the
      old ``checkpoint`` msgpack file).
    write_shape: the shape of the shards written, for sharded arrays.
  """
  value_type: str
  skip_deserialize: bool = False
  write_shape: tuple[int, ...] | None = None

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {'value_type': self.value_type,
                           'skip_deserialize': self.skip_deserialize}
    if self.write_shape is not None:
      out['write_shape'] = list(self.write_shape)
    return out

  @classmethod
  def from_json(cls, json_dict: dict[str, Any], *unused: Any) -> ValueMetadataEntry:
    shape = json_dict.get('write_shape')
    return cls(value_type=json_dict['value_type'],
               skip_deserialize=bool(json_dict.get('skip_deserialize', False)),
               write_shape=tuple(shape) if shape is not None else None)


@jax.tree_util.register_pytree_with_keys_class
class TreeMetadata:
  """The metadata of a PyTree checkpoint: a pytree shaped like the saved tree (dicts, lists and
  tuples, as saved), whose leaves are ``ArrayMetadata``/``ScalarMetadata``/``StringMetadata``
  (or None and empty containers), plus ``custom_metadata``.

  Use it as the tree it wraps: ``meta['params']``, ``jax.tree.map(f, meta)`` (the result is a
  ``TreeMetadata`` again), or ``meta.tree`` for the plain tree, e.g. to map it together with a
  tree of your own.
  """

  def __init__(self, *, tree: Any, custom_metadata: Any = None, use_zarr3: bool = False):
    self._tree = tree
    self._custom_metadata = custom_metadata
    self._use_zarr3 = use_zarr3

  @classmethod
  def build(cls, tree: Any, *, custom_metadata: Any = None,
            use_zarr3: bool = False) -> TreeMetadata:
    return cls(tree=tree, custom_metadata=custom_metadata, use_zarr3=use_zarr3)

  @property
  def tree(self) -> Any:
    return self._tree

  @property
  def custom_metadata(self) -> Any:
    return self._custom_metadata

  @property
  def use_zarr3(self) -> bool:
    return self._use_zarr3

  def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], dict[str, Any]]:
    tree = self._tree
    if isinstance(tree, dict):
      keys: list[Any] = [jax.tree_util.DictKey(k) for k in tree]
      values = list(tree.values())
    elif isinstance(tree, tuple) and hasattr(tree, '_fields'):
      keys = [jax.tree_util.DictKey(k) for k in tree._fields]
      values = list(tree)
    elif isinstance(tree, (list, tuple)):
      keys = [jax.tree_util.SequenceKey(i) for i in range(len(tree))]
      values = list(tree)
    else:  # A checkpoint of one bare value.
      keys, values = [jax.tree_util.GetAttrKey('tree')], [tree]
    aux = {'tree_type': type(tree), 'keys': keys, 'custom_metadata': self._custom_metadata,
           'use_zarr3': self._use_zarr3}
    return list(zip(keys, values)), aux

  def tree_flatten(self) -> tuple[list[Any], dict[str, Any]]:
    pairs, aux = self.tree_flatten_with_keys()
    return [value for _, value in pairs], aux

  @classmethod
  def tree_unflatten(cls, aux: dict[str, Any], children: Any) -> TreeMetadata:
    tree_type, keys, children = aux['tree_type'], aux['keys'], list(children)
    tree: Any
    if issubclass(tree_type, dict):
      tree = tree_type(zip((k.key for k in keys), children))
    elif issubclass(tree_type, tuple) and hasattr(tree_type, '_fields'):
      tree = tree_type(*children)
    elif issubclass(tree_type, (list, tuple)):
      tree = tree_type(children)
    else:
      tree = children[0]
    return cls(tree=tree, custom_metadata=aux['custom_metadata'], use_zarr3=aux['use_zarr3'])

  def __getitem__(self, key: Any) -> Any:
    return self._tree[key]

  def __contains__(self, key: Any) -> bool:
    return key in self._tree

  def __len__(self) -> int:
    return len(self._tree)

  def __iter__(self) -> Iterator[Any]:
    return iter(self._tree)

  def get(self, key: Any, default: Any = None) -> Any:
    try:
      return self._tree[key]
    except (KeyError, IndexError):
      return default

  def keys(self) -> Any:
    return self._tree.keys()

  def values(self) -> Any:
    return self._tree.values()

  def items(self) -> Any:
    return self._tree.items()

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, TreeMetadata) and self._tree == other._tree
            and self._custom_metadata == other._custom_metadata)

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    return (f'TreeMetadata(tree={self._tree!r}, custom_metadata={self._custom_metadata!r}, '
            f'use_zarr3={self._use_zarr3})')


def build_default_tree_metadata(tree: Any, *, custom_metadata: Any = None,
                                use_zarr3: bool = False) -> TreeMetadata:
  """A ``TreeMetadata`` wrapping ``tree``."""
  return TreeMetadata.build(tree, custom_metadata=custom_metadata, use_zarr3=use_zarr3)
