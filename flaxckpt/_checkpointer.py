"""Checkpointers: one checkpoint at one path, saved atomically, optionally in the background.

Commit protocol (Orbax's, for local file systems): write everything into a new directory of
this save's own, ``<path>.orbax-checkpoint-tmp-<timestamp>``, write ``_CHECKPOINT_METADATA``
with the commit time and ``commit_success.txt``, make it durable, then rename it to ``<path>``.
A failed save deletes its temporary directory; an existing checkpoint is only replaced (with
``force=True``) after the new one is complete.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flaxckpt import _errors, _metadata, _multihost, _restore, _storage
from flaxckpt._handler import (AbstractCheckpointer, AsyncCheckpointHandler, CheckpointArgs,
                               CheckpointHandler, args_type_for)
from flaxckpt._handler import typestr as handler_typestr
from flaxckpt._pytree_handler import PyTreeCheckpointHandler, StandardCheckpointHandler
from flaxckpt.metadata import StepMetadata, read_step_metadata
from flaxckpt.options import (AsyncOptions, AtomicityOptions, FileOptions,
                              MultiprocessingOptions)
from flaxckpt.path import atomicity

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
  """Pauses Python's cyclic garbage collector during a save or restore.

  Saving or restoring a tree of thousands of leaves allocates enough objects to trigger
  several full collections of a heap that jax makes large; those pauses used to cost more
  than the checkpoint itself. Reference counting still frees everything in the meantime.
  """
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


class Checkpointer(AbstractCheckpointer):
  """Saves and restores one item at a path through a handler, atomically.

  Args:
    handler: the handler of the item. One without registered args classes is called with the
      arguments given to ``save``/``restore`` as they are (Orbax's legacy form).
    multiprocessing_options: the primary process and the barrier key prefix (every process
      takes part in every save).
    file_options: ``path_permission_mode`` for every directory a save creates.
    temporary_path_class: the commit protocol (``flaxckpt.path.atomicity``); by default atomic
      renames where the storage has them, else a commit file.
    checkpoint_metadata_store: accepted for Orbax call sites; ``_CHECKPOINT_METADATA`` is always
      written before a save returns.
    atomicity_options: ``AtomicityOptions``: the commit protocol as a mode, where
      ``temporary_path_class`` is not given.

  Example:
    >>> ckptr = flaxckpt.Checkpointer(flaxckpt.StandardCheckpointHandler())
    >>> ckptr.save('/tmp/ckpt/1', args=flaxckpt.args.StandardSave(state))
    >>> ckptr.restore('/tmp/ckpt/1', args=flaxckpt.args.StandardRestore(abstract_state))
  """

  def __init__(self, handler: CheckpointHandler, *,
               multiprocessing_options: MultiprocessingOptions | None = None,
               file_options: FileOptions | None = None,
               temporary_path_class: type[atomicity.TemporaryPath] | None = None,
               checkpoint_metadata_store: Any = None,
               atomicity_options: AtomicityOptions | None = None):
    del checkpoint_metadata_store
    temporary_path_class = atomicity.temporary_path_class_for(temporary_path_class,
                                                              atomicity_options)
    if not isinstance(handler, CheckpointHandler):
      raise TypeError(f'Checkpointer needs a CheckpointHandler, got {type(handler).__name__}.')
    if (args_type_for(handler, for_save=True) is None
        and args_type_for(handler, for_save=False) is None):
      handler = _LegacyHandler(handler)
    self._handler = handler
    options = multiprocessing_options or MultiprocessingOptions()
    self._primary = _multihost.check_processes(options.primary_host, options.active_processes)
    self._prefix = options.barrier_sync_key_prefix
    self._file_options = file_options or FileOptions()
    if temporary_path_class is not None and not (
        isinstance(temporary_path_class, type)
        and issubclass(temporary_path_class, atomicity.TemporaryPath)):
      raise TypeError('temporary_path_class must be a flaxckpt.path.atomicity.TemporaryPath '
                      f'subclass, got {temporary_path_class!r}.')
    self._temporary_path_class = temporary_path_class
    # Replaces JAX's barrier at the commit (AsyncOptions.barrier_sync_fn).
    self._barrier_sync_fn: Callable[..., Any] | None = None

  @property
  def handler(self) -> CheckpointHandler:
    return self._handler

  def save(self, directory: _storage.PathLike, *legacy_item: Any,
           args: CheckpointArgs | None = None, force: bool = False,
           custom_metadata: dict[str, Any] | None = None, **legacy_kwargs: Any) -> None:
    """Saves to ``directory``; ``save(path, item, save_args=...)`` is the older form.

    Raises:
      CheckpointExistsError: ``directory`` exists and ``force`` is False.
    """
    self._save(directory, self._adapt(legacy_item, args, legacy_kwargs, for_save=True), force,
               custom_metadata)

  def _save(self, directory: _storage.PathLike, args: CheckpointArgs | None, force: bool,
            custom_metadata: dict[str, Any] | None,
            on_commit: Callable[[], None] | None = None) -> None:
    """The save itself; ``on_commit`` runs once the checkpoint is committed (managers apply
    their retention there)."""
    temp, init_ns = self._begin(directory, force, custom_metadata)
    try:
      with _gc_paused():
        self._handler.save(temp.get(), args=args)
      self._commit(temp, init_ns, custom_metadata, force)
    except BaseException:
      self._discard(temp)
      raise
    if on_commit is not None:
      on_commit()

  def restore(self, directory: _storage.PathLike, *legacy_item: Any,
              args: CheckpointArgs | None = None, **legacy_kwargs: Any) -> Any:
    """Restores from ``directory``; ``restore(path, item, restore_args=...)`` is the older form.

    Raises:
      FileNotFoundError: nothing exists at ``directory``.
      NotACheckpointError, IncompleteCheckpointError: it is not a committed checkpoint.
    """
    args = self._adapt(legacy_item, args, legacy_kwargs, for_save=False)
    path = _storage.as_path(directory)
    _restore.check_committed(path)
    atomicity.check_finalized(path)
    with _gc_paused():
      return self._handler.restore(path, args=args)

  def metadata(self, directory: _storage.PathLike) -> StepMetadata:
    """The step's ``StepMetadata`` (commit times, custom metadata, handler names), with the
    handler's description of the item as ``item_metadata``; no array data is read.

    A damaged ``_CHECKPOINT_METADATA`` leaves the step fields empty (with a warning naming it):
    the item's own metadata does not depend on it.
    """
    path = _storage.as_path(directory)
    item_metadata = self._handler.metadata(path)
    try:
      return read_step_metadata(path, item_metadata)
    except (_errors.NotACheckpointError, _errors.LimitExceededError,
            _errors.UnsafeCheckpointError) as e:
      logger.warning('Ignoring the step metadata of %s: %s', path, e)
      return StepMetadata(item_metadata=item_metadata)

  def wait_until_finished(self) -> None:
    """Nothing to wait for: saves are synchronous."""

  def check_for_errors(self) -> None:
    """Nothing to check: synchronous saves raise directly."""

  def close(self) -> None:
    self.wait_until_finished()
    self._handler.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # --- the protocol ------------------------------------------------------------------------------

  def _adapt(self, legacy_item: tuple, args: CheckpointArgs | None, kwargs: dict[str, Any],
             for_save: bool) -> CheckpointArgs | None:
    """Turns the older ``(item, save_args=..., restore_args=..., transforms=...)`` forms into
    the args object of this checkpointer's handler."""
    if isinstance(self._handler, _LegacyHandler):
      if args is not None:
        legacy_item, kwargs = (args, *legacy_item), kwargs
      return _LegacyArgs(legacy_item, kwargs)
    if len(legacy_item) > 1:
      raise TypeError(f'Expected at most one positional item, got {len(legacy_item)}.')
    item = legacy_item[0] if legacy_item else kwargs.pop('item', None)
    if isinstance(item, CheckpointArgs):
      args, item = item, None
    if args is not None:
      if item is not None or kwargs:
        raise TypeError('Pass either args=... or the older item/keyword form, not both.')
      return args
    args_type = args_type_for(self._handler, for_save)
    if args_type is None:
      raise TypeError(f'{type(self._handler).__name__} has no registered '
                      f'{"save" if for_save else "restore"} args type; pass args=... '
                      'explicitly.')
    if 'target' in kwargs and 'target' not in getattr(args_type, '__dataclass_fields__', {}):
      item = kwargs.pop('target')
    if for_save and item is None:
      raise TypeError('save() needs an item: save(path, args=...) or save(path, item).')
    fields = {k: v for k, v in kwargs.items() if v is not None}
    try:
      return args_type(item, **fields) if item is not None else args_type(**fields)
    except TypeError as e:
      if item is None and not fields:  # Its args need an item; the handler gets None.
        return None
      raise TypeError(f'{args_type.__name__} does not accept {sorted(fields)}: {e}') from e

  def _is_primary(self) -> bool:
    return _multihost.is_primary(self._primary)

  def _barrier(self, name: str, sync_fn: Callable[..., Any] | None = None) -> None:
    _multihost.barrier(name, prefix=self._prefix, sync_fn=sync_fn)

  def _begin(self, directory: _storage.PathLike, force: bool,
             custom_metadata: dict[str, Any] | None) -> tuple[atomicity.TemporaryPath, int]:
    final = _storage.as_path(directory)
    try:
      json.dumps(custom_metadata)
    except (TypeError, ValueError) as e:
      raise TypeError(f'custom_metadata for {final} must be JSON-serializable: {e}') from e
    cls = self._temporary_path_class or atomicity.default_temporary_path_class(final)
    if not force and cls.holds_checkpoint(final):
      raise atomicity.exists_error(final)
    temp = cls.from_final(final, file_options=self._file_options)
    if temp.get() != final:  # Every process writes into the directory the primary names.
      name = _multihost.agree(f'tmp:{final}', temp.get().name, self._primary, self._prefix)
      if name != temp.get().name:
        temp = cls.from_temporary(final.with_name(name), file_options=self._file_options)
    init_ns = _metadata.now_ns()
    if self._is_primary():
      temp.create_sync()
      self._write_checkpoint_metadata(temp.get(), init_ns, None, None)
    try:
      self._barrier(f'save-begin:{final}')  # The others write into it from here on.
    except _errors.BarrierTimeoutError:
      self._discard(temp)
      raise
    return temp, init_ns

  def _discard(self, temp: atomicity.TemporaryPath) -> None:
    """Removes a failed save's directory; only the primary process deletes anything.

    Best effort: storage that failed the save often fails this too (a server that went away),
    and the save's own error is the one to raise. What stays is no checkpoint (never
    committed, never listed) and the next save to the path reclaims it.
    """
    if self._is_primary():
      try:
        temp.discard()
      except Exception as e:  # noqa: BLE001 - logged; the save's error follows.
        logger.warning('Could not remove what the failed save to %s left (the next save there '
                       'reclaims it): %s', temp.get_final(), e)

  def _commit(self, temp: atomicity.TemporaryPath, init_ns: int,
              custom_metadata: dict[str, Any] | None, force: bool) -> None:
    """The primary finalizes and commits once every process has written its part; the others
    return when the commit is done, so a save ends at the same point everywhere."""
    final = temp.get_final()
    self._barrier(f'save-written:{final}', self._barrier_sync_fn)
    if self._is_primary():
      self._handler.finalize(temp.get())
      self._write_checkpoint_metadata(temp.get(), init_ns, _metadata.now_ns(), custom_metadata)
      temp.finalize_sync(replace=force)
    self._barrier(f'save-committed:{final}', self._barrier_sync_fn)

  def _write_checkpoint_metadata(self, directory, init_ns: int, commit_ns: int | None,
                                 custom_metadata: dict[str, Any] | None) -> None:
    typestrs = getattr(self._handler, 'typestrs', None)
    item_handlers = typestrs() if callable(typestrs) else handler_typestr(self._handler)
    _storage.write_text(directory / _metadata.CHECKPOINT_METADATA_FILE,
                        _metadata.checkpoint_metadata_json(item_handlers, init_ns, commit_ns,
                                                           custom_metadata))


class AsyncCheckpointer(Checkpointer):
  """A Checkpointer whose ``save`` returns once the data is in host memory.

  Writing and the commit run on a background thread (no asyncio loop is used, so it works
  inside Jupyter's running loop). A background failure is raised by the next
  ``wait_until_finished``, ``save``, ``check_for_errors`` or ``close``.

  Args:
    handler: preferably an ``AsyncCheckpointHandler``; others write on the caller's thread.
    timeout_secs: how long ``wait_until_finished`` waits for a save before raising
      ``TimeoutError``; overrides ``async_options.timeout_secs``.
    async_options: the timeout, ``post_finalization_callback`` (run on the background thread
      after each commit) and ``barrier_sync_fn`` (the barrier of the commit).
    multiprocessing_options, file_options, temporary_path_class, atomicity_options:
      as for ``Checkpointer`` (and ``checkpoint_metadata_store``).
  """

  def __init__(self, handler: CheckpointHandler, timeout_secs: float | None = None, *,
               async_options: AsyncOptions | None = None,
               multiprocessing_options: MultiprocessingOptions | None = None,
               file_options: FileOptions | None = None,
               temporary_path_class: type[atomicity.TemporaryPath] | None = None,
               checkpoint_metadata_store: Any = None,
               atomicity_options: AtomicityOptions | None = None):
    super().__init__(handler, multiprocessing_options=multiprocessing_options,
                     file_options=file_options, temporary_path_class=temporary_path_class,
                     checkpoint_metadata_store=checkpoint_metadata_store,
                     atomicity_options=atomicity_options)
    async_options = async_options or AsyncOptions()
    self._timeout = timeout_secs or async_options.timeout_secs
    if self._timeout <= 0:
      raise ValueError(f'timeout_secs must be positive, got {self._timeout}.')
    self._post_finalization_callback = async_options.post_finalization_callback
    self._barrier_sync_fn = async_options.barrier_sync_fn
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._pending_path: Any = None

  def save(self, directory: _storage.PathLike, *legacy_item: Any,
           args: CheckpointArgs | None = None, force: bool = False,
           custom_metadata: dict[str, Any] | None = None, **legacy_kwargs: Any) -> None:
    """Starts a save; returns once the caller's data is in host memory (numpy arrays copied,
    jax.Arrays on the CPU viewed: see ``_save.prepare``)."""
    self.wait_until_finished()
    self._save(directory, self._adapt(legacy_item, args, legacy_kwargs, for_save=True), force,
               custom_metadata)

  def _save(self, directory: _storage.PathLike, args: CheckpointArgs | None, force: bool,
            custom_metadata: dict[str, Any] | None,
            on_commit: Callable[[], None] | None = None) -> None:
    self.wait_until_finished()
    temp, init_ns = self._begin(directory, force, custom_metadata)
    try:
      with _gc_paused():
        if isinstance(self._handler, AsyncCheckpointHandler):
          writer = self._handler.async_save(temp.get(), args=args)
        else:
          self._handler.save(temp.get(), args=args)
          writer = None
    except BaseException:
      self._discard(temp)
      raise
    callbacks = [c for c in (on_commit, self._post_finalization_callback) if c is not None]

    def run() -> None:
      try:
        if writer is not None:
          writer()
        self._commit(temp, init_ns, custom_metadata, force)
      except BaseException as e:  # Surfaced to the caller by the next check.
        self._discard(temp)
        self._error = e
        return
      try:
        for callback in callbacks:
          callback()
      except BaseException as e:
        self._error = e

    self._pending_path = temp.get_final()
    # Not a daemon: a normal interpreter exit waits for the save to commit.
    self._thread = threading.Thread(target=run, name='flaxckpt-save', daemon=False)
    self._thread.start()

  def restore(self, directory: _storage.PathLike, *legacy_item: Any,
              args: CheckpointArgs | None = None, **legacy_kwargs: Any) -> Any:
    """Restores, first waiting for a save still in flight."""
    self.wait_until_finished()
    return super().restore(directory, *legacy_item, args=args, **legacy_kwargs)

  def wait_until_finished(self) -> None:
    """Blocks until the pending save has committed; raises if it failed.

    Raises:
      TimeoutError: the save did not finish within ``timeout_secs`` (it goes on; a later call
        waits for it again).
      AsyncSaveError: the background save failed.
    """
    thread = self._thread
    if thread is not None:
      thread.join(self._timeout)
      if thread.is_alive():
        raise TimeoutError(f'The save to {self._pending_path} did not finish within '
                           f'{self._timeout} s.')
      self._thread = None
    self.check_for_errors()

  def check_for_errors(self) -> None:
    """Raises the failure of a finished background save, once."""
    error, self._error = self._error, None
    if error is not None:
      raise _errors.AsyncSaveError(
          f'The background save to {self._pending_path} failed: {error!r}') from error

  def is_saving(self) -> bool:
    """Whether a background save is still writing or committing."""
    thread = self._thread
    return thread is not None and thread.is_alive()


class _OneHandlerCheckpointer(Checkpointer):
  """A Checkpointer of one handler class, made from that handler's options and the
  Checkpointer's own keywords."""

  _handler_class: type[CheckpointHandler]

  def __init__(self, *, multiprocessing_options: MultiprocessingOptions | None = None,
               file_options: FileOptions | None = None,
               temporary_path_class: type[atomicity.TemporaryPath] | None = None,
               atomicity_options: AtomicityOptions | None = None, **handler_options: Any):
    super().__init__(self._handler_class(**handler_options),
                     multiprocessing_options=multiprocessing_options,
                     file_options=file_options, temporary_path_class=temporary_path_class,
                     atomicity_options=atomicity_options)


class StandardCheckpointer(_OneHandlerCheckpointer):
  """``Checkpointer(StandardCheckpointHandler())``."""

  _handler_class = StandardCheckpointHandler


class PyTreeCheckpointer(_OneHandlerCheckpointer):
  """``Checkpointer(PyTreeCheckpointHandler())``."""

  _handler_class = PyTreeCheckpointHandler


class _LegacyArgs(CheckpointArgs):
  """The positional and keyword arguments of a call, for a handler without args classes."""

  def __init__(self, args: tuple, kwargs: dict[str, Any]):
    self.args, self.kwargs = args, kwargs


class _LegacyHandler(CheckpointHandler):
  """Calls a handler that has no registered args classes with the caller's arguments as given
  (Orbax's form for such handlers: ``save(directory, *args, **kwargs)``)."""

  def __init__(self, handler: CheckpointHandler):
    self.wrapped = handler
    self.typestr = handler_typestr(handler)

  def save(self, directory, args: _LegacyArgs) -> None:
    self.wrapped.save(directory, *args.args, **args.kwargs)

  def restore(self, directory, args: _LegacyArgs | None = None) -> Any:
    args = args or _LegacyArgs((), {})
    return self.wrapped.restore(directory, *args.args, **args.kwargs)

  def metadata(self, directory) -> Any:
    return self.wrapped.metadata(directory)

  def finalize(self, directory) -> None:
    self.wrapped.finalize(directory)

  def close(self) -> None:
    self.wrapped.close()
