"""Structured event loggers of a CheckpointManager (``orbax.checkpoint.logging``).

``CheckpointManager(logger=...)`` hands its logger one entry per save and per restore: a dict
with Orbax's keys (``SaveStepStatistics`` / ``RestoreStepStatistics`` as ``dataclasses.asdict``),
``event_type`` saying which. Subclass ``AbstractLogger`` to send them elsewhere (a metrics
system, a file); ``StandardLogger``, the default, writes them to the ``flaxckpt`` logger.
"""

from __future__ import annotations

import abc
import dataclasses
import logging as _logging
from typing import Any

__all__ = ['AbstractLogger', 'CompositeLogger', 'RestoreStepStatistics', 'SaveStepStatistics',
           'StandardLogger']

_log = _logging.getLogger('flaxckpt')


class AbstractLogger(abc.ABC):
  """Receives structured checkpointing events."""

  @abc.abstractmethod
  def log_entry(self, entry: Any) -> None:
    """Records one event (a dict of statistics from a CheckpointManager)."""


class StandardLogger(AbstractLogger):
  """Writes each entry to the ``flaxckpt`` Python logger at INFO level."""

  def log_entry(self, entry: Any) -> None:
    _log.info('%s', entry)


class CompositeLogger(AbstractLogger):
  """Passes each entry to every one of ``loggers``."""

  def __init__(self, *loggers: AbstractLogger):
    for logger in loggers:
      if not isinstance(logger, AbstractLogger):
        raise TypeError(f'CompositeLogger takes AbstractLogger instances, got '
                        f'{type(logger).__name__}.')
    self._loggers = loggers

  def log_entry(self, entry: Any) -> None:
    for logger in self._loggers:
      logger.log_entry(entry)


@dataclasses.dataclass
class SaveStepStatistics:
  """One save by a CheckpointManager (times from ``time.time()``, durations in seconds)."""
  step: int | None = None
  event_type: str | None = 'save'
  directory: str | None = None
  reached_preemption: bool | None = False
  preemption_received_at: float | None = None
  synchronous: bool | None = False
  wait_for_prev_start_time: float | None = None
  wait_for_prev_duration_secs: float | None = None
  time_between_consecutive_saves_sec: float | None = None
  checkpointer_blocking_start_time: float | None = None
  checkpointer_blocking_duration_secs: float | None = None
  get_old_steps_start_time: float | None = None
  get_old_steps_duration_secs: float | None = None
  checkpoint_manager_blocking_start_time: float | None = None
  checkpoint_manager_blocking_duration_secs: float | None = None


@dataclasses.dataclass
class RestoreStepStatistics:
  """One restore by a CheckpointManager (times from ``time.time()``, durations in seconds)."""
  step: int | None = None
  event_type: str | None = 'restore'
  directory: str | None = None
  checkpointer_start_time: float | None = None
  checkpointer_duration_secs: float | None = None
  checkpoint_manager_start_time: float | None = None
  checkpoint_manager_duration_secs: float | None = None
