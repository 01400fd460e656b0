"""Save-decision and preservation policies (ocp.checkpoint_managers), checked against Orbax's:
the same policy objects give the same answers, and managers configured the way gemma, MaxText
and kauldron configure them save and keep the same steps as Orbax's CheckpointManager."""

import dataclasses
import datetime

import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class Info:
  step: int
  time: datetime.datetime
  metrics: dict | None


def _infos(steps, minutes=None, losses=None):
  return [Info(s, T0 + datetime.timedelta(minutes=(minutes or steps)[i]),
               None if losses is None or losses[i] is None else {'loss': losses[i]})
          for i, s in enumerate(steps)]


STEPS = [0, 3, 5, 10, 12, 15, 20, 21, 30, 44]
MINUTES = [0, 1, 2, 40, 45, 61, 62, 130, 131, 200]
LOSSES = [.9, None, .4, .5, None, .1, .7, .2, .3, .6]


def _preservation(lib):
  """The preservation policies of one library, as the projects combine them."""
  m = lib.checkpoint_managers
  loss = lambda metrics: metrics['loss']  # noqa: E731
  return {
      'latest_n': m.LatestN(3),
      'latest_all': m.LatestN(),
      'latest_0': m.LatestN(0),
      'every_n_steps': m.EveryNSteps(interval_steps=10),
      'every_n_steps_inexact': m.EveryNSteps(interval_steps=10, exact_interval=False,
                                             max_to_keep=2),
      'every_n_seconds': m.EveryNSeconds(interval_secs=3600),
      'custom_steps': m.CustomSteps([5, 21, 99]),
      'best_min': m.BestN(get_metric_fn=loss, reverse=True, n=2),
      'best_max_drop_unscored': m.BestN(get_metric_fn=loss, n=3,
                                        keep_checkpoints_without_metrics=False),
      'best_0': m.BestN(get_metric_fn=loss, n=0),
      'best_all': m.BestN(get_metric_fn=loss),
      'kauldron': m.AnyPreservationPolicy(policies=[m.LatestN(2), m.CustomSteps([3, 12])]),
      'maxtext': m.AnyPreservationPolicy([m.LatestN(2), m.EveryNSteps(interval_steps=20)]),
      'closest': m.EveryNStepsClosest(interval_steps=10),
  }


@pytest.mark.parametrize('name', sorted(_preservation(orbax)))
def test_preservation_policies_answer_as_orbax(name):
  infos = _infos(STEPS, MINUTES, LOSSES)
  ours = _preservation(ocp)[name].should_preserve(
      infos, context=ocp.checkpoint_managers.PreservationContext())
  theirs = _preservation(orbax)[name].should_preserve(
      infos, context=orbax.checkpoint_managers.PreservationContext())
  assert list(ours) == list(theirs)
  assert list(ours) != [True] * len(infos) or name in ('latest_all', 'best_all')


def _save_policies(lib):
  m = lib.checkpoint_managers
  return {
      'fixed': m.FixedIntervalPolicy(interval=5),
      'specific': m.SpecificStepsPolicy(steps=[3, 7]),
      'initial': m.InitialSavePolicy(),
      'preemption': m.PreemptionCheckpointingPolicy(),
      'continuous': m.ContinuousCheckpointingPolicy(),
      'continuous_10min': m.ContinuousCheckpointingPolicy(minimum_interval_secs=600),
      'any': m.AnySavePolicy([m.FixedIntervalPolicy(4), m.SpecificStepsPolicy((3,))]),
  }


@pytest.mark.parametrize('name', sorted(_save_policies(orbax)))
def test_save_decision_policies_answer_as_orbax(name):
  ours, theirs = _save_policies(ocp)[name], _save_policies(orbax)[name]
  assert isinstance(ours, ocp.checkpoint_managers.SaveDecisionPolicy)
  answers = []
  for previous in ([], _infos([0, 1], [0, 5])):
    for step, minute in ((3, 6), (4, 9), (5, 20), (7, 16)):
      current = Info(step, T0 + datetime.timedelta(minutes=minute), None)
      for in_progress, preempted in ((False, False), (True, False), (False, True)):
        got = [policy.should_save(
            current, previous_steps=previous, context=lib.checkpoint_managers.DecisionContext(
                is_saving_in_progress=in_progress, reached_preemption=preempted,
                multiprocessing_options=lib.options.MultiprocessingOptions()))
               for policy, lib in ((ours, ocp), (theirs, orbax))]
        assert got[0] == got[1], (step, minute, previous, in_progress, preempted)
        answers.append(got[0])
  assert True in answers and False in answers


def test_submodules_resolve_as_in_orbax():
  assert ocp.checkpoint_managers.preservation_policy.LatestN is ocp.checkpoint_managers.LatestN
  assert (ocp.checkpoint_managers.save_decision_policy.FixedIntervalPolicy
          is ocp.checkpoint_managers.FixedIntervalPolicy)
  assert ocp.checkpoint_managers.CheckpointManagerOptions is ocp.CheckpointManagerOptions
  assert isinstance(ocp.checkpoint_managers.LatestN(1),
                    ocp.checkpoint_managers.PreservationPolicy)
  with pytest.raises(ValueError, match='EveryNSteps.interval_steps must be a positive int'):
    ocp.checkpoint_managers.EveryNSteps(interval_steps=0)


# --- managers: the same calls through Orbax and flaxckpt keep the same steps -------------------


def _run(lib, root, options, steps, losses=None, kwargs=None):
  """Saves each step (skipped ones included) and returns (save results, all_steps)."""
  mngr = lib.CheckpointManager(root, options=lib.CheckpointManagerOptions(
      enable_async_checkpointing=False, **options), **(kwargs or {}))
  saved = []
  for i, step in enumerate(steps):
    metrics = None if losses is None or losses[i] is None else {'loss': losses[i]}
    saved.append(mngr.save(step, args=lib.args.StandardSave({'x': np.full(2, step)}),
                           metrics=metrics))
  mngr.wait_until_finished()
  result = saved, mngr.all_steps(), mngr.best_step()
  mngr.close()
  return result


def _options(lib, case):
  m = lib.checkpoint_managers
  loss = lambda metrics: metrics['loss']  # noqa: E731
  return {
      # examples/gemma: keep the newest only.
      'gemma': dict(preservation_policy=m.LatestN(1),
                    save_decision_policy=m.FixedIntervalPolicy(4)),
      # kauldron: newest few plus fixed steps, saved on an interval and at the fixed steps.
      'kauldron': dict(
          save_decision_policy=m.AnySavePolicy([m.FixedIntervalPolicy(interval=6),
                                                m.SpecificStepsPolicy(steps=[5, 13])]),
          preservation_policy=m.AnyPreservationPolicy(policies=[m.LatestN(2),
                                                                m.CustomSteps([5, 13])])),
      # MaxText: continuous checkpointing with a long minimum interval, newest N kept.
      'maxtext': dict(
          save_decision_policy=m.AnySavePolicy([
              m.FixedIntervalPolicy(interval=10),
              m.ContinuousCheckpointingPolicy(minimum_interval_secs=3600)]),
          preservation_policy=m.AnyPreservationPolicy([m.LatestN(1),
                                                       m.EveryNSteps(interval_steps=20)])),
      'best_n': dict(preservation_policy=m.BestN(get_metric_fn=loss, reverse=True, n=2),
                     best_fn=loss, best_mode='min'),
      # The older options, which both libraries turn into policies.
      'interval_max_to_keep': dict(save_interval_steps=3, max_to_keep=2),
      'keep_period': dict(max_to_keep=1, keep_period=4, save_on_steps=[5, 7]),
      'best_fn_min': dict(best_fn=loss, best_mode='min', max_to_keep=2),
      'best_fn_max_drop_unscored': dict(best_fn=loss, max_to_keep=3,
                                        keep_checkpoints_without_metrics=False),
      'keep_time_interval': dict(max_to_keep=2,
                                 keep_time_interval=datetime.timedelta(hours=1)),
      'should_save_fn': dict(should_save_fn=lambda step, last: last is None or step >= last + 4,
                             max_to_keep=3),
  }[case]


STEP_SEQUENCE = list(range(0, 25)) + [24, 20, 26]
LOSS_SEQUENCE = [None if s % 3 == 1 else ((s * 7) % 11) / 10 for s in STEP_SEQUENCE]


@pytest.mark.parametrize('case', ['gemma', 'kauldron', 'maxtext', 'best_n',
                                  'interval_max_to_keep', 'keep_period', 'best_fn_min',
                                  'best_fn_max_drop_unscored', 'keep_time_interval',
                                  'should_save_fn'])
def test_managers_save_and_keep_the_steps_orbax_does(tmp_path, case):
  ours = _run(ocp, tmp_path / 'ours', _options(ocp, case), STEP_SEQUENCE, LOSS_SEQUENCE)
  theirs = _run(orbax, tmp_path / 'orbax', _options(orbax, case), STEP_SEQUENCE,
                LOSS_SEQUENCE)
  assert ours == theirs
  saved, steps, _ = ours
  assert len(steps) < sum(saved)  # Each case deletes some of what it saved.
  assert sorted(p.name for p in (tmp_path / 'ours').iterdir()) == sorted(map(str, steps))


def test_retention_survives_a_restart_as_in_orbax(tmp_path):
  """A second run over the same directory sees the first run's steps (and metrics)."""
  for lib, root in ((ocp, tmp_path / 'ours'), (orbax, tmp_path / 'orbax')):
    _run(lib, root, _options(lib, 'best_fn_min'), [0, 1, 2], [.5, .1, .9])
  ours = _run(ocp, tmp_path / 'ours', _options(ocp, 'best_fn_min'), [3, 4], [.3, .05])
  theirs = _run(orbax, tmp_path / 'orbax', _options(orbax, 'best_fn_min'), [3, 4], [.3, .05])
  assert ours == theirs == ([True, True], [1, 4], 4)


@pytest.mark.parametrize('replaced', [dict(max_to_keep=2), dict(keep_period=5),
                                      dict(keep_time_interval=datetime.timedelta(hours=1))])
def test_a_preservation_policy_with_the_options_it_replaces_is_refused(tmp_path, replaced):
  for lib in (orbax, ocp):
    options = lib.CheckpointManagerOptions(
        preservation_policy=lib.checkpoint_managers.LatestN(3), **replaced)
    with pytest.raises(ValueError, match='preservation_policy'):
      lib.CheckpointManager(tmp_path / lib.__name__, options=options)
  with pytest.raises(ValueError, match=r"preservation_policy replaces \['keep_latest'\]"):
    ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(3), keep_latest=1))


def test_a_user_policy_is_called_with_orbax_call_forms(tmp_path):
  """A project's own policies (kauldron writes some) follow the protocols."""
  calls = []

  class EvenSteps:
    def should_save(self, step, previous_steps, *, context):
      calls.append((step.step, [p.step for p in previous_steps], context.is_saving_in_progress))
      return step.step % 2 == 0

  class KeepOddAndNewest:
    def should_preserve(self, checkpoints, *, context):
      assert isinstance(context, ocp.checkpoint_managers.PreservationContext)
      return [c.step % 4 == 2 or i == len(checkpoints) - 1 for i, c in enumerate(checkpoints)]

  saved, steps, _ = _run(ocp, tmp_path, dict(save_decision_policy=EvenSteps(),
                                             preservation_policy=KeepOddAndNewest()),
                         range(9))
  assert saved == [s % 2 == 0 for s in range(9)]
  assert steps == [2, 6, 8]
  assert calls[:3] == [(0, [], False), (1, [0], False), (2, [0], False)]
  with pytest.raises(TypeError, match='save_decision_policy must be a SaveDecisionPolicy'):
    ocp.CheckpointManagerOptions(save_decision_policy=lambda step: True)
