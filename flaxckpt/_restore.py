"""The restore half of PyTree checkpoints: from files to the tree the caller asked for.

Read ``_METADATA``; decide for every result leaf where its value comes from (the checkpoint, a
transform, or the target itself) and what it must become (``_Want``); read every needed array in
one batch; convert, placing all jax arrays with one ``device_put`` per sharding. Leaves bound for
accelerators are read and placed in batches instead (see ``device_host_budget``), so host memory
never holds much more than the budget of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import pathlib
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from flaxckpt import (_aggregate, _arrays, _checksums, _errors, _metadata, _safe_json, _staging,
                      _storage, _transforms, _tree, _type_handlers)
from flaxckpt._args import PyTreeRestore
from flaxckpt._types import (ArrayRestoreArgs, RestoreArgs, as_jax_sharding, key_impl_name,
                             normalize_dtype)

try:  # See _device_put_all.
  from jax._src.interpreters.pxla import shard_args as _shard_args
  from jax._src.lib import xla_client
  _REUSE_INPUT = xla_client.ArrayCopySemantics.REUSE_INPUT
except (ImportError, AttributeError):
  _shard_args = None

_DEVICE_HOST_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    'flaxckpt_restore_device_host_budget', default=_arrays.DEFAULT_DEVICE_HOST_BUDGET)


@contextlib.contextmanager
def device_host_budget(budget: int | None) -> Iterator[None]:
  """Restores inside read and place the leaves bound for accelerators in batches of half of
  ``budget`` bytes, one placed while the next is read (None: all at once)."""
  token = _DEVICE_HOST_BUDGET.set(budget)
  try:
    yield
  finally:
    _DEVICE_HOST_BUDGET.reset(token)


def restore(directory: pathlib.Path, args: PyTreeRestore) -> Any:
  """Restores the tree at ``directory`` as ``args`` asks (see ``PyTreeRestore``)."""
  reader = open_reader(directory, args.verify_checksums)
  meta = reader.meta
  custom = _type_handlers.customized()  # Else no leaf can need a TypeHandler.
  if args.item is None and args.restore_args is None:
    handled = _handled_leaves(reader, [(leaf.path, leaf, None, None, None)
                                       for leaf in meta.leaves]) if custom else {}
    plain = [leaf for leaf in meta.leaves if leaf.path not in handled]
    values = reader.read_many(plain)
    restored = dict(zip([leaf.path for leaf in plain], _materialize(
        [(leaf.path, _STORED, leaf, values[leaf.path]) for leaf in plain], reader)))
    restored.update(_deserialize(handled))
    return _tree.build([(leaf.path, leaf.key_types, restored[leaf.path])
                        for leaf in meta.leaves])
  if args.item is not None:
    target_leaves, treedef = _tree.flatten(args.item)
  else:
    target_leaves, treedef = _flatten_restore_args(args.restore_args)
  restore_args = _restore_args_by_path(args.restore_args)
  wanted = [leaf for leaf in target_leaves if not _tree.is_empty_node(leaf.value)]
  sources = _transforms.resolve([leaf.path for leaf in wanted],
                                [leaf.path for leaf in meta.leaves], args.transforms,
                                args.transforms_default_to_original)
  by_path = {leaf.path: leaf for leaf in meta.leaves}
  wants = [_Want.of(leaf, restore_args.get(leaf.path), args.strict and args.item is not None)
           for leaf in wanted]
  converted: dict[_tree.Path, Any] = {}
  placing: list[Any] = []
  for batch in _batches(wants, _DEVICE_HOST_BUDGET.get()):
    part = _restore_part(reader, [wanted[i] for i in batch], [wants[i] for i in batch],
                         [sources[i] for i in batch], by_path, restore_args, custom)
    _staging.wait_placed(placing)  # The batch before is on its devices: its host data is gone.
    placing = list(part.values())
    converted.update(part)
  out = [converted[leaf.path] if leaf.path in converted else leaf.value
         for leaf in target_leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def _restore_part(reader: _Reader, wanted: list[_tree.Leaf], wants: list[_Want],
                  sources: list[_transforms.Source],
                  by_path: dict[_tree.Path, _metadata.LeafMetadata],
                  restore_args: dict[_tree.Path, RestoreArgs], custom: bool
                  ) -> dict[_tree.Path, Any]:
  """The values of the result leaves ``wanted`` (with what each must become and where it comes
  from) that the checkpoint provides, by result path."""
  handled = _handled_leaves(reader, [
      (leaf.path, by_path[s.checkpoint_path], restore_args.get(leaf.path), leaf.value,
       s.value_fn) for leaf, s in zip(wanted, sources) if s.checkpoint_path is not None
  ]) if custom else {}
  regions = {source.checkpoint_path: region for want, source in zip(wants, sources)
             if source.checkpoint_path is not None and source.value_fn is None
             and (region := _local_region(want)) is not None}
  values = reader.read_many([by_path[s.checkpoint_path] for leaf, s in zip(wanted, sources)
                             if s.checkpoint_path is not None and leaf.path not in handled],
                            regions)
  from_checkpoint = {}
  for leaf, want, source in zip(wanted, wants, sources):
    if source.checkpoint_path is None or leaf.path in handled:
      continue
    stored = by_path[source.checkpoint_path]
    value = values[source.checkpoint_path]
    if source.value_fn is not None:
      value = source.value_fn(reader.as_stored_type(stored, value))
    from_checkpoint[leaf.path] = (leaf.path, want, stored, value)
  converted: dict[_tree.Path, Any] = dict(zip(
      from_checkpoint, _materialize(list(from_checkpoint.values()), reader)))
  converted.update(_deserialize(handled))
  return converted


def _batches(wants: list[_Want], budget: int | None) -> list[list[int]]:
  """Indices of ``wants`` in batches that each hold at most half of ``budget`` bytes bound for
  accelerators (one batch of all when none is, or without a budget)."""
  everything = list(range(len(wants)))
  if budget is None or not any(_off_host(want) for want in wants):
    return [everything]
  return _arrays.in_batches(everything, lambda i: _off_host_nbytes(wants[i]),
                            _staging.batch_limit(budget))


def _off_host(want: _Want) -> bool:
  return want.kind == 'jax' and want.sharding is not None and _staging.off_host(want.sharding)


def _off_host_nbytes(want: _Want) -> int:
  if not _off_host(want) or want.shape is None or want.dtype is None:
    return 0
  return math.prod(want.shape) * want.dtype.itemsize


class _Handled(NamedTuple):
  """A result leaf that a custom TypeHandler reads."""
  handler: _type_handlers.TypeHandler
  info: _type_handlers.ParamInfo
  arg: RestoreArgs
  value_fn: Callable[[Any], Any] | None


def _handled_leaves(reader: _Reader, items: list[tuple[_tree.Path, _metadata.LeafMetadata,
                                                       RestoreArgs | None, Any, Any]]
                    ) -> dict[_tree.Path, _Handled]:
  """The result leaves (of ``(path, stored leaf, restore args, target, value_fn)``) that a
  registered custom handler reads: the one for ``restore_type`` when given, else the one whose
  typestr the leaf was saved with. As in Orbax, a leaf without restore args gets
  ``RestoreArgs()`` (``ArrayRestoreArgs`` from an abstract array target)."""
  handled = {}
  for path, stored, arg, target, value_fn in items:
    if stored.skip_deserialize:
      continue
    restore_type = arg.restore_type if arg is not None else None
    handler = _type_handlers.custom_restore_handler(
        stored.value_type if restore_type is None else restore_type)
    if handler is None:
      continue
    handled[path] = _Handled(handler, reader.param_info(stored),
                             arg if arg is not None else _default_restore_args(target),
                             value_fn)
  return handled


def _default_restore_args(target: Any) -> RestoreArgs:
  if target is not None and _is_abstract_array(target) and getattr(target, 'sharding', None):
    return ArrayRestoreArgs(sharding=as_jax_sharding(target.sharding),
                            global_shape=tuple(target.shape), dtype=target.dtype)
  return RestoreArgs()


def _deserialize(handled: dict[_tree.Path, _Handled]) -> dict[_tree.Path, Any]:
  """Runs each handler's ``deserialize`` once, on all its leaves."""
  if not handled:
    return {}
  by_handler: dict[int, list[_tree.Path]] = {}
  for path, entry in handled.items():
    by_handler.setdefault(id(entry.handler), []).append(path)
  out = {}
  for paths in by_handler.values():
    entries = [handled[path] for path in paths]
    values = list(_type_handlers.run_sync(entries[0].handler.deserialize(
        [e.info for e in entries], [e.arg for e in entries])))
    if len(values) != len(entries):
      raise ValueError(f'{type(entries[0].handler).__name__}.deserialize returned '
                       f'{len(values)} values for {len(entries)} leaves.')
    for path, entry, value in zip(paths, entries, values):
      out[path] = entry.value_fn(value) if entry.value_fn is not None else value
  return out


def handler_metadata(reader: _Reader) -> dict[_tree.Path, Any]:
  """What custom handlers' ``metadata`` says about the leaves saved with their typestr (none
  unless something was registered), by tree path."""
  if not _type_handlers.customized():
    return {}
  by_handler: dict[int, tuple[_type_handlers.TypeHandler, list[_metadata.LeafMetadata]]] = {}
  for leaf in reader.meta.leaves:
    handler = _type_handlers.custom_restore_handler(leaf.value_type)
    if handler is not None and not leaf.skip_deserialize:
      by_handler.setdefault(id(handler), (handler, []))[1].append(leaf)
  out: dict[_tree.Path, Any] = {}
  for handler, leaves in by_handler.values():
    try:
      values = _type_handlers.run_sync(handler.metadata([reader.param_info(leaf)
                                                         for leaf in leaves]))
    except NotImplementedError:
      continue
    out.update(zip([leaf.path for leaf in leaves], values))
  return out


def _get_by_slash(strings: dict[str, Any], name: str) -> Any:
  node: Any = strings
  for part in name.split('/'):
    node = node[part]
  return node


def _is_stored_array(leaf: _metadata.LeafMetadata) -> bool:
  """Whether ``leaf`` is an array (or scalar) in array storage, not in the ``checkpoint`` file."""
  return (leaf.value_type in (_metadata.JAX_ARRAY, _metadata.NP_ARRAY, _metadata.SCALAR)
          and not _aggregate.is_aggregated(leaf))


def _restore_args_by_path(restore_args: Any) -> dict[_tree.Path, RestoreArgs]:
  if restore_args is None:
    return {}
  leaves, _ = _flatten_restore_args(restore_args)
  return {leaf.path: leaf.value for leaf in leaves if isinstance(leaf.value, RestoreArgs)}


def _flatten_restore_args(tree: Any) -> tuple[list[_tree.Leaf], Any]:
  pairs, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, RestoreArgs) or _tree.is_empty_node(x))
  return _tree.leaves_from_pairs(pairs), treedef


def open_reader(directory: pathlib.Path, verify_checksums: bool = True) -> _Reader:
  """A reader of the committed checkpoint at ``directory``, its ``_METADATA`` read (and, with
  ``verify_checksums``, everything it reads checked against the checksums saved with it)."""
  recorded = _checksums.Recorded(directory) if verify_checksums else None
  return _Reader(directory, read_tree_metadata(directory, recorded), recorded)


def read_tree_metadata(directory: pathlib.Path, recorded: _checksums.Recorded | None = None
                       ) -> _metadata.TreeMetadata:
  """Reads ``_METADATA`` after checking that ``directory`` is a committed checkpoint (and the
  file against its checksum, with ``recorded``)."""
  check_committed(directory)
  _storage.check_tree(directory)  # No FIFO, device or link out of it is ever opened.
  path = directory / _metadata.METADATA_FILE
  if not _storage.is_file(path):
    if _storage.is_file(directory / _aggregate.FILE):  # Written by Orbax before 0.5.
      return _aggregate.tree_metadata(directory)
    raise _errors.NotACheckpointError(
        f'{directory}: not a PyTree checkpoint (expected a {_metadata.METADATA_FILE} file; found '
        f'{_storage.list_names(directory)[:10]}).')
  data = _storage.read_bytes(path)
  if recorded is not None:
    recorded.check_file(_metadata.METADATA_FILE, data)
  try:
    return _metadata.parse_tree_metadata(data.decode('utf-8'))
  except (_errors.UnsafeCheckpointError, _errors.LimitExceededError) as e:
    raise type(e)(f'{path}: {e}') from None
  except _DAMAGED as e:
    raise _errors.NotACheckpointError(
        f'{path}: unreadable checkpoint metadata ({type(e).__name__}: {e}).') from e


# What parsing a damaged JSON file can raise (UnicodeDecodeError and JSONDecodeError are
# ValueErrors; the others come from valid JSON of the wrong shape).
_DAMAGED = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def _json_object(text: str) -> dict:
  value = _safe_json.loads(text, 'JSON')
  if not isinstance(value, dict):
    raise TypeError(f'expected a JSON object, found {type(value).__name__}')
  return value


def read_side_file(path: pathlib.Path, parse: Callable[[str], Any] = _json_object,
                   recorded: _checksums.Recorded | None = None) -> Any:
  """``parse`` of the text of ``path`` (by default, the JSON object in it): a file beside a
  checkpoint's arrays, such as ``_strings.json``. A damaged one raises NotACheckpointError
  naming it (ChecksumError, when ``recorded`` holds its checksum)."""
  data = _storage.read_bytes(path)
  if recorded is not None:
    recorded.check_file(path.relative_to(recorded.directory).as_posix(), data)
  return parse_side_file(path, lambda: parse(data.decode('utf-8')))


def parse_side_file(path: pathlib.Path, parse: Callable[[], Any], what: str = 'the file') -> Any:
  """``parse()``, a failure becoming a NotACheckpointError that names ``path``."""
  try:
    return parse()
  except (_errors.UnsafeCheckpointError, _errors.LimitExceededError) as e:
    raise type(e)(f'{path}: {e}') from None
  except _DAMAGED as e:
    raise _errors.NotACheckpointError(
        f'{path}: {what} is damaged ({type(e).__name__}: {e}); the checkpoint cannot be '
        'restored as saved.') from e


def check_committed(directory: pathlib.Path) -> None:
  """Raises unless ``directory`` exists and is not a temporary (uncommitted) checkpoint."""
  if not _storage.exists(directory):
    raise FileNotFoundError(f'No checkpoint at {directory}: the path does not exist.')
  if not _storage.is_dir(directory):
    raise _errors.NotACheckpointError(f'{directory}: expected a checkpoint directory, found a '
                                      'file.')
  if _metadata.TMP_SUFFIX in directory.name:
    raise _errors.IncompleteCheckpointError(
        f'{directory}: this is the temporary directory of a save that never committed '
        '(its name contains ".orbax-checkpoint-tmp"); restore the committed checkpoint instead.')
  if (not _storage.renames_atomically(directory)
      and not _storage.exists(directory / _metadata.COMMIT_SUCCESS_FILE)):
    raise _errors.IncompleteCheckpointError(
        f'{directory}: no {_metadata.COMMIT_SUCCESS_FILE}; on this storage a checkpoint is '
        'committed only once that file exists, so this save never finished.')


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
      if arg.restore_type is np.ndarray:
        return cls('numpy', normalize_dtype(arg.dtype))
      if arg.restore_type in (bool, int, float):
        return cls('scalar')  # A Python number, even where an old release stored an array.
      return cls('stored', normalize_dtype(arg.dtype))
    if isinstance(target, np.ndarray):
      return cls('numpy', target.dtype, target.shape, strict=strict)
    if isinstance(target, jax.Array) or _is_abstract_array(target):
      sharding = as_jax_sharding(getattr(target, 'sharding', None))
      if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
        # Keys are stored as their uint32 key data, which has extra trailing dimensions.
        data = jax.eval_shape(jax.random.key_data,
                              jax.ShapeDtypeStruct(target.shape, target.dtype))
        return cls('jax', np.dtype(data.dtype), tuple(data.shape), sharding, strict,
                   key_impl_name(target.dtype))
      if sharding is None:
        # As in Orbax: an abstract leaf that names no devices restores to host memory.
        return cls('numpy', np.dtype(target.dtype), tuple(target.shape), strict=strict)
      return cls('jax', np.dtype(target.dtype), tuple(target.shape), sharding, strict)
    if isinstance(target, (bool, int, float)):
      return cls('scalar')  # A Python number, of the type it was saved as.
    return cls('stored')


_STORED = _Want('stored')


def _is_abstract_array(target: Any) -> bool:
  """Whether a target leaf describes an array: ``jax.ShapeDtypeStruct``, or any object with
  ``shape`` and ``dtype`` (and maybe ``sharding``), such as Orbax's ``ArrayMetadata``."""
  if isinstance(target, jax.ShapeDtypeStruct):
    return True
  return (hasattr(target, 'shape') and hasattr(target, 'dtype')
          and not isinstance(target, (np.ndarray, np.generic, type)))


class _Reader:
  """Reads leaves of one checkpoint, batching array reads and side files."""

  def __init__(self, directory: pathlib.Path, meta: _metadata.TreeMetadata,
               recorded: _checksums.Recorded | None):
    self.directory = directory
    self.meta = meta
    self._recorded = recorded  # None: nothing is checked.
    self._aggregate: Any = None  # The ``checkpoint`` file's tree, once a leaf needs it.
    self._strings: dict | None = None
    self._shardings: dict | None = None
    self._parsed_shardings: dict[str, jax.sharding.Sharding | None] = {}
    self._ext: dict | None = None
    self._ts_context: Any = None

  def param_info(self, leaf: _metadata.LeafMetadata) -> _type_handlers.ParamInfo:
    """What a TypeHandler reading ``leaf`` is told (Orbax's fields, as Orbax sets them)."""
    meta = self.meta
    use_ocdbt = meta.use_ocdbt
    if use_ocdbt is None:
      use_ocdbt = _storage.exists(self.directory / _arrays.OCDBT_MANIFEST)
    if self._ts_context is None:
      self._ts_context = _type_handlers.shared_ts_context(use_ocdbt)
    return _type_handlers.ParamInfo(
        name=leaf.name, parent_dir=self.directory, skip_deserialize=leaf.skip_deserialize,
        is_ocdbt_checkpoint=use_ocdbt, use_zarr3=meta.use_zarr3, ts_context=self._ts_context,
        value_typestr=leaf.value_type,
        raise_array_data_missing_error=meta.store_array_data_equal_to_fill_value)

  def read_many(self, leaves: list[_metadata.LeafMetadata],
                regions: dict[_tree.Path, _arrays.RegionRequest] | None = None
                ) -> dict[_tree.Path, Any]:
    """Raw values: numpy arrays for stored arrays/scalars (``_arrays.Region`` where
    ``regions`` asks for part of one), str for strings, None else."""
    for leaf in leaves:
      if leaf.value_type not in _metadata.VALUE_TYPES:
        raise _errors.NotACheckpointError(
            f'{self.directory / _metadata.METADATA_FILE}: leaf {_tree.path_str(leaf.path)!r} '
            f'has value type {leaf.value_type!r}, which flaxckpt cannot restore (the file is '
            'damaged, or the leaf was saved by a custom Orbax TypeHandler).')
    arrays = [leaf for leaf in leaves if _is_stored_array(leaf)]
    regions = regions or {}
    verifier = _checksums.NO_VERIFIER
    if self._recorded is not None and arrays:
      verifier = _checksums.Verifier(self.directory, self._recorded.chunks)
    try:
      data = _arrays.read_arrays(
          self.directory, [leaf.name for leaf in arrays], use_ocdbt=self.meta.use_ocdbt,
          use_zarr3=self.meta.use_zarr3,
          missing_chunks_are_errors=self.meta.store_array_data_equal_to_fill_value,
          ndim_hints=[_rank_hint(leaf) for leaf in arrays],
          regions=[regions.get(leaf.path) for leaf in arrays] if regions else None,
          verifier=verifier)
    except _errors.ChecksumError as e:
      path = next((leaf.path for leaf in arrays if leaf.name == e.name), None)
      if path is None:
        raise
      raise _errors.ChecksumError(f'Leaf {_tree.path_str(path)!r}: {e}', name=e.name) from None
    out: dict[_tree.Path, Any] = {leaf.path: value for leaf, value in zip(arrays, data)}
    for leaf in leaves:
      if leaf.value_type == _metadata.STRING:
        out[leaf.path] = self.string(leaf)
      elif _aggregate.is_aggregated(leaf):
        out[leaf.path] = self.aggregated(leaf)
      elif leaf.path not in out:
        out[leaf.path] = _empty_value(leaf)
    return out

  def aggregated(self, leaf: _metadata.LeafMetadata) -> Any:
    """The value of a leaf stored in the ``checkpoint`` file (Orbax before 0.11)."""
    if self._aggregate is None:
      self._aggregate = _aggregate.read(self.directory)
    return _aggregate.value_at(self._aggregate, leaf, self.directory)

  def string(self, leaf: _metadata.LeafMetadata) -> str:
    if _aggregate.is_aggregated(leaf):
      value = self.aggregated(leaf)
      if not isinstance(value, str):
        raise _errors.NotACheckpointError(
            f'{self.directory / _aggregate.FILE}: string leaf {_tree.path_str(leaf.path)!r} '
            f'holds a {type(value).__name__}; the file is damaged.')
      return value
    own_file = _storage.join_inside(self.directory, leaf.name, 'a string leaf\'s name') / (
        _metadata.STRINGS_FILE)
    if self.meta.use_ocdbt is False and _storage.is_file(own_file):  # Orbax 0.3: one per leaf.
      value = read_side_file(own_file).get(leaf.name)
      if not isinstance(value, str):
        raise _errors.NotACheckpointError(
            f'{own_file}: string leaf {_tree.path_str(leaf.path)!r} is not in it; the file is '
            'damaged.')
      return value
    if self._strings is None:
      path = self.directory / _metadata.STRINGS_FILE
      if not _storage.is_file(path):
        raise _errors.NotACheckpointError(
            f'{self.directory}: leaf {_tree.path_str(leaf.path)!r} is a string but '
            f'{_metadata.STRINGS_FILE} is missing.')
      self._strings = read_side_file(path, recorded=self._recorded)
    try:
      value = _get_by_slash(self._strings, leaf.name)
    except (KeyError, TypeError) as e:
      raise _errors.NotACheckpointError(
          f'{self.directory}: string leaf {_tree.path_str(leaf.path)!r} is missing from '
          f'{_metadata.STRINGS_FILE}.') from e
    if not isinstance(value, str):
      raise _errors.NotACheckpointError(
          f'{self.directory / _metadata.STRINGS_FILE}: string leaf '
          f'{_tree.path_str(leaf.path)!r} holds a {type(value).__name__}; the file is damaged.')
    return value

  def saved_sharding(self, leaf: _metadata.LeafMetadata) -> jax.sharding.Sharding | None:
    path = self.directory / _metadata.SHARDING_FILE
    if self._shardings is None:
      self._shardings = (read_side_file(path, recorded=self._recorded)
                         if _storage.is_file(path) else {})
    text = self._shardings.get(_metadata.sharding_key(leaf.name))
    if not text:
      return None
    if text not in self._parsed_shardings:  # Most leaves share one sharding: build it once.
      self._parsed_shardings[text] = parse_side_file(
          path, lambda: _metadata.sharding_from_json(text),
          f'the sharding of leaf {_tree.path_str(leaf.path)!r}')
    return self._parsed_shardings[text]

  def key_impl(self, leaf: _metadata.LeafMetadata) -> str | None:
    if self._ext is None:
      self._ext = {}
      folder = self.directory / _metadata.ARRAY_METADATAS_DIR
      if _storage.is_dir(folder):
        for name in _storage.list_names(folder):
          for entry in read_side_file(folder / name, _metadata.parse_array_metadatas,
                                      self._recorded):
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


_COPY_FIRST_MAX_BYTES = 1 << 20


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


def _local_region(want: _Want) -> _arrays.RegionRequest | None:
  if want.kind != 'jax' or want.key_impl is not None or not want.shape:
    return None
  return local_region(want.sharding, tuple(want.shape))


def local_region(sharding: jax.sharding.Sharding | None, shape: tuple[int, ...]
                 ) -> _arrays.RegionRequest | None:
  """The part of an array this process needs, when its sharding spans several processes."""
  if sharding is None or sharding.is_fully_addressable or not shape:
    return None
  indices = [index or () for index in sharding.addressable_devices_indices_map(shape).values()]
  box = tuple((min(index[d].indices(n)[0] for index in indices),
               max(index[d].indices(n)[1] for index in indices))
              for d, n in enumerate(shape))
  return _arrays.RegionRequest(shape, box)


def array_from_region(region: _arrays.Region, shape: tuple[int, ...],
                      sharding: jax.sharding.Sharding, dtype: np.dtype | None = None
                      ) -> jax.Array:
  """A global array from the part of it this process read."""
  data = region.data
  if dtype is not None and data.dtype != dtype:
    data = data.astype(dtype)
  starts = [start for start, _ in region.box]

  def local(index: tuple[slice, ...] | None) -> np.ndarray:
    return data[tuple(slice(lo - start, hi - start) for (lo, hi, _), start in
                      zip((s.indices(n) for s, n in zip(index or (), shape)), starts))]

  return jax.make_array_from_callback(shape, sharding, local)


def _convert(slot: int, path: _tree.Path, want: _Want, stored: _metadata.LeafMetadata,
             value: Any, reader: _Reader, out: list[Any], pending: list) -> None:
  if isinstance(value, _arrays.Region):  # Only asked for with a shape and sharding.
    assert want.shape is not None and want.sharding is not None
    out[slot] = array_from_region(value, tuple(want.shape), want.sharding, want.dtype)
    return
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
  # jax places writable host buffers about twice as fast as read-only ones (views of the bytes
  # read from storage); copying a small array first costs far less than the difference. A
  # large read-only one is copied by device_put itself: a copy first would be a second one.
  if value.nbytes < _COPY_FIRST_MAX_BYTES:
    value = _writable(value)
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
    arrays = _device_put_all([value for _, value, _, _ in entries], sharding)
    for (slot, _, _, key_impl), array in zip(entries, arrays):
      out[slot] = jax.random.wrap_key_data(array, impl=key_impl) if key_impl else array


def _device_put_all(values: list[np.ndarray], sharding: jax.sharding.Sharding) -> list[jax.Array]:
  """``jax.device_put(values, sharding, may_alias=True)``: the host buffers are ours alone, so
  jax may adopt them instead of copying.

  Single-device groups go straight to jax's batched ``shard_args``, which ``device_put`` calls
  once per array: that halves the cost of restoring thousands of small leaves. A jax without
  that internal, or whose version of it takes other arguments, gets the public call.
  """
  if _shard_args is not None and isinstance(sharding, jax.sharding.SingleDeviceSharding):
    count = len(values)
    try:
      return _shard_args([sharding] * count, [None] * count, [_REUSE_INPUT] * count, values)
    except TypeError:
      pass
  return jax.device_put(values, sharding, may_alias=True)
