"""The save half of PyTree checkpoints: from a tree to files.

``prepare`` runs on the caller's thread: it flattens the tree and checks every leaf.
``Prepared.write`` does the I/O (on a background thread for async saves): the arrays go to
``_arrays.start_write`` in one batched transaction, and the JSON side files are written while it
commits.

Arrays on accelerators reach the host through ``_staging.HostCopies``: an async save copies
them all before ``prepare`` returns (the caller may donate or delete them the moment it has
control back); a synchronous save copies them batch by batch, each batch's copies started while
the one before is written, so host memory holds at most ``device_host_budget`` of them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
from typing import Any, NamedTuple, cast

import jax
import numpy as np

from flaxckpt import (_arrays, _checksums, _errors, _metadata, _staging, _storage, _tree,
                      _type_handlers, _zarr)
from flaxckpt._args import PyTreeSave, StandardSave
from flaxckpt._types import SaveArgs, is_key_array, key_impl_name, normalize_dtype

_DEFAULT_SAVE_ARGS = SaveArgs()
_INT64 = np.iinfo(np.int64)


class Prepared(NamedTuple):
  """Everything a save still has to write once the caller's data is on the host."""
  directory: pathlib.Path
  arrays: list[_arrays.ArrayWrite]
  strings: dict[str, Any]  # Nested as _strings.json stores them.
  layout: _Layout
  tree_metadata: _metadata.TreeMetadata  # Its leaves are layout.entries.
  options: _arrays.StorageOptions
  # What the serialize calls of custom TypeHandlers returned: waited for after our own writes
  # (a handler delegating to a built-in one writes into the same OCDBT database).
  handler_futures: tuple[Any, ...] = ()
  on_device: bool = False  # Some blocks of ``arrays`` are still jax.Arrays on accelerators.

  def write(self) -> None:
    with _storage.naming_url(self.directory, 'writing the arrays'):
      self._write()

  def _write(self) -> None:
    limit = self.options.max_bytes_in_flight
    budget = self.options.device_host_budget
    if self.on_device and budget is not None:  # One batch written while the next is copied.
      half = _staging.batch_limit(budget)
      limit = half if limit is None else min(limit, half)
    batches = _arrays.in_batches(self.arrays, _staging.nbytes, limit)
    copies = _staging.HostCopies(batches[0]) if self.on_device else None
    sums = _checksums.Written({}, {})
    for i in range(len(batches) - 1):  # Each commits before the next is staged; the last merges.
      batch = copies.take() if copies is not None else batches[i]
      if copies is not None:
        copies = _staging.HostCopies(batches[i + 1])
      pending = _arrays.start_write(self.directory, batch,
                                    self.options._replace(merge_into_root=False))
      sums.update(pending.checksums())
      pending.wait()
      del batch  # Its host copies go before the next batch's arrive.
    last = copies.take() if copies is not None else batches[-1]
    pending = _arrays.start_write(self.directory, last, self.options)
    try:
      self._write_side_files(pending, sums)
    except BaseException:
      # Let tensorstore finish before the caller deletes the directory under it.
      with contextlib.suppress(Exception):
        pending.wait()
      raise
    pending.wait()
    _type_handlers.wait_for(self.handler_futures)

  def _write_side_files(self, pending: _arrays.PendingWrite,
                        sums: _checksums.Written) -> None:
    """Writes the JSON files; ``sums`` holds the checksums of arrays written before
    ``pending``'s."""
    primary = self.options.writes_metadata  # Only one process of a multi-process save.
    files: dict[str, int] = {}  # crc32c of the JSON files this process writes.

    def write_checked(name: str, text: str) -> None:
      data = text.encode('utf-8')
      _storage.write_bytes(self.directory / name, data)
      files[name] = _checksums.of_bytes(data)

    if self.strings and primary:
      write_checked(_metadata.STRINGS_FILE,
                    json.dumps(self.strings, ensure_ascii=False, separators=(',', ':')))
    layout = self.layout
    if layout.shardings and primary:
      write_checked(_metadata.SHARDING_FILE, layout.sharding_text)
    if layout.array_metadatas:
      _storage.make_dirs(self.directory / _metadata.ARRAY_METADATAS_DIR)
      write_checked(f'{_metadata.ARRAY_METADATAS_DIR}/process_{self.options.process_index}',
                    layout.array_metadatas_text)
    sums.update(pending.checksums())
    pending.advance()  # Arrays committed; the merge runs while _METADATA is encoded.
    if primary:
      write_checked(_metadata.METADATA_FILE,
                    _metadata.tree_metadata_json(self.tree_metadata, layout.entries_text))
    if sums.layouts or files:
      _storage.make_dirs(self.directory / _checksums.DIR)
      _storage.write_text(self.directory / _checksums.file_name(self.options.process_index),
                          _checksums.to_json(sums, files))


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


def prepare(directory: pathlib.Path, args: PyTreeSave | StandardSave,
            options: _arrays.StorageOptions, copy: bool, numpy_scalars_as_arrays: bool
            ) -> Prepared:
  """Flattens and checks the tree and copies what must be copied; returns what to write.

  With ``copy`` every host array is snapshotted, so the caller may change its data afterwards
  (async saves); otherwise host views are kept. A jax.Array is never copied on the host: its
  data cannot change, and while a host view of it is alive jax neither frees nor reuses its
  buffer (a donating computation gets a new one, ``delete`` waits for the view).
  """
  try:
    json.dumps(args.custom_metadata)
  except (TypeError, ValueError) as e:
    raise TypeError(f'custom_metadata for {directory} must be JSON-serializable: {e}') from e
  leaves, treedef = _tree.flatten(args.item)
  save_args = _save_args_by_path(args.save_args)
  target_file_size = getattr(args, 'ocdbt_target_data_file_size', None)
  if target_file_size is not None:
    if isinstance(target_file_size, bool) or not isinstance(target_file_size, int) or (
        target_file_size < 0):
      raise ValueError(f'ocdbt_target_data_file_size for {directory} must be an int >= 0 '
                       f'(0: no limit), got {target_file_size!r}.')
    options = options._replace(target_data_file_size=target_file_size)
  max_chunk = target_file_size or _zarr.MAX_CHUNK_BYTES
  # Leaves sharing shape, dtype, sharding and SaveArgs share a plan (SaveArgs by identity: they
  # stay alive for the whole call).
  plans: dict[tuple[Any, ...], _ArrayPlan] = {}
  leaf_plans: list[_ArrayPlan | None] = []
  # Looks up leaves' TypeHandlers only once something was registered.
  custom = _type_handlers.custom_save_handler if _type_handlers.customized() else None
  for leaf in leaves:  # Plan every array and start its device-to-host copy before any waits.
    value = leaf.value
    if not isinstance(value, jax.Array) or (custom is not None and custom(type(value))):
      leaf_plans.append(None)
      continue
    arg = save_args.get(leaf.path, _DEFAULT_SAVE_ARGS) if save_args else _DEFAULT_SAVE_ARGS
    signature = (value.shape, value.dtype, value.sharding, id(arg))
    plan = plans.get(signature)
    if plan is None:
      plan = plans[signature] = _plan_array(value, arg, max_chunk, options)
    leaf_plans.append(plan)
  tree_meta = _metadata.TreeMetadata(
      leaves=(), use_ocdbt=options.use_ocdbt, use_zarr3=options.use_zarr3,
      store_array_data_equal_to_fill_value=True, custom_metadata=args.custom_metadata)
  layout_key = None
  if None not in leaf_plans:  # Only jax.Arrays: the metadata follows from structure and plans.
    layout_key = (treedef, tuple(leaf_plans))
    layout = _LAYOUTS.get(layout_key)
    if layout is not None:
      plans_here = cast(list[_ArrayPlan], leaf_plans)  # None is not among them.
      arrays = [_jax_array_write(meta.param_name, leaf.value, plan)
                for leaf, plan, meta in zip(leaves, plans_here, layout.array_metadatas)]
      return _staged(Prepared(directory, arrays, {}, layout,
                              tree_meta._replace(leaves=layout.entries), options), plans, copy)
  seen: dict[str, _tree.Path] = {}
  arrays, strings, shardings, array_metas, entries = [], {}, {}, [], []
  requests: dict[int, _HandlerRequest] = {}
  for leaf, plan in zip(leaves, leaf_plans):
    name = leaf.name
    if name in seen:
      raise _errors.NameCollisionError(
          f'Tree paths {_tree.path_str(seen[name])!r} and {_tree.path_str(leaf.path)!r} both '
          f'map to the stored name {name!r} (names join keys with "."); rename one key.')
    seen[name] = leaf.path
    value = leaf.value
    write_shape = None
    handler = custom(type(value)) if custom is not None else None
    if handler is not None:  # A leaf whose registered TypeHandler writes it.
      value_type = handler.typestr()
      request = requests.setdefault(id(handler), _HandlerRequest(handler, [], [], []))
      request.values.append(value)
      request.infos.append(_type_handlers.ParamInfo(
          name=name, parent_dir=directory, is_ocdbt_checkpoint=options.use_ocdbt,
          use_zarr3=options.use_zarr3, use_compression=options.use_compression,
          ocdbt_target_data_file_size=getattr(args, 'ocdbt_target_data_file_size', None),
          value_typestr=value_type))
      request.args.append(save_args.get(leaf.path, _DEFAULT_SAVE_ARGS) if save_args
                          else _DEFAULT_SAVE_ARGS)
    elif plan is not None:  # A jax.Array, the common case.
      value_type = _metadata.JAX_ARRAY
      write_shape = plan.write_shape
      arrays.append(_jax_array_write(name, value, plan))
      if plan.sharding_json is not None:
        shardings[_metadata.sharding_key(name)] = plan.sharding_json
      array_metas.append(_metadata.ArrayMetadata(
          name, write_shape, plan.chunk_shape,
          None if plan.key_impl is None else {'random_key_impl': plan.key_impl}))
    elif _tree.is_empty_node(value):
      value_type = _empty_type(value)
    elif isinstance(value, str):
      value_type = _metadata.STRING
      strings[name] = value
    else:
      arg = save_args.get(leaf.path, _DEFAULT_SAVE_ARGS) if save_args else _DEFAULT_SAVE_ARGS
      value_type, host = _host_value(leaf, copy, numpy_scalars_as_arrays)
      if options.writes_metadata:  # Every process has host values; one writes them.
        arrays.append(_host_array_write(name, host, arg, max_chunk, options))
    entries.append(_metadata.LeafMetadata(leaf.path, leaf.key_types, value_type,
                                          skip_deserialize=value_type in
                                          _metadata.EMPTY_TYPES, write_shape=write_shape))
  layout = _Layout(shardings, array_metas, tuple(entries))
  if layout_key is not None:
    if len(_LAYOUTS) >= _LAYOUTS_CACHE_SIZE:
      _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[layout_key] = layout
  return _staged(Prepared(directory, arrays, _nest_by_slash(strings), layout,
                          tree_meta._replace(leaves=layout.entries), options,
                          _serialize(list(requests.values()))), plans, copy)


def _staged(prepared: Prepared, plans: dict[Any, _ArrayPlan], copy: bool) -> Prepared:
  """Marks a save with arrays on accelerators; with ``copy`` (async) copies them to host now."""
  if not any(plan.needs_host_copy for plan in plans.values()):
    return prepared
  if copy:
    return prepared._replace(arrays=_staging.HostCopies(prepared.arrays).take())
  return prepared._replace(on_device=True)


class _HandlerRequest(NamedTuple):
  """The leaves one custom TypeHandler saves, in tree order."""
  handler: _type_handlers.TypeHandler
  values: list[Any]
  infos: list[_type_handlers.ParamInfo]
  args: list[SaveArgs]


def _serialize(requests: list[_HandlerRequest]) -> tuple[Any, ...]:
  """Runs each handler's ``serialize`` (which copies the values before returning, as Orbax
  asks of it); returns the futures that finish the writes."""
  if not requests:
    return ()
  context = _type_handlers.shared_ts_context(requests[0].infos[0].is_ocdbt_checkpoint)
  futures: list[Any] = []
  for request in requests:
    for info in request.infos:
      info.ts_context = context
    futures.extend(_type_handlers.run_sync(
        request.handler.serialize(request.values, request.infos, request.args)) or ())
  return tuple(futures)


class _Layout:
  """The metadata of a tree's leaves and its JSON texts, encoded once per layout (for a tree of
  jax.Arrays it depends only on structure and plans, so repeated saves reuse it)."""

  def __init__(self, shardings: dict[str, str], array_metadatas: list[_metadata.ArrayMetadata],
               entries: tuple[_metadata.LeafMetadata, ...]):
    self.shardings = shardings
    self.array_metadatas = array_metadatas
    self.entries = entries

  @functools.cached_property
  def sharding_text(self) -> str:
    return json.dumps(self.shardings, separators=(',', ':'))

  @functools.cached_property
  def array_metadatas_text(self) -> str:
    return _metadata.array_metadatas_json(self.array_metadatas)

  @functools.cached_property
  def entries_text(self) -> str:
    return _metadata.leaf_entries_json(self.entries)


# Layouts of recently saved trees: a training run saves the same structure again and again,
# and building the metadata of thousands of leaves costs more than copying their data.
_LAYOUTS: dict[tuple[Any, ...], _Layout] = {}
_LAYOUTS_CACHE_SIZE = 8


def _host_value(leaf: _tree.Leaf, copy: bool, numpy_scalars_as_arrays: bool
                ) -> tuple[str, np.ndarray]:
  value = leaf.value
  if isinstance(value, np.ndarray):
    if value.dtype.kind == 'O':
      raise _errors.UnsupportedLeafError(
          f'Leaf {_tree.path_str(leaf.path)!r}: numpy arrays of dtype object cannot be saved.')
    return _metadata.NP_ARRAY, np.array(value, copy=True) if copy else value
  if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
    kind = _metadata.NP_ARRAY if numpy_scalars_as_arrays else _metadata.SCALAR
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


class _ArrayPlan(NamedTuple):
  """How to store the jax.Arrays of one (shape, dtype, sharding, SaveArgs) signature."""
  dtype: np.dtype  # As stored (after SaveArgs.dtype; key data for PRNG keys).
  key_impl: str | None  # The PRNG implementation of typed keys.
  one_device: bool
  global_shape: tuple[int, ...]
  write_shape: tuple[int, ...]
  chunk_shape: tuple[int, ...]
  sharding_json: str | None
  needs_host_copy: bool  # Off host (see _staging); numpy reads CPU arrays in place.


def _plan_array(value: jax.Array, arg: SaveArgs, max_chunk: int,
                options: _arrays.StorageOptions) -> _ArrayPlan:
  key_impl = None
  if is_key_array(value):
    key_impl = key_impl_name(value.dtype)
    value = jax.random.key_data(value)
  dtype = normalize_dtype(arg.dtype) or np.dtype(value.dtype)
  sharding = value.sharding
  one_device = len(sharding.device_set) == 1
  write_shape = value.shape if one_device else tuple(sharding.shard_shape(value.shape))
  chunk_shape = _zarr.choose_chunk_shape(
      write_shape, value.shape, dtype.itemsize, _chunk_limit(arg, max_chunk, options))
  needs_host_copy = _staging.off_host(sharding)
  return _ArrayPlan(dtype, key_impl, one_device, value.shape, write_shape, chunk_shape,
                    _metadata.sharding_to_json(sharding), needs_host_copy)


def _jax_array_write(name: str, value: jax.Array, plan: _ArrayPlan) -> _arrays.ArrayWrite:
  """The array's blocks: host arrays, or for arrays off host the device arrays themselves (see
  ``_staging.HostCopies``)."""
  if plan.key_impl is None and plan.one_device and not plan.needs_host_copy:  # Kept short.
    array = _staging.host_array(value, plan.dtype)
    return _arrays.ArrayWrite(name, plan.global_shape, plan.dtype, plan.chunk_shape,
                              ((_ORIGINS[array.ndim], array),))
  if plan.key_impl is not None:
    value = jax.random.key_data(value)
  if plan.one_device:
    blocks = [(_ORIGINS[len(plan.global_shape)], value)]
  else:
    blocks = [(tuple(s.start or 0 for s in shard.index), shard.data)
              for shard in value.addressable_shards if shard.replica_id == 0]
  if plan.needs_host_copy:
    return _arrays.ArrayWrite(name, plan.global_shape, plan.dtype, plan.chunk_shape,
                              tuple(blocks))
  return _arrays.ArrayWrite(name, plan.global_shape, plan.dtype, plan.chunk_shape, tuple(
      (origin, _staging.host_array(data, plan.dtype)) for origin, data in blocks))


_ORIGINS = [(0,) * ndim for ndim in range(65)]


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


def _save_args_by_path(save_args: Any) -> dict[_tree.Path, SaveArgs]:
  if save_args is None:
    return {}
  pairs, _ = jax.tree_util.tree_flatten_with_path(
      save_args, is_leaf=lambda x: isinstance(x, SaveArgs))
  return {leaf.path: leaf.value for leaf in _tree.leaves_from_pairs(pairs)
          if isinstance(leaf.value, SaveArgs)}
