"""A drop-in ``flax.training.checkpoints`` on flaxckpt's core.

Same functions, signatures, defaults and files as flax 0.12 (FORMATS.md §3). With flax's flag
``flax_use_orbax_checkpointing`` (or an ``orbax_checkpointer=``) a checkpoint is an Orbax PyTree
directory written by flaxckpt's own checkpointers; otherwise it is a msgpack file with exactly
the bytes ``flax.serialization.to_bytes`` gives, streamed to disk. ``restore_checkpoint`` reads
either kind, and ``_gda`` multi-process arrays, whatever the flag says.

Where we differ from flax: retention never deletes a save that is still in flight (``<prefix>tmp``
or ``*.orbax-checkpoint-tmp*``), errors name the path they are about, a corrupt msgpack file
raises ``CorruptCheckpointError`` instead of a bare msgpack error, ``_gda`` arrays restore
without a target (as numpy) instead of raising ``MPARestoreTargetRequiredError``, and each
msgpack file we write gets a hidden sidecar ``.<name>.crc32c`` with its size and crc32c, checked
on restore (flax's format has no checksum; flax neither lists nor reads the sidecar).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

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


def _checkpoint_path(ckpt_dir: str, step: int | float | str, prefix: str) -> str:
  return os.path.join(ckpt_dir, f'{prefix}{step}')


def _step_of(path: str) -> float | None:
  """The last number in ``path`` (what flax takes as a checkpoint's step)."""
  for part in reversed(SIGNED_FLOAT_RE.split(path)):
    if SIGNED_FLOAT_RE.match(part):
      return float(part)
  return None


def _names(directory: str) -> list[str]:
  path = _storage.as_path(directory)
  return _storage.list_names(path) if _storage.is_dir(path) else []


def _is_in_flight(name: str, prefix: str) -> bool:
  return name == f'{prefix}tmp' or _ORBAX_TMP_MARK in name


def _all_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = 'checkpoint_') -> list[str]:
  ckpt_dir = os.fspath(ckpt_dir)
  return natural_sort(
      os.path.join(ckpt_dir, name) for name in _names(ckpt_dir)
      if name.startswith(prefix) and not name.endswith(MP_ARRAY_POSTFIX)
      and not _is_in_flight(name, prefix))


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


def _paths(ckpt_dir: str | os.PathLike, step: int | float, prefix: str) -> tuple[str, str, str]:
  """(final path, temporary path, ``<dir>/<prefix>``) of a save."""
  if any(c in prefix for c in '*?['):
    raise ValueError(f'Checkpoint prefix {prefix!r} contains a glob character (* ? [); '
                     'checkpoints with it could not be listed back.')
  ckpt_dir = safe_normpath(os.fspath(ckpt_dir))
  directory = _storage.as_path(ckpt_dir)
  if _storage.exists(directory) and not _storage.is_dir(directory):
    raise NotADirectoryError(f'Checkpoint directory {ckpt_dir} is a file; expected a directory '
                             'to hold checkpoints.')
  logger.info('Saving checkpoint at step: %s', step)
  return (_checkpoint_path(ckpt_dir, step, prefix), _checkpoint_path(ckpt_dir, 'tmp', prefix),
          os.path.join(ckpt_dir, prefix))


def _check_not_outdated(ckpt_path: str, base_path: str, step: int | float) -> None:
  """Flax refuses (without overwrite) a step that exists or is not newer than every other."""
  existing = _all_checkpoints(*os.path.split(base_path))
  if ckpt_path in existing or natural_sort(existing + [ckpt_path])[-1] != ckpt_path:
    raise errors.InvalidCheckpointError(ckpt_path, step)


def _remove_invalid_checkpoints(ckpt_path: str, base_path: str, keep: int, overwrite: bool,
                                keep_every_n_steps: int | None) -> None:
  """Applies flax's retention after a save: with ``overwrite``, everything newer than
  ``ckpt_path`` goes; then all but the newest ``keep`` (none for ``keep=0``, as in flax), sparing
  one every ``keep_every_n_steps`` steps. A checkpoint's ``_gda`` folder goes with it.

  Unlike flax, in-flight entries (``<prefix>tmp``, Orbax temporary directories) neither count
  nor are deleted: an async save may still be writing them, and until it commits the ``keep``
  newest committed checkpoints are all there is. (Flax's result here depends on whether the
  async save has created its directory yet.)
  """
  directory, prefix = os.path.split(base_path)
  _steps.recover_replaced(_storage.as_path(directory))  # A replace that was cut off.
  paths = _all_checkpoints(directory, prefix)
  if overwrite and ckpt_path in paths:
    cut = paths.index(ckpt_path) + 1
    paths, newer = paths[:cut], paths[cut:]
    for path in newer:
      _delete_checkpoint(path)
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
      _storage.remove(_storage.as_path(os.path.join(directory, name)))
  if _sidecar.fits_prefix(prefix):
    _sidecar.remove_orphans(directory, prefix)


def _delete_checkpoint(path: str) -> None:
  """Deletes a checkpoint so that a crash part-way never leaves it listed but damaged: the
  listed name goes first (an Orbax directory is moved aside, then removed)."""
  logger.info('Removing checkpoint at %s', path)
  checkpoint = _storage.as_path(path)
  if _storage.is_dir(checkpoint):
    _steps.delete(checkpoint)
  else:
    _storage.remove(checkpoint)
  _storage.remove(_storage.as_path(path + MP_ARRAY_POSTFIX))
  _sidecar.remove(path)


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


def _write_msgpack(state: Any, tmp_path: str) -> _sidecar.Checksum:
  """Writes ``state`` to ``tmp_path``; returns the file's size and crc32c, taken on the way."""
  path = _storage.as_path(tmp_path)
  _storage.make_dirs(path.parent)
  try:
    with _storage.open_for_write(path) as file:
      summed = _sidecar.ChecksummingFile(file)
      _msgpack.write(summed, state)
  except BaseException:
    _storage.remove(path)
    raise
  return summed.checksum


def _host_snapshot(state: Any) -> Any:
  """``state`` with every array copied to host memory, for a save that finishes later.

  Dict order is kept: it is the order of the bytes in the file.
  """
  if type(state) is dict:
    return {key: _host_snapshot(value) for key, value in state.items()}
  if type(state) is list:
    return [_host_snapshot(value) for value in state]
  if isinstance(state, (jax.Array, np.ndarray, np.generic)):
    return _msgpack.host_array(state).copy()
  return state


def _commit(tmp_path: str, ckpt_path: str, base_path: str, keep: int, overwrite: bool,
            keep_every_n_steps: int | None, has_gda: bool, checksum: _sidecar.Checksum) -> None:
  _sidecar.remove(ckpt_path)  # Never beside a file it was not written for, even after a crash.
  tmp, gda_tmp = _storage.as_path(tmp_path), _storage.as_path(tmp_path + MP_ARRAY_POSTFIX)
  try:
    if has_gda:
      gda_final = _storage.as_path(ckpt_path + MP_ARRAY_POSTFIX)
      _storage.remove(gda_final)
      _storage.rename(gda_tmp, gda_final)
    _storage.rename(tmp, _storage.as_path(ckpt_path))
  except BaseException:  # No half-committed save is left to look like one in flight.
    _storage.remove(tmp)
    _storage.remove(gda_tmp)
    raise
  if _sidecar.fits_prefix(os.path.basename(base_path)):
    try:
      _sidecar.write(ckpt_path, checksum)
    except OSError as e:  # The checkpoint is complete; it only goes unchecked, like flax's.
      _sidecar.remove(ckpt_path)
      logger.warning('Saved %s without its checksum file: %s', ckpt_path, e)
  logger.info('Saved checkpoint at %s', ckpt_path)
  _remove_invalid_checkpoints(ckpt_path, base_path, keep, overwrite, keep_every_n_steps)


def save_checkpoint(ckpt_dir: str | os.PathLike, target: PyTree, step: int | float,
                    prefix: str = 'checkpoint_', keep: int = 1, overwrite: bool = False,
                    keep_every_n_steps: int | None = None,
                    async_manager: AsyncManager | None = None,
                    orbax_checkpointer: Checkpointer | None = None) -> str:
  """Saves ``target`` as checkpoint ``step`` in ``ckpt_dir``, from a single process.

  Writes ``<prefix><step>`` through ``<prefix>tmp`` (msgpack) or a temporary directory (Orbax)
  and a rename, so an interrupted save never looks complete, then deletes checkpoints as
  ``keep``, ``keep_every_n_steps`` and ``overwrite`` ask. With ``async_manager`` a msgpack save
  is written on a background thread from a host copy of ``target``.

  Returns:
    The path of the new checkpoint.

  Raises:
    flax.errors.InvalidCheckpointError: without ``overwrite``, ``step`` exists already or is
      not newer than every checkpoint in ``ckpt_dir``.
  """
  if async_manager:
    async_manager.wait_previous_save()
  ckpt_path, tmp_path, base_path = _paths(ckpt_dir, step, prefix)
  if _uses_orbax(orbax_checkpointer):
    if jax.process_count() > 1:
      logger.warning('save_checkpoint is called with several JAX processes: every process must '
                     'call it, or the devices hang; use save_checkpoint_multiprocess.')
    _orbax_save(ckpt_path, target, overwrite, orbax_checkpointer)
    if jax.process_index() == 0:
      _remove_invalid_checkpoints(ckpt_path, base_path, keep, overwrite, keep_every_n_steps)
    return ckpt_path
  if not overwrite:
    _check_not_outdated(ckpt_path, base_path, step)
  state = serialization.to_state_dict(target)

  def write_and_commit(state: Any) -> None:
    checksum = _write_msgpack(state, tmp_path)
    _commit(tmp_path, ckpt_path, base_path, keep, overwrite, keep_every_n_steps, False, checksum)

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
  own shards. Unlike flax, no ``gda_manager`` is needed (one passed is ignored): flaxckpt
  writes the arrays itself before this returns.

  Returns:
    The path of the new checkpoint.
  """
  _multihost.barrier('flaxckpt.legacy:save:start')
  if async_manager:
    async_manager.wait_previous_save()
  ckpt_path, tmp_path, base_path = _paths(ckpt_dir, step, prefix)
  if _uses_orbax(orbax_checkpointer):
    if jax.process_index() == 0:
      _remove_invalid_checkpoints(ckpt_path, base_path, keep, overwrite, keep_every_n_steps)
    _orbax_save(ckpt_path, target, overwrite, orbax_checkpointer)
    return ckpt_path
  state, gda_arrays = _gda.split(serialization.to_state_dict(target))
  state = jax.tree_util.tree_map(lambda x: x, state)  # Flax's copy; it sorts dict keys.
  if not overwrite:
    _check_not_outdated(ckpt_path, base_path, step)
    _multihost.barrier('flaxckpt.legacy:save:checked')
  is_writer = jax.process_index() == 0
  if is_writer:
    checksum = _write_msgpack(_host_snapshot(state) if async_manager else state, tmp_path)
  if gda_arrays:
    gda_tmp = _storage.as_path(tmp_path + MP_ARRAY_POSTFIX)
    if is_writer:
      _storage.remove(gda_tmp)
      _storage.make_dirs(gda_tmp)
    _multihost.barrier('flaxckpt.legacy:save:gda_dir')
    _gda.write(gda_tmp, gda_arrays)
    _multihost.barrier('flaxckpt.legacy:save:gda_written')
  if is_writer:
    commit = lambda: _commit(tmp_path, ckpt_path, base_path, keep, overwrite,
                             keep_every_n_steps, bool(gda_arrays), checksum)
    if async_manager:
      async_manager.save_async(commit)
    else:
      commit()
  return ckpt_path


# --- restoring ---------------------------------------------------------------------------------


def _resolve(ckpt_dir: str, step: int | float | None, prefix: str) -> str | None:
  """The checkpoint path to restore, or None when there is none (flax then returns target)."""
  if step is not None:
    ckpt_path = _checkpoint_path(ckpt_dir, step, prefix)
    if not _storage.exists(_storage.as_path(ckpt_path)):
      if _storage.is_file(_storage.as_path(ckpt_dir)):
        raise ValueError(f'Matching checkpoint not found: {ckpt_path}. {ckpt_dir} is a '
                         'checkpoint file; with step= pass the directory that holds it.')
      raise ValueError(f'Matching checkpoint not found: {ckpt_path}')
    return ckpt_path
  directory = _storage.as_path(ckpt_dir)
  if not _storage.exists(directory):
    logger.warning('No checkpoint directory at %s; returning the target unchanged.', ckpt_dir)
    return None
  if not _storage.is_dir(directory) or _is_orbax_checkpoint(ckpt_dir):
    return ckpt_dir
  latest = latest_checkpoint(ckpt_dir, prefix)
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
  path = _storage.as_path(ckpt_path)
  if _storage.is_dir(path):
    raise _errors.NotACheckpointError(
        f'{ckpt_path} is a directory but not an Orbax checkpoint (it has no _METADATA, '
        'manifest.ocdbt or checkpoint file), and a msgpack checkpoint is a file.')
  data = _storage.read_into_buffer(path)
  if verify_checksums:
    _sidecar.verify(ckpt_path, data)
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
  found = _gda.placeholders(state)
  if not found:
    return state
  if found[0][0] == ():
    flat_target = {(): target}
  elif target is not None:
    flat_target = flax.traverse_util.flatten_dict(serialization.to_state_dict(target),
                                                  keep_empty_nodes=True)
  else:
    flat_target = {}
  wanted = []
  for key, subpath in found:
    if subpath != '/'.join(key) or subpath.startswith('/') or any(
        part in ('.', '..') for part in subpath.split('/')):
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
  if ckpt_path.startswith('gs://') and not _storage.exists(gda_dir / COMMIT_SUCCESS_FILE):
    raise errors.MPARestoreDataCorruptedError(step, ckpt_path)
  if not _storage.is_dir(gda_dir):
    raise _errors.IncompleteCheckpointError(
        f'{ckpt_path} refers to multi-process arrays in {gda_dir}, which does not exist.')
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
  """
  del parallel, gda_manager  # flaxckpt reads the files itself.
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
