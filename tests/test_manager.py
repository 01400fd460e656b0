"""CheckpointManager: seed examples, retention, best-metric tracking, restarts, bad input."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt import checkpoint_utils
from trees import assert_trees_equal


def _state(i=0):
  return {'layer0': {'bias': jnp.full((2,), i, jnp.float32), 'weight': jnp.arange(3.0) + i}}


def test_seed_000_single_item(tmp_path):
  directory = tmp_path / 'checkpoint-manager-single'
  options = ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=2)
  mngr = ocp.CheckpointManager(directory, options=options)
  state = {'layer0': {'bias': 0, 'weight': 1}}
  saved = []
  for step in range(5):
    state = jax.tree_util.tree_map(lambda x: x + 1, state)
    saved.append(mngr.save(step, args=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  assert saved == [True, False, True, False, True]
  assert mngr.latest_step() == 4
  assert mngr.all_steps() == [2, 4]
  assert sorted(os.listdir(directory)) == ['2', '4']
  assert sorted(os.listdir(directory / '4')) == ['_CHECKPOINT_METADATA', 'commit_success.txt',
                                                 'default']
  assert mngr.restore(mngr.latest_step()) == {'layer0': {'bias': 5, 'weight': 6}}
  target_state = {'layer0': {'bias': 0.0, 'weight': 0.0}}
  assert mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target_state)) == {
      'layer0': {'bias': 5, 'weight': 6}}


def test_seed_000_multiple_items_remember_their_handlers(tmp_path):
  directory = tmp_path / 'checkpoint-manager-multiple'
  options = ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=2)
  mngr = ocp.CheckpointManager(directory, options=options,
                               item_names=('state', 'extra_metadata'))
  state = {'layer0': {'bias': 0, 'weight': 1}}
  extra_metadata = {'version': 1.0, 'step': 0}
  for step in range(5):
    state = jax.tree_util.tree_map(lambda x: x + 1, state)
    extra_metadata = {**extra_metadata, 'step': step}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            extra_metadata=ocp.args.JsonSave(extra_metadata)))
  mngr.wait_until_finished()
  result = mngr.restore(mngr.latest_step())
  assert repr(result) == ("CompositeArgs({'extra_metadata': {'version': 1.0, 'step': 4}, "
                          "'state': {'layer0': {'bias': 5, 'weight': 6}}})")
  assert result.state == {'layer0': {'bias': 5, 'weight': 6}}
  assert result.extra_metadata == {'version': 1.0, 'step': 4}
  only = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(extra_metadata=None))
  assert repr(only) == "CompositeArgs({'extra_metadata': {'version': 1.0, 'step': 4}})"
  both = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore({'layer0': {'bias': 0.0, 'weight': 0.0}}),
      extra_metadata=None))
  assert both.state == {'layer0': {'bias': 5, 'weight': 6}}
  step_meta = json.loads((directory / '4' / '_CHECKPOINT_METADATA').read_text())
  assert step_meta['item_handlers'] == {
      'extra_metadata':
          'orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler',
      'state': 'orbax.checkpoint._src.handlers.standard_checkpoint_handler.'
               'StandardCheckpointHandler'}
  # A fresh manager knows nothing yet: the recorded handler names let it restore anyway, and
  # item_handlers configures it explicitly.
  fresh = ocp.CheckpointManager(directory, item_names=('state', 'extra_metadata'))
  assert fresh.restore(4, args=ocp.args.Composite(extra_metadata=None)).extra_metadata['step'] == 4
  configured = ocp.CheckpointManager(directory, item_names=('state', 'extra_metadata'),
                                     item_handlers={'state': ocp.StandardCheckpointHandler,
                                                    'extra_metadata': ocp.JsonCheckpointHandler()})
  assert set(configured.item_metadata(4)) == {'state', 'extra_metadata'}


def test_seed_001_older_call_forms(tmp_path):
  ckpt = {'model': {'params': {'kernel': jnp.ones((5, 3)), 'bias': jnp.zeros(3)}, 'step': 1},
          'config': {'dimensions': np.array([5, 3])}, 'data': [jnp.arange(5.0)]}
  orbax_checkpointer = ocp.PyTreeCheckpointer()
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), ckpt)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  checkpoint_manager = ocp.CheckpointManager(tmp_path / 'managed', orbax_checkpointer, options)
  for step in range(5):
    assert checkpoint_manager.save(step, ckpt, save_kwargs={'save_args': save_args}) is True
  assert sorted(os.listdir(tmp_path / 'managed')) == ['3', '4']
  assert checkpoint_manager.latest_step() == 4
  raw = checkpoint_manager.restore(4)
  assert raw['model']['step'] == 1 and isinstance(raw['data'], list)
  restored = checkpoint_manager.restore(4, items=ckpt)
  assert_trees_equal(restored, ckpt)
  custom_target = {**ckpt, 'model': {**ckpt['model'], 'batch_stats': np.arange(10)}}
  with pytest.raises(KeyError, match='batch_stats'):
    checkpoint_manager.restore(4, items=custom_target)
  restore_args = checkpoint_utils.construct_restore_args(custom_target)
  filled = checkpoint_manager.restore(4, items=custom_target, restore_kwargs={
      'transforms': {}, 'restore_args': restore_args})
  np.testing.assert_array_equal(filled['model']['batch_stats'], np.arange(10))
  async_manager = ocp.CheckpointManager(
      tmp_path / 'managed_async', ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler()), options)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ('x', 'y'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x', 'y'))
  mp_array = jax.device_put(np.arange(8 * 2).reshape(8, 2), sharding)
  async_manager.save(0, {'model': mp_array})
  async_manager.wait_until_finished()
  ref_ckpt = {'model': jax.device_put(np.arange(8).reshape(4, 2), sharding)}
  out = async_manager.restore(0, items=ref_ckpt, restore_kwargs={
      'restore_args': checkpoint_utils.construct_restore_args(ref_ckpt, set_global_shape=False)})
  assert out['model'].shape == (8, 2) and out['model'].sharding == sharding
  np.testing.assert_array_equal(out['model'], np.arange(16).reshape(8, 2))


def test_dict_of_checkpointers_older_form(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, {'state': ocp.PyTreeCheckpointer(),
                                          'meta': ocp.Checkpointer(ocp.JsonCheckpointHandler())})
  mngr.save(1, {'state': _state(1), 'meta': {'lr': 0.1}})
  out = mngr.restore(1, items={'state': _state(), 'meta': None})
  assert_trees_equal(out['state'], _state(1))
  assert out['meta'] == {'lr': 0.1}


@pytest.mark.parametrize('use_async', [True, False])
def test_best_fn_retention_survives_a_restart(tmp_path, use_async):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, best_fn=lambda m: m['loss'], best_mode='min', step_prefix='ckpt',
      step_format_fixed_length=5, enable_async_checkpointing=use_async)
  with ocp.CheckpointManager(tmp_path, options=options, item_names=('state',)) as mngr:
    for step, loss in zip([0, 10, 20, 30], [.5, .1, .9, .3]):
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(step))),
                metrics={'loss': np.float32(loss)})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [10, 30]
    assert mngr.best_step() == 10
  assert sorted(os.listdir(tmp_path)) == ['ckpt_00010', 'ckpt_00030']
  assert json.loads((tmp_path / 'ckpt_00010' / 'metrics' / 'metrics').read_text()) == {
      'loss': pytest.approx(.1)}
  again = ocp.CheckpointManager(tmp_path, options=options, item_names=('state',))
  assert again.best_step() == 10 and again.metrics(30) == {'loss': pytest.approx(.3)}
  again.save(40, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(40))),
             metrics={'loss': .05})
  again.wait_until_finished()
  assert again.all_steps() == [10, 40] and again.best_step() == 40
  assert_trees_equal(again.restore(40).state, _state(40))


def test_keep_latest_together_with_best(tmp_path):
  options = ocp.CheckpointManagerOptions(max_to_keep=1, keep_latest=2,
                                         best_fn=lambda m: m['acc'])
  mngr = ocp.CheckpointManager(tmp_path, options=options)
  for step, acc in enumerate([.9, .1, .2, .3, .4]):
    mngr.save(step, args=ocp.args.StandardSave(_state(step)), metrics={'acc': acc})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [0, 3, 4]  # The best, and the two newest.


def test_keep_period_and_max_to_keep(tmp_path):
  options = ocp.CheckpointManagerOptions(max_to_keep=1, keep_period=3,
                                         enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(tmp_path, options=options)
  for step in range(8):
    mngr.save(step, args=ocp.args.StandardSave(_state(step)))
  assert mngr.all_steps() == [0, 3, 6, 7]


def test_existing_or_older_steps_are_skipped_and_force_never_overwrites(tmp_path, caplog):
  """Group 8: a loop resumed at step 20 may call save(20) again: it returns False, as Orbax's
  should_save decides; force=True saves off the policy but raises on an existing step."""
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      save_interval_steps=5))
  assert mngr.save(0, args=ocp.args.StandardSave(_state(0)))
  with caplog.at_level(logging.DEBUG, logger='flaxckpt._manager'):
    assert mngr.save(3, args=ocp.args.StandardSave(_state(3))) is False
  assert 'Step 3 skipped by the save decision policy' in caplog.text
  assert mngr.save(10, args=ocp.args.StandardSave(_state(10)))
  mngr.wait_until_finished()
  resumed = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      save_interval_steps=5))
  assert resumed.save(10, args=ocp.args.StandardSave(_state(99))) is False  # Exists.
  assert resumed.save(5, args=ocp.args.StandardSave(_state(99))) is False  # Older than latest.
  with pytest.raises(ocp.checkpoint_manager.StepAlreadyExistsError,
                     match='Step 10 already exists') as raised:
    resumed.save(10, args=ocp.args.StandardSave(_state(99)), force=True)
  assert isinstance(raised.value, ValueError)
  assert_trees_equal(resumed.restore(10), _state(10))  # Untouched.
  assert resumed.save(3, args=ocp.args.StandardSave(_state(3)), force=True)  # Off-policy.
  resumed.wait_until_finished()
  assert resumed.all_steps() == [0, 3, 10]
  assert_trees_equal(resumed.restore(3), _state(3))


def test_force_on_a_step_being_saved_raises_after_it_commits(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path)
  big = {'w': jnp.ones((256, 1024))}
  assert mngr.save(1, args=ocp.args.StandardSave(big))
  assert mngr.save(1, args=ocp.args.StandardSave(_state(1))) is False
  with pytest.raises(ocp.checkpoint_manager.StepAlreadyExistsError):
    mngr.save(1, args=ocp.args.StandardSave(_state(1)), force=True)
  assert mngr.all_steps() == [1]
  assert_trees_equal(mngr.restore(1), big)


def test_restore_waits_for_a_save_in_flight(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path)
  big = {'w': jnp.ones((512, 1024))}
  mngr.save(7, args=ocp.args.StandardSave(big))
  assert_trees_equal(mngr.restore(7), big)


def test_half_written_steps_are_ignored_and_cleaned_up_on_request(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False))
  mngr.save(1, args=ocp.args.StandardSave(_state(1)))
  tmp = tmp_path / '2.orbax-checkpoint-tmp'
  (tmp / 'default.orbax-checkpoint-tmp').mkdir(parents=True)
  assert ocp.CheckpointManager(tmp_path).all_steps() == [1]
  assert tmp.exists()
  ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      cleanup_tmp_directories=True))
  assert not tmp.exists() and (tmp_path / '1').is_dir()


def test_a_step_moved_aside_by_an_older_release_is_put_back(tmp_path):
  """Older releases replaced a step on force=True by moving it aside first; a writer killed in
  between left it as '<step>.orbax-checkpoint-tmp-replaced' and the next manager puts it back."""
  ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)).save(1, args=ocp.args.StandardSave({'x': np.arange(4)}))
  os.rename(tmp_path / '1', tmp_path / '1.orbax-checkpoint-tmp-replaced')
  (tmp_path / '1.orbax-checkpoint-tmp-1732886400123456' / 'default').mkdir(parents=True)
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      cleanup_tmp_directories=True))
  assert mngr.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ['1']
  assert_trees_equal(mngr.restore(1), {'x': np.arange(4)})


def test_cleanup_removes_every_kind_of_temporary_step_directory(tmp_path):
  """Orbax's own in-flight names carry a timestamp; deletions cut short end in -deleting."""
  ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)).save(1, args=ocp.args.StandardSave(_state(1)))
  leftovers = ['2.orbax-checkpoint-tmp', '3.orbax-checkpoint-tmp-1732886400123456',
               '0.orbax-checkpoint-tmp-deleting', '1.orbax-checkpoint-tmp-replaced']
  for name in leftovers:
    (tmp_path / name / 'default').mkdir(parents=True)
  assert ocp.CheckpointManager(tmp_path).all_steps() == [1]
  ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      cleanup_tmp_directories=True))
  assert sorted(os.listdir(tmp_path)) == ['1']


def test_read_only_never_writes(tmp_path):
  ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)).save(1, args=ocp.args.StandardSave(_state(1)))
  (tmp_path / '5.orbax-checkpoint-tmp').mkdir()
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      read_only=True, cleanup_tmp_directories=True, max_to_keep=1), metadata={'a': 1})
  assert mngr.save(2, args=ocp.args.StandardSave(_state(2))) is False
  mngr.delete(1)
  assert not mngr.should_save(9)
  assert_trees_equal(mngr.restore(1), _state(1))
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before


@pytest.mark.parametrize('step, error', [(-1, ValueError), (1.5, TypeError), ('3', TypeError),
                                         (True, TypeError)])
def test_bad_steps_are_refused(tmp_path, step, error):
  mngr = ocp.CheckpointManager(tmp_path)
  with pytest.raises(error, match='non-negative int'):
    mngr.save(step, args=ocp.args.StandardSave(_state()))
  assert os.listdir(tmp_path) == []


def test_bad_options_items_args_and_metrics_change_nothing(tmp_path):
  with pytest.raises(ValueError, match='save_interval_steps must be a positive int'):
    ocp.CheckpointManagerOptions(save_interval_steps=0)
  with pytest.raises(ValueError, match="best_mode must be 'max' or 'min'"):
    ocp.CheckpointManagerOptions(best_mode='lowest')
  mngr = ocp.CheckpointManager(tmp_path, item_names=('state',), options=(
      ocp.CheckpointManagerOptions(best_fn=lambda m: m['loss'])))
  with pytest.raises(ValueError, match=r"Unknown item names \['stat'\]"):
    mngr.save(0, args=ocp.args.Composite(stat=ocp.args.StandardSave(_state())))
  with pytest.raises(TypeError, match='pass args=args.Composite'):
    mngr.save(0, args=ocp.args.StandardSave(_state()))
  with pytest.raises(TypeError, match="Item 'state': expected a CheckpointArgs"):
    mngr.save(0, args=ocp.args.Composite(state=_state()))
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(_state())))
  mngr.wait_until_finished()
  with pytest.raises(TypeError, match="Item 'state' is handled by StandardCheckpointHandler, "
                     'which does not take JsonSave; pass StandardSave'):
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.JsonSave({'a': 1})))
  with pytest.raises(TypeError, match='Metrics of step 0 must be JSON-serializable'):
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(_state())),
              metrics={'loss': object()})
  mngr.wait_until_finished()
  assert os.listdir(tmp_path) == ['0'] and mngr.all_steps() == [0]
  single = ocp.CheckpointManager(tmp_path / 's')
  with pytest.raises(TypeError, match='args must be a CheckpointArgs'):
    single.save(0, args={'not': 'args'})
  with pytest.raises(FileNotFoundError, match='No step 3'):
    single.restore(3)


def test_root_metadata_and_reached_preemption(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, metadata={'model': 'x', 'n': 3})
  assert json.loads((tmp_path / 'metadata' / '_ROOT_METADATA').read_text()) == {
      'internal_metadata': {}, 'custom_metadata': {'model': 'x', 'n': 3}}
  assert ocp.CheckpointManager(tmp_path).metadata() == {'model': 'x', 'n': 3}
  assert mngr.reached_preemption(5) is False
  assert mngr.all_steps() == []  # The metadata folder is not a step.


def test_step_metadata_of_a_manager_step_matches_orbax(tmp_path):
  """``metadata(step)`` is the step's StepMetadata, as Orbax's manager reads it from our files."""
  import orbax.checkpoint as orbax
  with ocp.CheckpointManager(tmp_path, item_names=('state', 'extra')) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({'w': np.ones(2)}),
                                         extra=ocp.args.JsonSave({'lr': 0.1})),
              custom_metadata={'run': 'r7'})
    mngr.wait_until_finished()
    ours = mngr.metadata(3)
  assert isinstance(ours, ocp.metadata.StepMetadata)
  assert ours.custom_metadata == {'run': 'r7'}
  assert ours.commit_timestamp_nsecs >= ours.init_timestamp_nsecs > 0
  assert ours.item_metadata['state']['w'].shape == (2,)
  with orbax.CheckpointManager(tmp_path, item_names=('state', 'extra')) as theirs_mngr:
    theirs = theirs_mngr.metadata(3)
  assert theirs.custom_metadata == ours.custom_metadata
  assert (theirs.init_timestamp_nsecs, theirs.commit_timestamp_nsecs) == (
      ours.init_timestamp_nsecs, ours.commit_timestamp_nsecs)
  assert set(theirs.item_handlers) == set(ours.item_handlers) == {'state', 'extra'}


def test_wait_for_new_checkpoint_locks_the_step_against_retention(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, enable_async_checkpointing=False))
  mngr.save(0, args=ocp.args.StandardSave(_state(0)))
  with checkpoint_utils.wait_for_new_checkpoint(tmp_path, timeout=5) as step:
    assert step == 0 and (tmp_path / '0' / 'LOCKED').is_dir()
    assert_trees_equal(mngr.restore(0), _state(0))  # The lock is not an item.
    mngr.save(1, args=ocp.args.StandardSave(_state(1)))
    assert mngr.all_steps() == [0, 1]  # Step 0 is held.
  assert not (tmp_path / '0' / 'LOCKED').exists()
  mngr.save(2, args=ocp.args.StandardSave(_state(2)))
  assert mngr.all_steps() == [2]
  with checkpoint_utils.wait_for_new_checkpoint(tmp_path, until_step=5, timeout=0.2,
                                                seconds_to_sleep=0.05) as step:
    assert step == -1
  (tmp_path / '2' / 'LOCKED').mkdir()
  checkpoint_utils.unlock_existing_checkpoints(tmp_path)
  assert not (tmp_path / '2' / 'LOCKED').exists()


def test_checkpoints_iterator_yields_new_steps_then_times_out(tmp_path):
  naming = {'step_prefix': 'ckpt', 'step_format_fixed_length': 3}
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, **naming))
  mngr.save(1, args=ocp.args.StandardSave(_state(1)))
  seen = []
  calls = []

  def timeout_fn():
    calls.append(1)
    return True

  for step in checkpoint_utils.checkpoints_iterator(
      tmp_path, timeout=0.3, seconds_to_sleep=0.05, timeout_fn=timeout_fn, **naming):
    seen.append(step)
    if step == 1:
      mngr.save(4, args=ocp.args.StandardSave(_state(4)))
  assert seen == [1, 4] and calls == [1]


def test_construct_restore_args(tmp_path):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ('x',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  target = {'a': jax.device_put(jnp.zeros(4), sharding), 'b': np.zeros(2, np.int32), 'c': 3,
            'd': jax.ShapeDtypeStruct((4,), jnp.bfloat16, sharding=sharding)}
  out = checkpoint_utils.construct_restore_args(target)
  assert out['a'] == ocp.ArrayRestoreArgs(sharding=sharding, global_shape=(4,),
                                          dtype=jnp.float32)
  assert out['b'] == ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.int32)
  assert out['c'] == ocp.RestoreArgs(restore_type=int)
  assert out['d'].dtype == jnp.bfloat16 and out['d'].sharding == sharding
  other = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  overridden = checkpoint_utils.construct_restore_args(
      target, jax.tree.map(lambda _: other, target), set_global_shape=False)
  assert overridden['a'].sharding == other and overridden['a'].global_shape is None


def test_item_handlers_for_a_single_item_and_legacy_root_metadata(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, item_handlers=ocp.StandardCheckpointHandler)
  mngr.save(3, args=ocp.args.StandardSave(_state(3)))
  mngr.wait_until_finished()
  fresh = ocp.CheckpointManager(tmp_path, item_handlers=ocp.StandardCheckpointHandler)
  meta = fresh.item_metadata(3)
  assert set(meta) == {'layer0'} and set(meta['layer0']) == {'bias', 'weight'}
  assert fresh.metadata() == {}
  (tmp_path / 'metadata').mkdir()
  (tmp_path / 'metadata' / 'metadata').write_text('{"older": true}')  # Older Orbax's file.
  assert fresh.metadata() == {'older': True}
  assert fresh.all_steps() == [3]


_PREEMPTION_SCRIPT = '''
import os, signal, socket, sys, time
import jax
sock = socket.socket(); sock.bind(('127.0.0.1', 0)); port = sock.getsockname()[1]; sock.close()
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=1,
                           process_id=0)
import flaxckpt as ocp
mngr = ocp.CheckpointManager(sys.argv[1], options=ocp.CheckpointManagerOptions(
    save_interval_steps=100))
mngr.save(0, args=ocp.args.StandardSave({'a': 1}))
mngr.wait_until_finished()
print('before', mngr.reached_preemption(1), mngr.should_save(2))
os.kill(os.getpid(), signal.SIGTERM)  # What a cluster scheduler sends before preempting.
time.sleep(1)
print('after', mngr.should_save(3), mngr.reached_preemption(4))
'''


def test_reached_preemption_follows_jax_preemption_sync_manager(tmp_path):
  """With a real distributed runtime, a SIGTERM makes the next step a preemption sync point,
  which should_save then saves whatever the interval."""
  result = subprocess.run([sys.executable, '-c', _PREEMPTION_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'before False False' in result.stdout
  assert 'after True False' in result.stdout


@pytest.mark.parametrize('use_async', [True, False])
def test_a_failed_save_can_be_retried_at_the_same_step(tmp_path, use_async):
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=use_async))
  with pytest.raises(ocp.UnsupportedLeafError):
    mngr.save(3, args=ocp.args.StandardSave({'bad': object()}))
  assert mngr.should_save(3)
  assert mngr.save(3, args=ocp.args.StandardSave(_state(3)))
  mngr.wait_until_finished()
  assert mngr.all_steps() == [3]


class _GatedHandler(ocp.PyTreeCheckpointHandler):
  """A PyTree handler whose background write waits until the test opens the gate."""

  def __init__(self):
    super().__init__()
    import threading
    self.gate = threading.Event()

  def async_save(self, directory, args):
    write = super().async_save(directory, args)

    def gated_write():
      assert self.gate.wait(60), 'the test never opened the gate'
      write()

    return gated_write


@pytest.mark.parametrize('enable_async', [True, False])
def test_manager_saves_in_the_background_unless_disabled(tmp_path, enable_async):
  """By default save returns while the write is still pending (the step is not yet listed and
  its temporary directory exists); enable_async_checkpointing=False saves before returning."""
  import threading
  handler = _GatedHandler()
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=enable_async)
  manager = ocp.CheckpointManager(tmp_path, options=options, item_handlers=handler)
  tree = {'w': np.arange(3.0)}
  if not enable_async:
    handler.gate.set()
  saver = threading.Thread(target=manager.save, args=(1,),
                           kwargs={'args': ocp.args.PyTreeSave(tree)})
  saver.start()
  saver.join(30)
  if enable_async:
    assert not saver.is_alive()  # save returned although the write cannot run yet
    assert manager.all_steps() == []
    assert [p.is_dir() for p in tmp_path.glob('1.orbax-checkpoint-tmp-*')] == [True]
    handler.gate.set()
  manager.wait_until_finished()
  assert manager.all_steps() == [1]
  np.testing.assert_array_equal(manager.restore(1)['w'], tree['w'])
  manager.close()
