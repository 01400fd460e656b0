"""The corruption drill, small enough for every test run: seeded trials of
``tests/drill_corruption.py`` (``make drill`` runs 200 per contender), and checks that the drill
itself can fail."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import drill_corruption as drill

FLAXCKPT = ['flaxckpt', 'flaxckpt-zarr', 'flaxckpt-msgpack']
ORBAX = ['orbax', 'flaxckpt-reads-orbax']
FIRST_SEED = 1000  # Apart from make drill's seeds 0-199.


@pytest.fixture(scope='module')
def flaxckpt_trials():
  return drill.run_trials(FLAXCKPT, trials=40, seed=FIRST_SEED)


@pytest.fixture(scope='module')
def orbax_trials():
  return drill.run_trials(ORBAX, trials=8, seed=FIRST_SEED)


def _failures(trials):
  return [(t.contender, t.seed, t.file, t.damage, t.bad(drill.CONTENDERS[t.contender]),
           t.restores) for t in trials
          if t.bad(drill.CONTENDERS[t.contender])]


def test_flaxckpt_restores_exactly_or_raises_a_clear_error(flaxckpt_trials):
  assert len(flaxckpt_trials) == 40 * len(FLAXCKPT)
  assert not _failures(flaxckpt_trials), drill.report(flaxckpt_trials, FLAXCKPT)[0]


def test_a_sidecar_that_is_not_utf8_is_named(tmp_path, set_flag):
  from flaxckpt.legacy import checkpoints
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path, {'w': np.arange(3)}, step=1)
  sidecar = tmp_path / '.checkpoint_1.crc32c'
  data = bytearray(sidecar.read_bytes())
  data[5] = 0xff  # Never valid in UTF-8.
  sidecar.write_bytes(bytes(data))
  with pytest.raises(checkpoints.ChecksumMismatchError, match=str(sidecar)):
    checkpoints.restore_checkpoint(tmp_path, None, step=1)


def test_verify_flags_every_checkpoint_restore_rejects(flaxckpt_trials):
  rejected = [t for t in flaxckpt_trials if t.rejected]
  assert len(rejected) > len(flaxckpt_trials) // 3  # The damage does reach restore.
  assert all(t.problems for t in rejected)
  assert not any(t.verify_failure for t in flaxckpt_trials)


def test_the_trials_cover_every_damage_and_many_files(flaxckpt_trials):
  for contender in FLAXCKPT:
    mine = [t for t in flaxckpt_trials if t.contender == contender]
    assert {t.damage.split()[0] for t in mine} == set(drill.DAMAGES), contender
    assert len({t.file for t in mine}) >= (2 if contender == 'flaxckpt-msgpack' else 6)
  errors = [r for t in flaxckpt_trials for r in t.restores.values() if r['outcome'] == 'error']
  assert {'ChecksumError', 'ChecksumMismatchError', 'NotACheckpointError'} <= {
      r['error_type'] for r in errors}


def test_orbax_runs_beside_and_only_informs(orbax_trials):
  assert {t.contender for t in orbax_trials} == set(ORBAX)
  # The same damage reaches both readers of an Orbax checkpoint.
  by_seed = {}
  for t in orbax_trials:
    by_seed.setdefault(t.seed, set()).add((t.file, t.damage))
  assert all(len(plans) == 1 for plans in by_seed.values())
  text, passed = drill.report(orbax_trials, ORBAX)
  assert 'orbax ' in text and 'flaxckpt-reads-orbax' in text
  reads = [t for t in orbax_trials if t.contender == 'flaxckpt-reads-orbax']
  assert passed == (not _failures(reads))


def test_damage_plans_are_reproducible(tmp_path):
  root = tmp_path / 'ckpt'
  (root / 'sub').mkdir(parents=True)
  for name, size in (('a', 10), ('b', 300), ('sub/c', 50)):
    (root / name).write_bytes(bytes(size))
  files = drill.checkpoint_files(root)
  plans = [drill.plan_damage(drill.random.Random(f'x/{seed}'), files, root) for seed in range(50)]
  again = [drill.plan_damage(drill.random.Random(f'x/{seed}'), files, root) for seed in range(50)]
  assert plans == again
  for plan in plans:
    if plan['damage'] == 'truncate':
      assert 0 <= plan['length'] < plan['size']
    if plan['damage'] == 'flip':
      assert 1 <= len(plan['flips']) <= 8 and all(0 < mask < 256 for _, mask in plan['flips'])


def test_apply_damage_changes_the_file(tmp_path):
  data = bytes(range(200))
  for plan in ({'damage': 'truncate', 'length': 0}, {'damage': 'truncate', 'length': 199},
               {'damage': 'flip', 'flips': [(0, 1), (150, 0xff)]}, {'damage': 'zero'},
               {'damage': 'delete'}):
    (tmp_path / 'f').write_bytes(data)
    drill.apply_damage(tmp_path, {'file': 'f', 'size': len(data), **plan})
    assert not (tmp_path / 'f').exists() or (tmp_path / 'f').read_bytes() != data, plan


# --- the drill can fail ----------------------------------------------------------------------


def _original():
  return {'w': jnp.arange(6, dtype=jnp.float32), 'n': np.arange(3, dtype=np.int32),
          'step': 7, 'lr': 0.5, 'name': 'run'}


@pytest.mark.parametrize('change', [
    lambda t: t['n'].__setitem__(1, 5),
    lambda t: t.__setitem__('w', np.arange(6, dtype=np.float64)),  # Equal values, other dtype.
    lambda t: t.__setitem__('w', np.arange(6, dtype=np.float32).reshape(2, 3)),
    lambda t: t.__setitem__('step', 7.0),
    lambda t: t.__setitem__('name', 'rum'),
    lambda t: t.pop('lr'),
    lambda t: t.__setitem__('extra', 1),
], ids=['value', 'dtype', 'shape', 'scalar-type', 'string', 'missing-leaf', 'extra-leaf'])
def test_a_restore_that_differs_is_silent_wrong(change):
  restored = {key: np.array(value) if isinstance(value, np.ndarray) else value
              for key, value in _original().items()}
  change(restored)
  outcome = drill.classify(_original(), '/ckpt/7', result=restored)
  assert outcome['outcome'] == 'silent-wrong', outcome


def test_the_same_values_are_exact_as_jax_or_numpy():
  restored = {**_original(), 'w': np.arange(6, dtype=np.float32), 'n': jnp.arange(3)}
  assert drill.classify(_original(), '/ckpt/7', result=restored) == {'outcome': 'exact'}


def test_an_error_is_clear_only_when_it_names_the_checkpoint():
  root = pathlib.Path('/tmp/drill/ckpt-7')
  clear = drill.classify(_original(), root, error=ValueError(f'{root}/_METADATA: damaged'))
  assert clear['outcome'] == 'error' and clear['error_type'] == 'ValueError'
  assert drill.classify(_original(), root, error=ValueError(f'Nothing at {root}.'))[
      'outcome'] == 'error'
  for error in (ValueError('Expecting value: line 1 column 1 (char 0)'),
                KeyError('w'), ValueError('/tmp/drill/ckpt-70/x: another checkpoint'),
                ValueError('/tmp/drill/ckpt-7.orbax-checkpoint-tmp-1: another directory')):
    outcome = drill.classify(_original(), root, error=error)
    assert outcome['outcome'] == 'unclear-error', (error, outcome)


def test_bad_outcomes_fail_the_report_for_flaxckpt_only():
  def trial(contender, outcome, problems=('x',)):
    return drill.Trial(contender, 1, 'f', 'zero (3 bytes)',
                       {mode: {'outcome': outcome, 'detail': 'd', 'error_type': 'E'}
                        for mode in drill.MODES}, list(problems))

  for outcome in ('silent-wrong', 'unclear-error', 'crash', 'hang'):
    assert not drill.report([trial('flaxckpt', outcome)], ['flaxckpt'])[1], outcome
    assert drill.report([trial('orbax', outcome)], ['orbax'])[1], outcome
  assert drill.report([trial('flaxckpt-reads-orbax', 'silent-wrong')],
                      ['flaxckpt-reads-orbax'])[1]
  assert not drill.report([trial('flaxckpt-reads-orbax', 'crash')],
                          ['flaxckpt-reads-orbax'])[1]
  miss = trial('flaxckpt-msgpack', 'error', problems=())
  assert miss.verify_miss
  text, passed = drill.report([miss], ['flaxckpt-msgpack'])
  assert not passed and 'verify-miss' in text and '--only 1' in text
  assert drill.report([trial('flaxckpt', 'error')], ['flaxckpt'])[1]


def test_the_worker_reports_crashes_and_hangs_and_restarts(tmp_path):
  worker = drill._Worker(tmp_path / 'worker.log')
  try:
    with pytest.raises(drill.WorkerFailure) as crash:
      worker.call({'op': 'misbehave', 'how': 'crash'})
    assert crash.value.outcome == 'crash'
    with pytest.raises(drill.WorkerFailure) as hang:
      worker.call({'op': 'misbehave', 'how': 'hang'}, deadline=3)
    assert hang.value.outcome == 'hang'
    reply = worker.call({'op': 'verify', 'root': str(tmp_path / 'nothing')})
    assert reply['problems'] and 'nothing' in reply['problems'][0]
    assert worker.restarts == 2
  finally:
    worker.close()
