"""Multi-host helpers (``orbax.checkpoint.multihost``'s names): which process is primary,
barriers between all processes that time out with an error naming the missing ones, and the
maps between process and device ids that some launchers need.

``jax.process_index()`` (the runtime's id of a process) and the id a process was given in
``jax.distributed.initialize(process_id=...)`` can differ on some clusters;
``initialize_runtime_to_distributed_ids`` and ``initialize_distributed_to_device_ids`` gather
the maps once, collectively, and the getters read them afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from jax.experimental import multihost_utils

from flaxckpt._errors import BarrierTimeoutError
from flaxckpt._multihost import barrier as sync_global_processes
from flaxckpt._multihost import process_count, process_index, set_barrier_timeout

__all__ = ['BarrierTimeoutError', 'broadcast_one_to_all', 'distributed_to_device_ids',
           'initialize_distributed_to_device_ids', 'initialize_runtime_to_distributed_ids',
           'is_distributed_to_device_ids_initialized', 'is_primary_host',
           'is_runtime_to_distributed_ids_initialized', 'process_count', 'process_index',
           'reached_preemption', 'runtime_to_distributed_ids',
           'runtime_to_distributed_process_id', 'set_barrier_timeout', 'sync_global_processes']

_runtime_to_distributed: list[int] | None = None  # Index: jax.process_index().
_distributed_to_devices: list[list[int]] | None = None  # Index: distributed process id.


def is_primary_host(primary_host: int | None = 0) -> bool:
  """Whether this process is ``primary_host`` (None: every process is)."""
  return primary_host is None or process_index() == primary_host


def broadcast_one_to_all(in_tree: Any, is_source: bool | None = None) -> Any:
  """``in_tree`` of the source process (process 0 by default) on every process."""
  if is_source is None:
    is_source = process_index() == 0
  return multihost_utils.broadcast_one_to_all(in_tree, is_source=is_source)


def reached_preemption(step: int) -> bool:
  """Whether every process has reached the preemption sync point at ``step`` (see
  ``jax.experimental.multihost_utils.reached_preemption_sync_point``)."""
  return multihost_utils.reached_preemption_sync_point(step)


def _distributed_state() -> tuple[Any, int]:
  """(distributed client or None, this process's distributed id)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  process_id = state.process_id if state.client is not None else process_index()
  return state.client, process_id


def _gather(name: str, value: Any) -> list[Any]:
  """Every process's ``value`` of the collective ``name``, by distributed id."""
  client, own_id = _distributed_state()
  if client is None:
    if process_count() > 1:
      raise ValueError('Distributed system is not available; please initialize it via '
                       '`jax.distributed.initialize()` at the start of your program.')
    return [value]
  directory = f'flaxckpt/{name}/'
  client.key_value_set(directory + str(own_id), json.dumps(value))
  sync_global_processes(name)
  results: list[Any] = [None] * process_count()
  for key, text in client.key_value_dir_get(directory):
    results[int(key.rsplit('/', 1)[1])] = json.loads(text)
  return results


def initialize_runtime_to_distributed_ids() -> None:
  """Gathers, on every process, each runtime process index's distributed process id. Call it
  on every process, once ``jax.distributed`` is initialized (in a single process without it,
  the map is ``[0]``)."""
  global _runtime_to_distributed
  pairs = _gather('runtime_to_distributed_ids', [process_index(), _distributed_state()[1]])
  mapping = [0] * len(pairs)
  for runtime_id, distributed_id in pairs:
    mapping[runtime_id] = distributed_id
  _runtime_to_distributed = mapping


def initialize_distributed_to_device_ids() -> None:
  """Gathers, on every process, the ids of the devices of each distributed process id. Call it
  on every process, once; later calls do nothing."""
  global _distributed_to_devices
  if _distributed_to_devices is None:
    _distributed_to_devices = _gather('distributed_to_device_ids',
                                      [d.id for d in jax.local_devices()])


def is_runtime_to_distributed_ids_initialized() -> bool:
  return _runtime_to_distributed is not None


def is_distributed_to_device_ids_initialized() -> bool:
  return _distributed_to_devices is not None


def runtime_to_distributed_ids() -> list[int]:
  """The distributed id of each runtime process index.

  Raises:
    ValueError: ``initialize_runtime_to_distributed_ids`` was not called.
  """
  if _runtime_to_distributed is None:
    raise ValueError('Please call initialize_runtime_to_distributed_ids().')
  return _runtime_to_distributed


def runtime_to_distributed_process_id(pid: int) -> int:
  """The distributed id of runtime process index ``pid``."""
  return runtime_to_distributed_ids()[pid]


def distributed_to_device_ids() -> list[list[int]]:
  """The device ids of each distributed process id.

  Raises:
    ValueError: ``initialize_distributed_to_device_ids`` was not called.
  """
  if _distributed_to_devices is None:
    raise ValueError('Please call initialize_distributed_to_device_ids().')
  return _distributed_to_devices
