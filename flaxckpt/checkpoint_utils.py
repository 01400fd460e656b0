"""Helpers around CheckpointManager roots: following new steps, locking them while they are read,
and building restore args from a target tree (Orbax's ``checkpoint_utils``).

A step handed out by ``wait_for_new_checkpoint`` / ``checkpoints_iterator`` is locked (an empty
``LOCKED`` directory inside it, which this library's managers respect) until the caller is done
with it. With ``snapshot_dir``, it is also copied to ``<snapshot_dir>/<step name>`` for that
time (and the copy deleted afterwards), as Orbax 0.12 does, so a reader can use the copy even
if a manager that ignores locks deletes the step meanwhile.

Roots may be ``gs://`` and ``s3://`` URLs: the steps are listed afresh at every poll, only
those holding ``commit_success.txt`` count, and the lock is an empty object under
``<step>/LOCKED/``. ``snapshot_dir`` is a local directory (a URL raises
``NotImplementedError``); a step of a bucket root is downloaded into it.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from flaxckpt import _steps, _storage
from flaxckpt.path import step as step_lib
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs

__all__ = ['checkpoints_iterator', 'construct_restore_args', 'unlock_existing_checkpoints',
           'wait_for_new_checkpoint']


def _name_format(step_prefix: str | None, step_format_fixed_length: int | None,
                 step_name_format: step_lib.NameFormat[step_lib.Metadata] | None
                 ) -> step_lib.NameFormat[step_lib.Metadata]:
  """``step_name_format``, else the standard format of the prefix and length."""
  return step_name_format or step_lib.standard_name_format(
      step_prefix=step_prefix, step_format_fixed_length=step_format_fixed_length)


def _latest(root: pathlib.Path, name_format: step_lib.NameFormat[step_lib.Metadata]
            ) -> int | None:
  latest = step_lib.latest_step_metadata(root, name_format)
  return None if latest is None else latest.step


def _wait_for_step(root: pathlib.Path, name_format: step_lib.NameFormat[step_lib.Metadata],
                   until_step: int | None, seconds_to_sleep: float,
                   timeout: float | None) -> int:
  """The newest step ≥ ``until_step`` (any step if None) once one exists; -1 on timeout."""
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    step = _latest(root, name_format)
    if step is not None and (until_step is None or step >= until_step):
      return step
    if deadline is not None and time.monotonic() + seconds_to_sleep > deadline:
      return -1
    time.sleep(seconds_to_sleep)


def _root(checkpoint_dir: _storage.PathLike, snapshot_dir: _storage.PathLike | None
          ) -> pathlib.Path:
  """The root: a local path, or a ``RemotePath`` for a bucket URL; ``snapshot_dir`` must be
  a local path (a URL is refused with ``NotImplementedError``)."""
  if snapshot_dir is not None:
    _storage.as_local_path(snapshot_dir)
  return _storage.as_path(checkpoint_dir)


def _remove_snapshots(snapshot_dir: pathlib.Path) -> None:
  """Removes the step copies (entries named like steps) in ``snapshot_dir``."""
  if not _storage.is_dir(snapshot_dir):
    return
  for name in _storage.list_names(snapshot_dir):
    try:
      step_lib.step_from_checkpoint_name(name)
    except ValueError:
      continue  # Not a snapshot: left alone.
    _storage.remove_tree(snapshot_dir / name)


@contextlib.contextmanager
def _hold(root: pathlib.Path, step: int, name_format: step_lib.NameFormat[step_lib.Metadata],
          snapshot_dir: _storage.PathLike | None) -> Iterator[None]:
  """Locks ``step`` (and copies it into ``snapshot_dir``) while the block runs."""
  step_dir = name_format.find_step(root, step).path
  _steps.lock(step_dir)
  snapshot = None
  try:
    if snapshot_dir is not None:
      snapshot = _storage.as_local_path(snapshot_dir) / step_dir.name
      _storage.make_dirs(snapshot.parent)
      _storage.remove_tree(snapshot)  # Left by a reader that crashed.
      _storage.copy_tree(step_dir, snapshot)
      _storage.remove_tree(snapshot / _steps.LOCK_DIR)
    yield
  finally:
    _steps.unlock(step_dir)
    if snapshot is not None:
      _storage.remove_tree(snapshot)


@contextlib.contextmanager
def wait_for_new_checkpoint(checkpoint_dir: _storage.PathLike, *, until_step: int | None = None,
                            seconds_to_sleep: float = 1, timeout: float | None = None,
                            timeout_fn: Callable[[], bool] | None = None,
                            step_prefix: str | None = None,
                            step_format_fixed_length: int | None = None,
                            step_name_format: step_lib.NameFormat[step_lib.Metadata] | None
                            = None,
                            snapshot_dir: _storage.PathLike | None = None,
                            set_immutable: bool | None = None,
                            ignore_snapshot_errors: bool | None = True) -> Iterator[int]:
  """Waits for a step (≥ ``until_step``) and yields it, or -1 after ``timeout`` seconds
  (unless ``timeout_fn`` is given and answers False: then it waits on).

  While the ``with`` block runs the step is locked (an empty ``LOCKED`` directory inside it),
  and CheckpointManagers of this library leave it alone when applying retention. With
  ``snapshot_dir`` the step is also copied to ``<snapshot_dir>/<step name>`` for the block.
  ``step_name_format`` overrides ``step_prefix`` and ``step_format_fixed_length``.
  """
  del set_immutable, ignore_snapshot_errors  # Copies are plain files; errors are raised.
  root = _root(checkpoint_dir, snapshot_dir)
  name_format = _name_format(step_prefix, step_format_fixed_length, step_name_format)
  while True:
    step = _wait_for_step(root, name_format, until_step, seconds_to_sleep, timeout)
    if step >= 0 or timeout_fn is None or timeout_fn():
      break
  if step < 0:
    yield step
    return
  with _hold(root, step, name_format, snapshot_dir):
    yield step


def unlock_existing_checkpoints(checkpoint_dir: _storage.PathLike,
                                step_prefix: str | None = None,
                                step_format_fixed_length: int | None = None,
                                step_name_format: step_lib.NameFormat[step_lib.Metadata]
                                | None = None) -> None:
  """Removes the ``LOCKED`` marker of every step (after a reader crashed holding one)."""
  root = _root(checkpoint_dir, None)
  for metadata in _name_format(step_prefix, step_format_fixed_length,
                               step_name_format).find_all(root):
    _steps.unlock(metadata.path)


def checkpoints_iterator(checkpoint_dir: _storage.PathLike, *, min_interval_secs: float = 0,
                         seconds_to_sleep: float = 1, timeout: float | None = None,
                         timeout_fn: Callable[[], bool] | None = None,
                         step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None,
                         step_name_format: step_lib.NameFormat[step_lib.Metadata] | None = None,
                         snapshot_dir: _storage.PathLike | None = None,
                         set_immutable: bool | None = None,
                         ignore_snapshot_errors: bool | None = True) -> Iterator[int]:
  """Yields each new latest step as it appears, locked (and with ``snapshot_dir`` copied to
  ``<snapshot_dir>/<step name>``) until the loop body that received it ends.

  After ``timeout`` seconds without a new step the iterator ends, unless ``timeout_fn`` is
  given and returns False, in which case it keeps waiting. Snapshots left in ``snapshot_dir``
  by a reader that crashed are removed first.

  Example::

    for step in ocp.checkpoint_utils.checkpoints_iterator(root, timeout=600,
                                                          snapshot_dir=root / '_SNAPSHOTS'):
      evaluate(root / '_SNAPSHOTS' / str(step))
  """
  del set_immutable, ignore_snapshot_errors  # Copies are plain files; errors are raised.
  root = _root(checkpoint_dir, snapshot_dir)
  name_format = _name_format(step_prefix, step_format_fixed_length, step_name_format)
  if snapshot_dir is not None:
    _remove_snapshots(_storage.as_local_path(snapshot_dir))
  last = None
  while True:
    step = _wait_for_step(root, name_format, None if last is None else last + 1,
                          seconds_to_sleep, timeout)
    if step < 0:
      if timeout_fn is not None and not timeout_fn():
        continue
      return
    started = time.monotonic()
    last = step
    with _hold(root, step, name_format, snapshot_dir):
      yield step
    remaining = min_interval_secs - (time.monotonic() - started)
    if remaining > 0:
      time.sleep(remaining)


def construct_restore_args(target: Any, sharding_tree: Any = None,
                           set_global_shape: bool = True) -> Any:
  """Restore args matching ``target``: ``ArrayRestoreArgs`` (sharding, dtype, global shape) for
  jax arrays and sharded ``ShapeDtypeStruct``s, ``RestoreArgs`` with the leaf's type else.

  ``sharding_tree`` (same structure as ``target``) overrides the shardings of the target.
  """
  if sharding_tree is None:
    shardings = jax.tree.map(lambda x: getattr(x, 'sharding', None), target)
  else:
    shardings = sharding_tree

  def leaf_args(value: Any, sharding: Any) -> RestoreArgs:
    if isinstance(value, (jax.Array, jax.ShapeDtypeStruct)) and (
        sharding is not None or isinstance(value, jax.Array)):
      return ArrayRestoreArgs(
          sharding=sharding if isinstance(sharding, jax.sharding.Sharding) else None,
          global_shape=tuple(value.shape) if set_global_shape else None, dtype=value.dtype)
    if isinstance(value, (np.ndarray, jax.ShapeDtypeStruct)):
      return RestoreArgs(restore_type=np.ndarray, dtype=value.dtype)
    if isinstance(value, (int, float, str, bool)):
      return RestoreArgs(restore_type=type(value))
    return RestoreArgs()

  return jax.tree.map(leaf_args, target, shardings, is_leaf=lambda x: x is None)
