"""Writing and reading the array data of a checkpoint, all leaves at once.

Default path (raw zarr v2): every ``.zarray`` and chunk of every leaf is written as a key of one
OCDBT database in a single tensorstore transaction, then merged into the root database as Orbax
does. Compressed (``use_compression``) and zarr v3 saves go through tensorstore's zarr drivers in
one transaction. Reads decode raw chunks directly and hand everything else to tensorstore.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxckpt import _errors, _storage, _zarr

if TYPE_CHECKING:
  import tensorstore as ts


def _tensorstore():
  """tensorstore, imported on first use: it is a large extension module that ``import
  flaxckpt`` should not pay for."""
  import tensorstore
  return tensorstore

OCDBT_MANIFEST = 'manifest.ocdbt'
_OCDBT_CONFIG = {
    'max_inline_value_bytes': 1024,
    'max_decoded_node_bytes': 100_000_000,
    'version_tree_arity_log2': 4,
    'compression': {'id': 'zstd'},
}


@dataclasses.dataclass(frozen=True)
class ArrayWrite:
  """One array to store: host blocks at chunk-aligned origins of the global array."""
  name: str
  global_shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  blocks: tuple[tuple[tuple[int, ...], np.ndarray], ...]


@dataclasses.dataclass(frozen=True)
class StorageOptions:
  use_ocdbt: bool = True
  use_zarr3: bool = False
  use_compression: bool = False
  process_index: int = 0


def process_db_name(process_index: int) -> str:
  return f'ocdbt.process_{process_index}'


def _ocdbt_spec(path: pathlib.Path) -> dict[str, Any]:
  return {'driver': 'ocdbt', 'base': _storage.kvstore_spec(path), 'config': _OCDBT_CONFIG}


def _array_kvstore(base: dict[str, Any], name: str) -> dict[str, Any]:
  """The kvstore spec of one array's folder/prefix inside ``base``."""
  if base['driver'] == 'file':
    return {**base, 'path': base['path'] + name + '/'}
  return {**base, 'path': name + '/'}


def _context() -> ts.Context:
  return _tensorstore().Context({'file_io_concurrency': {'limit': 64}})


def write_arrays(directory: pathlib.Path, arrays: list[ArrayWrite],
                 options: StorageOptions) -> None:
  """Writes all arrays; returns when their bytes are durable."""
  if not arrays:
    return
  context = _context()
  if options.use_ocdbt:
    target = directory / process_db_name(options.process_index)
    _storage.make_dirs(target)
    base = _ocdbt_spec(target)
  else:
    base = _storage.kvstore_spec(directory)
  txn = _tensorstore().Transaction(atomic=options.use_ocdbt)
  if options.use_zarr3 or options.use_compression:
    _write_with_drivers(base, arrays, options, context, txn)
  else:
    kv = _tensorstore().KvStore.open(base, context=context).result().with_transaction(txn)
    for array in arrays:
      _stage_raw(kv, array)
  txn.commit_async().result()
  if options.use_ocdbt:
    merge_process_databases(directory, [target], context)


def _stage_raw(kv: ts.KvStore, array: ArrayWrite) -> None:
  prefix = array.name + '/'
  kv[prefix + _zarr.ZARRAY] = _zarr.zarray_bytes(
      array.global_shape, array.chunk_shape, _zarr.zarr2_dtype(array.dtype), None)
  for origin, block in array.blocks:
    if block.shape == array.chunk_shape:
      key = _zarr.chunk_key(tuple(o // c for o, c in zip(origin, array.chunk_shape)))
      kv[prefix + key] = _zarr.chunk_bytes(block)
      continue
    for key, piece in _zarr.split_into_chunks(block, origin, array.chunk_shape):
      kv[prefix + key] = _zarr.chunk_bytes(piece)


def _write_with_drivers(base: dict[str, Any], arrays: list[ArrayWrite], options: StorageOptions,
                        context: ts.Context, txn: ts.Transaction) -> None:
  opens = []
  for array in arrays:
    if options.use_zarr3:
      spec = {'driver': 'zarr3', 'metadata': _zarr.zarr3_spec_metadata(
          array.global_shape, array.chunk_shape, array.dtype, options.use_compression)}
    else:
      spec = {'driver': 'zarr', 'metadata': {
          'shape': list(array.global_shape), 'chunks': list(array.chunk_shape),
          'dtype': _zarr.zarr2_dtype(array.dtype), 'dimension_separator': '.',
          'compressor': {'id': 'zstd', 'level': 1} if options.use_compression else None}}
    spec['kvstore'] = _array_kvstore(base, array.name)
    opens.append(_tensorstore().open(spec, create=True, open=True, context=context,
                                     transaction=txn))
  writes = []
  for array, future in zip(arrays, opens):
    store = future.result()
    for origin, block in array.blocks:
      region = tuple(slice(o, o + n) for o, n in zip(origin, block.shape))
      writes.append(store[region].write(block) if region else store.write(block))
  for write in writes:
    write.result()


def merge_process_databases(directory: pathlib.Path, process_dirs: list[pathlib.Path],
                            context: ts.Context | None = None) -> None:
  """Copies every per-process OCDBT database into the root database at ``directory``.

  Large values stay in the per-process data files; the root refers to them, so those
  directories are part of the checkpoint.
  """
  context = context or _context()
  root = _tensorstore().KvStore.open(_ocdbt_spec(directory), context=context).result()
  txn = _tensorstore().Transaction(atomic=True)
  for process_dir in process_dirs:
    source = _tensorstore().KvStore.open(_ocdbt_spec(process_dir), context=context).result()
    source.experimental_copy_range_to(root.with_transaction(txn)).result()
  txn.commit_async().result()


# --- reading ---------------------------------------------------------------------------------


def read_arrays(directory: pathlib.Path, names: list[str], *, use_ocdbt: bool | None,
                use_zarr3: bool, missing_chunks_are_errors: bool,
                ndim_hints: list[int | None] | None = None) -> list[np.ndarray]:
  """Reads whole arrays by parameter name.

  ``ndim_hints`` (the rank each array probably has) lets the read of a single-chunk array's
  chunk start together with its ``.zarray`` instead of after it: one round trip, not two.
  """
  if not names:
    return []
  if use_ocdbt is None:
    use_ocdbt = _storage.exists(directory / OCDBT_MANIFEST)
  context = _context()
  base = _ocdbt_spec(directory) if use_ocdbt else _storage.kvstore_spec(directory)
  if use_zarr3:
    return _read_with_driver(directory, base, names, 'zarr3', context)
  kv = _tensorstore().KvStore.open(base, context=context).result()
  hints = ndim_hints or [None] * len(names)
  meta_reads = [kv.read(name + '/' + _zarr.ZARRAY) for name in names]
  guesses = [kv.read(name + '/' + _zarr.chunk_key((0,) * ndim)) if ndim is not None else None
             for name, ndim in zip(names, hints)]
  results: list[Any] = [None] * len(names)
  fallback, chunk_reads = [], []
  for i, (name, future) in enumerate(zip(names, meta_reads)):
    read = future.result()
    if read.state != 'value':
      raise _errors.NotACheckpointError(
          f'{directory}: array {name!r} has no {_zarr.ZARRAY} (expected a zarr v2 array at '
          f'key {name}/{_zarr.ZARRAY}); the checkpoint is incomplete or damaged.')
    meta = _zarr.parse_zarray(read.value)
    if not _zarr.is_raw_zarr2(meta):
      fallback.append(i)
      continue
    keys = list(_zarr.grid(tuple(meta['shape']), tuple(meta['chunks'])))
    if guesses[i] is not None and keys == [(0,) * hints[i]]:
      futures = [guesses[i]]
    else:
      futures = [kv.read(name + '/' + _zarr.chunk_key(k)) for k in keys]
    chunk_reads.append((i, name, meta, keys, futures))
  if fallback:
    arrays = _read_with_driver(directory, base, [names[i] for i in fallback], 'zarr', context)
    for i, array in zip(fallback, arrays):
      results[i] = array
  for i, name, meta, keys, futures in chunk_reads:
    pieces = {}
    for key, future in zip(keys, futures):
      read = future.result()
      if read.state != 'value' and missing_chunks_are_errors:
        raise _errors.NotACheckpointError(
            f'{directory}: chunk {_zarr.chunk_key(key)!r} of array {name!r} is missing; the '
            'checkpoint is incomplete or damaged.')
      pieces[key] = read.value if read.state == 'value' else None
    dtype = _zarr.parse_dtype(meta['dtype'])
    results[i] = _zarr.assemble(tuple(meta['shape']), tuple(meta['chunks']), dtype, pieces)
  return results


def _read_with_driver(directory: pathlib.Path, base: dict[str, Any], names: list[str],
                      driver: str, context: ts.Context) -> list[np.ndarray]:
  opens = [_tensorstore().open({'driver': driver, 'kvstore': _array_kvstore(base, name)},
                               open=True, context=context) for name in names]
  stores = []
  for name, future in zip(names, opens):
    try:
      stores.append(future.result())
    except ValueError as e:
      raise _errors.NotACheckpointError(
          f'{directory}: cannot open array {name!r} as {driver}: {e}') from e
  reads = [store.read() for store in stores]
  return [np.asarray(r.result()) for r in reads]
