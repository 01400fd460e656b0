"""Coordination between the processes of a multi-host job.

One process (the primary, process 0) creates, finalizes and commits checkpoint directories; every
process writes its own shards. Processes meet at barriers of JAX's distributed runtime. Every
barrier has a timeout, and a timed-out barrier names the processes that never arrived, so a
save called on some processes only fails with an error instead of hanging.
"""

from __future__ import annotations

import collections
import os
import threading

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


def is_primary() -> bool:
  return jax.process_index() == 0


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def barrier(name: str) -> None:
  """Blocks until every process has reached the barrier ``name``.

  Names must be reached in the same order on every process; a name may be reused (each use
  is numbered). Nothing happens in a single process.

  Raises:
    BarrierTimeoutError: some process did not arrive within the timeout.
  """
  if jax.process_count() == 1:
    return
  client = _client()
  with _counts_lock:
    _counts[name] += 1
    barrier_id = f'flaxckpt/{name}#{_counts[name]}'
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


def agree(name: str, value: str) -> str:
  """The primary's ``value`` on every process (each other process's own ``value`` is ignored);
  just ``value`` in a single process. Called in the same order on every process, like
  ``barrier``.

  Raises:
    BarrierTimeoutError: the primary did not publish its value within the timeout.
  """
  if jax.process_count() == 1:
    return value
  client = _client()
  with _counts_lock:
    _counts[f'agree:{name}'] += 1
    key = f'flaxckpt/agree/{name}#{_counts[f"agree:{name}"]}'
  if is_primary():
    client.key_value_set(key, value)
    return value
  try:
    return client.blocking_key_value_get(key, int(_timeout_secs * 1000))
  except Exception as e:  # jax raises its runtime error type; its text names the cause.
    raise _errors.BarrierTimeoutError(
        f'Process {jax.process_index()} waited {_timeout_secs:g} s for process 0 to choose '
        f'{name!r}; it never did (a save called on some processes only ends here).') from e
