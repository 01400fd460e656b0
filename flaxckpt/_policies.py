"""Save-decision and preservation policies of a CheckpointManager (Orbax's, same call forms).

A manager consults exactly one ``SaveDecisionPolicy`` (``should_save(step, previous_steps,
context=...)``: save this step?) and one ``PreservationPolicy`` (``should_preserve(checkpoints,
context=...)``: which of these committed steps stay?). The older options (``save_interval_steps``,
``max_to_keep``, ``best_fn``, ...) are turned into these policies by the manager; a policy given
directly replaces them. Policies see ``CheckpointInfo``-like records, oldest first.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Container, Sequence
from typing import Any, Protocol, runtime_checkable

from flaxckpt import _multihost
from flaxckpt.options import MultiprocessingOptions

__all__ = [
    'AnyPreservationPolicy', 'AnySavePolicy', 'BestN', 'CheckpointInfo',
    'ContinuousCheckpointingPolicy', 'CustomSteps', 'DecisionContext', 'EveryNSeconds',
    'EveryNSteps', 'EveryNStepsClosest', 'FixedIntervalPolicy', 'InitialSavePolicy',
    'LatestDuration', 'LatestN', 'PolicyCheckpointInfo', 'PreemptionCheckpointingPolicy',
    'PreservationContext', 'PreservationPolicy', 'PreserveAll', 'SaveDecisionPolicy',
    'SpecificStepsPolicy',
]


class PolicyCheckpointInfo(Protocol):
  """What a policy knows of a step: its number, its save time and its metrics (or None)."""
  step: int
  metrics: Any
  time: datetime.datetime


@dataclasses.dataclass
class CheckpointInfo:
  """A step as a manager tracks it (Orbax's ``checkpoint_manager.CheckpointInfo``).

  Attributes:
    step: the step number.
    time: when it was saved (UTC); for steps found on disk, its commit time.
    metrics: the metrics saved with it, or None.
  """
  step: int
  time: datetime.datetime
  metrics: Any = None

  def __post_init__(self) -> None:
    if hasattr(self.step, '__index__') and not isinstance(self.step, int):
      self.step = self.step.__index__()  # A jax or numpy integer.


def _positive(owner: str, name: str, value: Any, allow_zero: bool = False) -> None:
  low = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    kind = 'non-negative' if allow_zero else 'positive'
    raise ValueError(f'{owner}.{name} must be a {kind} int, got {value!r}.')


# --- save decisions ---------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class DecisionContext:
  """What a save decision may depend on besides the steps.

  Attributes:
    is_saving_in_progress: a background save has started and not yet committed.
    reached_preemption: JAX's preemption sync point has been reached at this step.
    multiprocessing_options: the manager's; says which process decides for all.
  """
  is_saving_in_progress: bool
  reached_preemption: bool
  multiprocessing_options: MultiprocessingOptions = dataclasses.field(
      default_factory=MultiprocessingOptions)


@runtime_checkable
class SaveDecisionPolicy(Protocol):
  """Decides whether a step is saved."""

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    """True to save ``step``; ``previous_steps`` are the committed steps, oldest first."""
    ...


@dataclasses.dataclass
class FixedIntervalPolicy:
  """Saves every step that is a multiple of ``interval``."""
  interval: int

  def __post_init__(self) -> None:
    _positive('FixedIntervalPolicy', 'interval', self.interval)

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    return step.step % self.interval == 0


@dataclasses.dataclass
class SpecificStepsPolicy:
  """Saves the steps in ``steps`` (any container: set, list, range)."""
  steps: Container[int]

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    return step.step in self.steps


@dataclasses.dataclass(kw_only=True)
class ContinuousCheckpointingPolicy:
  """Saves whenever no save is in flight, at most once per ``minimum_interval_secs`` (measured
  from the latest step's save time). The primary process decides for every process."""
  minimum_interval_secs: int | None = None

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    decision = not context.is_saving_in_progress and (
        not previous_steps or self.minimum_interval_secs is None
        or step.time - previous_steps[-1].time
        >= datetime.timedelta(seconds=self.minimum_interval_secs))
    return _multihost.agree(f'continuous-policy:{step.step}', str(int(decision))) == '1'


class PreemptionCheckpointingPolicy:
  """Saves when the preemption sync point is reached."""

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    return context.reached_preemption

  def __repr__(self) -> str:
    return 'PreemptionCheckpointingPolicy()'


class InitialSavePolicy:
  """Saves when no step has been saved yet."""

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    return not previous_steps

  def __repr__(self) -> str:
    return 'InitialSavePolicy()'


@dataclasses.dataclass
class AnySavePolicy:
  """Saves when any of ``policies`` would (evaluated in order, stopping at the first yes)."""
  policies: Sequence[SaveDecisionPolicy]

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    return any(p.should_save(step, previous_steps=previous_steps, context=context)
               for p in self.policies)


@dataclasses.dataclass
class ShouldSaveFnPolicy:
  """``CheckpointManagerOptions.should_save_fn(step, latest_step_or_None)`` as a policy."""
  should_save_fn: Callable[[int, int | None], bool]

  def should_save(self, step: PolicyCheckpointInfo,
                  previous_steps: Sequence[PolicyCheckpointInfo], *,
                  context: DecisionContext) -> bool:
    return bool(self.should_save_fn(step.step,
                                    previous_steps[-1].step if previous_steps else None))


# --- preservation -----------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class PreservationContext:
  """Reserved for what a preservation decision may depend on besides the steps (empty)."""


@runtime_checkable
class PreservationPolicy(Protocol):
  """Decides which committed steps are kept; the others are deleted."""

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    """One flag per checkpoint (oldest first): True keeps it."""
    ...


@dataclasses.dataclass
class PreserveAll:
  """Keeps every step."""

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    return [True] * len(checkpoints)


@dataclasses.dataclass
class LatestN:
  """Keeps the ``n`` newest steps (all of them when ``n`` is None)."""
  n: int | None = None

  def __post_init__(self) -> None:
    if self.n is not None:
      _positive('LatestN', 'n', self.n, allow_zero=True)

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    if self.n is None:
      return [True] * len(checkpoints)
    dropped = max(len(checkpoints) - self.n, 0)
    return [i >= dropped for i in range(len(checkpoints))]


@dataclasses.dataclass
class EveryNSeconds:
  """Keeps the first step and then each step saved at least ``interval_secs`` after the last
  step kept this way."""
  interval_secs: int

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    result, kept = [], None
    interval = datetime.timedelta(seconds=self.interval_secs)
    for info in checkpoints:
      keep = kept is None or info.time - kept >= interval
      if keep:
        kept = info.time
      result.append(keep)
    return result


def _keep_newest(result: list[bool], max_to_keep: int | None) -> list[bool]:
  """Clears all but the last ``max_to_keep`` True flags."""
  if max_to_keep is None:
    return result
  kept = [i for i, keep in enumerate(result) if keep]
  for i in kept[:max(len(kept) - max_to_keep, 0)]:
    result[i] = False
  return result


@dataclasses.dataclass
class EveryNSteps:
  """Keeps the steps that are multiples of ``interval_steps``; with ``exact_interval=False``,
  the first step and each step at least ``interval_steps`` after the last one kept. At most
  ``max_to_keep`` (the newest) of them when set."""
  interval_steps: int
  exact_interval: bool = True
  max_to_keep: int | None = None

  def __post_init__(self) -> None:
    _positive('EveryNSteps', 'interval_steps', self.interval_steps)

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    if self.exact_interval:
      result = [info.step % self.interval_steps == 0 for info in checkpoints]
    else:
      result, kept = [], None
      for info in checkpoints:
        keep = kept is None or info.step - kept >= self.interval_steps
        if keep:
          kept = info.step
        result.append(keep)
    return _keep_newest(result, self.max_to_keep)


@dataclasses.dataclass
class EveryNStepsClosest:
  """For each multiple of ``interval_steps``, keeps the step closest to it (the later one on a
  tie), and always the newest step; at most ``max_to_keep`` of them when set."""
  interval_steps: int
  max_to_keep: int | None = None

  def __post_init__(self) -> None:
    _positive('EveryNStepsClosest', 'interval_steps', self.interval_steps)

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    if not checkpoints:
      return []
    closest: dict[int, tuple[int, int]] = {}  # multiple -> (distance, index)
    for i, info in enumerate(checkpoints):
      k = round(info.step / self.interval_steps)
      distance = abs(info.step - k * self.interval_steps)
      if k not in closest or distance <= closest[k][0]:
        closest[k] = (distance, i)
    kept = {i for _, i in closest.values()} | {len(checkpoints) - 1}
    return _keep_newest([i in kept for i in range(len(checkpoints))], self.max_to_keep)


@dataclasses.dataclass
class CustomSteps:
  """Keeps the steps in ``steps``."""
  steps: Sequence[int]

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    wanted = set(self.steps)
    return [info.step in wanted for info in checkpoints]


@dataclasses.dataclass
class LatestDuration:
  """Keeps the steps saved within ``duration`` of now."""
  duration: datetime.timedelta

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    return [now - info.time <= self.duration for info in checkpoints]


@dataclasses.dataclass
class AnyPreservationPolicy:
  """Keeps a step when any of ``policies`` keeps it."""
  policies: Sequence[PreservationPolicy]

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    result = [False] * len(checkpoints)
    for policy in self.policies:
      flags = list(policy.should_preserve(checkpoints, context=context))
      if len(flags) != len(checkpoints):
        raise ValueError(f'{policy!r}.should_preserve returned {len(flags)} flags for '
                         f'{len(checkpoints)} checkpoints.')
      result = [a or bool(b) for a, b in zip(result, flags)]
    return result


@dataclasses.dataclass(kw_only=True)
class BestN:
  """Keeps the ``n`` best steps by ``get_metric_fn(metrics)`` (higher is better; lower with
  ``reverse=True``), and the steps without metrics unless ``keep_checkpoints_without_metrics``
  is False. ``n=None`` keeps every step; so does having at most ``n`` steps."""
  get_metric_fn: Callable[[Any], float]
  reverse: bool = False
  n: int | None = None
  keep_checkpoints_without_metrics: bool = True

  def __post_init__(self) -> None:
    if self.n is not None:
      _positive('BestN', 'n', self.n, allow_zero=True)

  def should_preserve(self, checkpoints: Sequence[PolicyCheckpointInfo], *,
                      context: PreservationContext) -> Sequence[bool]:
    if self.n is None or len(checkpoints) <= self.n:
      return [True] * len(checkpoints)
    if self.n == 0:
      return [False] * len(checkpoints)
    ranked = sorted((i for i, info in enumerate(checkpoints) if info.metrics is not None),
                    key=lambda i: self.get_metric_fn(checkpoints[i].metrics),
                    reverse=self.reverse)  # Worst first; a stable sort keeps ties oldest first.
    kept = set(ranked[-self.n:])
    if self.keep_checkpoints_without_metrics:
      kept |= {i for i, info in enumerate(checkpoints) if info.metrics is None}
    return [i in kept for i in range(len(checkpoints))]
