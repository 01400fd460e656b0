"""Tree paths: flattening a pytree into named leaves and building trees back.

A leaf's *path* is a tuple of strings, one per level, each with a *key type*: 1 for a sequence
index, 2 for a dict key or attribute (the codes Orbax writes into ``_METADATA``). The *name* of a
leaf is the path joined with '.', as on disk. Matching is always done on paths, never on names,
because names are not escaped (``{'a.b': x}`` and ``{'a': {'b': x}}`` share a name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

SEQUENCE_KEY = 1
DICT_KEY = 2

Path = tuple[str, ...]


class Leaf(NamedTuple):
  """One leaf of a flattened tree (a NamedTuple: trees can have many thousands of leaves)."""
  path: Path
  key_types: tuple[int, ...]
  value: Any

  @property
  def name(self) -> str:
    return '.'.join(self.path)


def is_empty_node(x: Any) -> bool:
  """None and empty containers have no leaves in jax but are recorded in checkpoints."""
  if x is None:
    return True
  if isinstance(x, (dict, list, tuple)) and not x:
    return True
  return isinstance(x, Mapping) and not isinstance(x, dict) and len(x) == 0


_KEY_ENTRY = {
    jax.tree_util.SequenceKey: lambda k: (str(k.idx), SEQUENCE_KEY),
    jax.tree_util.DictKey: lambda k: (str(k.key), DICT_KEY),
    jax.tree_util.GetAttrKey: lambda k: (k.name, DICT_KEY),
    jax.tree_util.FlattenedIndexKey: lambda k: (str(k.key), SEQUENCE_KEY),
}


def leaves_from_pairs(pairs: list[tuple[tuple[Any, ...], Any]]) -> list[Leaf]:
  leaves = []
  for keys, value in pairs:
    names, kinds = [], []
    for key in keys:
      convert = _KEY_ENTRY.get(type(key))
      name, kind = convert(key) if convert is not None else (str(key), DICT_KEY)
      names.append(name)
      kinds.append(kind)
    leaves.append(Leaf(tuple(names), tuple(kinds), value))
  return leaves


# Paths of recently flattened tree structures: a training run saves the same structure again
# and again, and computing key paths costs several times more than flattening itself. Keyed by
# the plain treedef (where None and empty containers are childless nodes), which fixes the paths.
# The value is None for structures with such nodes: their flattening needs the ``is_leaf``
# callback on every node, so only trees without them take the fast path.
_PATHS_BY_TREEDEF: dict[Any, list[tuple[Path, tuple[int, ...]]] | None] = {}
_PATHS_CACHE_SIZE = 16


def flatten(tree: Any) -> tuple[list[Leaf], Any]:
  """Flattens ``tree`` keeping None and empty containers as leaves.

  Returns the leaves in jax flatten order and the treedef to rebuild the tree with.
  """
  values, treedef = jax.tree_util.tree_flatten(tree)
  paths = _PATHS_BY_TREEDEF.get(treedef)
  if paths is not None:
    return [Leaf(path, kinds, value) for (path, kinds), value in zip(paths, values)], treedef
  pairs, full_treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_empty_node)
  leaves = leaves_from_pairs(pairs)
  if treedef not in _PATHS_BY_TREEDEF:
    if len(_PATHS_BY_TREEDEF) >= _PATHS_CACHE_SIZE:
      _PATHS_BY_TREEDEF.pop(next(iter(_PATHS_BY_TREEDEF)))
    # jaxlib ships no stub for PyTreeDef, so mypy does not know its attributes.
    has_empty_nodes = full_treedef.num_leaves != treedef.num_leaves  # type: ignore[attr-defined]
    _PATHS_BY_TREEDEF[treedef] = None if has_empty_nodes else [
        (leaf.path, leaf.key_types) for leaf in leaves]
  return leaves, full_treedef


def path_str(path: Path) -> str:
  """The human-readable form used in error messages and transform keys: ``a/b/0``."""
  return '/'.join(path) if path else '<root>'


def build(entries: list[tuple[Path, tuple[int, ...], Any]]) -> Any:
  """Builds nested dicts and lists from (path, key_types, value) entries.

  Key type 1 levels become lists (indices sorted numerically), key type 2 levels dicts.
  An entry with an empty path is the whole tree.
  """
  if len(entries) == 1 and not entries[0][0]:
    return entries[0][2]
  root: dict[str, Any] = {}
  kinds: dict[Path, int] = {}
  for path, key_types, value in entries:
    node = root
    for depth, key in enumerate(path[:-1]):
      kinds.setdefault(path[:depth + 1], key_types[depth + 1])
      node = node.setdefault(key, {})
    node[path[-1]] = value
    if path:
      kinds.setdefault((), key_types[0])
  return _lists_from_dicts(root, (), kinds)


def _lists_from_dicts(node: dict[str, Any], prefix: Path, kinds: dict[Path, int]) -> Any:
  children = {}
  for key, value in sorted(node.items()):  # Sorted like jax (and Orbax) order dict keys.
    child = prefix + (key,)
    children[key] = _lists_from_dicts(value, child, kinds) if child in kinds else value
  if kinds.get(prefix) == SEQUENCE_KEY:
    return [children[k] for k in sorted(children, key=int)]
  return children
