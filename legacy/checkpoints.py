"""A drop-in ``flax.training.checkpoints`` on flaxckpt's core.

Same functions, signatures, defaults and files as flax 0.12 (FORMATS.md §3). With flax's flag
``flax_use_orbax_checkpointing`` (or an ``orbax_checkpointer=``) a checkpoint is an Orbax PyTree
directory written by flaxckpt's own checkpointers; otherwise it is a msgpack file with exactly
the bytes ``flax.serialization.to_bytes`` gives, streamed to disk. ``restore_checkpoint`` reads
either kind, and ``_gda`` multi-process arrays, whatever the flag says.

Where we differ from flax: retention never deletes a save that is still in flight (``<prefix>tmp``
or ``*.orbax-checkpoint-tmp*``), a msgpack save writes a temporary file of its own (never the
shared ``<prefix>tmp``) and commits without clobbering, so that several writers on one directory
never mix their files, a ``prefix`` or ``step`` that would name something outside ``ckpt_dir``
is refused, errors name the path they are about, a corrupt msgpack file
raises ``CorruptCheckpointError`` instead of a bare msgpack error, ``_gda`` arrays restore
without a target (as numpy) instead of raising ``MPARestoreTargetRequiredError``, and each
msgpack file we write gets a hidden sidecar ``.<name>.crc32c`` with its size and crc32c, checked
on restore (flax's format has no checksum; flax neither lists nor reads the sidecar).

Every function also takes ``gs://`` and ``s3://`` URLs (docs/object_storage.md). There a msgpack
checkpoint is one object, written whole at the commit (exclusively, without ``overwrite``), then
its sidecar (size and crc32c only); a ``_gda`` folder and an Orbax directory are written in
place and committed by their ``commit_success.txt``, as flax and Orbax do on GCS. Only committed
checkpoints are listed or restored; retention reclaims the uncommitted ones of earlier steps.
Buckets have no locks: saves from several programs into one directory at once are not
supported there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import pathlib
import re
import secrets
from collections.abc import Callable, Iterable
from typing import IO, Any

import flax
import jax
import numpy as np
from flax import core, errors, serialization

from flaxckpt import _errors, _multihost, _steps, _storage
from flaxckpt._errors import ChecksumMismatchError, CorruptCheckpointError
from flaxckpt._checkpointer import AsyncCheckpointer, Checkpointer
from flaxckpt._pytree_handler import PyTreeCheckpointHandler
from flaxckpt.legacy import _gda, _msgpack, _sidecar, orbax_utils

logger = logging.getLogger(__name__)

PyTree = Any
SIGNED_FLOAT_RE = re.compile(r'([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)')
UNSIGNED_FLOAT_RE = re.compile(r'[-+]?((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)')
MODULE_NUM_RE = re.compile(r'(.*)_\d+$')
SCHEME_RE = re.compile('^(?P<scheme>[a-z][a-z0-9.+-]+://)?(?P<path>.*)', re.I)
MP_ARRAY_POSTFIX = _gda.SUFFIX
MP_ARRAY_PH = _gda.PLACEHOLDER
COMMIT_SUCCESS_FILE = _gda.COMMIT_FILE
ORBAX_CKPT_FILENAME = 'checkpoint'
ORBAX_MANIFEST_OCDBT = 'manifest.ocdbt'
ORBAX_METADATA_FILENAME = '_METADATA'
_ORBAX_TMP_MARK = '.orbax-checkpoint-tmp'
# Our msgpack saves write ``.<prefix><step>.flaxckpt-tmp-<pid>-<random>`` (and ``..._gda``): a
# name of their own, so two writers never share one, and hidden, so that neither flax's listing
# nor its retention (both take names matching ``<prefix>*``) sees it.
_TMP_MARK = '.flaxckpt-tmp-'
_COMMIT_LOCK_SECONDS = 300.0  # A commit holds the directory's lock for a rename and a few files.


class AsyncManager:
  """Runs msgpack saves on a background thread, one at a time.

  Pass it as ``async_manager=`` to ``save_checkpoint``; ``wait_previous_save`` blocks until the
  last save is committed and re-raises its error, if any.
  """

  def __init__(self, max_workers: int = 1):
    self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers)
    self.save_future: concurrent.futures.Future | None = None

  def wait_previous_save(self) -> None:
    if self.save_future is not None and not self.save_future.done():
      logger.warning('The previous async save_checkpoint has not finished yet; waiting for it '
                     'before the next save.')
    if self.save_future is not None:
      self.save_future.result()

  def save_async(self, task: Callable[[], Any]) -> None:
    self.wait_previous_save()
    self.save_future = self.executor.submit(task)


# --- names and listing -------------------------------------------------------------------------


def natural_sort(file_list: Iterable[str], signed: bool = True) -> list[str]:
  """Sorts names so that their numeric parts compare as numbers: ``ckpt_2`` before
  ``ckpt_10``, ``ckpt_-1.0`` before ``ckpt_0.01`` (with ``signed``) and ``ckpt_1e5`` last."""
  float_re = SIGNED_FLOAT_RE if signed else UNSIGNED_FLOAT_RE

  def sort_key(name: str) -> list[Any]:
    return [float(part) if float_re.match(part) else part for part in float_re.split(name)]

  return sorted(file_list, key=sort_key)


def safe_normpath(path: str) -> str:
  """``os.path.normpath`` that keeps a URL scheme such as ``gs://`` intact."""
  match = SCHEME_RE.match(path)
  assert match is not None  # The pattern matches every string.
  return (match['scheme'] or '') + os.path.normpath(match['path'])


def _check_prefix(prefix: str) -> str:
  """Refuses a ``prefix`` with which ``<prefix><step>`` is not a plain name inside ckpt_dir."""
  if not isinstance(prefix, str):
    raise TypeError(f'prefix={prefix!r} is a {type(prefix).__name__}; expected a string.')
  problem = ("contains '/' (or is absolute)" if '/' in prefix or os.sep in prefix
             else 'contains a backslash' if '\\' in prefix
             else 'contains a NUL character' if '\x00' in prefix else None)
  if problem is not None:
    raise ValueError(f'prefix={prefix!r} {problem}: checkpoints are the entries '
                     '<prefix><step> of ckpt_dir, so a prefix that names another directory '
                     "could write or delete outside it. Use a plain name such as 'checkpoint_' "
                     'and put the directory in ckpt_dir.')
  return prefix


def _checkpoint_name(step: int | float | str, prefix: str) -> str:
  name = f'{_check_prefix(prefix)}{step}'
  if '/' in name or '\\' in name or '\x00' in name or name in ('.', '..'):
    raise ValueError(f'step={step!r} gives the checkpoint name {name!r}, which is not an entry '
                     'of ckpt_dir; steps are numbers.')
  return name


def _checkpoint_path(ckpt_dir: str, step: int | float | str, prefix: str) -> str:
  return os.path.join(ckpt_dir, _checkpoint_name(step, prefix))


def _step_of(path: str) -> float | None:
  """The last number in ``path`` (what flax takes as a checkpoint's step)."""
  for part in reversed(SIGNED_FLOAT_RE.split(path)):
    if SIGNED_FLOAT_RE.match(part):
      return float(part)
  return None


def _names(directory: str | pathlib.Path) -> list[str]:
  path = _storage.as_path(directory)
  return _storage.list_names(path) if _storage.is_dir(path) else []


def _is_committed(path: pathlib.Path) -> bool:
  """Whether the checkpoint listed at ``path`` is complete. On a local disk every listed name
  is (saves commit by rename). On an object store, where saves write in place: a msgpack object
  (a PUT appears whole), or an Orbax directory holding ``commit_success.txt``."""
  return (_storage.renames_atomically(path) or _storage.is_file(path)
          or _storage.is_file(path / COMMIT_SUCCESS_FILE))


def _is_in_flight(name: str, prefix: str) -> bool:
  return name == f'{prefix}tmp' or _ORBAX_TMP_MARK in name or _TMP_MARK in name


def _all_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = 'checkpoint_') -> list[str]:
  ckpt_dir = os.fspath(ckpt_dir)
  _check_prefix(prefix)
  return natural_sort(
      os.path.join(ckpt_dir, name) for name in _names(ckpt_dir)
      if name.startswith(prefix) and not name.endswith(MP_ARRAY_POSTFIX)
      and not _is_in_flight(name, prefix)
      and _is_committed(_storage.as_path(os.path.join(ckpt_dir, name))))


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = 'checkpoint_') -> str | None:
  """The path of the newest checkpoint in ``ckpt_dir`` (natural sort order), or None."""
  paths = _all_checkpoints(ckpt_dir, prefix)
  return paths[-1] if paths else None


def available_steps(ckpt_dir: str | os.PathLike, prefix: str = 'checkpoint_',
                    step_type: type = int) -> list[int | float]:
  """The steps of the checkpoints in ``ckpt_dir``, oldest first, as ``step_type``."""
  steps = []
  for path in _all_checkpoints(ckpt_dir, prefix):
    text = path[path.rfind(prefix) + len(prefix):]
    try:
      steps.append(step_type(text))
    except ValueError as e:
      raise ValueError(f'Checkpoint {path}: step {text!r} is not a valid {step_type.__name__}; '
                       'pass step_type=float for float steps.') from e
  return steps


def _is_orbax_checkpoint(path: str) -> bool:
  root = _storage.as_path(path)
  return any(_storage.exists(root / name) for name in
             (ORBAX_CKPT_FILENAME, ORBAX_METADATA_FILENAME, ORBAX_MANIFEST_OCDBT))


# --- saving ------------------------------------------------------------------------------------


def _paths(ckpt_dir: str | os.PathLike, step: int | float, prefix: str) -> tuple[str, str]:
  """(final path, ``<dir>/<prefix>``) of a save."""
  if any(c in prefix for c in '*?['):
    raise ValueError(f'Checkpoint prefix {prefix!r} contains a glob character (* ? [); '
                     'checkpoints with it could not be listed back.')
  ckpt_dir = safe_normpath(os.fspath(ckpt_dir))
  ckpt_path = _checkpoint_path(ckpt_dir, step, prefix)
  directory = _storage.as_path(ckpt_dir)
  if _storage.exists(directory) and not _storage.is_dir(directory):
    raise NotADirectoryError(f'Checkpoint directory {ckpt_dir} is a file; expected a directory '
                             'to hold checkpoints.')
  logger.info('Saving checkpoint at step: %s', step)
  return ckpt_path, os.path.join(ckpt_dir, prefix)


def _check_not_outdated(ckpt_path: str, base_path: str, step: int | float) -> None:
  """Flax refuses (without overwrite) a step that exists or is not newer than every other."""
  existing = _all_checkpoints(*os.path.split(base_path))
  if ckpt_path in existing or natural_sort(existing + [ckpt_path])[-1] != ckpt_path:
    raise errors.InvalidCheckpointError(ckpt_path, step)


def _commit_lock(ckpt_path: str) -> contextlib.AbstractContextManager[None]:
  """Serializes the commits (and retention) of flaxckpt's writers in the directory of
  ``ckpt_path``: a lock on the directory itself adds no entry flax could list, and dies with its
  holder. Where the file system has no such locks, commits run unserialized; a commit without
  overwrite still never replaces a file (``_storage.link_new``). An object store has no locks:
  there a commit without overwrite writes its object only if none is there yet.

  Raises:
    TimeoutError: another process held the lock for ``_COMMIT_LOCK_SECONDS``.
  """
  directory = _storage.as_path(ckpt_path).parent
  if _storage.is_remote(directory):
    return contextlib.nullcontext()
  return _storage.directory_lock(directory, _COMMIT_LOCK_SECONDS)


def _remove_invalid_checkpoints(ckpt_path: str, base_path: str, keep: int, overwrite: bool,
                                keep_every_n_steps: int | None, saving: bool = False) -> None:
  """Applies flax's retention after a save: with ``overwrite``, everything newer than
  ``ckpt_path`` goes; then all but the newest ``keep`` (none for ``keep=0``, as in flax), sparing
  one every ``keep_every_n_steps`` steps. A checkpoint's ``_gda`` folder goes with it.

  Unlike flax, in-flight entries (``<prefix>tmp``, Orbax temporary directories, our own
  temporaries) neither count nor are deleted: an async save may still be writing them, and until
  it commits the ``keep`` newest committed checkpoints are all there is. (Flax's result here
  depends on whether the async save has created its directory yet.) With ``saving`` (an async
  save of ``ckpt_path`` was just started) that checkpoint does not count either, even if its
  save has already committed, so what retention keeps does not depend on timing. Temporaries
  that a killed writer of ours left are removed (on an object store: the uncommitted
  checkpoints of steps before this one).
  """
  directory, prefix = os.path.split(base_path)
  root = _storage.as_path(directory)
  if _storage.renames_atomically(root):  # Only renames move a checkpoint aside.
    _steps.recover_replaced(root)  # A replace that was cut off.
  paths = _all_checkpoints(directory, prefix)
  if overwrite and ckpt_path in paths:
    cut = paths.index(ckpt_path) + 1
    paths, newer = paths[:cut], paths[cut:]
    for path in newer:
      _delete_checkpoint(path)
  if saving:
    paths = [path for path in paths if path != ckpt_path]
  if len(paths) > keep:
    last_kept = -float('inf')
    for path in paths[:-keep]:
      if keep_every_n_steps:
        step = _step_of(path)
        if step and step - last_kept >= keep_every_n_steps:
          last_kept = step
          continue
      _delete_checkpoint(path)
  for name in _names(directory):  # Deletions a crash cut short.
    if name.startswith(prefix) and name.endswith(_steps.DELETING_SUFFIX):
      _storage.remove(root / name)
  step = _step_of(os.path.basename(ckpt_path)) or 0
  if _storage.renames_atomically(root):
    _remove_abandoned_temporaries(root, prefix, step)
  else:
    _remove_uncommitted(root, prefix, step)
  if _sidecar.fits_prefix(prefix):
    _sidecar.remove_orphans(directory, prefix)


def _delete_checkpoint(path: str) -> None:
  """Deletes a checkpoint so that a crash part-way never leaves it listed but damaged: the
  listed name goes first (an Orbax directory is moved aside, then removed). A link standing at
  a checkpoint's name is removed itself, never what it points to."""
  logger.info('Removing checkpoint at %s', path)
  checkpoint = _storage.as_path(path)
  if _storage.is_dir(checkpoint) and not _storage.is_link(checkpoint):
    _steps.delete(checkpoint)
  else:
    _storage.remove(checkpoint)
  _storage.remove(_storage.as_path(path + MP_ARRAY_POSTFIX))
  _sidecar.remove(path)


def _remove_abandoned_temporaries(directory: pathlib.Path, prefix: str, step: int | float
                                  ) -> None:
  """Removes the temporaries of our saves whose writer died: msgpack files (then their
  ``_gda`` folders), and the Orbax-format temporary directories of steps up to ``step``, the
  one just saved (later ones may be another program's saves in flight, which hold no lock)."""
  names = [name for name in _names(os.fspath(directory))
           if name.startswith('.') and _TMP_MARK in name
           or _is_superseded_save(name, prefix, step)]
  for name in sorted(names, key=lambda name: name.endswith(MP_ARRAY_POSTFIX)):
    path = directory / name
    if name.endswith(MP_ARRAY_POSTFIX):
      partner = directory / name[:-len(MP_ARRAY_POSTFIX)]
      if partner.exists() or partner.is_symlink():
        continue  # Its save still runs (it creates the file first and removes it last).
      logger.info('Removing %s, left by a save that did not finish.', path)
      _storage.remove_tree(path)
    elif _storage.remove_if_abandoned(path):
      logger.info('Removed %s, left by a save that did not finish.', path)


def _remove_uncommitted(root: pathlib.Path, prefix: str, step: int | float) -> None:
  """Removes, from an object store, what saves of steps before ``step`` (the one just saved;
  later ones may still be running) left when they died: they write in place, under their final
  names. Those are an Orbax directory without ``commit_success.txt``, and a ``_gda`` folder
  whose msgpack object was never written."""
  for name in _names(root):
    checkpoint = name[:-len(MP_ARRAY_POSTFIX)] if name.endswith(MP_ARRAY_POSTFIX) else name
    if not checkpoint.startswith(prefix) or _is_in_flight(checkpoint, prefix):
      continue
    saved = _step_of(checkpoint[len(prefix):])
    if saved is None or saved >= step:
      continue
    if (not _storage.is_file(root / checkpoint) if name != checkpoint
        else not _is_committed(root / name)):
      logger.info('Removing %s, left by a save that did not finish.', root / name)
      _storage.remove_tree(root / name)


def _is_superseded_save(name: str, prefix: str, step: int | float) -> bool:
  if not _steps.is_save_in_flight(name) or not name.startswith(prefix):
    return False
  saved = _step_of(name[len(prefix):name.rfind(_ORBAX_TMP_MARK)])
  return saved is not None and saved <= step


def _orbax_save(ckpt_path: str, target: PyTree, overwrite: bool,
                orbax_checkpointer: Checkpointer | None) -> None:
  if isinstance(orbax_checkpointer, AsyncCheckpointer):
    orbax_checkpointer.wait_until_finished()
  checkpointer = orbax_checkpointer or Checkpointer(PyTreeCheckpointHandler())
  if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(target)):
    raise ValueError(
        'The Orbax backend only saves pytrees, but the target for '
        f'{ckpt_path} is a single {type(target).__name__}. Wrap it in a dict, or set '
        "flax.config.update('flax_use_orbax_checkpointing', False) for a msgpack checkpoint.")
  checkpointer.save(ckpt_path, target, force=overwrite)


def _uses_orbax(orbax_checkpointer: Any) -> bool:
  return bool(flax.config.flax_use_orbax_checkpointing or orbax_checkpointer)


class _Written:
  """A msgpack save written but not yet committed, on a local disk: a file under a temporary
  name of this save's own, with its ``_gda`` folder beside it; ``file`` stays open until the
  commit ends: its lock tells other saves that this one still runs. The commit renames both
  into place."""

  def __init__(self, final: pathlib.Path, tmp_name: str):
    self.final = final
    self.path = final.with_name(tmp_name)
    self.gda_path = final.with_name(tmp_name + MP_ARRAY_POSTFIX)
    self.checksum: _sidecar.Checksum | None = None
    self.identity: _sidecar.Identity | None = None
    self._file: IO[bytes] | None = None

  def write(self, state: Any) -> None:
    """Writes ``state`` to a new file at ``path`` (refused if anything stands there), keeping
    its size and crc32c, taken on the way, and its identity once written."""
    _storage.make_dirs(self.path.parent)
    self._file = _storage.open_new_locked(self.path)
    summed = _sidecar.ChecksummingFile(self._file)
    _msgpack.write(summed, state)
    self._file.flush()
    self.checksum = summed.checksum
    self.identity = _sidecar.Identity.of_fd(self._file.fileno())

  def prepare_arrays(self) -> None:
    """Creates the ``_gda`` folder every process writes its shards into."""
    _storage.make_new_dir(self.gda_path)

  def commit_arrays(self) -> None:
    gda_final = self.final.with_name(self.final.name + MP_ARRAY_POSTFIX)
    _storage.remove_tree(gda_final)  # The old step's, or a commit's that was cut off.
    _storage.rename(self.gda_path, gda_final)

  def commit_file(self, overwrite: bool, step: int | float) -> None:
    """Gives the file its final name; without ``overwrite`` that name must be free (flax's
    error if not)."""
    if overwrite:
      _storage.rename(self.path, self.final)
      return
    try:
      _storage.link_new(self.path, self.final)
    except FileExistsError as e:
      raise errors.InvalidCheckpointError(os.fspath(self.final), step) from e

  def close(self, discard: bool) -> None:
    """Closes the file; with ``discard`` (an uncommitted save) removes what it wrote."""
    try:
      if discard and self._file is not None:  # Else what stands there is not this save's.
        _storage.remove_tree(self.gda_path)
        _storage.remove(self.path)
    finally:
      if self._file is not None:
        self._file.close()


class _WrittenToBucket(_Written):
  """A msgpack save on an object store, where an object appears whole once written: nothing
  is stored before the commit (the bytes wait in memory, as in flax's own save), and the
  ``_gda`` folder is written in place under its final name, committed by its
  ``commit_success.txt`` as flax does on GCS. No temporary names, no locks."""

  def __init__(self, final: pathlib.Path, tmp_name: str):
    del tmp_name  # No temporaries on a bucket: the save writes under the final names.
    super().__init__(final, final.name)
    self._data = b''

  def write(self, state: Any) -> None:
    self._data, self.checksum = _sidecar.encode(state)

  def prepare_arrays(self) -> None:
    # With overwrite, the old step goes first, its msgpack object before its arrays, so that
    # it is never listed with arrays missing, nor is this save's until it commits. Else these
    # are the arrays of a save that died.
    _delete_checkpoint(os.fspath(self.final))

  def commit_arrays(self) -> None:
    _storage.write_text(self.gda_path / COMMIT_SUCCESS_FILE,
                        f'Checkpoint commit was successful to {self.gda_path}')

  def commit_file(self, overwrite: bool, step: int | float) -> None:
    try:
      _storage.write_bytes(self.final, self._data, exclusive=not overwrite)
    except _errors.UnsafeCheckpointError as e:  # Another writer committed this step meanwhile.
      raise errors.InvalidCheckpointError(os.fspath(self.final), step) from e

  def close(self, discard: bool) -> None:
    self._data = b''
    if discard:  # The checkpoint object itself is never touched: it may be the old step's.
      _storage.remove_tree(self.gda_path)


def _temporary_name(ckpt_path: str) -> str:
  return f'.{os.path.basename(ckpt_path)}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}'


def _pending(ckpt_path: str, tmp_name: str) -> _Written:
  """How a msgpack save to ``ckpt_path`` writes and commits (see ``_Written``)."""
  final = _storage.as_path(ckpt_path)
  kind = _Written if _storage.renames_atomically(final) else _WrittenToBucket
  return kind(final, tmp_name)


def _write_msgpack(state: Any, ckpt_path: str, tmp_name: str) -> _Written:
  written = _pending(ckpt_path, tmp_name)
  try:
    written.write(state)
  except BaseException:
    written.close(discard=True)
    raise
  return written


def _host_snapshot(state: Any) -> Any:
  """``state`` with every array copied to host memory, for a save that finishes later.

  Dict order is kept: it is the order of the bytes in the file.
  """
  if type(state) is dict:
    return {key: _host_snapshot(value) for key, value in state.items()}
  if type(state) is list:
    return [_host_snapshot(value) for value in state]
  if isinstance(state, np.generic):  # Immutable; a copy would turn it into a 0-d array,
    return state                      # which msgpack encodes differently.
  if isinstance(state, (jax.Array, np.ndarray)):
    return _msgpack.host_array(state).copy()
  return state


def _commit(written: _Written, ckpt_path: str, base_path: str, step: int | float, keep: int,
            overwrite: bool, keep_every_n_steps: int | None, has_gda: bool) -> None:
  """Puts a written save in place (its ``_gda`` folder first), then its sidecar, then applies
  retention, holding the directory's commit lock. Without ``overwrite`` the step is checked
  again under the lock and nothing existing is replaced: a concurrent writer that got there
  first makes this one raise ``InvalidCheckpointError``."""
  committed = False
  try:
    with _commit_lock(ckpt_path):
      if not overwrite:
        _check_not_outdated(ckpt_path, base_path, step)
      if has_gda:
        written.commit_arrays()
      if overwrite:
        # A sidecar from before identities were recorded must not outlive its file.
        _sidecar.remove(ckpt_path)
      written.commit_file(overwrite, step)
      committed = True
      if _sidecar.fits_prefix(os.path.basename(base_path)):
        assert written.checksum is not None
        try:
          _sidecar.write(ckpt_path, written.checksum, written.identity)
        except OSError as e:  # The checkpoint is complete; it only goes unchecked, like flax's.
          logger.warning('Saved %s without its checksum file: %s', ckpt_path, e)
      logger.info('Saved checkpoint at %s', ckpt_path)
      _remove_invalid_checkpoints(ckpt_path, base_path, keep, overwrite, keep_every_n_steps)
  finally:  # No half-committed save is left to look like one in flight.
    written.close(discard=not committed)


def save_checkpoint(ckpt_dir: str | os.PathLike, target: PyTree, step: int | float,
                    prefix: str = 'checkpoint_', keep: int = 1, overwrite: bool = False,
                    keep_every_n_steps: int | None = None,
                    async_manager: AsyncManager | None = None,
                    orbax_checkpointer: Checkpointer | None = None) -> str:
  """Saves ``target`` as checkpoint ``step`` in ``ckpt_dir``, from a single process.

  Writes ``<prefix><step>`` through a temporary name of this save's own (msgpack) or a
  temporary directory (Orbax) and a rename, so an interrupted save never looks complete, then
  deletes checkpoints as ``keep``, ``keep_every_n_steps`` and ``overwrite`` ask. With
  ``async_manager`` a msgpack save is written on a background thread from a host copy of
  ``target``. Several processes may save into one directory: each commit is checked again and
  done under a lock, so one may fail, but none mixes its file with another's.

  Returns:
    The path of the new checkpoint.

  Raises:
    flax.errors.InvalidCheckpointError: without ``overwrite``, ``step`` exists already or is
      not newer than every checkpoint in ``ckpt_dir`` (also when another writer committed it
      while this save was writing).
    ValueError: ``prefix`` or ``step`` would name something outside ``ckpt_dir``.
  """
  if async_manager:
    async_manager.wait_previous_save()
  ckpt_path, base_path = _paths(ckpt_dir, step, prefix)
  if _uses_orbax(orbax_checkpointer):
    if jax.process_count() > 1:
      logger.warning('save_checkpoint is called with several JAX processes: every process must '
                     'call it, or the devices hang; use save_checkpoint_multiprocess.')
    _orbax_save(ckpt_path, target, overwrite, orbax_checkpointer)
    if jax.process_index() == 0:
      with _commit_lock(ckpt_path):
        _remove_invalid_checkpoints(ckpt_path, base_path, keep, overwrite, keep_every_n_steps,
                                    saving=isinstance(orbax_checkpointer, AsyncCheckpointer))
    return ckpt_path
  if not overwrite:
    _check_not_outdated(ckpt_path, base_path, step)
  state = serialization.to_state_dict(target)
  tmp_name = _temporary_name(ckpt_path)

  def write_and_commit(state: Any) -> None:
    written = _write_msgpack(state, ckpt_path, tmp_name)
    _commit(written, ckpt_path, base_path, step, keep, overwrite, keep_every_n_steps, False)

  if async_manager:
    snapshot = _host_snapshot(state)
    async_manager.save_async(lambda: write_and_commit(snapshot))
  else:
    write_and_commit(state)
  return ckpt_path


def save_checkpoint_multiprocess(ckpt_dir: str | os.PathLike, target: PyTree,
                                 step: int | float, prefix: str = 'checkpoint_', keep: int = 1,
                                 overwrite: bool = False, keep_every_n_steps: int | None = None,
                                 async_manager: AsyncManager | None = None,
                                 gda_manager: Any | None = None,
                                 orbax_checkpointer: Checkpointer | None = None) -> str:
  """Saves ``target`` from every process of a multi-process job into one shared checkpoint.

  Every process must call it. Process 0 writes the msgpack file and applies retention; arrays
  that no single process holds whole go to ``<prefix><step>_gda/``, each process writing its
  own shards into a temporary folder that process 0 names and creates (on an object store:
  into the final folder, committed by its ``commit_success.txt`` before the msgpack object is
  written, as flax does on GCS). Unlike flax, no
  ``gda_manager`` is needed (one passed is ignored): flaxckpt writes the arrays itself before
  this returns.

  Returns:
    The path of the new checkpoint.
  """
  _multihost.barrier('flaxckpt.legacy:save:start')
  if async_manager:
    async_manager.wait_previous_save()
  ckpt_path, base_path = _paths(ckpt_dir, step, prefix)
  if _uses_orbax(orbax_checkpointer):
    if jax.process_index() == 0:
      with _commit_lock(ckpt_path):
        _remove_invalid_checkpoints(ckpt_path, base_path, keep, overwrite, keep_every_n_steps)
    _orbax_save(ckpt_path, target, overwrite, orbax_checkpointer)
    return ckpt_path
  state, gda_arrays = _gda.split(serialization.to_state_dict(target))
  state = jax.tree_util.tree_map(lambda x: x, state)  # Flax's copy; it sorts dict keys.
  if not overwrite:
    _check_not_outdated(ckpt_path, base_path, step)
    _multihost.barrier('flaxckpt.legacy:save:checked')
  is_writer = jax.process_index() == 0
  # Process 0's name for the temporaries; the others write the arrays into its _gda folder.
  tmp_name = _multihost.agree(f'flaxckpt.legacy:tmp:{os.path.basename(ckpt_path)}',
                              _temporary_name(ckpt_path))
  _storage.check_name(tmp_name, 'the temporary name chosen by process 0')
  written = None  # Process 0's msgpack file, once written.
  try:
    if is_writer:
      written = _write_msgpack(_host_snapshot(state) if async_manager else state, ckpt_path,
                               tmp_name)
    if gda_arrays:
      if written is not None:
        written.prepare_arrays()
      _multihost.barrier('flaxckpt.legacy:save:gda_dir')
      _gda.write(_pending(ckpt_path, tmp_name).gda_path, gda_arrays)
      _multihost.barrier('flaxckpt.legacy:save:gda_written')
  except BaseException:
    if written is not None:
      written.close(discard=True)
    raise
  if written is not None:
    commit = lambda: _commit(written, ckpt_path, base_path, step, keep, overwrite,
                             keep_every_n_steps, bool(gda_arrays))
    if async_manager:
      async_manager.save_async(commit)
    else:
      commit()
  return ckpt_path


# --- restoring ---------------------------------------------------------------------------------


def _check_entry(ckpt_path: str, ckpt_dir: str) -> None:
  """Refuses a checkpoint found in ``ckpt_dir`` that is a link leading outside it."""
  try:
    _storage.check_inside(_storage.as_path(ckpt_path), _storage.as_path(ckpt_dir),
                          'the checkpoint')
  except _errors.UnsafeCheckpointError as e:
    raise _errors.UnsafeCheckpointError(
        f'{e} Pass the target itself as ckpt_dir to restore it.') from None


def _resolve(ckpt_dir: str, step: int | float | None, prefix: str) -> str | None:
  """The checkpoint path to restore, or None when there is none (flax then returns target)."""
  if step is not None:
    ckpt_path = _checkpoint_path(ckpt_dir, step, prefix)
    path = _storage.as_path(ckpt_path)
    if not _storage.exists(path):
      if _storage.is_file(_storage.as_path(ckpt_dir)):
        raise ValueError(f'Matching checkpoint not found: {ckpt_path}. {ckpt_dir} is a '
                         'checkpoint file; with step= pass the directory that holds it.')
      raise ValueError(f'Matching checkpoint not found: {ckpt_path}')
    if not _is_committed(path):
      raise _errors.IncompleteCheckpointError(
          f'Matching checkpoint not committed: {ckpt_path} has no {COMMIT_SUCCESS_FILE}, so its '
          'save is still running or was cut off; only committed checkpoints are restored.')
    _check_entry(ckpt_path, ckpt_dir)
    return ckpt_path
  directory = _storage.as_path(ckpt_dir)
  if not _storage.exists(directory):
    logger.warning('No checkpoint directory at %s; returning the target unchanged.', ckpt_dir)
    return None
  if not _storage.is_dir(directory) or _is_orbax_checkpoint(ckpt_dir):
    return ckpt_dir
  latest = latest_checkpoint(ckpt_dir, prefix)
  if latest is not None:
    _check_entry(latest, ckpt_dir)
  if latest is None:
    logger.warning('No checkpoint with prefix %r in %s; returning the target unchanged.',
                   prefix, ckpt_dir)
  return latest


def _orbax_restore(ckpt_path: str, target: Any, orbax_checkpointer: Checkpointer | None,
                   orbax_transforms: dict | None) -> Any:
  checkpointer = orbax_checkpointer or Checkpointer(PyTreeCheckpointHandler())
  kwargs = {}
  if target is not None:
    kwargs['restore_args'] = orbax_utils.restore_args_from_target(target)
    if isinstance(getattr(checkpointer, 'handler', None), PyTreeCheckpointHandler):
      kwargs['transforms'] = orbax_utils.maybe_construct_transformations(
          target, orbax_transforms)
  restored = serialization.to_state_dict(checkpointer.restore(ckpt_path, item=target, **kwargs))
  return restored if target is None else _from_state_dict(target, restored, ckpt_path)


def _from_state_dict(target: Any, state: Any, ckpt_path: str) -> Any:
  """``flax.serialization.from_state_dict``, its errors naming the checkpoint."""
  try:
    return serialization.from_state_dict(target, state)
  except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
    found = f'a {type(state).__name__}' if not isinstance(state, dict) else 'a tree'
    raise _errors.StructureMismatchError(
        f'{ckpt_path} holds {found} that does not fit the target '
        f'{type(target).__name__} ({type(e).__name__}: {e}). Restore with target=None to see '
        'what it holds.') from e


def _read_msgpack(ckpt_path: str, verify_checksums: bool) -> Any:
  """The state dict in the msgpack file (or object) at ``ckpt_path``.

  A local file is read into a new writable buffer. An object is read whole with no size limit
  (a msgpack checkpoint holds the whole state, and its size is the size of the object, not a
  number it declares), and its arrays are read-only views into the bytes read, as flax's own
  restore returns them: a writable copy would double the memory of the restore."""
  path = _storage.as_path(ckpt_path)
  if _storage.is_dir(path):
    raise _errors.NotACheckpointError(
        f'{ckpt_path} is a directory but not an Orbax checkpoint (it has no _METADATA, '
        'manifest.ocdbt or checkpoint file), and a msgpack checkpoint is a file.')
  local = not _storage.is_remote(path)
  data = _storage.read_into_buffer(path) if local else _storage.map_readonly(path)
  if verify_checksums:
    # Stat after reading: a file replaced in between is then not checked, rather than checked
    # against the identity it no longer has. (Objects have no identity to check.)
    _sidecar.verify(ckpt_path, data, os.stat(path) if local else None)
  try:
    return _msgpack.decode(data)
  except _msgpack.MsgpackDecodeError as e:
    raise CorruptCheckpointError(
        f'{ckpt_path} is not a complete flax msgpack checkpoint: {e}. The file is truncated or '
        'was not written by save_checkpoint.') from e


def _restore_gda_arrays(state: Any, target: Any, ckpt_path: str, step: int | float | None,
                        allow_partial: bool) -> Any:
  """Reads the ``_gda`` arrays whose placeholders are in ``state``.

  Each is placed like the target's array at its position: with its sharding for a jax.Array or
  a ``jax.ShapeDtypeStruct`` with a sharding (flax accepts only arrays spread over several
  processes; any sharding works here), as numpy for a numpy array. Where the target has no
  array (or there is no target) flax raises ``MPARestoreTargetRequiredError``; flaxckpt reads
  the array as numpy, exactly as stored, unless ``allow_partial`` asks to leave the placeholder
  string there, as flax does.
  """
  found = _gda.placeholders(state, ckpt_path)
  if not found:
    return state
  flat_target: dict[tuple[str, ...], Any]
  if found[0][0] == ():
    flat_target = {(): target}
  elif target is not None:
    flat_target = flax.traverse_util.flatten_dict(serialization.to_state_dict(target),
                                                  keep_empty_nodes=True)
  else:
    flat_target = {}
  wanted = []
  for key, subpath in found:
    if subpath != '/'.join(key) or any(part == '.' for part in subpath.split('/')):
      raise CorruptCheckpointError(
          f'{ckpt_path}: the multi-process array placeholder at {"/".join(key)!r} names the '
          f'folder {subpath!r} of {ckpt_path + MP_ARRAY_POSTFIX}; flax names it after the key '
          'path.')
    reference = flat_target.get(key)
    if not isinstance(reference, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
      if allow_partial:
        logger.warning('Multi-process array %s of %s is not restored: the target has no array '
                       'there.', '/'.join(key), ckpt_path)
        continue
      reference = None  # Read whole, as numpy.
    wanted.append((key, subpath, reference))
  if not wanted:
    return state
  gda_dir = _storage.as_path(ckpt_path + MP_ARRAY_POSTFIX)
  # Written in place on an object store, the folder is complete once it has its commit file
  # (flax checks it on GCS only; flaxckpt writes it on S3 too, and so asks for it there).
  if (not _storage.renames_atomically(gda_dir)
      and not _storage.is_file(gda_dir / COMMIT_SUCCESS_FILE)):
    raise errors.MPARestoreDataCorruptedError(step, ckpt_path)
  if not _storage.is_dir(gda_dir):
    raise _errors.IncompleteCheckpointError(
        f'{ckpt_path} refers to multi-process arrays in {gda_dir}, which does not exist.')
  _storage.check_tree(gda_dir, root=gda_dir.parent)  # No FIFO to hang on, no link out.
  arrays = _gda.read(gda_dir, [subpath for _, subpath, _ in wanted],
                     [reference for _, _, reference in wanted])
  return _gda.replace(state, {key: array for (key, _, _), array in zip(wanted, arrays)})


def restore_checkpoint(ckpt_dir: str | os.PathLike, target: Any | None,
                       step: int | float | None = None, prefix: str = 'checkpoint_',
                       parallel: bool = True, gda_manager: Any | None = None,
                       allow_partial_mpa_restoration: bool = False,
                       orbax_checkpointer: Checkpointer | None = None,
                       orbax_transforms: dict | None = None,
                       verify_checksums: bool = True) -> PyTree:
  """Restores the newest checkpoint in ``ckpt_dir`` (or ``step``, or ``ckpt_dir`` itself when it
  is a checkpoint), whichever backend wrote it.

  Without a target the raw state dict comes back (lists as ``{'0': ...}`` dicts, numpy arrays,
  ``_gda`` arrays too, where flax raises ``MPARestoreTargetRequiredError``); with one,
  ``flax.serialization.from_state_dict`` rebuilds its structure, a ``_gda`` array taking the
  sharding of the target's jax.Array or ``ShapeDtypeStruct`` (numpy for a numpy leaf, or where
  the target has no array). ``allow_partial_mpa_restoration`` leaves the placeholder string of a
  ``_gda`` array that has no target array, as flax does. When ``ckpt_dir``
  does not exist or holds no checkpoint, ``target`` is returned unchanged (with a warning).
  ``parallel`` and ``gda_manager`` are accepted for flax's call sites; flaxckpt reads files in
  parallel slices and reads ``_gda`` arrays itself. A msgpack file with a ``.<name>.crc32c``
  sidecar (written by flaxckpt's ``save_checkpoint``) is checked against it first, unless
  ``verify_checksums`` is False; files without one (written by flax) are read unchecked.

  Raises:
    ValueError: ``step`` names a checkpoint that does not exist.
    CorruptCheckpointError: a msgpack file is truncated or not a checkpoint.
    ChecksumMismatchError: a msgpack file's size or crc32c differs from its sidecar's (a
      ``CorruptCheckpointError`` and a ``flaxckpt.ChecksumError``).
    flaxckpt.StructureMismatchError: the checkpoint does not fit ``target``.
    flaxckpt.IncompleteCheckpointError: the checkpoint's ``_gda`` folder is missing.
    flaxckpt.UnsafeCheckpointError: the checkpoint (or its ``_gda`` folder) holds a link leading
      outside ``ckpt_dir``, or something other than regular files and directories.
  """
  del parallel, gda_manager  # flaxckpt reads the files itself.
  _check_prefix(prefix)
  if isinstance(orbax_checkpointer, AsyncCheckpointer):
    orbax_checkpointer.wait_until_finished()
  ckpt_dir = safe_normpath(os.fspath(ckpt_dir))
  ckpt_path = _resolve(ckpt_dir, step, prefix)
  if ckpt_path is None:
    return target
  if _is_orbax_checkpoint(ckpt_path):
    logger.info('Restoring Orbax checkpoint from %s', ckpt_path)
    return _orbax_restore(ckpt_path, target, orbax_checkpointer, orbax_transforms)
  logger.info('Restoring legacy Flax checkpoint from %s', ckpt_path)
  state = _restore_gda_arrays(_read_msgpack(ckpt_path, verify_checksums), target, ckpt_path,
                              step, allow_partial_mpa_restoration)
  return state if target is None else _from_state_dict(target, state, ckpt_path)


def convert_pre_linen(params: PyTree) -> PyTree:
  """Renames pre-Linen submodules (numbered across classes: ``Conv_0, Dense_1``) to Linen's
  per-class numbering (``Conv_0, Dense_0``); Linen trees come back unchanged."""
  if not isinstance(params, (dict, core.FrozenDict)):
    return params
  renamed = {}
  counts: dict[str, int] = {}
  for name in natural_sort(params.keys()):
    match = MODULE_NUM_RE.match(name)
    new_name = name
    if match:
      module = match.group(1)
      new_name = f'{module}_{counts.get(module, 0)}'
      counts[module] = counts.get(module, 0) + 1
    renamed[new_name] = convert_pre_linen(params[name])
  return core.freeze(renamed) if isinstance(params, core.FrozenDict) else renamed


__all__ = [
    'AsyncManager', 'ChecksumMismatchError', 'CorruptCheckpointError', 'available_steps',
    'convert_pre_linen',
    'latest_checkpoint', 'natural_sort', 'restore_checkpoint', 'safe_normpath',
    'save_checkpoint', 'save_checkpoint_multiprocess',
]
