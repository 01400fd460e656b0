"""How a save becomes a checkpoint: the two commit protocols, as in
``orbax.checkpoint.path.atomicity``.

- ``AtomicRenameTemporaryPath`` (the default on local file systems): the save writes into a
  directory of its own, ``<name>.orbax-checkpoint-tmp-<timestamp>``; ``commit_success.txt`` is
  written, everything made durable, and the directory renamed to ``<name>``. A checkpoint at
  ``<name>`` is always whole.
- ``CommitFileTemporaryPath`` (for storage without atomic renames, and gemma's choice): the
  save writes at ``<name>`` itself; ``commit_success.txt``, written last, is the commit. A
  directory without it is a save that never finished, and readers treat it so.

A ``Checkpointer`` (``temporary_path_class=``) and a ``CheckpointManager`` select the class; the
checkpointer calls the synchronous ``create_sync`` / ``finalize_sync`` / ``discard`` on its
primary process. ``create`` and ``finalize`` are their awaitable forms, as in Orbax.
"""

from __future__ import annotations

import abc
import errno
import pathlib
from typing import Any

from flaxckpt import _errors, _metadata, _safe_json, _steps, _storage
from flaxckpt.options import AtomicityMode, AtomicityOptions, FileOptions
from flaxckpt.utils import record_saved_duration  # noqa: F401  (Orbax exports it here)

__all__ = ['AtomicRenameTemporaryPath', 'CommitFileTemporaryPath', 'TemporaryPath',
           'ValidationError', 'default_temporary_path_class', 'is_finalized']

COMMIT_SUCCESS_FILE = _metadata.COMMIT_SUCCESS_FILE
TMP_DIR_SUFFIX = _metadata.TMP_SUFFIX


class ValidationError(ValueError):
  """A path is not what its ``TemporaryPath`` class expects (Orbax's class of that name)."""


class TemporaryPath(abc.ABC):
  """Where one save writes (``get``) and where its checkpoint ends up (``get_final``)."""

  def __init__(self, temporary_path: pathlib.Path, final_path: pathlib.Path, *,
               checkpoint_metadata_store: Any = None, file_options: FileOptions | None = None):
    del checkpoint_metadata_store  # The checkpointer writes _CHECKPOINT_METADATA itself.
    self._tmp_path = _storage.as_path(temporary_path)
    self._final_path = _storage.as_path(final_path)
    self._mode = (file_options or FileOptions()).path_permission_mode
    self._lock: int | None = None

  @classmethod
  @abc.abstractmethod
  def from_final(cls, final_path: _storage.PathLike, *, checkpoint_metadata_store: Any = None,
                 file_options: FileOptions | None = None) -> TemporaryPath:
    """The temporary path of a new save to ``final_path``."""

  @classmethod
  @abc.abstractmethod
  def from_temporary(cls, temporary_path: _storage.PathLike, *,
                     file_options: FileOptions | None = None) -> TemporaryPath:
    """The object for an existing temporary path."""

  def get(self) -> pathlib.Path:
    """The directory the save writes into."""
    return self._tmp_path

  def get_final(self) -> pathlib.Path:
    """The checkpoint's directory once committed."""
    return self._final_path

  @classmethod
  def holds_checkpoint(cls, final_path: pathlib.Path) -> bool:
    """Whether something at ``final_path`` stands in a new save's way (without ``force``)."""
    return _storage.exists(final_path)

  @abc.abstractmethod
  def create_sync(self) -> pathlib.Path:
    """Creates the (empty) directory the save writes into; returns it."""

  @abc.abstractmethod
  def finalize_sync(self, replace: bool = False) -> None:
    """Commits the save; with ``replace``, an existing checkpoint at the final path is
    replaced. Every file of the save must have been written."""

  def discard(self) -> None:
    """Removes what a failed save left."""
    _storage.release(self._lock)
    self._lock = None
    _storage.remove_tree(self._tmp_path)

  async def create(self) -> pathlib.Path:
    return self.create_sync()

  async def finalize(self) -> None:
    self.finalize_sync()

  @classmethod
  async def validate(cls, temporary_path: _storage.PathLike) -> None:
    """Raises ``ValidationError`` unless ``temporary_path`` looks like a save in flight."""
    del temporary_path  # Any path can be; subclasses say more.

  @classmethod
  async def validate_final(cls, final_path: _storage.PathLike) -> None:
    """Raises ``ValidationError`` unless ``final_path`` looks like a committed checkpoint."""
    del final_path

  def _apply_mode(self) -> None:
    """Gives every directory of the save ``FileOptions.path_permission_mode``."""
    if self._mode is not None:
      _storage.set_directory_modes(self._tmp_path, self._mode)

  def _write_commit_file(self, sync: bool) -> None:
    _storage.write_text(self._tmp_path / COMMIT_SUCCESS_FILE,
                        _metadata.commit_message(self._final_path), sync=sync)

  def __repr__(self) -> str:
    return f'{type(self).__name__}(tmp={str(self._tmp_path)!r}, final={str(self._final_path)!r})'


class AtomicRenameTemporaryPath(TemporaryPath):
  """Writes into ``<name>.orbax-checkpoint-tmp-<timestamp>``, renamed to ``<name>`` on commit."""

  @classmethod
  def from_final(cls, final_path: _storage.PathLike, *, checkpoint_metadata_store: Any = None,
                 file_options: FileOptions | None = None) -> AtomicRenameTemporaryPath:
    final = _storage.as_path(final_path)
    # Each save gets a directory of its own: two writers of one path never share files.
    tmp = final.with_name(f'{final.name}{TMP_DIR_SUFFIX}-{_metadata.now_ns()}')
    return cls(tmp, final, checkpoint_metadata_store=checkpoint_metadata_store,
               file_options=file_options)

  @classmethod
  def from_temporary(cls, temporary_path: _storage.PathLike, *,
                     file_options: FileOptions | None = None) -> AtomicRenameTemporaryPath:
    tmp = _storage.as_path(temporary_path)
    mark = tmp.name.find(TMP_DIR_SUFFIX)
    if mark <= 0:
      raise ValidationError(f'{tmp}: expected a temporary directory name containing '
                            f'{TMP_DIR_SUFFIX!r}.')
    return cls(tmp, tmp.with_name(tmp.name[:mark]), file_options=file_options)

  def create_sync(self) -> pathlib.Path:
    # Created here and nowhere else, locked while the writer lives: nothing planted at the name
    # is written through, and cleanups of abandoned saves leave a live one alone.
    self._lock = _storage.make_new_locked_dir(self._tmp_path)
    return self._tmp_path

  def finalize_sync(self, replace: bool = False) -> None:
    tmp, final = self._tmp_path, self._final_path
    self._write_commit_file(sync=False)
    self._apply_mode()
    _storage.sync_tree(tmp)
    if _storage.exists(final):
      if not replace:  # Another writer committed this path while this save was writing.
        raise exists_error(final)
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
          raise exists_error(final) from e  # Another writer committed it since the check.
        raise
    _storage.release(self._lock)
    self._lock = None
    _steps.remove_abandoned_saves(final)  # Left by earlier saves to this path that died.

  @classmethod
  async def validate(cls, temporary_path: _storage.PathLike) -> None:
    path = _storage.as_path(temporary_path)
    if TMP_DIR_SUFFIX not in path.name:
      raise ValidationError(f'{path}: expected {cls.__name__} to end with {TMP_DIR_SUFFIX!r}.')

  @classmethod
  async def validate_final(cls, final_path: _storage.PathLike) -> None:
    path = _storage.as_path(final_path)
    if TMP_DIR_SUFFIX in path.name:
      raise ValidationError(f'{path}: a final path cannot contain {TMP_DIR_SUFFIX!r}.')


class CommitFileTemporaryPath(TemporaryPath):
  """Writes at ``<name>`` directly; ``commit_success.txt``, written last, commits it."""

  @classmethod
  def from_final(cls, final_path: _storage.PathLike, *, checkpoint_metadata_store: Any = None,
                 file_options: FileOptions | None = None) -> CommitFileTemporaryPath:
    final = _storage.as_path(final_path)
    return cls(final, final, checkpoint_metadata_store=checkpoint_metadata_store,
               file_options=file_options)

  @classmethod
  def from_temporary(cls, temporary_path: _storage.PathLike, *,
                     file_options: FileOptions | None = None) -> CommitFileTemporaryPath:
    path = _storage.as_path(temporary_path)
    return cls(path, path, file_options=file_options)

  @classmethod
  def holds_checkpoint(cls, final_path: pathlib.Path) -> bool:
    """A save that died writing in place is no checkpoint: a new save may take its place. On
    an object store only ``commit_success.txt`` commits a checkpoint."""
    if _storage.is_remote(final_path):
      return _storage.exists(final_path / COMMIT_SUCCESS_FILE)
    return _storage.exists(final_path) and is_finalized(final_path)

  def create_sync(self) -> pathlib.Path:
    path = self._tmp_path
    if _storage.is_remote(path):
      # An object store: nothing to create or lock; the save writes its objects in place. What
      # stands there (a checkpoint being replaced, or a save that died: no commit file) goes
      # first, so that no object of it outlives this save or makes it look committed. Writers
      # cannot be told dead from alive there: two saves to one path at once are not supported.
      _storage.remove_tree(path)
      return path
    if _storage.exists(path):
      if is_finalized(path):
        # A checkpoint being replaced (force=True) is removed first, as Orbax does: the commit
        # file of the old one must not make the new, unfinished one look committed.
        _storage.remove_tree(path)
      elif not _storage.remove_if_abandoned(path):  # A save that died here is reclaimed.
        raise _errors.CheckpointExistsError(
            f'{path}: another save is writing this checkpoint in place right now.')
    # Locked while its writer lives, as a temporary directory is, so that a later save can
    # tell a dead writer's directory from a live one's.
    self._lock = _storage.make_new_locked_dir(path)
    return path

  def finalize_sync(self, replace: bool = False) -> None:
    del replace  # The old checkpoint was removed when this save began.
    if _storage.is_remote(self._tmp_path):
      self._write_commit_file(sync=False)  # Objects are durable once written.
      return
    _storage.sync_tree(self._tmp_path)
    self._write_commit_file(sync=True)
    self._apply_mode()
    _storage.release(self._lock)
    self._lock = None

  @classmethod
  async def validate(cls, temporary_path: _storage.PathLike) -> None:
    path = _storage.as_path(temporary_path)
    if _storage.exists(path / COMMIT_SUCCESS_FILE):
      raise ValidationError(f'{path}: expected {cls.__name__} not to contain '
                            f'{COMMIT_SUCCESS_FILE!r} before its commit.')

  @classmethod
  async def validate_final(cls, final_path: _storage.PathLike) -> None:
    path = _storage.as_path(final_path)
    if not _storage.exists(path / COMMIT_SUCCESS_FILE):
      raise ValidationError(f'{path}: expected {cls.__name__} to contain '
                            f'{COMMIT_SUCCESS_FILE!r} once committed.')


def temporary_path_class_for(temporary_path_class: type[TemporaryPath] | None,
                             atomicity_options: AtomicityOptions | None
                             ) -> type[TemporaryPath] | None:
  """The class a save uses: ``temporary_path_class`` if given, else the one
  ``atomicity_options.mode`` names (None: chosen per path by ``default_temporary_path_class``)."""
  if temporary_path_class is not None or atomicity_options is None:
    return temporary_path_class
  mode = AtomicityMode(atomicity_options.mode)
  return {AtomicityMode.COMMIT_FILE: CommitFileTemporaryPath,
          AtomicityMode.ATOMIC_RENAME: AtomicRenameTemporaryPath}.get(mode)


def default_temporary_path_class(final_path: pathlib.Path) -> type[TemporaryPath]:
  """Atomic renames where the storage has them, else a commit file."""
  if _storage.renames_atomically(final_path):
    return AtomicRenameTemporaryPath
  return CommitFileTemporaryPath


def exists_error(final: pathlib.Path) -> _errors.CheckpointExistsError:
  """The error of a save to a path where a checkpoint exists."""
  return _errors.CheckpointExistsError(
      f'{final} already exists; pass force=True to replace it, or save to a new path.')


def is_finalized(path: pathlib.Path) -> bool:
  """False for a directory written in place (``CommitFileTemporaryPath``) whose save never
  committed: no ``commit_success.txt``, and a ``_CHECKPOINT_METADATA`` without a commit time.

  Checkpoints of every Orbax release and of older flaxckpt either hold the commit file or
  record their commit time (or have no ``_CHECKPOINT_METADATA`` at all), so they count as
  finalized.
  """
  if _storage.exists(path / COMMIT_SUCCESS_FILE):
    return True
  metadata_file = path / _metadata.CHECKPOINT_METADATA_FILE
  if not _storage.is_file(metadata_file):
    return True
  try:
    metadata = _safe_json.read(metadata_file)
  except ValueError:
    return True  # Damaged metadata is for the metadata readers to report.
  return not (isinstance(metadata, dict) and 'commit_timestamp_nsecs' in metadata
              and metadata['commit_timestamp_nsecs'] is None)


def check_finalized(path: pathlib.Path) -> None:
  """Raises ``IncompleteCheckpointError`` where ``is_finalized`` says no."""
  if not is_finalized(path):
    raise _errors.IncompleteCheckpointError(
        f'{path}: no {COMMIT_SUCCESS_FILE} and no commit time in '
        f'{_metadata.CHECKPOINT_METADATA_FILE}; this save (written in place) never committed.')
