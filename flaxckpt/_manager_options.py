"""The options of a CheckpointManager, and the two policies they stand for.

A manager consults one save-decision policy and one preservation policy
(``flaxckpt.checkpoint_managers``); the older options (``save_interval_steps``, ``max_to_keep``,
``best_fn``, ...) are turned into those here, the only place that reads them.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Container, Iterable
from typing import Any

from flaxckpt import _policies, _storage
from flaxckpt._steps import validate_step
from flaxckpt.options import (AsyncOptions, AtomicityOptions, FileOptions,
                              MultiprocessingOptions)
from flaxckpt.path import atomicity
from flaxckpt.path import step as step_lib


@dataclasses.dataclass
class CheckpointManagerOptions:
  """How a CheckpointManager names, saves, keeps and writes steps (Orbax's options).

  Which steps are saved: ``save_decision_policy``, else a policy built from
  ``save_interval_steps``/``save_on_steps`` (or ``should_save_fn``), the first save and
  preemption. Which are kept: ``preservation_policy``, else a policy built from
  ``max_to_keep``, ``keep_period``, ``keep_time_interval``, ``best_fn``, ``keep_latest``.

  Attributes:
    save_interval_steps: save steps that are multiples of this (and the first save).
    max_to_keep: how many steps to keep (the newest, or with ``best_fn`` the best); None keeps
      every step.
    keep_time_interval: also keep a step each time this much time has passed since the last
      step kept this way (a ``datetime.timedelta``).
    keep_period: steps divisible by this are never deleted.
    best_fn: maps a step's metrics to a number to rank steps by; metrics are then saved.
    best_mode: 'max' or 'min': which end of ``best_fn`` is best.
    keep_checkpoints_without_metrics: with ``best_fn``, keep steps saved without metrics.
    keep_latest: (flaxckpt only) also keep this many of the newest steps whatever their
      metrics (Orbax keeps only the best once ``best_fn`` is set).
    step_prefix: step directories are named ``<prefix>_<step>``.
    step_format_fixed_length: zero-pad step numbers to this many digits.
    step_name_format: a ``NameFormat`` naming and finding steps; replaces ``step_prefix`` and
      ``step_format_fixed_length``.
    create: create the root directory if it is missing.
    cleanup_tmp_directories: delete the directories of saves that never committed, at start.
    save_on_steps: steps that are saved whatever the interval.
    single_host_load_and_broadcast: process 0 lists the steps and the others take its list.
    todelete_subdir: instead of deleting a step, move it into this sub-directory of the root
      (``<root>/<todelete_subdir>/<step name>``, replacing an older copy there).
    todelete_full_path: Orbax's soft-delete location inside a GCS bucket; refused here (no GCS).
    enable_background_delete: delete old steps on a background thread;
      ``wait_until_finished`` and ``close`` wait for the deletions.
    num_deletion_threads: accepted for Orbax call sites; one thread deletes.
    read_only: never write or delete anything; saves return False.
    enable_async_checkpointing: save on a background thread (the default).
    async_options: ``AsyncOptions`` of background saves (its ``timeout_secs`` wins over
      ``async_timeout_secs``).
    multiprocessing_options: ``MultiprocessingOptions``: the primary process, barrier keys.
    should_save_fn: ``fn(step, latest_step_or_None) -> bool``; replaces
      ``save_interval_steps`` and ``save_on_steps``.
    file_options: ``FileOptions``: permissions of the directories created.
    save_root_metadata: write the run's ``metadata`` under the root.
    temporary_path_class: how a save is made atomic (``ocp.path.atomicity``);
      ``CommitFileTemporaryPath`` steps count once they hold ``commit_success.txt``.
    atomicity_options: ``AtomicityOptions``: the same choice as a mode, where
      ``temporary_path_class`` is not given.
    enable_per_process_directory_creation: Orbax's per-process directories; only False.
    save_decision_policy: decides which steps are saved (replaces the options above).
    preservation_policy: decides which steps are kept; not to be combined with
      ``max_to_keep``, ``keep_period``, ``keep_time_interval`` or ``keep_latest``.
    prevent_write_metrics: never save metrics (``best_fn`` still ranks those in memory).
    enable_should_save_is_saving_in_progress_check: tell policies whether a save is in
      flight (``ContinuousCheckpointingPolicy`` waits for it); False always says no.
    lightweight_initialize: at construction only list the step directories: no step's
      metrics or save time are read (policies see them as absent / as long ago).
    async_timeout_secs: (flaxckpt's older spelling) the ``AsyncOptions.timeout_secs`` used
      when ``async_options`` is not given.
  """
  save_interval_steps: int = 1
  max_to_keep: int | None = None
  keep_time_interval: datetime.timedelta | None = None
  keep_period: int | None = None
  best_fn: Callable[[Any], float] | None = None
  best_mode: str = 'max'
  keep_checkpoints_without_metrics: bool = True
  keep_latest: int | None = None
  step_prefix: str | None = None
  step_format_fixed_length: int | None = None
  step_name_format: step_lib.NameFormat[step_lib.Metadata] | None = None
  create: bool = True
  cleanup_tmp_directories: bool = False
  save_on_steps: Container[int] | None = None
  single_host_load_and_broadcast: bool = False
  todelete_subdir: str | None = None
  todelete_full_path: str | None = None
  enable_background_delete: bool = False
  num_deletion_threads: int | None = None
  read_only: bool = False
  enable_async_checkpointing: bool = True
  async_options: AsyncOptions | None = None
  multiprocessing_options: MultiprocessingOptions = dataclasses.field(
      default_factory=MultiprocessingOptions)
  should_save_fn: Callable[[int, int | None], bool] | None = None
  file_options: FileOptions = dataclasses.field(default_factory=FileOptions)
  save_root_metadata: bool = True
  atomicity_options: AtomicityOptions | None = None
  temporary_path_class: type | None = None
  save_decision_policy: _policies.SaveDecisionPolicy | None = None
  preservation_policy: _policies.PreservationPolicy | None = None
  prevent_write_metrics: bool = False
  enable_should_save_is_saving_in_progress_check: bool = True
  lightweight_initialize: bool = False
  enable_per_process_directory_creation: bool = False
  async_timeout_secs: float = 600

  def __post_init__(self) -> None:
    for name in ('save_interval_steps', 'max_to_keep', 'keep_period', 'keep_latest',
                 'step_format_fixed_length'):
      value = getattr(self, name)
      if value is None and name != 'save_interval_steps':
        continue
      low = 0 if name == 'max_to_keep' else 1
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = 'non-negative' if low == 0 else 'positive'
        raise ValueError(f'CheckpointManagerOptions.{name} must be a {kind} int'
                         f'{"" if name == "save_interval_steps" else " or None"}, got {value!r}.')
    if self.best_mode not in ('max', 'min'):
      raise ValueError(f"CheckpointManagerOptions.best_mode must be 'max' or 'min', got "
                       f'{self.best_mode!r}.')
    if self.keep_time_interval is not None and not isinstance(self.keep_time_interval,
                                                              datetime.timedelta):
      raise TypeError('CheckpointManagerOptions.keep_time_interval must be a '
                      f'datetime.timedelta, got {type(self.keep_time_interval).__name__}.')
    if self.todelete_subdir is not None and self.todelete_full_path is not None:
      raise ValueError('CheckpointManagerOptions: todelete_subdir and todelete_full_path cannot '
                       'both be set.')
    if self.todelete_subdir is not None:
      _storage.check_entry_name(self.todelete_subdir, 'todelete_subdir')
    if self.todelete_full_path is not None:
      raise NotImplementedError('CheckpointManagerOptions.todelete_full_path soft-deletes inside '
                                'a GCS bucket, which flaxckpt does not write to; use '
                                'todelete_subdir to keep deleted steps.')
    if self.enable_per_process_directory_creation:
      raise NotImplementedError('CheckpointManagerOptions.enable_per_process_directory_creation '
                                'is not supported: the primary process creates every directory.')
    if self.read_only:
      self.todelete_subdir = None  # Nothing is deleted or moved (Orbax drops it too).
    self.temporary_path_class = atomicity.temporary_path_class_for(self.temporary_path_class,
                                                                   self.atomicity_options)
    if self.save_on_steps is not None:
      steps: Iterable[int] = self.save_on_steps  # type: ignore[assignment]
      self.save_on_steps = frozenset(validate_step(s) for s in steps)
    for name, protocol, method in (
        ('save_decision_policy', 'SaveDecisionPolicy', 'should_save'),
        ('preservation_policy', 'PreservationPolicy', 'should_preserve')):
      value = getattr(self, name)
      if value is not None and not callable(getattr(value, method, None)):
        raise TypeError(f'CheckpointManagerOptions.{name} must be a {protocol} (an object with '
                        f'a {method} method, see flaxckpt.checkpoint_managers), got {value!r}.')
    option_types: tuple[tuple[str, type], ...] = (
        ('async_options', AsyncOptions), ('multiprocessing_options', MultiprocessingOptions),
        ('file_options', FileOptions))
    for field, option_type in option_types:
      value = getattr(self, field)
      if value is not None and not isinstance(value, option_type):
        raise TypeError(f'CheckpointManagerOptions.{field} must be a flaxckpt.options.'
                        f'{option_type.__name__}, got {type(value).__name__}.')


def save_decision_policy(options: CheckpointManagerOptions) -> _policies.SaveDecisionPolicy:
  """The one policy deciding which steps ``options`` saves (besides ``save`` itself refusing
  steps not newer than the latest)."""
  if options.save_decision_policy is not None:
    return options.save_decision_policy
  policies: list[_policies.SaveDecisionPolicy] = []
  if options.should_save_fn is not None:
    policies += [_policies.ShouldSaveFnPolicy(options.should_save_fn),
                 _policies.PreemptionCheckpointingPolicy()]
  else:
    policies.append(_policies.FixedIntervalPolicy(options.save_interval_steps))
    if options.save_on_steps:
      policies.append(_policies.SpecificStepsPolicy(options.save_on_steps))
    policies += [_policies.PreemptionCheckpointingPolicy(), _policies.InitialSavePolicy()]
  return _policies.AnySavePolicy(policies)


def preservation_policy(options: CheckpointManagerOptions) -> _policies.PreservationPolicy:
  """The one policy deciding which steps ``options`` keeps.

  Raises:
    ValueError: ``preservation_policy`` is combined with the options it replaces.
  """
  if options.preservation_policy is not None:
    mixed = [name for name in ('max_to_keep', 'keep_period', 'keep_time_interval', 'keep_latest')
             if getattr(options, name)]
    if mixed:
      raise ValueError(f'CheckpointManagerOptions: preservation_policy replaces {mixed}; pass '
                       'one or the other (e.g. AnyPreservationPolicy([LatestN(n), ...])).')
    return options.preservation_policy
  policies: list[_policies.PreservationPolicy] = []
  if options.keep_period is not None:
    policies.append(_policies.EveryNSteps(options.keep_period))
  if options.keep_time_interval is not None:
    policies.append(_policies.EveryNSeconds(int(options.keep_time_interval.total_seconds())))
  if options.best_fn is not None:
    policies.append(_policies.BestN(
        get_metric_fn=options.best_fn, reverse=options.best_mode == 'min',
        n=options.max_to_keep,
        keep_checkpoints_without_metrics=options.keep_checkpoints_without_metrics))
  else:
    policies.append(_policies.LatestN(options.max_to_keep))
  if options.keep_latest is not None:
    policies.append(_policies.LatestN(options.keep_latest))
  return _policies.AnyPreservationPolicy(policies)
