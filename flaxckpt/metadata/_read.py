"""Reads a PyTree checkpoint's metadata into a ``TreeMetadata`` of value metadata (no array
data is read: shapes and dtypes come from each array's zarr metadata)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from flaxckpt import _aggregate, _arrays, _metadata, _restore, _safe_json, _storage, _tree
from flaxckpt.metadata import _sharding
from flaxckpt.metadata.tree import TreeMetadata
from flaxckpt.metadata.value import ArrayMetadata, ScalarMetadata, StorageMetadata, StringMetadata

_ARRAY_TYPES = (_metadata.JAX_ARRAY, _metadata.NP_ARRAY)


def read_tree_metadata(directory: pathlib.Path) -> TreeMetadata:
  """The ``TreeMetadata`` of the committed PyTree checkpoint at ``directory``.

  Raises:
    FileNotFoundError, NotACheckpointError, IncompleteCheckpointError: as restore does.
  """
  reader = _restore.open_reader(directory, verify_checksums=False)
  meta = reader.meta
  described = _restore.handler_metadata(reader)  # Leaves of registered custom types.
  stored = [leaf for leaf in meta.leaves
            if leaf.value_type in (*_ARRAY_TYPES, _metadata.SCALAR)
            and not _aggregate.is_aggregated(leaf) and leaf.path not in described]
  infos = dict(zip([leaf.path for leaf in stored], _arrays.read_array_infos(
      directory, [leaf.name for leaf in stored], use_ocdbt=meta.use_ocdbt,
      use_zarr3=meta.use_zarr3)))
  shardings = _Shardings(directory)
  layouts = _array_layouts(directory)
  entries = []
  for leaf in meta.leaves:
    value: Any
    if leaf.path in described:
      value = described[leaf.path]
    elif leaf.path in infos:
      shape, dtype, zarr_chunks = infos[leaf.path]
      if leaf.value_type == _metadata.SCALAR:
        value = ScalarMetadata(name=leaf.name, directory=directory, dtype=dtype)
      else:
        write_shape, chunk_shape = layouts.get(leaf.name, (leaf.write_shape, None))
        chunk_shape = zarr_chunks if zarr_chunks is not None else chunk_shape
        storage = (StorageMetadata(chunk_shape, write_shape)
                   if chunk_shape is not None or write_shape is not None else None)
        value = ArrayMetadata(
            name=leaf.name, directory=directory, shape=tuple(shape), dtype=dtype,
            sharding=shardings.get(leaf) if leaf.value_type == _metadata.JAX_ARRAY else None,
            storage=storage)
    elif leaf.value_type == _metadata.STRING:
      value = StringMetadata(name=leaf.name, directory=directory)
    elif _aggregate.is_aggregated(leaf):  # Its value is at hand: describe it the same way.
      value = _describe_value(reader.aggregated(leaf), leaf, directory)
    else:
      factory = _metadata.EMPTY_TYPES.get(leaf.value_type)
      value = factory() if factory is not None else None
    entries.append((leaf.path, leaf.key_types, value))
  return TreeMetadata(tree=_tree.build(entries) if entries else {},
                      custom_metadata=meta.custom_metadata, use_zarr3=meta.use_zarr3)


def _describe_value(value: Any, leaf: _metadata.LeafMetadata, directory: pathlib.Path) -> Any:
  if isinstance(value, str):
    return StringMetadata(name=leaf.name, directory=directory)
  if value is None or _tree.is_empty_node(value):
    return value
  array = np.asarray(value)
  if leaf.value_type == _metadata.SCALAR or np.isscalar(value):
    return ScalarMetadata(name=leaf.name, directory=directory, dtype=array.dtype)
  return ArrayMetadata(name=leaf.name, directory=directory, shape=array.shape, sharding=None,
                       dtype=array.dtype)


class _Shardings:
  """The saved sharding of each jax array, from ``_sharding`` (read once, when first needed)."""

  def __init__(self, directory: pathlib.Path):
    self._path = directory / _metadata.SHARDING_FILE
    self._entries: dict | None = None

  def get(self, leaf: _metadata.LeafMetadata) -> _sharding.ShardingMetadata | None:
    if self._entries is None:
      self._entries = (_restore.read_side_file(self._path) if _storage.is_file(self._path)
                       else {})
    text = self._entries.get(_metadata.sharding_key(leaf.name))
    if not isinstance(text, str) or not text:
      return None
    return _restore.parse_side_file(
        self._path, lambda: _sharding.from_deserialized_dict(_safe_json.loads(text, self._path)),
        f'the sharding of leaf {_tree.path_str(leaf.path)!r}')


def _array_layouts(directory: pathlib.Path
                   ) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]:
  """(write_shape, chunk_shape) by array name, from ``array_metadatas/`` when present."""
  folder = directory / _metadata.ARRAY_METADATAS_DIR
  out: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {}
  if not _storage.is_dir(folder):
    return out
  for name in _storage.list_names(folder):
    for entry in _restore.read_side_file(folder / name, _metadata.parse_array_metadatas):
      out[entry.param_name] = (entry.write_shape, entry.chunk_shape)
  return out
