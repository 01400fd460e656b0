"""Checkpointers: one checkpoint at one path, saved atomically, optionally in the background.

Commit protocol (Orbax's, for local file systems): write everything into a new directory of
this save's own, ``<path>.orbax-checkpoint-tmp-<timestamp>``, write ``_CHECKPOINT_METADATA``
with the commit time and ``commit_success.txt``, make it durable, then rename it to ``<path>``.
A failed save deletes its temporary directory; an existing checkpoint is only replaced (with
``force=True``) after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flaxckpt import _errors, _metadata, _multihost, _restore, _steps, _storage
from flaxckpt._handler import (AsyncCheckpointHandler, CheckpointArgs, CheckpointHandler,
                               args_type_for)
from flaxckpt._pytree_handler import PyTreeCheckpointHandler, StandardCheckpointHandler



def _exists_error(final) -> _errors.CheckpointExistsError:
  return _errors.CheckpointExistsError(
      f'{final} already exists; pass force=True to replace it, or save to a new path.')


# The lock each running save holds on its temporary directory, by directory: it tells other
# writers and cleanups that the directory is in use (the kernel drops it if the process dies).
_tmp_locks: dict[Any, int | None] = {}


def _release(tmp) -> None:
  _storage.release(_tmp_locks.pop(tmp, None))


def _discard(tmp) -> None:
  """Removes a failed save's directory; only the primary process deletes anything."""
  if _multihost.is_primary():
    _release(tmp)
    _storage.remove_tree(tmp)


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


class Checkpointer:
  """Saves and restores one item at a path through a handler, atomically.

  Example:
    >>> ckptr = flaxckpt.Checkpointer(flaxckpt.StandardCheckpointHandler())
    >>> ckptr.save('/tmp/ckpt/1', args=flaxckpt.args.StandardSave(state))
    >>> ckptr.restore('/tmp/ckpt/1', args=flaxckpt.args.StandardRestore(abstract_state))
  """

  def __init__(self, handler: CheckpointHandler):
    if not isinstance(handler, CheckpointHandler):
      raise TypeError(f'Checkpointer needs a CheckpointHandler, got {type(handler).__name__}.')
    self._handler = handler

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
    args = self._adapt(legacy_item, args, legacy_kwargs, for_save=True)
    self._save(directory, args, force, custom_metadata)

  def _save(self, directory: _storage.PathLike, args: CheckpointArgs, force: bool,
            custom_metadata: dict[str, Any] | None,
            on_commit: Callable[[], None] | None = None) -> None:
    """The save itself; ``on_commit`` runs once the checkpoint is committed (managers apply
    their retention there)."""
    final, tmp, init_ns = self._begin(directory, force, custom_metadata)
    try:
      with _gc_paused():
        self._handler.save(tmp, args)
      self._commit(final, tmp, init_ns, custom_metadata, force)
    except BaseException:
      _discard(tmp)
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
    with _gc_paused():
      return self._handler.restore(path, args)

  def metadata(self, directory: _storage.PathLike) -> Any:
    return self._handler.metadata(_storage.as_path(directory))

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
      raise TypeError(f'{type(self._handler).__name__} has no registered args type; '
                      'pass args=... explicitly.')
    if 'target' in kwargs:
      item = kwargs.pop('target')
    if for_save and item is None:
      raise TypeError('save() needs an item: save(path, args=...) or save(path, item).')
    fields = {k: v for k, v in kwargs.items() if v is not None}
    if item is None and not fields:
      return None
    try:
      return args_type(item, **fields) if item is not None else args_type(**fields)
    except TypeError as e:
      raise TypeError(f'{args_type.__name__} does not accept {sorted(fields)}: {e}') from e

  def _begin(self, directory: _storage.PathLike, force: bool,
             custom_metadata: dict[str, Any] | None):
    final = _storage.as_path(directory)
    try:
      json.dumps(custom_metadata)
    except (TypeError, ValueError) as e:
      raise TypeError(f'custom_metadata for {final} must be JSON-serializable: {e}') from e
    if _storage.exists(final) and not force:
      raise _exists_error(final)
    # Without atomic renames (object stores) the checkpoint is written in place and committed by
    # its commit_success.txt alone.
    in_place = not _storage.renames_atomically(final)
    init_ns = _metadata.now_ns()
    # Each save writes into a directory of its own, created here and nowhere else, so that two
    # writers of one path never share files and nothing planted at the name is written through.
    tmp = final if in_place else final.with_name(
        _multihost.agree(f'tmp:{final}', f'{final.name}{_metadata.TMP_SUFFIX}-{init_ns}'))
    if _multihost.is_primary():
      if in_place:
        _storage.make_dirs(tmp)
      else:
        _tmp_locks[tmp] = _storage.make_new_locked_dir(tmp)
      self._write_checkpoint_metadata(tmp, init_ns, None, None)
    try:
      _multihost.barrier(f'save-begin:{final}')  # The others write into tmp from here on.
    except _errors.BarrierTimeoutError:
      _discard(tmp)
      raise
    return final, tmp, init_ns

  def _commit(self, final, tmp, init_ns: int, custom_metadata: dict[str, Any] | None,
              force: bool) -> None:
    """The primary finalizes and commits once every process has written its part; the others
    return when the commit is done, so a save ends at the same point everywhere."""
    _multihost.barrier(f'save-written:{final}')
    if _multihost.is_primary():
      self._commit_as_primary(final, tmp, init_ns, custom_metadata, force)
    _multihost.barrier(f'save-committed:{final}')

  def _commit_as_primary(self, final, tmp, init_ns: int,
                         custom_metadata: dict[str, Any] | None, force: bool) -> None:
    self._handler.finalize(tmp)
    self._write_checkpoint_metadata(tmp, init_ns, _metadata.now_ns(), custom_metadata)
    if tmp == final:  # Written in place: the commit marker, written last, is the commit.
      _storage.sync_tree(tmp)
      _storage.write_text(tmp / _metadata.COMMIT_SUCCESS_FILE, _metadata.commit_message(final),
                          sync=True)
      return
    _storage.write_text(tmp / _metadata.COMMIT_SUCCESS_FILE, _metadata.commit_message(final))
    _storage.sync_tree(tmp)
    if _storage.exists(final):
      if not force:  # Another writer committed this path while this save was writing.
        raise _exists_error(final)
      replaced = final.with_name(final.name + _steps.REPLACED_SUFFIX)
      _storage.remove_tree(replaced)
      _storage.rename(final, replaced)
      try:
        _storage.rename(tmp, final)
      except BaseException:
        _storage.rename(replaced, final)  # The old checkpoint stays until a new one replaces it.
        raise
      _storage.remove_tree(replaced)
    else:
      try:
        _storage.rename(tmp, final)
      except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
          raise _exists_error(final) from e  # Another writer committed it since the check.
        raise
    _release(tmp)
    _steps.remove_abandoned_saves(final)  # Left by earlier saves to this path that died.

  def _write_checkpoint_metadata(self, directory, init_ns: int, commit_ns: int | None,
                                 custom_metadata: dict[str, Any] | None) -> None:
    typestrs = getattr(self._handler, 'typestrs', None)
    item_handlers = typestrs() if callable(typestrs) else (self._handler.typestr or None)
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
    timeout_secs: how long ``wait_until_finished`` waits for a save before raising.
  """

  def __init__(self, handler: CheckpointHandler, timeout_secs: float = 600):
    super().__init__(handler)
    self._timeout = timeout_secs
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._pending_path = None

  def save(self, directory: _storage.PathLike, *legacy_item: Any,
           args: CheckpointArgs | None = None, force: bool = False,
           custom_metadata: dict[str, Any] | None = None, **legacy_kwargs: Any) -> None:
    """Starts a save; returns once the caller's arrays have been copied to host memory."""
    self.wait_until_finished()
    args = self._adapt(legacy_item, args, legacy_kwargs, for_save=True)
    self._save(directory, args, force, custom_metadata)

  def _save(self, directory: _storage.PathLike, args: CheckpointArgs, force: bool,
            custom_metadata: dict[str, Any] | None,
            on_commit: Callable[[], None] | None = None) -> None:
    self.wait_until_finished()
    final, tmp, init_ns = self._begin(directory, force, custom_metadata)
    try:
      with _gc_paused():
        if isinstance(self._handler, AsyncCheckpointHandler):
          writer = self._handler.async_save(tmp, args)
        else:
          self._handler.save(tmp, args)
          writer = None
    except BaseException:
      _discard(tmp)
      raise

    def run() -> None:
      try:
        if writer is not None:
          writer()
        self._commit(final, tmp, init_ns, custom_metadata, force)
      except BaseException as e:  # Surfaced to the caller by the next check.
        _discard(tmp)
        self._error = e
        return
      if on_commit is not None:
        try:
          on_commit()
        except BaseException as e:
          self._error = e

    self._pending_path = final
    # Not a daemon: a normal interpreter exit waits for the save to commit.
    self._thread = threading.Thread(target=run, name='flaxckpt-save', daemon=False)
    self._thread.start()

  def restore(self, directory: _storage.PathLike, *legacy_item: Any,
              args: CheckpointArgs | None = None, **legacy_kwargs: Any) -> Any:
    """Restores, first waiting for a save still in flight."""
    self.wait_until_finished()
    return super().restore(directory, *legacy_item, args=args, **legacy_kwargs)

  def wait_until_finished(self) -> None:
    """Blocks until the pending save has committed; raises if it failed."""
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

  def __del__(self) -> None:
    thread = getattr(self, '_thread', None)
    if thread is not None:
      thread.join()


class StandardCheckpointer(Checkpointer):
  """``Checkpointer(StandardCheckpointHandler())``."""

  def __init__(self, **handler_options: Any):
    super().__init__(StandardCheckpointHandler(**handler_options))


class PyTreeCheckpointer(Checkpointer):
  """``Checkpointer(PyTreeCheckpointHandler())``."""

  def __init__(self, **handler_options: Any):
    super().__init__(PyTreeCheckpointHandler(**handler_options))
