"""A checkpoint read one leaf at a time, whatever its format (for ``convert`` and ``diff``).

Leaves are addressed by key path, a tuple of strings: lists count as dicts keyed ``'0'``,
``'1'``, ..., as in flax state dicts, so an Orbax tree and the msgpack file of the same state
have the same paths. msgpack files are memory-mapped: a leaf is paged in when it is used (an
object on ``gs://``/``s3://`` is read whole).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from flaxckpt import _arrays, _errors, _formats, _metadata, _restore, _storage

KeyPath = tuple[str, ...]


class LeafSource:
  """The leaves of one checkpoint: ``paths`` in order, ``read(path)`` for a value (a numpy
  array, Python or numpy scalar, str, or None / empty dict for empty nodes)."""

  def __init__(self, path: _storage.PathLike):
    found = _single_tree(_formats.detect(path))
    self.path = found.path
    self.format = 'flax-msgpack' if found.kind is _formats.Kind.MSGPACK else 'orbax-pytree'
    if found.kind is _formats.Kind.MSGPACK:
      self._values = _msgpack_leaves(found.path)
      self.paths = list(self._values)
    else:
      self._reader = _restore.open_reader(found.path)
      self._leaves = {tuple(str(key) for key in leaf.path): leaf
                      for leaf in self._reader.meta.leaves}
      self.paths = list(self._leaves)

  def read(self, path: KeyPath) -> Any:
    if self.format == 'flax-msgpack':
      return self._values[path]
    leaf = self._leaves[path]
    value = self._reader.read_many([leaf])[leaf.path]
    if leaf.value_type == _metadata.SCALAR and isinstance(value, np.ndarray):
      return value.item()  # Saved from a Python scalar, read back as one (as restore does).
    if value is None or isinstance(value, (list, tuple)) and not value:
      return None if value is None else {}
    return value

  def nbytes(self) -> dict[KeyPath, int]:
    """The bytes of each leaf's array data (0 for other leaves), from the arrays' metadata
    only; for progress, which needs the total before anything is read."""
    if self.format == 'flax-msgpack':
      return {path: value.nbytes if isinstance(value, (np.ndarray, np.generic)) else 0
              for path, value in self._values.items()}
    meta = self._reader.meta
    stored = [(path, leaf) for path, leaf in self._leaves.items()
              if _restore._is_stored_array(leaf)]
    infos = _arrays.read_array_infos(self.path, [leaf.name for _, leaf in stored],
                                     use_ocdbt=meta.use_ocdbt, use_zarr3=meta.use_zarr3)
    sizes = dict.fromkeys(self.paths, 0)
    for (path, _), info in zip(stored, infos):
      sizes[path] = math.prod(info.shape) * info.dtype.itemsize
    return sizes

  def is_array(self, path: KeyPath) -> bool:
    if self.format == 'flax-msgpack':
      return isinstance(self._values[path], np.ndarray)
    return self._leaves[path].value_type in (_metadata.JAX_ARRAY, _metadata.NP_ARRAY)


def _single_tree(found: _formats.Found) -> _formats.Found:
  """The one tree to read: a manager root or flax directory stands for its latest step, a
  checkpoint of items for its only PyTree item."""
  kind, path = found
  if kind in (_formats.Kind.PYTREE, _formats.Kind.MSGPACK):
    return found
  if kind in (_formats.Kind.MANAGER, _formats.Kind.FLAX_DIR):
    steps = (_formats.manager_steps(path) if kind is _formats.Kind.MANAGER
             else _formats.flax_dir_steps(path))
    if steps:
      return _single_tree(_formats.detect(steps[-1].path))
  if kind is _formats.Kind.COMPOSITE:
    trees = [name for name in _formats.item_names(path) if _formats.is_pytree_dir(path / name)]
    if len(trees) == 1:
      return _formats.Found(_formats.Kind.PYTREE, path / trees[0])
    raise _errors.NotACheckpointError(
        f'{path}: holds {len(trees)} PyTree items ({", ".join(trees) or "none"}); pass the '
        'directory of the one to use.')
  raise _errors.NotACheckpointError(
      f'{path}: a {kind.value} holds no single tree of leaves; pass a PyTree checkpoint '
      'directory or a flax msgpack file.')


def read_msgpack(path: pathlib.Path) -> Any:
  """The state dict of a flax msgpack file, its arrays views into a read-only map of it (of
  the object's bytes, read whole, on an object store: objects cannot be mapped)."""
  from flaxckpt.legacy import _msgpack  # Only flax files need the legacy package.
  try:
    return _msgpack.decode(_storage.map_readonly(path))
  except _msgpack.MsgpackDecodeError as e:
    raise _errors.NotACheckpointError(
        f'{path}: not a complete flax msgpack checkpoint ({e}).') from None


def _msgpack_leaves(path: pathlib.Path) -> dict[KeyPath, Any]:
  from flaxckpt.legacy import _gda
  state = read_msgpack(path)
  leaves = dict(flatten_state(state))
  gda_dir = gda_dir_of(path)
  found = _gda.placeholders(state, path)
  if found:
    _storage.check_tree(gda_dir)
  for key, subpath in found:
    leaves[key] = _arrays.read_arrays(gda_dir, [subpath], use_ocdbt=False, use_zarr3=False,
                                      missing_chunks_are_errors=True)[0]
  return leaves


def gda_dir_of(path: pathlib.Path) -> pathlib.Path:
  """The ``<file>_gda`` folder of the multi-process arrays of the msgpack file ``path``."""
  from flaxckpt.legacy import _gda
  return path.with_name(path.name + _gda.SUFFIX)


def flatten_state(state: Any, key: KeyPath = ()) -> list[tuple[KeyPath, Any]]:
  """(key path, value) of every leaf of a flax state dict; empty dicts are leaves."""
  if isinstance(state, dict) and state:
    return [pair for name, value in state.items()
            for pair in flatten_state(value, (*key, str(name)))]
  return [(key, state)]


def nest(pairs: list[tuple[KeyPath, Any]]) -> Any:
  """The nested dict (a flax state dict) of (key path, value) pairs."""
  if len(pairs) == 1 and pairs[0][0] == ():
    return pairs[0][1]
  root: dict[str, Any] = {}
  for key, value in pairs:
    node = root
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return root
