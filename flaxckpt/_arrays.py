"""Writing and reading the array data of a checkpoint, all leaves at once.

Default path (raw zarr v2): all leaves go into one OCDBT database in a single tensorstore
transaction, then are merged into the root database as Orbax does. Small arrays are staged as raw
keys (``.zarray`` and chunks), which costs far less per leaf than opening a zarr array; large ones
are written through tensorstore's zarr driver, which can reference the host buffers instead of
copying them. Compressed (``use_compression``) and zarr v3 saves use the zarr drivers for every
leaf. Reads decode raw chunks directly and hand everything else to tensorstore.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from flaxckpt import _checksums, _errors, _sources, _storage, _zarr

if TYPE_CHECKING:
  import tensorstore as ts


@functools.cache
def _tensorstore():
  """tensorstore, imported on first use: it is a large extension module that ``import
  flaxckpt`` should not pay for.

  jax's tensorstore serialization module comes with it (1 ms more): code written for Orbax,
  whose import loads it, reaches ``jax.experimental.array_serialization.serialization``
  (its ``TS_CONTEXT``) without importing it, as Orbax's own guides do.
  """
  import jax.experimental.array_serialization.serialization  # noqa: F401
  import tensorstore
  return tensorstore


OCDBT_MANIFEST = 'manifest.ocdbt'

# Chunks at least this large are read straight from their data file into 64-byte-aligned
# buffers (which jax adopts without copying) instead of as bytes objects, which cost two extra
# copies. Smaller chunks are cheaper to fetch all at once as bytes.
DIRECT_READ_MIN_BYTES = 1 << 20
# Arrays at least this large are saved through the zarr driver without copying their buffers;
# below it, opening a driver per array costs more than copying the bytes.
DRIVER_WRITE_MIN_BYTES = 1 << 18
_READ_THREADS = 4
DEFAULT_DEVICE_HOST_BUDGET = 1 << 30
_OCDBT_CONFIG = {  # Orbax's, except for the node compression (see _ocdbt_write_config).
    'max_inline_value_bytes': 1024,
    'max_decoded_node_bytes': 100_000_000,
    'version_tree_arity_log2': 4,
}


T = TypeVar('T')


def in_batches(items: Sequence[T], size: Callable[[T], int], max_bytes: int | None
               ) -> list[list[T]]:
  """Consecutive items in groups of at most ``max_bytes`` by ``size`` (an item larger than that
  is a group of its own); one group without a limit. Never empty: [[]] for no items."""
  if max_bytes is None or not items:
    return [list(items)]
  batches: list[list[T]] = [[]]
  held = 0
  for item in items:
    nbytes = size(item)
    if batches[-1] and held + nbytes > max_bytes:
      batches.append([])
      held = 0
    batches[-1].append(item)
    held += nbytes
  return batches


class ArrayWrite(NamedTuple):
  """One array to store: host blocks at chunk-aligned origins of the global array (before
  ``start_write``, a save may hold device arrays in their place: see ``_staging.HostCopies``)."""
  name: str
  global_shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  blocks: tuple[tuple[tuple[int, ...], Any], ...]


class StorageOptions(NamedTuple):
  use_ocdbt: bool = True
  use_zarr3: bool = False
  use_compression: bool = False
  process_index: int = 0
  # False when several processes write chunks of the same arrays: only the one that passes True
  # writes each array's metadata (.zarray / zarr.json); concurrent creation would conflict.
  writes_metadata: bool = True
  # False in multi-process saves: the primary merges every process's database at finalize.
  merge_into_root: bool = True
  # With a limit, arrays are written in successive transactions of at most this many bytes
  # (one larger array alone), so a save holds one batch in memory at a time, not the state.
  max_bytes_in_flight: int | None = None
  # The size OCDBT aims its data files at (0: no limit); None leaves tensorstore's default.
  target_data_file_size: int | None = None
  # How much data of arrays on accelerators a synchronous save holds in host memory at once
  # (None: all of it); see PyTreeCheckpointHandler(save_device_host_concurrent_gb=).
  device_host_budget: int | None = DEFAULT_DEVICE_HOST_BUDGET


def process_db_name(process_index: int) -> str:
  return f'ocdbt.process_{process_index}'


def _ocdbt_write_config(compress: bool) -> dict[str, Any]:
  """The config of a new database. Its B-tree nodes hold the small chunks inline: zstd on them
  (Orbax's choice, kept with ``use_compression``) would cost more than half of the commit of a
  many-leaf save and gains little on float data."""
  return {**_OCDBT_CONFIG, 'compression': {'id': 'zstd'} if compress else None}


def _ocdbt_spec(path: pathlib.Path, write_config: dict[str, Any] | None = None
                ) -> dict[str, Any]:
  """An OCDBT kvstore spec; readers take the config from the manifest, whatever wrote it."""
  spec = {'driver': 'ocdbt',
          'base': _storage.kvstore_spec(path, sync_each_write=write_config is None)}
  if write_config is not None:
    spec['config'] = write_config
  return spec


def read_spec(directory: pathlib.Path, name: str, *, use_ocdbt: bool, use_zarr3: bool
              ) -> dict[str, Any]:
  """A tensorstore spec that opens the stored array ``name`` of the checkpoint at
  ``directory`` (what Orbax's ``get_json_tspec_read`` describes)."""
  base = _ocdbt_spec(directory) if use_ocdbt else _storage.kvstore_spec(directory)
  return {'driver': 'zarr3' if use_zarr3 else 'zarr', 'kvstore': _array_kvstore(base, name)}


def _array_kvstore(base: dict[str, Any], name: str) -> dict[str, Any]:
  """The kvstore spec of one array's folder/prefix inside ``base``."""
  if base['driver'] in ('file', 'gcs', 's3'):
    return {**base, 'path': base['path'] + name + '/'}
  return {**base, 'path': name + '/'}


def _context(directory: pathlib.Path) -> ts.Context:
  """A fresh context for the stores of one save or restore under ``directory``."""
  return _tensorstore().Context({'file_io_concurrency': {'limit': 64},
                                 **_storage.context_resources(directory)})


class PendingWrite:
  """Array writes whose tensorstore commit is under way.

  ``advance`` waits for the commit and starts the merge into the root database; ``wait``
  finishes everything. Callers interleave their own work between the steps.
  """

  def __init__(self, directory: pathlib.Path, commit: Any, process_dir: pathlib.Path | None,
               context: ts.Context | None, config: dict[str, Any] | None,
               arrays: Sequence[ArrayWrite] = (),
               staged: list[tuple[str, str, int]] | None = None,
               by_reference: list[ArrayWrite] | None = None):
    self._directory = directory
    self._commit = commit
    self._process_dir = process_dir
    self._context = context
    self._config = config
    self._finish_merge: Any = None
    self._arrays = arrays
    self._staged = staged or []
    self._by_reference = by_reference or []
    self._written: _checksums.Written | None = None

  def checksums(self) -> _checksums.Written:
    """The layout of every array and the checksum of every chunk written. Layouts, and the
    chunks tensorstore writes from the caller's buffers, are checksummed here: call it while
    the commit runs."""
    if self._written is None:
      layouts = {array.name: _checksums.of_layout(array.dtype, array.global_shape,
                                                  array.chunk_shape) for array in self._arrays}
      chunks: dict[str, dict[str, int]] = {array.name: {} for array in self._arrays}
      for name, key, crc in self._staged:
        chunks[name][key] = crc
      for array in self._by_reference:
        chunks[array.name].update(_chunk_checksums(array))
      self._written = _checksums.Written(layouts, chunks)
      self._staged, self._by_reference = [], []
    return self._written

  def advance(self) -> None:
    if self._commit is None:
      return
    self._commit.result()
    self._commit = None
    if self._process_dir is not None and self._config is not None:
      self._finish_merge = merge_process_databases(self._directory, [self._process_dir],
                                                   self._config, self._context)

  def wait(self) -> None:
    """Blocks until the arrays are durable and, with OCDBT, merged into the root database."""
    self.advance()
    if self._finish_merge is not None:
      self._finish_merge()
      self._finish_merge = None


def start_write(directory: pathlib.Path, arrays: list[ArrayWrite],
                options: StorageOptions) -> PendingWrite:
  """Stages every array in one transaction and starts its commit.

  The caller can do other work (the JSON side files) while tensorstore writes.
  """
  if not arrays:
    return PendingWrite(directory, None, None, None, None)
  context = _context(directory)
  process_dir = config = None
  if options.use_ocdbt:
    process_dir = directory / process_db_name(options.process_index)
    _storage.make_dirs(process_dir)
    config = _ocdbt_write_config(options.use_compression)
    base = _ocdbt_spec(process_dir, config)
    target_size = options.target_data_file_size
    if target_size is None:
      target_size = _storage.ocdbt_data_file_size(directory)
    if target_size is not None:
      base['target_data_file_size'] = target_size
  else:
    base = _storage.kvstore_spec(directory, sync_each_write=False)
  txn = _tensorstore().Transaction(atomic=options.use_ocdbt)
  by_driver: list[ArrayWrite] = []
  by_key: list[ArrayWrite] = []
  if options.use_zarr3 or options.use_compression:
    by_driver = arrays
  else:
    for array in arrays:
      large = math.prod(array.global_shape) * array.dtype.itemsize >= DRIVER_WRITE_MIN_BYTES
      (by_driver if large else by_key).append(array)
  if by_driver:
    _write_with_drivers(base, by_driver, options, context, txn)
  staged: list[tuple[str, str, int]] = []  # (array name, chunk key, crc32c) of raw chunks.
  if by_key:
    kv = _tensorstore().KvStore.open(base, context=context).result().with_transaction(txn)
    for array in by_key:
      _stage_raw(kv, array, options.writes_metadata, staged)
  return PendingWrite(directory, txn.commit_async(),
                      process_dir if options.merge_into_root else None, context, config,
                      arrays, staged, by_driver)


def _stage_raw(kv: ts.KvStore, array: ArrayWrite, writes_metadata: bool,
               staged: list[tuple[str, str, int]]) -> None:
  """Stages the array's keys, appending each chunk's (name, key, checksum) to ``staged``."""
  name = array.name
  prefix = name + '/'
  chunk_shape = array.chunk_shape
  if writes_metadata:
    kv[prefix + _zarr.ZARRAY] = _zarr.zarray_bytes(array.global_shape, chunk_shape, array.dtype)
  for origin, block in array.blocks:
    for key, piece in _zarr.split_into_chunks(block, origin, chunk_shape):
      data = _zarr.chunk_bytes(piece)
      kv[prefix + key] = data
      staged.append((name, key, _checksums.of_bytes(data)))


def _chunk_checksums(array: ArrayWrite) -> dict[str, int]:
  """The checksum of every chunk of ``array``'s blocks, by chunk key."""
  return {key: _checksums.of_array(piece) for origin, block in array.blocks
          for key, piece in _zarr.split_into_chunks(block, origin, array.chunk_shape)}


def _write_with_drivers(base: dict[str, Any], arrays: list[ArrayWrite], options: StorageOptions,
                        context: ts.Context, txn: ts.Transaction) -> None:
  """Writes through tensorstore's zarr drivers. The blocks are referenced, not copied: they are
  host snapshots or views of immutable arrays that outlive the transaction."""
  opens = []
  for array in arrays:
    spec: dict[str, Any]
    if options.use_zarr3:
      spec = {'driver': 'zarr3', 'metadata': _zarr.zarr3_spec_metadata(
          array.global_shape, array.chunk_shape, array.dtype, options.use_compression)}
    else:
      spec = {'driver': 'zarr', 'metadata': {
          'shape': list(array.global_shape), 'chunks': list(array.chunk_shape),
          'dtype': _zarr.zarr2_dtype(array.dtype), 'dimension_separator': '.',
          'compressor': {'id': 'zstd', 'level': 1} if options.use_compression else None}}
    spec['kvstore'] = _array_kvstore(base, array.name)
    spec['store_data_equal_to_fill_value'] = True  # As Orbax: every chunk exists on disk.
    mode: dict[str, bool]
    if options.writes_metadata:
      mode = {'create': True, 'open': True}
    else:  # Write chunks only; the metadata is another process's to write.
      mode = {'open': True, 'assume_metadata': True}
    opens.append(_tensorstore().open(spec, **mode, context=context, transaction=txn))
  writes = []
  for array, future in zip(arrays, opens):
    store = future.result()
    for origin, block in array.blocks:
      region = tuple(slice(o, o + n) for o, n in zip(origin, block.shape))
      target = store[region] if region else store
      writes.append(target.write(block, can_reference_source_data_indefinitely=True))
  for write in writes:
    write.result()


def merge_process_databases(directory: pathlib.Path, process_dirs: list[pathlib.Path],
                            config: dict[str, Any], context: ts.Context | None = None) -> Any:
  """Starts copying every per-process OCDBT database into the root database at ``directory``.

  Returns a function that waits for the copy to commit. Large values stay in the per-process
  data files and the root refers to them, so those directories are part of the checkpoint.
  """
  ts = _tensorstore()
  context = context or _context(directory)
  root = ts.KvStore.open(_ocdbt_spec(directory, config), context=context).result()
  txn = ts.Transaction(atomic=True)
  copies = []
  for process_dir in process_dirs:
    source = ts.KvStore.open(_ocdbt_spec(process_dir, config), context=context).result()
    copies.append(source.experimental_copy_range_to(root.with_transaction(txn)))

  def finish() -> None:
    for copy in copies:
      copy.result()
    txn.commit_async().result()

  return finish


def merge_all_process_databases(directory: pathlib.Path, compress: bool) -> None:
  """Merges every ``ocdbt.process_<i>`` database below ``directory`` into its root database."""
  process_dirs = [directory / name for name in _storage.list_names(directory)
                  if name.startswith(process_db_name(0)[:-1])]
  if process_dirs:
    merge_process_databases(directory, process_dirs, _ocdbt_write_config(compress))()


# --- reading ---------------------------------------------------------------------------------


class Region(NamedTuple):
  """Part of a stored array: ``data`` is the box ((start, stop) per dimension) of it."""
  data: np.ndarray
  box: tuple[tuple[int, int], ...]


class RegionRequest(NamedTuple):
  """Read only ``box`` of an array expected to have ``shape`` (else the whole array)."""
  shape: tuple[int, ...]
  box: tuple[tuple[int, int], ...]


def read_arrays(directory: pathlib.Path, names: list[str], *, use_ocdbt: bool | None,
                use_zarr3: bool, missing_chunks_are_errors: bool,
                ndim_hints: list[int | None] | None = None,
                regions: list[RegionRequest | None] | None = None,
                verifier: _checksums.Verifier = _checksums.NO_VERIFIER
                ) -> list[np.ndarray | Region]:
  """Reads arrays by parameter name: whole, or a ``Region`` where ``regions`` asks for one and
  the stored shape is the expected one (then only the chunks overlapping it are read).

  Raw zarr v2 arrays are decoded here; compressed and zarr v3 ones are read by tensorstore.
  ``ndim_hints`` (the rank each array probably has) lets a kvstore read of a single-chunk
  array's chunk start together with its ``.zarray``: one round trip, not two. Every whole chunk
  read is checked against ``verifier``'s checksums (``ChecksumError`` on a mismatch).
  """
  if not names:
    return []
  regions = regions or [None] * len(names)
  with _storage.naming_url(directory, 'reading the arrays'):
    use_ocdbt, base, context = _read_setup(directory, use_ocdbt)
    if use_zarr3:
      return _read_with_driver(directory, base, names, 'zarr3', context,
                               missing_chunks_are_errors, regions, verifier)
    source = _open_source(directory, base, use_ocdbt, context)
    try:
      return _read_zarr2(directory, base, names, source, context, missing_chunks_are_errors,
                         ndim_hints if source.speculative else None, regions, verifier)
    finally:
      source.close()


class ArrayInfo(NamedTuple):
  """What an array's zarr metadata declares."""
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...] | None  # None where the metadata names none we can use.


def read_array_infos(directory: pathlib.Path, names: list[str], *, use_ocdbt: bool | None,
                     use_zarr3: bool) -> list[ArrayInfo]:
  """The shape, dtype and chunk shape of each array, from its zarr metadata only."""
  if not names:
    return []
  meta_file = _zarr.ZARR_JSON if use_zarr3 else _zarr.ZARRAY
  with _storage.naming_url(directory, 'reading the array metadata'):
    use_ocdbt, base, context = _read_setup(directory, use_ocdbt)
    source = _open_source(directory, base, use_ocdbt, context)
    try:
      raws = source.collect(source.request([name + '/' + meta_file for name in names]))
    finally:
      source.close()
  infos = []
  for name, raw in zip(names, raws):
    if raw is None:
      raise _errors.NotACheckpointError(
          f'{directory}: array {name!r} has no {meta_file}; the checkpoint is incomplete or '
          'damaged.')
    try:
      infos.append(_array_info(raw, use_zarr3))
    except _errors.LimitExceededError as e:
      raise _errors.LimitExceededError(f'{directory}: array {name!r}: {e}') from None
    except _DAMAGED_METADATA as e:
      raise _damaged_metadata(directory, name, meta_file, e) from e
  return infos


def _array_info(raw: bytes, use_zarr3: bool) -> ArrayInfo:
  meta = _zarr.parse_metadata_json(raw)
  dtype = meta['data_type'] if use_zarr3 else meta['dtype']
  shape = _zarr.check_shape(tuple(meta['shape']))
  if use_zarr3:
    grid = meta.get('chunk_grid')
    chunks = grid.get('configuration', {}).get('chunk_shape') if isinstance(grid, dict) else None
  else:
    chunks = meta.get('chunks')
  if not (isinstance(chunks, list) and len(chunks) == len(shape)
          and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chunks)):
    chunks = None  # What a reader would refuse is not described either.
  return ArrayInfo(shape, _zarr.parse_dtype(dtype), None if chunks is None else tuple(chunks))


# What a damaged zarr metadata file can raise when parsed (JSON and UTF-8 errors are
# ValueErrors; the others come from valid JSON holding the wrong things).
_DAMAGED_METADATA = (ValueError, KeyError, TypeError, AttributeError, IndexError,
                     ZeroDivisionError, OverflowError)


def _damaged_metadata(directory: pathlib.Path, name: str, meta_file: str,
                      error: Exception) -> _errors.NotACheckpointError:
  return _errors.NotACheckpointError(
      f'{directory}: the {meta_file} of array {name!r} (key {name}/{meta_file}) is damaged '
      f'({type(error).__name__}: {error}); the checkpoint cannot be restored as saved.')


def _read_setup(directory: pathlib.Path, use_ocdbt: bool | None
                ) -> tuple[bool, dict[str, Any], ts.Context]:
  """Whether the arrays live in OCDBT (``manifest.ocdbt`` decides when unrecorded), the
  kvstore spec they live in, and a fresh tensorstore context."""
  if use_ocdbt is None:
    use_ocdbt = _storage.exists(directory / OCDBT_MANIFEST)
  base = _ocdbt_spec(directory) if use_ocdbt else _storage.kvstore_spec(directory)
  return use_ocdbt, base, _context(directory)


def _open_source(directory: pathlib.Path, base: dict[str, Any], use_ocdbt: bool,
                 context: ts.Context) -> Any:
  ts = _tensorstore()
  local = not _storage.is_remote(directory)
  if use_ocdbt:
    spec = _storage.kvstore_spec(directory)
    index = (_sources.OcdbtIndexSource.load(ts, directory, spec) if local else
             _sources.ObjectIndexSource.load(ts, directory, spec, context))
    if index is not None:
      return index
  kv = ts.KvStore.open(base, context=context).result()
  return _sources.KvSource(kv, None if use_ocdbt or not local else directory)


def _read_zarr2(directory: pathlib.Path, base: dict[str, Any], names: list[str], source: Any,
                context: ts.Context, missing_chunks_are_errors: bool,
                ndim_hints: list[int | None] | None,
                regions: list[RegionRequest | None],
                verifier: _checksums.Verifier) -> list[np.ndarray | Region]:
  metas = source.collect(source.request([name + '/' + _zarr.ZARRAY for name in names]))
  guesses: list[Any] = [None] * len(names)
  if ndim_hints:
    guessed = [(i, ndim) for i, ndim in enumerate(ndim_hints) if ndim is not None]
    handles = source.request([names[i] + '/' + _zarr.chunk_key((0,) * ndim)
                              for i, ndim in guessed])
    for (i, ndim), handle in zip(guessed, handles):
      guesses[i] = (ndim, handle)
  results: list[Any] = [None] * len(names)
  fallback: list[int] = []
  pending: list[tuple[int, str, Any, Any, Any, tuple[tuple[int, int], ...] | None]] = []
  direct: list[Any] = []
  for i, (name, raw) in enumerate(zip(names, metas)):
    if raw is None:
      raise _errors.NotACheckpointError(
          f'{directory}: array {name!r} has no {_zarr.ZARRAY} (expected a zarr v2 array at '
          f'key {name}/{_zarr.ZARRAY}); the checkpoint is incomplete or damaged.')
    try:
      layout = _zarr.zarr2_layout(raw)
    except _errors.LimitExceededError as e:
      raise _errors.LimitExceededError(f'{directory}: array {name!r}: {e}') from None
    except _DAMAGED_METADATA as e:
      raise _damaged_metadata(directory, name, _zarr.ZARRAY, e) from e
    if verifier:
      verifier.check_layout(name, layout.dtype, layout.shape, layout.chunks, _zarr.ZARRAY,
                            layout.checksum)
    if not layout.raw:
      fallback.append(i)
      continue
    region = regions[i]
    if region is not None and region.shape == layout.shape and not layout.single_chunk:
      grid = tuple(_zarr.grid_in(region.box, layout.chunks))
      handles = source.request([name + '/' + _zarr.chunk_key(index) for index in grid])
      pending.append((i, name, layout, handles, grid, region.box))
      continue
    if layout.single_chunk and layout.chunk_nbytes >= DIRECT_READ_MIN_BYTES:
      where = source.location(name + layout.key_suffixes[0])
      if where is not None and where[2] == layout.chunk_nbytes:
        direct.append((i, layout, where, name, layout.key_suffixes[0][1:]))
        continue
    guess = guesses[i]
    if guess is not None and layout.grid == ((0,) * guess[0],):
      handles = [guess[1]]
    else:
      handles = source.request([name + suffix for suffix in layout.key_suffixes])
    pending.append((i, name, layout, handles, layout.grid, None))
  if fallback:
    arrays = _read_with_driver(directory, base, [names[i] for i in fallback], 'zarr', context,
                               missing_chunks_are_errors, [regions[i] for i in fallback],
                               verifier)
    for i, array in zip(fallback, arrays):
      results[i] = array
  if direct and isinstance(source, _sources.ObjectIndexSource):
    def check(index: int, array: np.ndarray) -> None:
      i, _, where, name, key = direct[index]
      results[i] = array
      verifier.check_array(name, key, array, lambda: where)

    # The large values' reads go out first, with the small values next to them.
    with source.start_reads([(layout.shape, layout.dtype, where)
                             for _, layout, where, _, _ in direct], check) as reads:
      _read_pending(directory, source, missing_chunks_are_errors, verifier, results,
                    pending)
      reads.finish()
    return results
  _read_pending(directory, source, missing_chunks_are_errors, verifier, results, pending)
  if direct:
    def read_and_check(i: int, layout: _zarr.Zarr2Layout, where: _sources.Location, name: str,
                       key: str) -> None:
      results[i] = _sources.aligned_empty(layout.shape, layout.dtype)
      _sources.read_into(results[i], where)
      verifier.check_array(name, key, results[i], lambda: where)

    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
      list(pool.map(lambda job: read_and_check(*job), direct))
  return results


def _read_pending(directory: pathlib.Path, source: Any,
                  missing_chunks_are_errors: bool, verifier: _checksums.Verifier,
                  results: list[Any], pending: list) -> None:
  """Reads the arrays that ``_read_zarr2`` assembles from the chunks ``source`` returns."""
  for i, name, layout, handles, grid, box in pending:
    pieces = dict(zip(grid, source.collect(handles)))
    _check_chunks(directory, name, pieces, layout.chunk_nbytes, missing_chunks_are_errors)
    if verifier:
      for index, data in pieces.items():
        if data is not None:
          chunk = _zarr.chunk_key(index)
          verifier.check_bytes(name, chunk, data, functools.partial(source.location,
                                                                    f'{name}/{chunk}'))
    array = _zarr.assemble(layout.shape, layout.chunks, layout.dtype, pieces, fill=layout.fill,
                           box=box)
    results[i] = array if box is None else Region(array, box)


def _check_chunks(directory: pathlib.Path, name: str, pieces: dict[tuple[int, ...], Any],
                  nbytes: int, missing_are_errors: bool) -> None:
  for key, data in pieces.items():
    if data is None and missing_are_errors:
      raise _errors.NotACheckpointError(
          f'{directory}: chunk {_zarr.chunk_key(key)!r} of array {name!r} is missing; the '
          'checkpoint is incomplete or damaged.')
    if data is not None and len(data) != nbytes:
      raise _errors.NotACheckpointError(
          f'{directory}: chunk {_zarr.chunk_key(key)!r} of array {name!r} holds {len(data)} '
          f'bytes, expected {nbytes}; the checkpoint is damaged.')


def _read_with_driver(directory: pathlib.Path, base: dict[str, Any], names: list[str],
                      driver: str, context: ts.Context, missing_chunks_are_errors: bool,
                      regions: list[RegionRequest | None],
                      verifier: _checksums.Verifier) -> list[np.ndarray | Region]:
  """Reads arrays through tensorstore's zarr/zarr3 driver (compressed chunks, zarr v3)."""
  opens = [_tensorstore().open({'driver': driver, 'kvstore': _array_kvstore(base, name),
                                'fill_missing_data_reads': not missing_chunks_are_errors},
                               open=True, context=context) for name in names]
  stores = []
  for name, future in zip(names, opens):
    try:
      stores.append(future.result())
    except ValueError as e:
      raise _storage.request_failure(directory, f'opening array {name!r}', e) or \
          _errors.NotACheckpointError(
              f'{directory}: cannot open array {name!r} as {driver}: {e}') from e
  if verifier and driver == 'zarr3':  # zarr v2 layouts were checked as their .zarray was read.
    for name, store in zip(names, stores):
      verifier.check_layout(name, store.dtype.numpy_dtype, tuple(store.shape),
                            _write_chunk_shape(store), _zarr.ZARR_JSON)
  boxes = [region.box if region is not None and tuple(store.shape) == region.shape else None
           for store, region in zip(stores, regions)]
  for name, store, box in zip(names, stores, boxes):  # Before tensorstore allocates anything.
    what = f'{directory}: array {name!r}'
    _zarr.check_grid(tuple(store.shape), _write_chunk_shape(store) or tuple(store.shape), what)
    _zarr.check_allocation(tuple(b - a for a, b in box) if box else tuple(store.shape),
                           store.dtype.numpy_dtype, what)
  reads = [(store if box is None else store[tuple(slice(a, b) for a, b in box)]).read()
           for store, box in zip(stores, boxes)]
  out = []
  for name, store, read, box in zip(names, stores, reads, boxes):
    try:
      array = np.asarray(read.result())
    except ValueError as e:
      raise _storage.request_failure(directory, f'reading array {name!r}', e) or \
          _errors.NotACheckpointError(
              f'{directory}: cannot read array {name!r}; a chunk is missing or damaged '
              f'({e}).') from e
    if verifier:
      origin = tuple(start for start, _ in box) if box is not None else (0,) * array.ndim
      _check_whole_chunks(verifier, name, array, origin, tuple(store.shape),
                          _write_chunk_shape(store))
    out.append(array if box is None else Region(array, box))
  return out


def _write_chunk_shape(store: Any) -> tuple[int, ...]:
  """A tensorstore array's chunk shape; tensorstore gives None for a 0-d array's."""
  return tuple(store.chunk_layout.write_chunk.shape or ())


def _check_whole_chunks(verifier: _checksums.Verifier, name: str, array: np.ndarray,
                        origin: tuple[int, ...], shape: tuple[int, ...],
                        chunks: tuple[int, ...]) -> None:
  """Verifies the chunks that lie wholly inside both ``array`` (placed at ``origin``) and the
  stored shape; edge chunks were checksummed with their padding and are skipped."""
  first = [-(-o // c) for o, c in zip(origin, chunks)]
  stop = [min(o + n, s) // c for o, n, s, c in zip(origin, array.shape, shape, chunks)]
  for index in itertools.product(*(range(a, b) for a, b in zip(first, stop))):
    piece = array[tuple(slice(i * c - o, (i + 1) * c - o)
                        for i, c, o in zip(index, chunks, origin))]
    verifier.check_array(name, _zarr.chunk_key(index), piece)
