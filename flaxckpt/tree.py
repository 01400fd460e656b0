"""PyTree helpers of ``orbax.checkpoint.tree``: flat dicts keyed by paths, parameter names, and
the nested dict/list form a tree takes in a checkpoint's JSON (``serialize_tree``).

Keys are named as Orbax names them: a dict key by ``str(key)``, an attribute (flax struct,
dataclass) by its name, a sequence index by its int; ``to_flat_dict`` turns every name into a
string. Empty containers and None are dropped unless ``keep_empty_nodes=True``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import jax
import numpy as np
from jax import tree_util as jtu


__all__ = [
    'JsonType', 'PyTree', 'PyTreeKey', 'PyTreeOf', 'PyTreePath', 'deserialize_tree',
    'from_flat_dict', 'from_flattened_with_keypath', 'get_key_name', 'get_param_names',
    'is_dict_key', 'is_empty_node', 'is_empty_or_leaf', 'is_flat_dict', 'is_sequence_key',
    'serialize_tree', 'str_keypath', 'to_flat_dict', 'to_shape_dtype_struct',
    'tuple_path_from_keypath',
]

T = TypeVar('T')
PyTree = Any
PyTreeOf = Any  # A PyTree whose leaves are of a given type (documentation only).
PyTreeKey: TypeAlias = jtu.SequenceKey | jtu.DictKey | jtu.GetAttrKey | jtu.FlattenedIndexKey
PyTreePath = tuple[PyTreeKey, ...]
JsonType = Any  # A value json.dumps accepts.


def _one_level(x: Any) -> list[tuple[Any, Any]] | None:
  """(key, child) pairs of the node ``x``, or None when ``x`` is a leaf."""
  pairs, _ = jtu.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if len(pairs) == 1 and not pairs[0][0]:
    return None  # x itself came back, at the empty path: a leaf.
  return [(path[0], child) for path, child in pairs]


def is_empty_node(x: Any) -> bool:
  """Whether ``x`` is a container without children (``{}``, ``[]``, ``()``, None, ...)."""
  children = _one_level(x)
  return children is not None and not children


def is_empty_or_leaf(x: Any) -> bool:
  """Whether ``x`` is a leaf or an empty container: the leaves when empty nodes are kept."""
  children = _one_level(x)
  return children is None or not children


def get_key_name(key: Any) -> int | str:
  """The name of one key of a key path: a dict key as ``str``, an attribute's name, an index."""
  if isinstance(key, jtu.SequenceKey):
    return key.idx
  if isinstance(key, jtu.DictKey):
    return str(key.key)
  if isinstance(key, jtu.GetAttrKey):
    return key.name
  if isinstance(key, jtu.FlattenedIndexKey):
    return key.key
  raise ValueError(f'Unsupported KeyEntry: {type(key)}: "{key}"')


def tuple_path_from_keypath(keypath: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as a tuple of strings: ``(DictKey('a'), SequenceKey(0))`` -> ``('a', '0')``."""
  return tuple(str(get_key_name(k)) for k in keypath)


str_keypath = tuple_path_from_keypath


def is_dict_key(key: Any) -> bool:
  return isinstance(key, (jtu.DictKey, jtu.GetAttrKey))


def is_sequence_key(key: Any) -> bool:
  return isinstance(key, (jtu.FlattenedIndexKey, jtu.SequenceKey))


def _empty_like(key: Any) -> dict[Any, Any] | list[Any]:
  if is_dict_key(key):
    return {}
  if is_sequence_key(key):
    return []
  raise ValueError(f'Unsupported KeyEntry: {key}.')


def _set_child(node: Any, key: Any, value: Any) -> Any:
  """Puts ``value`` under ``key`` in ``node`` (a list grows by one) unless it is there already,
  and returns what is there."""
  name = get_key_name(key)
  if isinstance(node, dict):
    return node.setdefault(name, value)
  if not isinstance(node, list) or not isinstance(name, int) or name > len(node):
    raise ValueError(f'Key {key} does not fit {type(node).__name__} node {node!r}: the key '
                     'paths must come in the order jax flattens the tree.')
  if name == len(node):
    node.append(value)
  return node[name]


def from_flattened_with_keypath(flat_with_keys: list[tuple[tuple[Any, ...], Any]]) -> PyTree:
  """The nested dicts (dict and attribute keys) and lists (sequence keys) that hold each value
  at its key path: tuples and named tuples come back as lists and dicts.

  Raises:
    ValueError: the list is empty (the tree could be ``{}`` or ``[]``).
  """
  if not flat_with_keys:
    raise ValueError('Unable to uniquely reconstruct tree from empty flattened list '
                     '(it could be {} or []).')
  first_path = flat_with_keys[0][0]
  if not first_path:
    return flat_with_keys[0][1]  # The tree is a single leaf.
  result = _empty_like(first_path[0])
  for keypath, value in flat_with_keys:
    node = result
    for key, next_key in zip(keypath[:-1], keypath[1:]):
      node = _set_child(node, key, _empty_like(next_key))
    _set_child(node, keypath[-1], value)
  return result


def serialize_tree(tree: PyTree, keep_empty_nodes: bool = False) -> PyTree:
  """``tree`` as nested dicts and lists (its custom nodes as dicts of their attributes), the
  form a checkpoint's JSON holds it in.

  Raises:
    ValueError: nothing is left of ``tree`` (it is empty and ``keep_empty_nodes`` is False).
  """
  flat, _ = jtu.tree_flatten_with_path(tree,
                                       is_leaf=is_empty_or_leaf if keep_empty_nodes else None)
  return from_flattened_with_keypath(flat)


def _look_up(node: Any, key: Any) -> Any:
  if type(node) in (dict, list, tuple):
    name = get_key_name(key)
    if isinstance(node, dict) and name not in node:
      name = str(name)
    return node[name]
  if isinstance(key, (jtu.SequenceKey, jtu.DictKey)):
    return node[key.idx if isinstance(key, jtu.SequenceKey) else key.key]
  if isinstance(key, jtu.GetAttrKey):
    return getattr(node, key.name)
  if isinstance(key, jtu.FlattenedIndexKey):
    children = _one_level(node) or []
    return children[key.key][1]
  raise KeyError(f'Key {key!r} not found in {node!r}')


def deserialize_tree(serialized: PyTree, target: PyTree, keep_empty_nodes: bool = False
                     ) -> PyTree:
  """The inverse of ``serialize_tree``: the values of ``serialized`` put back into the
  structure of ``target`` (its tuples, named tuples, dataclasses, flax structs)."""
  def value_at(keypath: tuple[Any, ...], _: Any) -> Any:
    node = serialized
    for key in keypath:
      node = _look_up(node, key)
    return node

  return jtu.tree_map_with_path(value_at, target,
                                is_leaf=is_empty_or_leaf if keep_empty_nodes else None)


def is_flat_dict(tree: PyTree) -> bool:
  """Whether ``tree`` is a dict whose values are all leaves."""
  return isinstance(tree, dict) and all(jtu.all_leaves([v]) for v in tree.values())


def to_flat_dict(tree: PyTree, sep: str | None = None, keep_empty_nodes: bool = False,
                 is_leaf: Callable[[Any], bool] | None = None) -> dict[Any, Any]:
  """``{path: leaf}`` of ``tree``, each path a tuple of key names as strings (or the names
  joined by ``sep``). ``is_leaf`` overrides ``keep_empty_nodes``.

  Example::

    ocp.tree.to_flat_dict({'a': 1, 'b': {'c': 2, 'd': {}}})  # {('a',): 1, ('b', 'c'): 2}
    ocp.tree.to_flat_dict({'b': {'c': 2}}, sep='/')          # {'b/c': 2}
  """
  is_leaf = is_leaf or (is_empty_or_leaf if keep_empty_nodes else None)
  flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
  if sep is None:
    return {tuple_path_from_keypath(path): value for path, value in flat}
  return {sep.join(tuple_path_from_keypath(path)): value for path, value in flat}


def from_flat_dict(flat_dict: dict[Any, Any], target: PyTree | None = None,
                   sep: str | None = None, *, inplace: bool = False) -> PyTree:
  """The tree ``to_flat_dict`` flattened: ``target``'s structure filled with the values of
  ``flat_dict``, or without ``target`` nested dicts built from the keys (split at ``sep``).
  ``inplace`` empties ``flat_dict`` as its values are taken.

  Raises:
    KeyError: ``flat_dict`` lacks a path of ``target``.
    ValueError: two keys collide (one path is a prefix of another).
  """
  if inplace and not isinstance(flat_dict, dict):
    raise ValueError('Inplace operations require flat_dict to be a dict.')
  take = flat_dict.pop if inplace else flat_dict.__getitem__
  if target is not None:
    paths = to_flat_dict(target, sep=sep).keys()
    return jax.tree.unflatten(jax.tree.structure(target), [take(p) for p in paths])
  if sep is None and () in flat_dict:
    if len(flat_dict) != 1:
      raise ValueError(f'Empty keypath () must be the only key; got {list(flat_dict)}.')
    return take(())
  result: dict[Any, Any] = {}
  for key in list(flat_dict):
    names = tuple(key.split(sep)) if sep is not None else tuple(key)
    node = result
    for name in names[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f'Key {key!r} goes through {name!r}, which holds a leaf.')
    if names[-1] in node:
      raise ValueError(f'Key {key!r} collides with another key of the flat dict.')
    node[names[-1]] = take(key)
  return result


def get_param_names(item: PyTree, *, include_empty_nodes: bool = True) -> PyTree:
  """``item`` with each leaf replaced by its parameter name, the key names joined by ``.``
  (the names of the leaves' files in a checkpoint): ``{'a': {'b': x}}`` -> ``{'a': {'b':
  'a.b'}}``."""
  return jtu.tree_map_with_path(lambda path, _: '.'.join(tuple_path_from_keypath(path)), item,
                                is_leaf=is_empty_or_leaf if include_empty_nodes else None)


def to_shape_dtype_struct(x: Any, dtype: Any = None, scalar_dtype: Any = None) -> Any:
  """An abstract stand-in for ``x``: ``jax.ShapeDtypeStruct`` with its shape, dtype, sharding.

  Use it to build restore targets without allocating arrays:
  ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``. Python scalars are returned
  unchanged unless ``scalar_dtype`` is given.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    return x if dtype is None else jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
  if isinstance(x, (int, float, complex, bool)) and scalar_dtype is not None:
    return jax.ShapeDtypeStruct((), scalar_dtype)
  return x


def __getattr__(name: str) -> Any:
  """``merge_trees`` lives with the other tree transforms (imported on first use)."""
  if name == 'merge_trees':
    return importlib.import_module('flaxckpt.transform_utils').merge_trees
  raise AttributeError(f'module "flaxckpt.tree" has no attribute {name!r}')
