"""The crash drill (tests/drill_crash.py) at small size, and proof that its checker catches the
damage it looks for. ``make drill`` runs it at full size."""

import os
import shutil

import pytest

import drill_crash
import flaxckpt as ocp

_FLAXCKPT = [c for c in drill_crash.CONTENDERS if drill_crash.is_flaxckpt(c)]


def test_random_kills(tmp_path):
  results = drill_crash.run_trials(list(drill_crash.CONTENDERS), trials=3, seed=0,
                                   workdir=str(tmp_path))
  assert len(results) == 3 * len(drill_crash.CONTENDERS)
  assert all(t.outcome in drill_crash.OUTCOMES for t in results)
  bad = [f'{drill_crash.describe(t)}: {t.outcome}: {t.problems}' for t in results
         if drill_crash.is_flaxckpt(t.contender) and t.outcome != 'ok']
  assert not bad, '\n'.join(bad)
  # Orbax's outcomes are only reported; its trials must have run to a check.
  assert all(t.outcome != 'writer-error' for t in results if t.contender == 'orbax-manager')


@pytest.mark.parametrize('contender', ['flaxckpt-manager', 'flaxckpt-legacy-orbax'])
def test_kills_while_retention_deletes_a_step(tmp_path, contender):
  """Killed inside the deletion of the oldest step (no file is removed before it): just before
  its 2nd, 9th and 17th removal (of 18 or more), and just before the last directory goes. The
  step must then be either whole or not listed."""
  calls = ['delete:2', 'delete:9', 'delete:17', 'rmdir:1']
  plans = [drill_crash.Trial(contender, i, 0, mode='op', kill_at_op=call)
           for i, call in enumerate(calls)]
  results = drill_crash.run_plans(plans, str(tmp_path))
  bad = [f'{drill_crash.describe(t)}: {t.outcome}: {t.problems}' for t in results
         if t.outcome != 'ok']
  assert not bad, '\n'.join(bad)
  assert all(t.killed_on and t.returned == drill_crash.KEEP + 1 for t in results)


# --- the checker catches what it looks for -----------------------------------------------------


@pytest.fixture
def saved(tmp_path):
  """A manager directory holding steps 0, 1, 2 as the drill's writer saves them."""
  directory = tmp_path / 'ckpt'
  saver = drill_crash._Saver('flaxckpt-manager', str(directory))
  for step in range(3):
    saver.save(step, drill_crash._as_jax(drill_crash.expected_tree(step)))
  saver.finish()
  return directory


def _check(directory, committed=2):
  return drill_crash.check_directory('flaxckpt-manager', str(directory), committed)


def test_checker_passes_a_clean_directory(saved):
  result = _check(saved)
  assert result['outcome'] == 'ok', result['problems']
  assert result['listed'] == [0, 1, 2] and result['next_step'] == 3


def test_checker_catches_a_half_written_step(saved):
  shutil.copytree(saved / '2', saved / '3')
  for folder, _, files in os.walk(saved / '3' / 'default' / 'ocdbt.process_0'):
    for name in files:
      os.remove(os.path.join(folder, name))
  result = _check(saved)
  assert result['outcome'] == 'listed-step-unrestorable'
  assert result['problems'][0][1].startswith('step 3: ')


def test_checker_catches_wrong_values(saved):
  with ocp.CheckpointManager(saved, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)) as mngr:
    tree = drill_crash.expected_tree(3)
    tree['params']['kernel'] = drill_crash.expected_tree(4)['params']['kernel']
    tree['opt']['step'] = tree['opt']['step'].astype('int64')
    mngr.save(3, args=ocp.args.StandardSave(tree))
  result = _check(saved)
  assert result['outcome'] == 'wrong-values'
  assert [tuple(p) for p in result['problems']] == [
      ('wrong-values', 'step 3: /params/kernel: values differ at 785645 positions'),  # Not 0s.
      ('wrong-values', 'step 3: /opt/step: int64[] != int32[]')]


def test_checker_catches_a_lost_step(saved):
  shutil.rmtree(saved / '2')
  assert _check(saved)['outcome'] == 'lost-latest'


def test_checker_catches_a_tmp_directory_left_behind(saved, monkeypatch):
  monkeypatch.setattr('flaxckpt._steps.remove_tmp_step_dirs', lambda root: None)
  (saved / '3.orbax-checkpoint-tmp').mkdir()
  result = _check(saved)
  assert result['outcome'] == 'tmp-not-cleaned', result['problems']


def test_checker_process_reports_failures(saved, tmp_path):
  """The same check through the checker process the drill uses, which never raises."""
  checker = drill_crash._Checker(str(tmp_path))
  try:
    assert checker.check('flaxckpt-manager', str(saved), 7)['outcome'] == 'lost-latest'
    assert checker.check('flaxckpt-manager', str(saved), 'x')['outcome'] == 'reader-crash'
    assert checker.check('flaxckpt-manager', str(saved), 2)['outcome'] == 'ok'
  finally:
    checker.close()


def test_flax_listing_must_agree(tmp_path):
  """For the legacy contenders flax's own listing is checked too."""
  (tmp_path / 'checkpoint_3.orbax-checkpoint-tmpx').mkdir()
  problems = drill_crash._flax_listing_problems(str(tmp_path), [])
  assert problems == []
  (tmp_path / 'checkpoint_4').write_bytes(b'')
  problems = drill_crash._flax_listing_problems(str(tmp_path), [])
  assert problems[0][0] == 'listed-step-unrestorable'
