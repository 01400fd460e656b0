"""Writing and reading the array data of a checkpoint, all leaves at once.

Default path (raw zarr v2): every ``.zarray`` and chunk of every leaf is written as a key of one
OCDBT database in a single tensorstore transaction, then merged into the root database as Orbax
does. Compressed (``use_compression``) and zarr v3 saves go through tensorstore's zarr drivers in
one transaction. Reads decode raw chunks directly and hand everything else to tensorstore.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
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

# Chunks at least this large are read straight from their data file into 64-byte-aligned
# buffers (which jax adopts without copying) instead of through kvstore reads, which copy
# every byte twice. Smaller chunks are cheaper to fetch in one batch of kvstore reads.
DIRECT_READ_MIN_BYTES = 1 << 20
_ALIGNMENT = 64
_READ_THREADS = 4
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
  direct = _direct_locations(directory, use_ocdbt, chunk_reads)
  jobs = []
  for i, name, meta, keys, futures in chunk_reads:
    dtype = _zarr.parse_dtype(meta['dtype'])
    shape, chunks = tuple(meta['shape']), tuple(meta['chunks'])
    if name in direct:
      results[i] = aligned_empty(shape, dtype)
      jobs.append((results[i], direct[name]))
      continue
    pieces = {}
    chunk_nbytes = math.prod(chunks) * dtype.itemsize
    for key, future in zip(keys, futures):
      read = future.result()
      if read.state != 'value':
        if missing_chunks_are_errors:
          raise _errors.NotACheckpointError(
              f'{directory}: chunk {_zarr.chunk_key(key)!r} of array {name!r} is missing; the '
              'checkpoint is incomplete or damaged.')
        pieces[key] = None
      elif len(read.value) != chunk_nbytes:
        raise _errors.NotACheckpointError(
            f'{directory}: chunk {_zarr.chunk_key(key)!r} of array {name!r} holds '
            f'{len(read.value)} bytes, expected {chunk_nbytes}; the checkpoint is damaged.')
      else:
        pieces[key] = read.value
    results[i] = _zarr.assemble(shape, chunks, dtype, pieces)
  if jobs:
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
      list(pool.map(lambda job: _read_into(*job), jobs))
  return results


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array whose data is 64-byte aligned, so jax can use it without a copy."""
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, dtype=np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _direct_locations(directory: pathlib.Path, use_ocdbt: bool,
                      chunk_reads: list) -> dict[str, tuple[pathlib.Path, int, int]]:
  """Where the single chunk of each large raw array lies: (file, offset, length)."""
  large = {}
  for _, name, meta, keys, _ in chunk_reads:
    nbytes = math.prod(meta['chunks']) * _zarr.parse_dtype(meta['dtype']).itemsize
    if len(keys) == 1 and tuple(meta['chunks']) == tuple(meta['shape']) and (
        nbytes >= DIRECT_READ_MIN_BYTES):
      large[name + '/' + _zarr.chunk_key(keys[0])] = (name, nbytes)
  if not large:
    return {}
  if not use_ocdbt:
    found = {}
    for key, (name, nbytes) in large.items():
      path = directory / key
      if _storage.is_file(path) and path.stat().st_size == nbytes:
        found[name] = (path, 0, nbytes)
    return found
  located = _ocdbt_value_locations(directory, set(large))
  return {large[key][0]: where for key, where in located.items()
          if where[2] == large[key][1]}


def _ocdbt_value_locations(directory: pathlib.Path, keys: set[str]
                           ) -> dict[str, tuple[pathlib.Path, int, int]]:
  """Finds the data-file locations of ``keys`` by walking the OCDBT B+tree with tensorstore.

  Indirect values are stored verbatim in the data files, so (file, offset, length) is all a
  reader needs. Keys stored inline (small values) are not returned.
  """
  ts = _tensorstore()
  base = ts.KvStore.open(_storage.kvstore_spec(directory)).result()
  manifest = ts.ocdbt.dump(base).result()
  version = manifest['versions'][-1]
  root = version['root'].get('location')
  found: dict[str, tuple[pathlib.Path, int, int]] = {}
  pending = [(root, b'')] if root else []
  while pending:
    location, prefix = pending.pop()
    for entry in ts.ocdbt.dump(base, location).result()['entries']:
      if 'location' in entry:
        pending.append((entry['location'], prefix + entry.get('subtree_common_prefix', b'')))
        continue
      key = (prefix + entry['key']).decode('utf-8', 'replace')
      if key in keys and 'indirect_value' in entry:
        found[key] = _parse_value_reference(directory, entry['indirect_value'])
  return found


def _parse_value_reference(directory: pathlib.Path, ref: str
                           ) -> tuple[pathlib.Path, int, int]:
  """``value:<base path>:<relative file>:<offset>:<length>`` -> (path, offset, length)."""
  head, offset, length = ref.rsplit(':', 2)
  _, base_path, relative = head.split(':', 2)
  return directory / base_path / relative, int(offset), int(length)


def _read_into(out: np.ndarray, where: tuple[pathlib.Path, int, int]) -> None:
  path, offset, length = where
  view = memoryview(out.reshape(-1).view(np.uint8))
  with open(path, 'rb', buffering=0) as f:
    f.seek(offset)
    done = 0
    while done < length:
      n = f.readinto(view[done:])
      if not n:
        raise _errors.NotACheckpointError(
            f'{path}: expected {length} bytes at offset {offset}, the file ends early; the '
            'checkpoint is damaged.')
      done += n


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
