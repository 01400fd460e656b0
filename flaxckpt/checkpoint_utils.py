"""Helpers around CheckpointManager roots: following new steps, locking them while they are read,
and building restore args from a target tree (Orbax's ``checkpoint_utils``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from flaxckpt import _storage
from flaxckpt._steps import LOCK_DIR, StepNaming
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs

__all__ = ['checkpoints_iterator', 'construct_restore_args', 'unlock_existing_checkpoints',
           'wait_for_new_checkpoint']


def _latest(root, naming: StepNaming) -> int | None:
  steps = naming.list_steps(root)
  return steps[-1] if steps else None


def _wait_for_step(root, naming: StepNaming, until_step: int | None, seconds_to_sleep: float,
                   timeout: float | None) -> int:
  """The newest step ≥ ``until_step`` (any step if None) once one exists; -1 on timeout."""
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    step = _latest(root, naming)
    if step is not None and (until_step is None or step >= until_step):
      return step
    if deadline is not None and time.monotonic() + seconds_to_sleep > deadline:
      return -1
    time.sleep(seconds_to_sleep)


@contextlib.contextmanager
def wait_for_new_checkpoint(checkpoint_dir: _storage.PathLike, *, until_step: int | None = None,
                            seconds_to_sleep: float = 1, timeout: float | None = None,
                            step_prefix: str | None = None,
                            step_format_fixed_length: int | None = None) -> Iterator[int]:
  """Waits for a step (≥ ``until_step``) and yields it, or -1 after ``timeout`` seconds.

  While the ``with`` block runs the step is locked (an empty ``LOCKED`` directory inside it),
  and CheckpointManagers of this library leave it alone when applying retention.
  """
  root = _storage.as_path(checkpoint_dir)
  naming = StepNaming(step_prefix, step_format_fixed_length)
  step = _wait_for_step(root, naming, until_step, seconds_to_sleep, timeout)
  if step < 0:
    yield step
    return
  lock = naming.path(root, step) / LOCK_DIR
  _storage.make_dirs(lock)
  try:
    yield step
  finally:
    _storage.remove_tree(lock)


def unlock_existing_checkpoints(checkpoint_dir: _storage.PathLike,
                                step_prefix: str | None = None,
                                step_format_fixed_length: int | None = None) -> None:
  """Removes the ``LOCKED`` marker of every step (after a reader crashed holding one)."""
  root = _storage.as_path(checkpoint_dir)
  naming = StepNaming(step_prefix, step_format_fixed_length)
  for step in naming.list_steps(root):
    _storage.remove_tree(naming.path(root, step) / LOCK_DIR)


def checkpoints_iterator(checkpoint_dir: _storage.PathLike, *, min_interval_secs: float = 0,
                         seconds_to_sleep: float = 1, timeout: float | None = None,
                         timeout_fn: Callable[[], bool] | None = None,
                         step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None) -> Iterator[int]:
  """Yields each new latest step as it appears.

  After ``timeout`` seconds without a new step the iterator ends, unless ``timeout_fn`` is
  given and returns False, in which case it keeps waiting.
  """
  root = _storage.as_path(checkpoint_dir)
  naming = StepNaming(step_prefix, step_format_fixed_length)
  last = None
  while True:
    step = _wait_for_step(root, naming, None if last is None else last + 1, seconds_to_sleep,
                          timeout)
    if step < 0:
      if timeout_fn is not None and not timeout_fn():
        continue
      return
    started = time.monotonic()
    last = step
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
