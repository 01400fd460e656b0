"""PyTree checkpoints in Orbax's layout: the save and restore path of flaxckpt.

Save: flatten the tree, start every device-to-host copy at once, then hand all arrays to
``_arrays.start_write`` (one batched transaction) and write the JSON side files while it
commits. Restore: read ``_METADATA``, decide per result leaf where its value comes from and what
it must become, read every needed array in one batch, and convert.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np

from flaxckpt import _arrays, _errors, _metadata, _storage, _transforms, _tree, _zarr
from flaxckpt._args import PyTreeRestore, PyTreeSave, StandardRestore, StandardSave
from flaxckpt._handler import AsyncCheckpointHandler, Writer, register_with_handler
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs, SaveArgs, normalize_dtype


_TMP_MARKER = '.orbax-checkpoint-tmp'
_DEFAULT_SAVE_ARGS = SaveArgs()
_INT64 = np.iinfo(np.int64)


class _Prepared(NamedTuple):
  """Everything a save still has to write once the caller's data is on the host."""
  directory: pathlib.Path
  arrays: list[_arrays.ArrayWrite]
  strings: dict[str, Any]  # Nested as _strings.json stores them.
  shardings: dict[str, str]
  array_metadatas: list[_metadata.ArrayMetadata]
  tree_metadata: _metadata.TreeMetadata
  options: _arrays.StorageOptions

  def write(self) -> None:
    pending = _arrays.start_write(self.directory, self.arrays, self.options)
    if self.strings:
      _storage.write_text(self.directory / _metadata.STRINGS_FILE,
                          json.dumps(self.strings, ensure_ascii=False, separators=(',', ':')))
    if self.shardings:
      _storage.write_text(self.directory / _metadata.SHARDING_FILE,
                          json.dumps(self.shardings, separators=(',', ':')))
    if self.array_metadatas:
      folder = self.directory / _metadata.ARRAY_METADATAS_DIR
      _storage.make_dirs(folder)
      _storage.write_text(folder / f'process_{self.options.process_index}',
                          _metadata.array_metadatas_json(self.array_metadatas))
    pending.advance()  # Arrays committed; the merge runs while _METADATA is encoded.
    _storage.write_text(self.directory / _metadata.METADATA_FILE,
                        _metadata.tree_metadata_json(self.tree_metadata))
    pending.wait()


def _nest_by_slash(strings: dict[str, str]) -> dict[str, Any]:
  """``_strings.json`` addresses values by JSON pointer ``/<name>``, so '/' in a name nests."""
  out: dict[str, Any] = {}
  for name, value in strings.items():
    node = out
    parts = name.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        break
    if not isinstance(node, dict) or isinstance(node.get(parts[-1]), dict):
      raise _errors.NameCollisionError(
          f'String leaves {name!r} and another whose name starts with "{parts[0]}/" cannot both '
          'be stored: _strings.json nests names at "/"; rename one key.')
    node[parts[-1]] = value
  return out


def _get_by_slash(strings: dict[str, Any], name: str) -> Any:
  node: Any = strings
  for part in name.split('/'):
    node = node[part]
  return node


class PyTreeCheckpointHandler(AsyncCheckpointHandler):
  """Saves and restores pytrees in Orbax's PyTree checkpoint format.

  Args:
    use_ocdbt: store arrays in one OCDBT database (Orbax's default) instead of a folder each.
    use_zarr3: write zarr v3 arrays instead of zarr v2.
    use_compression: zstd-compress chunks as Orbax does by default. Off by default: zstd halves
      the write speed of large states and float weights barely compress; OCDBT still compresses
      its index, where small leaves live.

  Example:
    >>> ckptr = flaxckpt.Checkpointer(flaxckpt.PyTreeCheckpointHandler())
    >>> ckptr.save(path, args=flaxckpt.args.PyTreeSave({'w': np.ones(3)}))
  """

  typestr = 'orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler'
  _numpy_scalars_as_arrays = False

  def __init__(self, *, use_ocdbt: bool = True, use_zarr3: bool = False,
               use_compression: bool = False, save_concurrent_gb: int | None = None,
               restore_concurrent_gb: int | None = None):
    del save_concurrent_gb, restore_concurrent_gb  # Accepted for Orbax call sites; unused.
    self._options = _arrays.StorageOptions(
        use_ocdbt=use_ocdbt, use_zarr3=use_zarr3, use_compression=use_compression,
        process_index=jax.process_index())

  # --- save ------------------------------------------------------------------------------------

  def save(self, directory: pathlib.Path, args: PyTreeSave) -> None:
    self._prepare(directory, args, copy=False).write()

  def async_save(self, directory: pathlib.Path, args: PyTreeSave) -> Writer:
    return self._prepare(directory, args, copy=True).write

  def _prepare(self, directory: pathlib.Path, args: PyTreeSave | StandardSave,
               copy: bool) -> _Prepared:
    directory = _storage.as_path(directory)
    leaves, _ = _tree.flatten(args.item)
    save_args = _save_args_by_path(args.save_args)
    max_chunk = getattr(args, 'ocdbt_target_data_file_size', None) or _zarr.MAX_CHUNK_BYTES
    for leaf in leaves:  # Start every device-to-host copy before waiting on any.
      value = leaf.value
      if isinstance(value, jax.Array) and _needs_host_copy(value.sharding) and not (
          _is_key_array(value)):
        value.copy_to_host_async()
    seen: dict[str, _tree.Path] = {}
    arrays, strings, shardings, array_metas, entries = [], {}, {}, [], []
    for leaf in leaves:
      name = leaf.name
      if name in seen:
        raise _errors.NameCollisionError(
            f'Tree paths {_tree.path_str(seen[name])!r} and {_tree.path_str(leaf.path)!r} both '
            f'map to the stored name {name!r} (names join keys with "."); rename one key.')
      seen[name] = leaf.path
      value = leaf.value
      arg = save_args.get(leaf.path, _DEFAULT_SAVE_ARGS) if save_args else _DEFAULT_SAVE_ARGS
      write_shape = None
      if isinstance(value, jax.Array):  # The common case first: trees are mostly arrays.
        value_type = _metadata.JAX_ARRAY
        array, ext, write_shape = self._jax_array_write(name, value, arg, copy, max_chunk)
        arrays.append(array)
        sharding = _metadata.sharding_to_json(value.sharding)
        if sharding is not None:
          shardings[_metadata.sharding_key(name)] = sharding
        array_metas.append(_metadata.ArrayMetadata(name, write_shape, array.chunk_shape, ext))
      elif _tree.is_empty_node(value):
        value_type = _empty_type(value)
      elif isinstance(value, str):
        value_type = _metadata.STRING
        strings[name] = value
      else:
        value_type, host = self._host_value(leaf, copy)
        arrays.append(_host_array_write(name, host, arg, max_chunk, self._options))
      entries.append(_metadata.LeafMetadata(leaf.path, leaf.key_types, value_type,
                                            skip_deserialize=value_type in
                                            _metadata.EMPTY_TYPES, write_shape=write_shape))
    tree_meta = _metadata.TreeMetadata(
        leaves=tuple(entries), use_ocdbt=self._options.use_ocdbt,
        use_zarr3=self._options.use_zarr3, store_array_data_equal_to_fill_value=True,
        custom_metadata=args.custom_metadata)
    return _Prepared(directory, arrays, _nest_by_slash(strings), shardings, array_metas,
                     tree_meta, self._options)

  def _host_value(self, leaf: _tree.Leaf, copy: bool) -> tuple[str, np.ndarray]:
    value = leaf.value
    if isinstance(value, np.ndarray):
      if value.dtype.kind == 'O':
        raise _errors.UnsupportedLeafError(
            f'Leaf {_tree.path_str(leaf.path)!r}: numpy arrays of dtype object cannot be saved.')
      return _metadata.NP_ARRAY, np.array(value, copy=True) if copy else value
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
      kind = _metadata.NP_ARRAY if self._numpy_scalars_as_arrays else _metadata.SCALAR
      return kind, np.asarray(value)
    if isinstance(value, (bool, int, float)):
      if isinstance(value, int) and not isinstance(value, bool) and not (
          _INT64.min <= value <= _INT64.max):
        raise _errors.UnsupportedLeafError(
            f'Leaf {_tree.path_str(leaf.path)!r}: int {value} does not fit in int64.')
      return _metadata.SCALAR, np.asarray(value)
    if hasattr(value, '__array__') and not isinstance(value, (bytes, complex)):
      return _metadata.NP_ARRAY, np.array(value, copy=True)
    raise _errors.UnsupportedLeafError(
        f'Leaf {_tree.path_str(leaf.path)!r} has type {type(value).__module__}.'
        f'{type(value).__qualname__}, which cannot be saved; expected a jax or numpy array, a '
        'Python int/float/bool, a numpy scalar, a str, None or an empty container.')

  def _jax_array_write(self, name: str, value: jax.Array, arg: SaveArgs, copy: bool,
                       max_chunk: int
                       ) -> tuple[_arrays.ArrayWrite, dict | None, tuple[int, ...]]:
    ext = None
    if _is_key_array(value):
      ext = {'random_key_impl': _key_impl_name(value.dtype)}
      value = jax.random.key_data(value)
    dtype = normalize_dtype(arg.dtype) or np.dtype(value.dtype)
    if _on_one_device(value):
      blocks = [((0,) * value.ndim, value)]
    else:
      blocks = [(tuple(s.start or 0 for s in shard.index), shard.data)
                for shard in value.addressable_shards if shard.replica_id == 0]
    host = []
    for origin, data in blocks:
      array = np.array(data, copy=True) if copy else np.asarray(data)
      host.append((origin, array if array.dtype == dtype else array.astype(dtype)))
    write_shape = _write_shape(value)
    chunk_shape = _zarr.choose_chunk_shape(
        write_shape, value.shape, dtype.itemsize, _chunk_limit(arg, max_chunk, self._options))
    return (_arrays.ArrayWrite(name, value.shape, dtype, chunk_shape, tuple(host)), ext,
            write_shape)

  # --- restore ---------------------------------------------------------------------------------

  def restore(self, directory: pathlib.Path, args: PyTreeRestore | None = None) -> Any:
    directory = _storage.as_path(directory)
    meta = read_tree_metadata(directory)
    args = args or PyTreeRestore()
    reader = _Reader(directory, meta)
    if args.item is None and args.restore_args is None:
      values = reader.read_many(list(meta.leaves))
      converted = _materialize(
          [(leaf.path, _STORED, leaf, values[leaf.path]) for leaf in meta.leaves], reader)
      return _tree.build([(leaf.path, leaf.key_types, value)
                          for leaf, value in zip(meta.leaves, converted)])
    if args.item is not None:
      target_leaves, treedef = _tree.flatten(args.item)
    else:
      target_leaves, treedef = _flatten_restore_args(args.restore_args)
    restore_args = _restore_args_by_path(args.restore_args)
    wanted = [leaf for leaf in target_leaves if not _tree.is_empty_node(leaf.value)]
    sources = _transforms.resolve([leaf.path for leaf in wanted],
                                  [leaf.path for leaf in meta.leaves], args.transforms)
    by_path = {leaf.path: leaf for leaf in meta.leaves}
    values = reader.read_many([by_path[s.checkpoint_path] for s in sources
                               if s.checkpoint_path is not None])
    from_checkpoint = {}
    for leaf, source in zip(wanted, sources):
      if source.checkpoint_path is None:
        continue
      stored = by_path[source.checkpoint_path]
      value = values[source.checkpoint_path]
      if source.value_fn is not None:
        value = source.value_fn(reader.as_stored_type(stored, value))
      want = _Want.of(leaf, restore_args.get(leaf.path), args.strict and args.item is not None)
      from_checkpoint[leaf.path] = (leaf.path, want, stored, value)
    converted = dict(zip(from_checkpoint, _materialize(list(from_checkpoint.values()), reader)))
    out = [converted[leaf.path] if leaf.path in converted else leaf.value
           for leaf in target_leaves]
    return jax.tree_util.tree_unflatten(treedef, out)

  def metadata(self, directory: pathlib.Path) -> Any:
    """The stored tree with ``jax.ShapeDtypeStruct`` leaves for arrays and scalars, read from
    the array metadata alone (no array data)."""
    directory = _storage.as_path(directory)
    meta = read_tree_metadata(directory)
    arrays = [leaf for leaf in meta.leaves if _is_stored_array(leaf)]
    infos = dict(zip([leaf.path for leaf in arrays], _arrays.read_array_infos(
        directory, [leaf.name for leaf in arrays], use_ocdbt=meta.use_ocdbt,
        use_zarr3=meta.use_zarr3)))
    entries = []
    for leaf in meta.leaves:
      if leaf.path in infos:
        shape, dtype = infos[leaf.path]
        value: Any = jax.ShapeDtypeStruct(shape, dtype)
      elif leaf.value_type == _metadata.STRING:
        value = str
      else:
        value = _metadata.EMPTY_TYPES.get(leaf.value_type)
        value = value() if value is not None else None
      entries.append((leaf.path, leaf.key_types, value))
    return _tree.build(entries)


class StandardCheckpointHandler(PyTreeCheckpointHandler):
  """The handler for ``StandardSave``/``StandardRestore``: arrays, scalars and strings.

  Same files as ``PyTreeCheckpointHandler``; numpy scalars are stored as 0-d arrays, and a target
  given to ``StandardRestore`` fixes each array's shape (``strict=False`` pads or truncates).
  """

  typestr = ('orbax.checkpoint._src.handlers.standard_checkpoint_handler.'
             'StandardCheckpointHandler')
  _numpy_scalars_as_arrays = True

  def restore(self, directory: pathlib.Path, args: StandardRestore | None = None) -> Any:
    args = args or StandardRestore()
    return super().restore(directory, PyTreeRestore(item=args.item, strict=args.strict))


register_with_handler(PyTreeCheckpointHandler, for_save=True)(PyTreeSave)
register_with_handler(PyTreeCheckpointHandler, for_restore=True)(PyTreeRestore)
register_with_handler(StandardCheckpointHandler, for_save=True)(StandardSave)
register_with_handler(StandardCheckpointHandler, for_restore=True)(StandardRestore)


# --- helpers -------------------------------------------------------------------------------------


def _is_key_array(value: jax.Array) -> bool:
  # Typed PRNG key dtypes are jax extended dtypes, never numpy dtypes.
  return not isinstance(value.dtype, np.dtype) and jax.dtypes.issubdtype(
      value.dtype, jax.dtypes.prng_key)


@functools.lru_cache(maxsize=256)
def _needs_host_copy(sharding: jax.sharding.Sharding) -> bool:
  """CPU arrays are already in host memory; numpy views them without a copy."""
  return any(device.platform != 'cpu' for device in sharding.device_set)


def _on_one_device(value: jax.Array) -> bool:
  sharding = value.sharding
  return isinstance(sharding, jax.sharding.SingleDeviceSharding) or len(
      sharding.device_set) == 1


def _write_shape(value: jax.Array) -> tuple[int, ...]:
  """The shape each process writes per shard (the whole array when on one device)."""
  if _on_one_device(value):
    return tuple(value.shape)
  return tuple(value.sharding.shard_shape(value.shape))


def _chunk_limit(arg: SaveArgs, max_chunk: int, options: _arrays.StorageOptions) -> int | None:
  limits = [arg.chunk_byte_size] if arg.chunk_byte_size else []
  if options.use_ocdbt:
    limits.append(max_chunk)
  return min(limits) if limits else None


def _host_array_write(name: str, host: np.ndarray, arg: SaveArgs, max_chunk: int,
                      options: _arrays.StorageOptions) -> _arrays.ArrayWrite:
  dtype = normalize_dtype(arg.dtype) or host.dtype
  if host.dtype != dtype:
    host = host.astype(dtype)
  chunk_shape = _zarr.choose_chunk_shape(host.shape, host.shape, dtype.itemsize,
                                         _chunk_limit(arg, max_chunk, options))
  return _arrays.ArrayWrite(name, host.shape, dtype, chunk_shape, (((0,) * host.ndim, host),))


def _empty_type(value: Any) -> str:
  if value is None:
    return 'None'
  if isinstance(value, tuple):
    return 'None' if hasattr(value, '_fields') else 'Tuple'
  if isinstance(value, list):
    return 'List'
  return 'Dict'


def _is_stored_array(leaf: _metadata.LeafMetadata) -> bool:
  return leaf.value_type in (_metadata.JAX_ARRAY, _metadata.NP_ARRAY, _metadata.SCALAR)


def _save_args_by_path(save_args: Any) -> dict[_tree.Path, SaveArgs]:
  if save_args is None:
    return {}
  pairs, _ = jax.tree_util.tree_flatten_with_path(
      save_args, is_leaf=lambda x: isinstance(x, SaveArgs))
  return {leaf.path: leaf.value for leaf in _tree.leaves_from_pairs(pairs)
          if isinstance(leaf.value, SaveArgs)}


def _restore_args_by_path(restore_args: Any) -> dict[_tree.Path, RestoreArgs]:
  if restore_args is None:
    return {}
  leaves, _ = _flatten_restore_args(restore_args)
  return {leaf.path: leaf.value for leaf in leaves if isinstance(leaf.value, RestoreArgs)}


def _flatten_restore_args(tree: Any) -> tuple[list[_tree.Leaf], Any]:
  pairs, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, RestoreArgs) or _tree.is_empty_node(x))
  return _tree.leaves_from_pairs(pairs), treedef


def read_tree_metadata(directory: pathlib.Path) -> _metadata.TreeMetadata:
  """Reads ``_METADATA`` after checking that ``directory`` is a committed checkpoint."""
  check_committed(directory)
  path = directory / _metadata.METADATA_FILE
  if not _storage.is_file(path):
    if _storage.is_file(directory / _metadata.LEGACY_AGGREGATE_FILE):
      raise _errors.NotACheckpointError(
          f'{directory}: this checkpoint was written by an Orbax release older than mid-2023 '
          f'(it has a "{_metadata.LEGACY_AGGREGATE_FILE}" file and no _METADATA); that format is '
          'not supported yet.')
    raise _errors.NotACheckpointError(
        f'{directory}: not a PyTree checkpoint (expected a {_metadata.METADATA_FILE} file; found '
        f'{_storage.list_names(directory)[:10]}).')
  try:
    return _metadata.parse_tree_metadata(_storage.read_text(path))
  except (ValueError, KeyError, TypeError) as e:
    raise _errors.NotACheckpointError(f'{path}: unreadable checkpoint metadata ({e}).') from e


def check_committed(directory: pathlib.Path) -> None:
  """Raises unless ``directory`` exists and is not a temporary (uncommitted) checkpoint."""
  if not _storage.exists(directory):
    raise FileNotFoundError(f'No checkpoint at {directory}: the path does not exist.')
  if not _storage.is_dir(directory):
    raise _errors.NotACheckpointError(f'{directory}: expected a checkpoint directory, found a '
                                      'file.')
  if _TMP_MARKER in directory.name:
    raise _errors.IncompleteCheckpointError(
        f'{directory}: this is the temporary directory of a save that never committed '
        '(its name contains ".orbax-checkpoint-tmp"); restore the committed checkpoint instead.')


class _Want(NamedTuple):
  """What one result leaf must become."""
  kind: str  # 'jax', 'numpy', 'scalar', or 'stored'
  dtype: np.dtype | None = None
  shape: tuple[int, ...] | None = None
  sharding: jax.sharding.Sharding | None = None
  strict: bool = True
  key_impl: str | None = None

  @classmethod
  def of(cls, leaf: _tree.Leaf, arg: RestoreArgs | None, strict: bool) -> _Want:
    target = leaf.value
    if arg is not None:
      if isinstance(arg, ArrayRestoreArgs) or arg.restore_type is jax.Array:
        sharding = arg.resolved_sharding() if isinstance(arg, ArrayRestoreArgs) else None
        shape = arg.global_shape if isinstance(arg, ArrayRestoreArgs) else None
        return cls('jax', normalize_dtype(arg.dtype), tuple(shape) if shape else None, sharding,
                   getattr(arg, 'strict', True))
      kind = 'numpy' if arg.restore_type is np.ndarray else 'stored'
      return cls(kind, normalize_dtype(arg.dtype))
    if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
      if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
        # Keys are stored as their uint32 key data, which has extra trailing dimensions.
        data = jax.eval_shape(jax.random.key_data, target)
        return cls('jax', np.dtype(data.dtype), tuple(data.shape),
                   getattr(target, 'sharding', None), strict, _key_impl_name(target.dtype))
      if isinstance(target, jax.ShapeDtypeStruct) and target.sharding is None:
        # As in Orbax: an abstract leaf that names no devices restores to host memory.
        return cls('numpy', np.dtype(target.dtype), tuple(target.shape), strict=strict)
      return cls('jax', np.dtype(target.dtype), tuple(target.shape), target.sharding, strict)
    if isinstance(target, np.ndarray):
      return cls('numpy', target.dtype, target.shape, strict=strict)
    if isinstance(target, (bool, int, float)):
      return cls('scalar')  # A Python number, of the type it was saved as.
    return cls('stored')


_STORED = _Want('stored')


def _key_impl_name(key_dtype: Any) -> str:
  """The registered name of a typed key dtype's PRNG implementation (``threefry2x32``)."""
  return key_dtype._impl.name  # jax exposes no public accessor that also takes abstract keys.


class _Reader:
  """Reads leaves of one checkpoint, batching array reads and side files."""

  def __init__(self, directory: pathlib.Path, meta: _metadata.TreeMetadata):
    self.directory = directory
    self.meta = meta
    self._strings: dict | None = None
    self._shardings: dict | None = None
    self._ext: dict | None = None

  def read_many(self, leaves: list[_metadata.LeafMetadata]) -> dict[_tree.Path, Any]:
    """Raw values: numpy arrays for stored arrays/scalars, str for strings, None else."""
    arrays = [leaf for leaf in leaves if _is_stored_array(leaf)]
    data = _arrays.read_arrays(
        self.directory, [leaf.name for leaf in arrays], use_ocdbt=self.meta.use_ocdbt,
        use_zarr3=self.meta.use_zarr3,
        missing_chunks_are_errors=self.meta.store_array_data_equal_to_fill_value,
        ndim_hints=[_rank_hint(leaf) for leaf in arrays])
    out: dict[_tree.Path, Any] = {leaf.path: value for leaf, value in zip(arrays, data)}
    for leaf in leaves:
      if leaf.value_type == _metadata.STRING:
        out[leaf.path] = self.string(leaf)
      elif leaf.path not in out:
        out[leaf.path] = _empty_value(leaf)
    return out

  def string(self, leaf: _metadata.LeafMetadata) -> str:
    if self._strings is None:
      path = self.directory / _metadata.STRINGS_FILE
      if not _storage.is_file(path):
        raise _errors.NotACheckpointError(
            f'{self.directory}: leaf {_tree.path_str(leaf.path)!r} is a string but '
            f'{_metadata.STRINGS_FILE} is missing.')
      self._strings = json.loads(_storage.read_text(path))
    return _get_by_slash(self._strings, leaf.name)

  def saved_sharding(self, leaf: _metadata.LeafMetadata) -> jax.sharding.Sharding | None:
    if self._shardings is None:
      path = self.directory / _metadata.SHARDING_FILE
      self._shardings = json.loads(_storage.read_text(path)) if _storage.is_file(path) else {}
    text = self._shardings.get(_metadata.sharding_key(leaf.name))
    return _metadata.sharding_from_json(text) if text else None

  def key_impl(self, leaf: _metadata.LeafMetadata) -> str | None:
    if self._ext is None:
      self._ext = {}
      folder = self.directory / _metadata.ARRAY_METADATAS_DIR
      if _storage.is_dir(folder):
        for name in _storage.list_names(folder):
          for entry in _metadata.parse_array_metadatas(_storage.read_text(folder / name)):
            if entry.ext_metadata:
              self._ext[entry.param_name] = entry.ext_metadata
    return (self._ext.get(leaf.name) or {}).get('random_key_impl')

  def as_stored_type(self, leaf: _metadata.LeafMetadata, value: Any) -> Any:
    if leaf.value_type == _metadata.SCALAR and isinstance(value, np.ndarray):
      return value.item()
    if leaf.value_type == _metadata.NP_ARRAY and isinstance(value, np.ndarray):
      return _writable(value)
    return value


def _rank_hint(leaf: _metadata.LeafMetadata) -> int | None:
  """The rank of a leaf worth reading its chunk speculatively: only small arrays, since large
  ones are read straight from their data files."""
  if leaf.value_type == _metadata.SCALAR:
    return 0
  if leaf.write_shape is None or math.prod(leaf.write_shape) * 16 >= (
      _arrays.DIRECT_READ_MIN_BYTES):
    return None
  return len(leaf.write_shape)


def _empty_value(leaf: _metadata.LeafMetadata) -> Any:
  factory = _metadata.EMPTY_TYPES.get(leaf.value_type)
  return factory() if factory is not None else None


def _writable(array: np.ndarray) -> np.ndarray:
  return array if array.flags.writeable else array.copy()


def _materialize(items: list[tuple[_tree.Path, _Want, _metadata.LeafMetadata, Any]],
                 reader: _Reader) -> list[Any]:
  """Converts read values to what each result leaf wants, with one batched device_put."""
  out: list[Any] = [None] * len(items)
  pending: list[tuple[int, np.ndarray, jax.sharding.Sharding | None, str | None]] = []
  for slot, (path, want, stored, value) in enumerate(items):
    _convert(slot, path, want, stored, value, reader, out, pending)
  _put_on_devices(out, pending)
  return out


def _convert(slot: int, path: _tree.Path, want: _Want, stored: _metadata.LeafMetadata,
             value: Any, reader: _Reader, out: list[Any], pending: list) -> None:
  kind = want.kind
  if kind == 'stored':
    if stored.value_type == _metadata.JAX_ARRAY:
      kind = 'jax'
    else:
      out[slot] = reader.as_stored_type(stored, value)
      if want.dtype is not None and isinstance(out[slot], np.ndarray):
        out[slot] = out[slot].astype(want.dtype)
      return
  if not isinstance(value, np.ndarray):
    if isinstance(value, (str, type(None))) or not np.isscalar(value):
      raise _errors.StructureMismatchError(
          f'Leaf {_tree.path_str(path)!r}: the checkpoint holds a {stored.value_type} but the '
          f'target expects an array.')
    value = np.asarray(value)
  if want.shape is not None and tuple(value.shape) != tuple(want.shape):
    if want.strict:
      raise _errors.StructureMismatchError(
          f'Leaf {_tree.path_str(path)!r}: the checkpoint holds shape {tuple(value.shape)} but '
          f'the target expects {tuple(want.shape)}; pass strict=False to pad or truncate.')
    value = _fit(value, want.shape)
  if want.dtype is not None and value.dtype != want.dtype:
    value = value.astype(want.dtype)
  if kind == 'numpy':
    out[slot] = _writable(value)
    return
  if kind == 'scalar':
    if value.size != 1:
      raise _errors.StructureMismatchError(
          f'Leaf {_tree.path_str(path)!r}: the target is a Python scalar but the checkpoint '
          f'holds an array of shape {tuple(value.shape)}.')
    out[slot] = value.reshape(()).item()
    return
  sharding = want.sharding
  key_impl = want.key_impl or (reader.key_impl(stored) if want.kind == 'stored' else None)
  if sharding is None:
    sharding = reader.saved_sharding(stored) if stored.value_type == _metadata.JAX_ARRAY else None
    if sharding is None and want.kind == 'stored':
      out[slot] = _writable(value)  # Saved devices are not here: numpy, as documented.
      return
    if sharding is not None and key_impl is not None:
      sharding = None  # The saved sharding describes the key data's trailing dims too.
  pending.append((slot, value, sharding, key_impl))


def _fit(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Pads with zeros or truncates ``value`` to ``shape`` (``strict=False``)."""
  if len(shape) != value.ndim:
    raise _errors.StructureMismatchError(
        f'Cannot pad or truncate rank {value.ndim} to rank {len(shape)}.')
  out = np.zeros(shape, dtype=value.dtype)
  region = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, shape))
  out[region] = value[region]
  return out


def _put_on_devices(out: list[Any], pending: list) -> None:
  """One ``device_put`` per distinct sharding (much cheaper than one per leaf)."""
  if not pending:
    return
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  groups: dict[jax.sharding.Sharding, list] = {}
  for entry in pending:
    groups.setdefault(entry[2] or default, []).append(entry)
  for sharding, entries in groups.items():
    arrays = jax.device_put([value for _, value, _, _ in entries], sharding)
    for (slot, _, _, key_impl), array in zip(entries, arrays):
      out[slot] = jax.random.wrap_key_data(array, impl=key_impl) if key_impl else array
