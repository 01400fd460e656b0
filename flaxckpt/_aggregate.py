"""The ``checkpoint`` file of PyTree checkpoints written by Orbax 0.1 to 0.5.

Orbax 0.1 to 0.3 wrote no ``_METADATA``: the tree lived in ``checkpoint``, a flax msgpack
document of the saved tree in which every leaf is either its value (leaves saved with
``SaveArgs(aggregate=True)``: arrays as flax's msgpack arrays, scalars, strings, and ``None`` or
empty containers) or the string ``PLACEHOLDER://<name>`` for an array stored under ``<name>``
(per-leaf zarr directories, or in OCDBT when ``manifest.ocdbt`` is there; a string leaf of
Orbax 0.3 in ``<name>/_strings.json``). From 0.3 (with OCDBT) to 0.5, ``checkpoint`` sat beside
``_METADATA``, which marks the leaves stored in it ``skip_deserialize``; 0.6 dropped it.

This module maps that layout onto the current restore path: ``tree_metadata`` builds what
``_METADATA`` would say, and ``value_at`` gives an aggregated leaf's value.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from flaxckpt import _errors, _metadata, _storage, _tree

FILE = _metadata.LEGACY_AGGREGATE_FILE
_PLACEHOLDER = 'PLACEHOLDER://'


def read(directory: pathlib.Path) -> Any:
  """The tree in ``directory``'s ``checkpoint`` file (arrays are numpy arrays)."""
  from flaxckpt.legacy import _msgpack  # The same encoding as flax's msgpack checkpoints.
  path = directory / FILE
  try:
    return _msgpack.decode(_storage.read_into_buffer(path))
  except _msgpack.MsgpackDecodeError as e:
    raise _errors.NotACheckpointError(
        f'{path}: the tree file of this (pre-2024 Orbax) checkpoint is damaged: {e}.') from e


def tree_metadata(directory: pathlib.Path) -> _metadata.TreeMetadata:
  """What ``_METADATA`` would say about the checkpoint at ``directory``, which has none."""
  tree = read(directory)
  leaves: list[_metadata.LeafMetadata] = []
  _collect(tree, (), (), leaves, directory)
  return _metadata.TreeMetadata(
      leaves=tuple(leaves), use_ocdbt=_storage.is_file(directory / 'manifest.ocdbt'),
      use_zarr3=False, store_array_data_equal_to_fill_value=False)


def _collect(node: Any, path: _tree.Path, key_types: tuple[int, ...],
             out: list[_metadata.LeafMetadata], directory: pathlib.Path) -> None:
  if isinstance(node, dict) and node:
    for key, value in node.items():
      _collect(value, path + (str(key),), key_types + (_tree.DICT_KEY,), out, directory)
    return
  if isinstance(node, list) and node:
    for index, value in enumerate(node):
      _collect(value, path + (str(index),), key_types + (_tree.SEQUENCE_KEY,), out, directory)
    return
  if not path:  # A bare empty tree.
    return
  if isinstance(node, str) and node.startswith(_PLACEHOLDER):
    name = node[len(_PLACEHOLDER):]
    if name != '.'.join(path):
      raise _errors.NotACheckpointError(
          f'{directory / FILE}: leaf {_tree.path_str(path)!r} points to the array {name!r}; '
          f'expected {".".join(path)!r}, the name Orbax gives that leaf.')
    # Orbax 0.3 kept a string leaf in its own '<name>/_strings.json', as {name: value}.
    own_dir = _storage.join_inside(directory, name, f'{directory / FILE}: a placeholder')
    kind = (_metadata.STRING if _storage.is_file(own_dir / _metadata.STRINGS_FILE)
            else _metadata.NP_ARRAY)
    out.append(_metadata.LeafMetadata(path, key_types, kind))
    return
  out.append(_metadata.LeafMetadata(path, key_types, _value_type(node, path, directory),
                                    skip_deserialize=True))


def _value_type(value: Any, path: _tree.Path, directory: pathlib.Path) -> str:
  if value is None:
    return 'None'
  if isinstance(value, dict):
    return 'Dict'
  if isinstance(value, list):
    return 'List'
  if isinstance(value, str):
    return _metadata.STRING
  if isinstance(value, np.ndarray):
    return _metadata.NP_ARRAY
  if isinstance(value, (bool, int, float, np.generic)):
    return _metadata.SCALAR
  raise _errors.NotACheckpointError(
      f'{directory / FILE}: leaf {_tree.path_str(path)!r} holds a {type(value).__name__}, '
      'which no Orbax release stores there.')


def is_aggregated(leaf: _metadata.LeafMetadata) -> bool:
  """Whether ``leaf``'s value is in the ``checkpoint`` file rather than in array storage."""
  return leaf.skip_deserialize and leaf.value_type not in _metadata.EMPTY_TYPES


def value_at(tree: Any, leaf: _metadata.LeafMetadata, directory: pathlib.Path) -> Any:
  """The value of the aggregated ``leaf`` in ``tree`` (from ``read``)."""
  node = tree
  try:
    for key in leaf.path:
      node = node[int(key)] if isinstance(node, list) else node[key]
  except (KeyError, IndexError, ValueError, TypeError) as e:
    raise _errors.NotACheckpointError(
        f'{directory / FILE}: leaf {_tree.path_str(leaf.path)!r}, which _METADATA says is '
        'stored in this file, is not in it.') from e
  if isinstance(node, str) and node.startswith(_PLACEHOLDER):
    raise _errors.NotACheckpointError(
        f'{directory / FILE}: leaf {_tree.path_str(leaf.path)!r} is a placeholder there, but '
        '_METADATA says its value is stored in this file.')
  return node
