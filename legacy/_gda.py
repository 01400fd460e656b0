"""Multi-process arrays of legacy checkpoints: the ``<prefix><step>_gda`` folders.

``save_checkpoint_multiprocess`` cannot put an array that no single process holds whole into the
msgpack file. Flax leaves a placeholder string there and stores the array as a plain zstd zarr v2
folder under ``<checkpoint>_gda/<key/path>/``, one chunk per shard (FORMATS.md §3.5). The arrays
are written and read by flaxckpt's array layer, which talks to tensorstore.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from flaxckpt import _arrays, _restore, _storage

SUFFIX = '_gda'
PLACEHOLDER = '//GDAPlaceholder:'
COMMIT_FILE = 'commit_success.txt'


def is_multiprocess_array(value: Any) -> bool:
  return isinstance(value, jax.Array) and not value.is_fully_addressable


def split(state: Any) -> tuple[Any, list[tuple[jax.Array, str]]]:
  """Replaces multi-process arrays in a state dict by placeholders.

  Returns the new state and (array, key path joined by '/') for each replaced array.
  """
  if not isinstance(state, dict):
    if is_multiprocess_array(state):
      return PLACEHOLDER, [(state, '')]
    return state, []
  flat = traverse_util.flatten_dict(state, keep_empty_nodes=True)
  arrays = []
  for key, value in flat.items():
    if is_multiprocess_array(value):
      subpath = '/'.join(key)
      arrays.append((value, subpath))
      flat[key] = PLACEHOLDER + subpath
  return (traverse_util.unflatten_dict(flat) if arrays else state), arrays


def write(directory: pathlib.Path, arrays: list[tuple[jax.Array, str]]) -> None:
  """Writes this process's shards (replica 0 only) of each array below ``directory``."""
  writes = []
  for array, subpath in arrays:
    shard_shape = array.sharding.shard_shape(array.shape)
    blocks = tuple((tuple(s.start or 0 for s in shard.index), np.asarray(shard.data))
                   for shard in array.addressable_shards if shard.replica_id == 0)
    writes.append(_arrays.ArrayWrite(
        subpath, array.shape, np.dtype(array.dtype), tuple(max(1, n) for n in shard_shape),
        blocks))
  options = _arrays.StorageOptions(use_ocdbt=False, use_compression=True,
                                   process_index=jax.process_index(),
                                   writes_metadata=jax.process_index() == 0)
  _arrays.start_write(directory, writes, options).wait()


def placeholders(state: Any, where: Any) -> list[tuple[tuple[str, ...], str]]:
  """(key path, subpath) of every placeholder in a restored state dict; a subpath that would
  lead outside the ``_gda`` folder is refused (UnsafeCheckpointError naming ``where``, the
  msgpack file)."""
  if isinstance(state, str) and state.startswith(PLACEHOLDER):
    return [((), placeholder_subpath(state, where))]
  if not isinstance(state, dict):
    return []
  flat = traverse_util.flatten_dict(state, keep_empty_nodes=True)
  return [(key, placeholder_subpath(value, where)) for key, value in flat.items()
          if isinstance(value, str) and value.startswith(PLACEHOLDER)]


def placeholder_subpath(placeholder: str, where: Any) -> str:
  """The folder below ``_gda`` that ``placeholder`` names, refused (UnsafeCheckpointError naming
  ``where``) if it would lead outside."""
  return _storage.check_name(placeholder[len(PLACEHOLDER):],
                             f'{where}: the {SUFFIX} placeholder {placeholder!r}')


def read(directory: pathlib.Path, subpaths: list[str], references: list[Any]
         ) -> list[jax.Array | np.ndarray]:
  """Reads arrays stored by ``write``, each placed like its reference (a jax.Array or sharded
  ``ShapeDtypeStruct``; numpy, as stored, for anything else, None included). A process reads
  only the chunks its shards of a multi-process array need."""
  shardings = [getattr(reference, 'sharding', None) for reference in references]
  regions = [None if sharding is None
             else _restore.local_region(sharding, tuple(reference.shape))
             for sharding, reference in zip(shardings, references)]
  hosts = _arrays.read_arrays(directory, subpaths, use_ocdbt=False, use_zarr3=False,
                              missing_chunks_are_errors=True, regions=regions)
  out: list[jax.Array | np.ndarray] = []
  for host, sharding, region in zip(hosts, shardings, regions):
    if isinstance(host, _arrays.Region):
      # read_arrays returns a Region only for a RegionRequest, made only where there is a sharding.
      assert region is not None and sharding is not None
      out.append(_restore.array_from_region(host, region.shape, sharding))
    else:
      out.append(host if sharding is None else jax.device_put(host, sharding))
  return out


def replace(state: Any, restored: dict[tuple[str, ...], Any]) -> Any:
  """``state`` with the placeholders at the given key paths replaced."""
  if () in restored:
    return restored[()]
  flat = traverse_util.flatten_dict(state, keep_empty_nodes=True)
  flat.update(restored)
  return traverse_util.unflatten_dict(flat)
