"""Per-leaf type handlers: Orbax's ``TypeHandler`` interface, its global registry, and the
built-in handlers expressed as handler objects.

flaxckpt saves and restores its own leaf kinds (jax and numpy arrays, scalars, strings) natively,
without going through handler objects: that is what keeps a save of thousands of leaves cheap.
The handler objects exist so that code written for Orbax can register, look up and subclass them.
A leaf goes through a handler's ``serialize``/``deserialize`` only when that handler is not one of
the built-in ones (or a subclass that overrides the method): a user's own leaf class, or a
built-in type whose handler was replaced with ``register_type_handler(..., override=True)``.

Handler methods are coroutines, as in Orbax; ``run_sync`` runs them on an event loop of our own in
a worker thread, so a caller inside a running loop (Jupyter) is never touched.
"""

from __future__ import annotations

import abc
import asyncio
import copy
import dataclasses
import inspect
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from flaxckpt import _arrays, _errors, _multihost, _staging, _storage, _zarr
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs, SaveArgs, normalize_dtype

JAX_ARRAY = 'jax.Array'
NP_ARRAY = 'np.ndarray'
SCALAR = 'scalar'
STRING = 'string'
PLACEHOLDER_TYPESTR = 'placeholder'


# --- ParamInfo and the TypeHandler interface ---------------------------------------------------


class ParamInfo:
  """What a handler is told about one leaf (computed by the checkpoint handler, not the user).

  Attributes:
    name: the leaf's stored name (its tree keys joined with '.').
    parent_dir: the checkpoint directory all leaves of one save share.
    path: ``parent_dir / name``, where a handler writing files of its own should put them.
    keypath: the leaf's jax key path, when known.
    skip_deserialize: the leaf is not read (an empty node, a placeholder).
    is_ocdbt_checkpoint: whether the arrays of this checkpoint live in an OCDBT database.
    use_zarr3: whether arrays are zarr v3.
    use_compression: whether array chunks are compressed.
    ts_context: the tensorstore Context to open stores with.
    value_typestr: the typestr of the leaf's handler.
    raise_array_data_missing_error: restoring: a missing chunk is an error (else fill value).
    byte_limiter, device_host_byte_limiter, ocdbt_target_data_file_size, write_shape,
    enable_pinned_host_transfer, is_prioritized_key_fn: accepted as Orbax names them.
  """

  def __init__(self, *, name: str, parent_dir: Any, path: Any = None, keypath: Any = None,
               skip_deserialize: bool | None = None, byte_limiter: Any = None,
               device_host_byte_limiter: Any = None, is_ocdbt_checkpoint: bool | None = None,
               use_compression: bool | None = True, use_zarr3: bool | None = False,
               ocdbt_target_data_file_size: int | None = None, ts_context: Any = None,
               value_typestr: str | None = None, enable_pinned_host_transfer: bool = False,
               raise_array_data_missing_error: bool = True,
               write_shape: tuple[int, ...] | None = None, is_prioritized_key_fn: Any = None):
    self.name = name
    self.parent_dir = parent_dir
    self.path = path if path is not None else parent_dir / name
    self.keypath = keypath
    self.skip_deserialize = skip_deserialize
    self.byte_limiter = byte_limiter
    self.device_host_byte_limiter = device_host_byte_limiter
    self.is_ocdbt_checkpoint = is_ocdbt_checkpoint
    self.use_compression = use_compression
    self.use_zarr3 = use_zarr3
    self.ocdbt_target_data_file_size = ocdbt_target_data_file_size
    self.ts_context = ts_context
    self.value_typestr = value_typestr
    self.enable_pinned_host_transfer = enable_pinned_host_transfer
    self.raise_array_data_missing_error = raise_array_data_missing_error
    self.write_shape = write_shape
    self.is_prioritized_key_fn = is_prioritized_key_fn

  def replace(self, **changes: Any) -> ParamInfo:
    new = copy.copy(self)
    for key, value in changes.items():
      setattr(new, key, value)
    return new

  async def await_path_creation(self) -> None:
    """Orbax may hand out a directory still being created; ours always exists already."""

  def __repr__(self) -> str:
    return (f'ParamInfo(name={self.name!r}, parent_dir={self.parent_dir!r}, '
            f'is_ocdbt_checkpoint={self.is_ocdbt_checkpoint!r}, '
            f'value_typestr={self.value_typestr!r})')


class TypeHandler(abc.ABC):
  """Reads and writes the leaves of one type; subclass it to checkpoint a class of your own.

  The methods are coroutines and take all leaves of the handler's type in one call.
  ``serialize`` copies what it must from the values before it returns (the caller may change
  them afterwards) and returns futures (objects with ``result()``, or awaitables) that finish
  the writing; the checkpoint is committed only after every one of them is done.

  Example:
    >>> class PointHandler(ocp.type_handlers.TypeHandler):
    ...   def typestr(self): return 'Point'
    ...   async def serialize(self, values, infos, args=None): ...
    ...   async def deserialize(self, infos, args=None): ...
    ...   async def metadata(self, infos): ...
    >>> ocp.type_handlers.register_type_handler(Point, PointHandler())
  """

  @abc.abstractmethod
  def typestr(self) -> str:
    """The name recorded as the leaf's ``value_type`` in ``_METADATA``; unique per handler."""

  @abc.abstractmethod
  async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
    """Describes each stored leaf without reading its data."""

  @abc.abstractmethod
  async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                      args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
    """Starts writing ``values``; returns futures that complete the writes."""

  @abc.abstractmethod
  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
    """Reads the leaves ``infos`` describe."""

  def finalize(self, directory: pathlib.Path) -> None:  # noqa: B027 (optional hook)
    """Hook for work on the whole checkpoint after every write (none by default; Orbax does
    not call it either)."""


def check_input_arguments(*sequences: Sequence[Any]) -> None:
  """Raises ValueError unless the sequences are non-empty and of one length."""
  length = None
  for sequence in sequences:
    if length == 0:
      raise ValueError('Cannot pass TypeHandler input of length 0.')
    if length is None:
      length = len(sequence)
    elif len(sequence) != length:
      raise ValueError('Found input args with mismatched lengths.')


def get_ts_context(*, use_ocdbt: bool = True, file_io_concurrency_limit: int | None = None,
                   data_copy_concurrency_limit: int | None = None) -> Any:
  """A tensorstore ``Context`` configured as Orbax's (128 concurrent file operations; with
  ``use_ocdbt``, a 100 MB cache for OCDBT B-tree nodes)."""
  import tensorstore as ts
  spec: dict[str, Any] = {'file_io_concurrency': {
      'limit': 128 if file_io_concurrency_limit is None else file_io_concurrency_limit}}
  if use_ocdbt:
    spec['cache_pool#ocdbt'] = {'total_bytes_limit': 100_000_000}
  if data_copy_concurrency_limit is not None:
    spec['data_copy_concurrency'] = {'limit': data_copy_concurrency_limit}
  return ts.Context(spec)


def shared_ts_context(use_ocdbt: bool | None) -> Any:
  """The Context every handler of one save or restore shares (one cache, one thread pool)."""
  return get_ts_context(use_ocdbt=bool(use_ocdbt))


# --- running coroutines -------------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None
_loop_lock = threading.Lock()


def _private_loop() -> asyncio.AbstractEventLoop:
  """flaxckpt's event loop, running forever in a daemon thread started on first use."""
  global _loop, _loop_thread
  with _loop_lock:
    if _loop is None or _loop_thread is None or not _loop_thread.is_alive():
      _loop = asyncio.new_event_loop()
      _loop_thread = threading.Thread(target=_loop.run_forever, name='flaxckpt-type-handlers',
                                      daemon=True)
      _loop_thread.start()
    return _loop


def run_sync(awaitable: Any) -> Any:
  """The result of a coroutine (or other awaitable), run on flaxckpt's own event loop.

  Called from that loop's thread itself (a handler that restores inside ``deserialize``), it
  runs on a fresh loop in another thread instead of waiting for itself.
  """
  loop = _private_loop()
  if threading.current_thread() is _loop_thread:
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
      try:
        result.append(asyncio.run(_as_coroutine(awaitable)))
      except BaseException as e:  # Re-raised on the calling thread.
        errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if errors:
      raise errors[0]
    return result[0]
  return asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop).result()


async def _as_coroutine(awaitable: Any) -> Any:
  return await awaitable


def wait_for(futures: Sequence[Any]) -> None:
  """Waits for what a ``serialize`` returned: futures with ``result()`` and awaitables."""
  for future in futures or ():
    if isinstance(future, (list, tuple)):
      wait_for(future)
    elif inspect.isawaitable(future) and not hasattr(future, 'result'):
      run_sync(future)
    elif isinstance(future, asyncio.Future):
      run_sync(future)
    elif hasattr(future, 'result'):
      future.result()


# --- the registry -------------------------------------------------------------------------------


class _Registry:
  """Handlers by type (first match in registration order) and by typestr, as Orbax keeps them.

  ``version`` changes with every registration, so callers can cache lookups per type.
  """

  def __init__(self) -> None:
    self._by_type: list[tuple[Callable[[Any], bool], TypeHandler]] = []
    self._by_typestr: dict[str, TypeHandler] = {}
    self.version = 0
    self.customized = False  # Whether anything but the built-in defaults was registered.

  def add(self, ty: Any, handler: TypeHandler, func: Callable[[Any], bool] | None = None,
          override: bool = False) -> None:
    if not isinstance(handler, TypeHandler):
      raise TypeError(f'register_type_handler({ty!r}, ...) needs a TypeHandler instance, got '
                      f'{type(handler).__module__}.{type(handler).__qualname__}.')
    if func is None:
      func = _subclass_test(ty)
    typestr = handler.typestr()
    existing = next((i for i, (test, _) in enumerate(self._by_type) if _matches(test, ty)),
                    None)
    if existing is None:
      if typestr in self._by_typestr and not override:
        raise ValueError(f'Type "{ty}" has a `typestr` ("{typestr}") which collides with that '
                         'of an existing TypeHandler; pass override=True to replace it.')
      self._by_type.append((func, handler))
    elif override:
      self._by_type[existing] = (func, handler)
    else:
      raise ValueError(f'A TypeHandler for "{ty}" is already registered; pass override=True '
                       'to replace it.')
    self._by_typestr[typestr] = handler
    self.version += 1
    self.customized = True

  def get(self, ty: Any) -> TypeHandler:
    if isinstance(ty, str):
      if ty in self._by_typestr:
        return self._by_typestr[ty]
    else:
      for test, handler in self._by_type:
        if _matches(test, ty):
          return handler
    raise ValueError(f'Unknown type: "{ty}". Must register a TypeHandler.')

  def has(self, ty: Any) -> bool:
    try:
      self.get(ty)
    except ValueError:
      return False
    return True


def _subclass_test(ty: Any) -> Callable[[Any], bool]:
  return lambda t: isinstance(t, type) and issubclass(t, ty)


def _matches(test: Callable[[Any], bool], ty: Any) -> bool:
  try:
    return bool(test(ty))
  except TypeError:  # issubclass of a non-class
    return False


# --- built-in handlers ------------------------------------------------------------------------
# flaxckpt writes these leaf kinds itself; the methods below serve code that calls a built-in
# handler directly (typically a custom handler delegating to NumpyHandler).


def _writer_options(info: ParamInfo) -> _arrays.StorageOptions:
  single = _multihost.process_count() == 1
  return _arrays.StorageOptions(
      use_ocdbt=bool(info.is_ocdbt_checkpoint), use_zarr3=bool(info.use_zarr3),
      process_index=_multihost.process_index(), writes_metadata=_multihost.is_primary(),
      merge_into_root=single)


class _DeferredWrite:
  """A future whose ``result()`` performs the write (after the checkpoint's own arrays)."""

  def __init__(self, write: Callable[[], None]):
    self._write: Callable[[], None] | None = write

  def result(self, timeout: float | None = None) -> None:
    del timeout
    if self._write is not None:
      write, self._write = self._write, None
      write()


def _host_write(name: str, value: np.ndarray, arg: SaveArgs | None) -> _arrays.ArrayWrite:
  dtype = normalize_dtype(arg.dtype if arg is not None else None) or value.dtype
  value = value if value.dtype == dtype else value.astype(dtype)
  chunk_shape = _zarr.choose_chunk_shape(
      value.shape, value.shape, dtype.itemsize, arg.chunk_byte_size if arg else None)
  return _arrays.ArrayWrite(name, value.shape, dtype, chunk_shape,
                            (((0,) * value.ndim, value),))


def _read_infos(infos: Sequence[ParamInfo]) -> list[Any]:
  """The stored arrays of ``infos`` (all in one directory), read in one batch."""
  by_dir: dict[Any, list[int]] = {}
  for i, info in enumerate(infos):
    by_dir.setdefault((str(info.parent_dir), info.is_ocdbt_checkpoint, bool(info.use_zarr3),
                       info.raise_array_data_missing_error), []).append(i)
  out: list[Any] = [None] * len(infos)
  for (_, use_ocdbt, use_zarr3, missing_are_errors), indices in by_dir.items():
    directory = _storage.as_path(infos[indices[0]].parent_dir)
    data = _arrays.read_arrays(directory, [infos[i].name for i in indices], use_ocdbt=use_ocdbt,
                               use_zarr3=use_zarr3,
                               missing_chunks_are_errors=missing_are_errors)
    for i, array in zip(indices, data):
      out[i] = array
  return out


class NumpyHandler(TypeHandler):
  """``np.ndarray`` leaves: one zarr array each, written by the primary process.

  Args:
    metadata_key, ocdbt_process_id: accepted as Orbax names them; flaxckpt always writes the
      standard ``.zarray``/``zarr.json`` and per-process database names.
    deepcopy_host_arrays: copy the values in ``serialize`` (the caller may change them later).
  """

  def __init__(self, metadata_key: str | None = None, ocdbt_process_id: str | None = None,
               deepcopy_host_arrays: bool = True):
    self._metadata_key = metadata_key
    self._ocdbt_process_id = ocdbt_process_id
    self._deepcopy_host_arrays = deepcopy_host_arrays

  def typestr(self) -> str:
    return NP_ARRAY

  async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
    from flaxckpt.metadata import value  # The metadata package reads through _restore.
    out = []
    for info in infos:
      directory = _storage.as_path(info.parent_dir)
      ((shape, dtype, _),) = _arrays.read_array_infos(
          directory, [info.name], use_ocdbt=info.is_ocdbt_checkpoint,
          use_zarr3=bool(info.use_zarr3))
      entry: Any
      if self.typestr() == SCALAR:
        entry = value.ScalarMetadata(name=info.name, directory=directory, dtype=dtype)
      else:
        entry = value.ArrayMetadata(name=info.name, directory=directory, shape=tuple(shape),
                                    dtype=dtype, sharding=None)
      out.append(entry)
    return out

  async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                      args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
    args = list(args) if args else [SaveArgs()] * len(values)
    check_input_arguments(values, infos, args)
    arrays = [np.array(v, copy=True) if self._deepcopy_host_arrays else np.asarray(v)
              for v in values]
    writes = [_host_write(info.name, array, arg) for array, info, arg in zip(arrays, infos, args)]
    directory = _storage.as_path(infos[0].parent_dir)
    options = _writer_options(infos[0])
    if not options.writes_metadata:  # Host values are the same everywhere: one process writes.
      return []
    return [_DeferredWrite(lambda: _arrays.start_write(directory, writes, options).wait())]

  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
    args = list(args) if args else [RestoreArgs()] * len(infos)
    check_input_arguments(infos, args)
    out = []
    for array, arg in zip(_read_infos(infos), args):
      dtype = normalize_dtype(arg.dtype)
      out.append(array.astype(dtype) if dtype is not None else np.array(array))
    return out


class ScalarHandler(NumpyHandler):
  """Python and numpy scalar leaves, stored as 0-d arrays."""

  def __init__(self, metadata_key: str | None = None, ocdbt_process_id: str | None = None):
    super().__init__(metadata_key, ocdbt_process_id, deepcopy_host_arrays=False)

  def typestr(self) -> str:
    return SCALAR

  async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                      args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
    return await super().serialize([np.asarray(v) for v in values], infos, args)

  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
    results = await super().deserialize(infos, args)
    out = []
    restore_args: Sequence[RestoreArgs | None] = args or [None] * len(results)
    for info, value, arg in zip(infos, results, restore_args):
      if value.ndim != 0:
        raise _errors.StructureMismatchError(
            f'Leaf {info.name!r}: expected a scalar, the checkpoint holds shape {value.shape}.')
      item = value.item()
      restore_type = getattr(arg, 'restore_type', None)
      out.append(restore_type(item) if restore_type else item)
    return out


class ArrayHandler(TypeHandler):
  """``jax.Array`` leaves: each process writes the shards it holds (replica 0 of each).

  The keyword arguments are Orbax's; flaxckpt's own writer decides chunking, replication and
  the sharding file, so they are accepted and kept for subclasses.
  """

  def __init__(self, metadata_key: str | None = None, primary_host: int | None = 0,
               replica_id: int | None = 0, use_replica_parallel: bool | None = None,
               min_slice_bytes_for_replica_parallel: int | None = None,
               max_replicas_for_replica_parallel: int | None = None,
               enable_write_sharding_file: bool = True, array_metadata_store: Any = None,
               enable_replica_parallel_separate_folder: bool = False, dispatcher: Any = None,
               callback: Any = None):
    self._metadata_key = metadata_key
    self._primary_host = primary_host
    self._replica_id = replica_id
    self._use_replica_parallel = use_replica_parallel
    self._min_slice_bytes_for_replica_parallel = min_slice_bytes_for_replica_parallel
    self._max_replicas_for_replica_parallel = max_replicas_for_replica_parallel
    self._enable_write_sharding_file = enable_write_sharding_file
    self._array_metadata_store = array_metadata_store
    self._enable_replica_parallel_separate_folder = enable_replica_parallel_separate_folder
    self._dispatcher = dispatcher
    self._callback = callback

  def typestr(self) -> str:
    return JAX_ARRAY

  async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
    return await NumpyHandler().metadata(infos)

  async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                      args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
    args = list(args) if args else [SaveArgs()] * len(values)
    check_input_arguments(values, infos, args)
    writes = []
    for value, info, arg in zip(values, infos, args):
      dtype = normalize_dtype(arg.dtype) or np.dtype(value.dtype)
      blocks = tuple((tuple(s.start or 0 for s in shard.index),
                      np.array(_staging.detached(shard.data), dtype=dtype, copy=True))
                     for shard in value.addressable_shards if shard.replica_id == 0)
      write_shape = value.sharding.shard_shape(value.shape)
      chunk_shape = _zarr.choose_chunk_shape(write_shape, value.shape, dtype.itemsize,
                                             arg.chunk_byte_size)
      writes.append(_arrays.ArrayWrite(info.name, value.shape, dtype, chunk_shape, blocks))
    directory = _storage.as_path(infos[0].parent_dir)
    options = _writer_options(infos[0])
    return [_DeferredWrite(lambda: _arrays.start_write(directory, writes, options).wait())]

  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
    if args is None:
      raise ValueError('Must provide ArrayRestoreArgs to restore as jax.Array.')
    check_input_arguments(infos, args)
    out = []
    for array, arg in zip(_read_infos(infos), args):
      sharding = arg.resolved_sharding() if isinstance(arg, ArrayRestoreArgs) else None
      dtype = normalize_dtype(arg.dtype)
      if dtype is not None:
        array = array.astype(dtype)
      out.append(jax.device_put(array, sharding) if sharding is not None
                 else jax.device_put(array))
    return out


class StringHandler(TypeHandler):
  """``str`` leaves, kept together in one JSON file (``_strings.json``)."""

  def __init__(self, filename: str | None = None):
    self._filename = filename or '_strings.json'

  def typestr(self) -> str:
    return STRING

  def _spec(self, info: ParamInfo) -> dict[str, Any]:
    base = _storage.kvstore_spec(_storage.as_path(info.parent_dir))
    return {'driver': 'json', 'json_pointer': '/' + info.name,
            'kvstore': {**base, 'path': base['path'] + self._filename}}

  async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
    from flaxckpt.metadata import value
    return [value.StringMetadata(name=info.name, directory=_storage.as_path(info.parent_dir))
            for info in infos]

  async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                      args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
    del args
    check_input_arguments(values, infos)
    if not _multihost.is_primary():
      return []
    pairs = list(zip(infos, values))

    def write() -> None:
      import tensorstore as ts
      txn = ts.Transaction()
      for info, value in pairs:
        store = ts.open(self._spec(info), open=True, create=True).result()
        store.with_transaction(txn).write(value).result()
      txn.commit_async().result()

    return [_DeferredWrite(write)]

  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
    del args
    import tensorstore as ts
    return [str(ts.open(self._spec(info), open=True, read=True).result().read().result())
            for info in infos]


class PlaceholderHandler(TypeHandler):
  """Leaves skipped on purpose (``ocp.PLACEHOLDER``): never written, restored as themselves."""

  def typestr(self) -> str:
    return PLACEHOLDER_TYPESTR

  async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
    raise NotImplementedError('Placeholders do not have metadata.')

  async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                      args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
    raise NotImplementedError('Placeholders cannot be serialized.')

  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
    return [...] * len(infos)


# The types flaxckpt handles natively, with the handler each is registered with by default.
_DEFAULTS: tuple[tuple[Any, TypeHandler], ...] = (
    (int, ScalarHandler()),
    (float, ScalarHandler()),
    (bytes, ScalarHandler()),
    (np.number, ScalarHandler()),
    (np.ndarray, NumpyHandler()),
    (jax.Array, ArrayHandler()),
    (str, StringHandler()),
    (type(...), PlaceholderHandler()),
)
_BUILTIN_CLASSES = (ScalarHandler, NumpyHandler, ArrayHandler, StringHandler, PlaceholderHandler)

REGISTRY = _Registry()
for _ty, _handler in _DEFAULTS:
  REGISTRY.add(_ty, _handler, override=True)
REGISTRY.customized = False


def _native(handler: TypeHandler, method: str) -> bool:
  """Whether flaxckpt's own code does ``method``'s work for ``handler``: a built-in handler
  class, or a subclass that leaves that method alone."""
  for base in _BUILTIN_CLASSES:
    if isinstance(handler, base):
      return getattr(type(handler), method) is getattr(base, method)
  return False


@dataclasses.dataclass
class _Lookups:
  version: int = -1
  save: dict[type, TypeHandler | None] = dataclasses.field(default_factory=dict)
  restore: dict[str, TypeHandler | None] = dataclasses.field(default_factory=dict)


_lookups = _Lookups()


def _current_lookups() -> _Lookups:
  global _lookups
  if _lookups.version != REGISTRY.version:
    _lookups = _Lookups(REGISTRY.version)
  return _lookups


def custom_save_handler(ty: type) -> TypeHandler | None:
  """The handler whose ``serialize`` must write leaves of type ``ty``; None where flaxckpt
  writes them itself (or no handler is registered: the save then rejects the leaf)."""
  return _custom_handler(_current_lookups().save, ty, 'serialize')


def custom_restore_handler(typestr: str) -> TypeHandler | None:
  """The handler whose ``deserialize`` must read leaves stored (or asked for) as ``typestr``;
  None where flaxckpt reads them itself."""
  return _custom_handler(_current_lookups().restore, typestr, 'deserialize')


def _custom_handler(cache: dict[Any, TypeHandler | None], key: Any, method: str
                    ) -> TypeHandler | None:
  """The registered handler for ``key`` (a type or a typestr) unless flaxckpt's own code does
  its ``method``; looked up once per registry state (``cache``)."""
  try:
    return cache[key]
  except KeyError:
    pass
  try:
    handler: TypeHandler | None = REGISTRY.get(key)
  except ValueError:
    handler = None
  if handler is not None and _native(handler, method):
    handler = None
  cache[key] = handler
  return handler


def customized() -> bool:
  """Whether any registration differs from the defaults (else no leaf needs a lookup)."""
  return REGISTRY.customized


def typestr_of_type(ty: Any) -> str | None:
  """The typestr of the handler registered for ``ty`` (a restore_type), if any."""
  try:
    return REGISTRY.get(ty).typestr()
  except ValueError:
    return None
