"""Coordination between the processes of a multi-host job.

One process (the primary, process 0 unless ``MultiprocessingOptions.primary_host`` names another)
creates, finalizes and commits checkpoint directories; every process writes its own shards.
Processes meet at barriers of JAX's distributed runtime. Every barrier has a timeout, and a
timed-out barrier names the processes that never arrived, so a save called on some processes
only fails with an error instead of hanging.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Set
from typing import Any

import jax

from flaxckpt import _errors

_DEFAULT_TIMEOUT_SECS = float(os.environ.get('FLAXCKPT_BARRIER_TIMEOUT_SECS', 600))
_timeout_secs = _DEFAULT_TIMEOUT_SECS
_counts: collections.Counter[str] = collections.Counter()
_counts_lock = threading.Lock()


def set_barrier_timeout(seconds: float) -> None:
  """How long a process waits at a barrier for the others (default 600 s, or the environment
  variable ``FLAXCKPT_BARRIER_TIMEOUT_SECS``) before raising ``BarrierTimeoutError``."""
  global _timeout_secs
  if seconds <= 0:
    raise ValueError(f'The barrier timeout must be positive, got {seconds}.')
  _timeout_secs = float(seconds)


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_primary(primary: int = 0) -> bool:
  return jax.process_index() == primary


def check_processes(primary_host: int | None, active_processes: Set[int] | None) -> int:
  """Validates ``MultiprocessingOptions``' process selection; returns the primary process.

  Raises:
    NotImplementedError: ``primary_host=None`` (every process its own primary) or a strict
      subset of processes as ``active_processes``: every process takes part in every save.
    ValueError: ``primary_host`` is not a process of this job.
  """
  count = jax.process_count()
  if primary_host is None:
    raise NotImplementedError(
        'MultiprocessingOptions(primary_host=None) (every process saving its own checkpoint to '
        'local storage) is not supported; name one primary process, e.g. primary_host=0.')
  if not 0 <= primary_host < count:
    raise ValueError(f'MultiprocessingOptions.primary_host={primary_host} is not a process of '
                     f'this job (processes 0..{count - 1}).')
  if active_processes is not None and set(active_processes) != set(range(count)):
    raise NotImplementedError(
        f'MultiprocessingOptions(active_processes={sorted(active_processes)}): saving from a '
        f'subset of the {count} processes is not supported; every process takes part in a save '
        '(pass active_processes=None).')
  return primary_host


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _key(prefix: str | None, name: str) -> str:
  return f'{prefix}_{name}' if prefix else name


def barrier(name: str, prefix: str | None = None,
            sync_fn: Callable[..., Any] | None = None) -> None:
  """Blocks until every process has reached the barrier ``name``.

  Names must be reached in the same order on every process; a name may be reused (each use
  is numbered). ``prefix`` (``MultiprocessingOptions.barrier_sync_key_prefix``) keeps the
  barriers of concurrent checkpointers apart; ``sync_fn`` (``AsyncOptions.barrier_sync_fn``),
  called as ``sync_fn(key=..., timeout_ms=...)``, replaces JAX's barrier. Nothing happens in a
  single process.

  Raises:
    BarrierTimeoutError: some process did not arrive within the timeout.
  """
  if jax.process_count() == 1:
    return
  name = _key(prefix, name)
  with _counts_lock:
    _counts[name] += 1
    barrier_id = f'flaxckpt/{name}#{_counts[name]}'
  if sync_fn is not None:
    sync_fn(key=barrier_id, timeout_ms=int(_timeout_secs * 1000))
    return
  client = _client()
  client.key_value_set(f'{barrier_id}/arrived/{jax.process_index()}', '1')
  timeout = _timeout_secs
  try:
    client.wait_at_barrier(barrier_id, int(timeout * 1000))
  except Exception as e:  # jax raises its runtime error type; its text names the cause.
    arrived = {int(key.rsplit('/', 1)[1])
               for key, _ in client.key_value_dir_get(f'{barrier_id}/arrived/')}
    missing = sorted(set(range(jax.process_count())) - arrived)
    raise _errors.BarrierTimeoutError(
        f'Process {jax.process_index()} waited {timeout:g} s at barrier {name!r} for '
        f'processes {missing}, which never arrived (arrived: {sorted(arrived)}). Every process '
        'must make the same checkpoint calls (a save called on process 0 only ends here); '
        'the timeout is set with flaxckpt.multihost.set_barrier_timeout. Runtime error: '
        f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from e


def agree(name: str, value: str, primary: int = 0, prefix: str | None = None) -> str:
  """The ``primary`` process's ``value`` on every process (each other process's own ``value``
  is ignored); just ``value`` in a single process. Called in the same order on every process,
  like ``barrier``.

  Raises:
    BarrierTimeoutError: the primary did not publish its value within the timeout.
  """
  if jax.process_count() == 1:
    return value
  client = _client()
  name = _key(prefix, name)
  with _counts_lock:
    _counts[f'agree:{name}'] += 1
    key = f'flaxckpt/agree/{name}#{_counts[f"agree:{name}"]}'
  if is_primary(primary):
    client.key_value_set(key, value)
    return value
  try:
    return client.blocking_key_value_get(key, int(_timeout_secs * 1000))
  except Exception as e:  # jax raises its runtime error type; its text names the cause.
    raise _errors.BarrierTimeoutError(
        f'Process {jax.process_index()} waited {_timeout_secs:g} s for process {primary} to choose '
        f'{name!r}; it never did (a save called on some processes only ends here).') from e
