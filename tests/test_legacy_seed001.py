"""Seed 001 (Flax guide "Save and load checkpoints") through ``flaxckpt.legacy``.

Every example of the guide that calls ``flax.training.checkpoints`` or
``flax.training.orbax_utils`` runs here with ``from flaxckpt.legacy import checkpoints,
orbax_utils``, and with ``import flaxckpt as ocp`` where the guide uses ``orbax.checkpoint``; each
test asserts what the guide prints. Paths under /tmp/flax_ckpt become ``tmp_path``.

Adaptations to today's libraries:
  * jax's PRNG changed since the page was written, so random values (x1, the kernel) are compared
    with the values that were saved; values that do not depend on the PRNG (bias -0.001, step 1,
    dimensions [5, 3], arange data) are compared with the page exactly.
  * The page prints numpy ``array`` for leaves that were jax Arrays when restored without a target
    through the Orbax backend; flax 0.12 (the reference) returns jax Arrays there, so leaf types are
    not asserted where the page is outdated, only values.
  * ``jax.distributed.initialize(...)`` before the AsyncCheckpointer section is left out: flaxckpt
    needs no distributed runtime in a single process.
"""

from __future__ import annotations

import os

import flax
import jax
import numpy as np
import pytest
from flax import serialization
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

import flaxckpt as ocp
from flaxckpt.legacy import checkpoints, orbax_utils
import seed001
from seed001 import CustomTrainState


def _listing(directory) -> list[str]:
  """Directory entries, less flaxckpt's checksum sidecars (test_legacy_integrity.py)."""
  return sorted(name for name in os.listdir(directory)
                if not name.endswith('.crc32c'))


@pytest.fixture(scope='module')
def guide():
  """The guide's objects: model, ckpt, target, custom_state, custom_ckpt, custom_target."""
  return seed001.guide_objects()


def _assert_array(actual, expected, dtype):
  assert isinstance(actual, (np.ndarray, jax.Array)), type(actual)
  assert actual.dtype == np.dtype(dtype)
  assert actual.shape == np.shape(expected)
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def _legacy_dir(tmp_path, set_flag, guide, upto):
  """Replays the guide's saves into '.../flax-checkpointing' up to step ``upto`` (0, 4 or 5)."""
  ckpt_dir = tmp_path / 'flax_ckpt' / 'flax-checkpointing'
  set_flag(True)  # The default of flax 0.12: the Orbax backend.
  checkpoints.save_checkpoint(ckpt_dir=ckpt_dir, target=guide['ckpt'], step=0, overwrite=True,
                              keep=2)
  if upto >= 4:
    # Save in the "Flax-with-Orbax" backend.
    flax.config.update('flax_use_orbax_checkpointing', True)
    checkpoints.save_checkpoint(ckpt_dir=ckpt_dir, target=guide['ckpt'], step=4, overwrite=True,
                                keep=2)
  if upto >= 5:
    # Save using the legacy Flax `checkpoints` API.
    flax.config.update('flax_use_orbax_checkpointing', False)
    checkpoints.save_checkpoint(ckpt_dir=ckpt_dir, target=guide['ckpt'], step=5, overwrite=True,
                                keep=2)
  return ckpt_dir


# ==================================================================================================
# "With the legacy API": save, raw restore, restore with a target
# ==================================================================================================


def test_seed001_legacy_save_returns_path(tmp_path, set_flag, guide):
  """save_checkpoint(..., step=0, overwrite=True, keep=2) returns '.../checkpoint_0'."""
  set_flag(True)
  ckpt_dir = tmp_path / 'flax_ckpt' / 'flax-checkpointing'
  path = checkpoints.save_checkpoint(ckpt_dir=str(ckpt_dir), target=guide['ckpt'], step=0,
                                     overwrite=True, keep=2)
  assert path == f'{ckpt_dir}/checkpoint_0'
  assert _listing(ckpt_dir) == ['checkpoint_0']
  # With the Orbax backend (flax's default) the checkpoint is an Orbax PyTree directory.
  assert os.path.isfile(os.path.join(path, '_METADATA'))


def test_seed001_legacy_raw_restore(tmp_path, set_flag, guide):
  """restore_checkpoint(target=None): lists as {'0': ...}, opt_state {'0': None, '1': None}."""
  ckpt_dir = _legacy_dir(tmp_path, set_flag, guide, upto=0)
  raw_restored = checkpoints.restore_checkpoint(ckpt_dir=ckpt_dir, target=None)
  # {'config': {'dimensions': array([5, 3])},
  #  'data': {'0': array([...], dtype=float32)},
  #  'model': {'opt_state': {'0': None, '1': None},
  #   'params': {'bias': array([-0.001, -0.001, -0.001], dtype=float32), 'kernel': array(...)},
  #   'step': 1}}
  assert type(raw_restored) is dict
  assert sorted(raw_restored) == ['config', 'data', 'model']
  assert sorted(raw_restored['config']) == ['dimensions']
  _assert_array(raw_restored['config']['dimensions'], np.array([5, 3]), np.array([5, 3]).dtype)
  assert type(raw_restored['data']) is dict and list(raw_restored['data']) == ['0']
  _assert_array(raw_restored['data']['0'], np.asarray(guide['x1']), np.float32)
  model = raw_restored['model']
  assert type(model) is dict
  assert sorted(model) == ['opt_state', 'params', 'step']
  assert model['opt_state'] == {'0': None, '1': None}
  assert model['step'] == 1 and type(model['step']) is int
  seed001.check_params(model['params'], guide['state'])


def test_seed001_legacy_restore_with_target(tmp_path, set_flag, guide):
  """restore_checkpoint(target=target) rebuilds the TrainState; numpy leaves of the target come
  back as numpy arrays and its jax data array as a jax Array, as the page prints."""
  ckpt_dir = _legacy_dir(tmp_path, set_flag, guide, upto=0)
  target = guide['target']
  restored = checkpoints.restore_checkpoint(ckpt_dir=ckpt_dir, target=target)
  # {'model': TrainState(step=1, ..., params={'bias': array(...), 'kernel': array(...)}, ...,
  #            opt_state=(EmptyState(), EmptyState())),
  #  'config': {'dimensions': array([5, 3])},
  #  'data': [Array([...], dtype=float32)]}
  assert type(restored) is dict
  assert sorted(restored) == ['config', 'data', 'model']
  seed001.check_train_state(restored['model'], guide)
  for leaf in restored['model'].params.values():
    assert type(leaf) is np.ndarray
  assert type(restored['config']['dimensions']) is np.ndarray
  _assert_array(restored['config']['dimensions'], np.array([5, 3]), np.array([5, 3]).dtype)
  assert type(restored['data']) is list and len(restored['data']) == 1
  assert isinstance(restored['data'][0], jax.Array)
  _assert_array(restored['data'][0], np.asarray(guide['x1']), np.float32)
  # The target is not modified.
  np.testing.assert_array_equal(target['config']['dimensions'], [0, 0])
  np.testing.assert_array_equal(target['model'].params['bias'], np.zeros(3))


# ==================================================================================================
# "Restore when checkpoint structures differ": Orbax backend with orbax_transforms={}
# ==================================================================================================


def test_seed001_orbax_transforms_fill_batch_stats_from_target(tmp_path, set_flag, guide):
  """Step 4 (a TrainState, Orbax backend) restored into custom_target with
  orbax_transforms={}: a CustomTrainState whose batch_stats come from the target."""
  ckpt_dir = _legacy_dir(tmp_path, set_flag, guide, upto=4)
  assert _listing(ckpt_dir) == ['checkpoint_0', 'checkpoint_4']
  custom_target = guide['custom_target']
  restored = checkpoints.restore_checkpoint(str(ckpt_dir), target=custom_target, step=4,
                                            orbax_transforms={})
  # {'model': CustomTrainState(step=1, ..., params={'bias': Array(...), 'kernel': Array(...)},
  #            ..., batch_stats=array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])),
  #  'config': None,
  #  'data': [Array([...], dtype=float32)]}
  assert sorted(restored) == ['config', 'data', 'model']
  seed001.check_train_state(restored['model'], guide, cls=CustomTrainState)
  _assert_array(restored['model'].batch_stats, np.arange(10), np.arange(10).dtype)
  for name in ('bias', 'kernel'):
    assert isinstance(restored['model'].params[name], jax.Array)
  assert restored['config'] is None
  assert type(restored['data']) is list and isinstance(restored['data'][0], jax.Array)
  _assert_array(restored['data'][0], np.asarray(guide['x1']), np.float32)


def test_seed001_legacy_msgpack_raw_dict_then_from_state_dict(tmp_path, set_flag, guide):
  """Step 5 with the flag off is a msgpack file; its raw dict plus a batch_stats entry goes
  through from_state_dict into a CustomTrainState with batch_stats [9..0]."""
  ckpt_dir = _legacy_dir(tmp_path, set_flag, guide, upto=5)
  # keep=2: step 0 is gone; step 4 (Orbax directory) and step 5 (msgpack file) remain.
  assert _listing(ckpt_dir) == ['checkpoint_4', 'checkpoint_5']
  assert os.path.isdir(ckpt_dir / 'checkpoint_4') and os.path.isfile(ckpt_dir / 'checkpoint_5')
  assert (ckpt_dir / 'checkpoint_5').read_bytes() == serialization.to_bytes(guide['ckpt'])

  custom_target = guide['custom_target']
  # Pass no target to get a raw state dictionary first.
  raw_state_dict = checkpoints.restore_checkpoint(str(ckpt_dir), target=None, step=5)
  # Add/remove fields as needed.
  raw_state_dict['model']['batch_stats'] = np.flip(np.arange(10))
  # Restore the classes with correct target now
  restored = flax.serialization.from_state_dict(custom_target, raw_state_dict)
  # {'model': CustomTrainState(step=1, ..., batch_stats=array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])),
  #  'config': {'dimensions': array([5, 3])},
  #  'data': [array([...], dtype=float32)]}
  seed001.check_train_state(restored['model'], guide, cls=CustomTrainState)
  _assert_array(restored['model'].batch_stats, np.arange(10)[::-1], np.arange(10).dtype)
  _assert_array(restored['config']['dimensions'], np.array([5, 3]), np.array([5, 3]).dtype)
  assert type(restored['data']) is list and type(restored['data'][0]) is np.ndarray
  _assert_array(restored['data'][0], np.asarray(guide['x1']), np.float32)
  # "Not as flexible": restoring into custom_target directly fails on the missing field.
  with pytest.raises(ValueError, match='batch_stats'):
    checkpoints.restore_checkpoint(str(ckpt_dir), target=custom_target, step=5)


@pytest.mark.parametrize('flag', [True, False])
def test_seed001_mixed_backend_directory_restores_either_step(tmp_path, set_flag, guide, flag):
  """restore_checkpoint tells the backends apart whatever the flag says: the latest (msgpack
  step 5) and step 4 (Orbax) both come back, raw and into the target."""
  ckpt_dir = _legacy_dir(tmp_path, set_flag, guide, upto=5)
  set_flag(flag)
  latest = checkpoints.restore_checkpoint(ckpt_dir, target=None)
  assert sorted(latest) == ['config', 'data', 'model']
  assert latest['model']['opt_state'] == {'0': {}, '1': {}}  # msgpack keeps EmptyState as {}.
  assert list(latest['data']) == ['0']
  seed001.check_params(latest['model']['params'], guide['state'])
  step4 = checkpoints.restore_checkpoint(ckpt_dir, target=None, step=4)
  assert step4['model']['opt_state'] == {'0': None, '1': None}  # Orbax: EmptyState is None.
  seed001.check_params(step4['model']['params'], guide['state'])
  assert checkpoints.latest_checkpoint(ckpt_dir) == str(ckpt_dir / 'checkpoint_5')
  assert checkpoints.available_steps(ckpt_dir) == [4, 5]
  for step in (None, 4, 5):
    restored = checkpoints.restore_checkpoint(ckpt_dir, target=guide['target'], step=step)
    seed001.check_train_state(restored['model'], guide)
    _assert_array(restored['data'][0], np.asarray(guide['x1']), np.float32)


# ==================================================================================================
# "With Orbax": PyTreeCheckpointer and CheckpointManager with orbax_utils args
# ==================================================================================================


def test_seed001_orbax_utils_with_checkpointer_and_manager(tmp_path, guide):
  """save_args_from_target feeds PyTreeCheckpointer.save and CheckpointManager.save; the
  manager keeps steps 3 and 4; restore_args_from_target with transforms={} fills batch_stats."""
  ckpt, target = guide['ckpt'], guide['target']
  orbax_checkpointer = ocp.PyTreeCheckpointer()
  save_args = orbax_utils.save_args_from_target(ckpt)
  assert all(type(x) is ocp.SaveArgs for x in jax.tree.leaves(save_args))
  single_save = tmp_path / 'flax_ckpt' / 'orbax' / 'single_save'
  orbax_checkpointer.save(single_save, ckpt, save_args=save_args)
  raw = orbax_checkpointer.restore(single_save)
  assert raw['model']['opt_state'] == [None, None] and raw['model']['step'] == 1
  seed001.check_params(raw['model']['params'], guide['state'])

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  managed = tmp_path / 'flax_ckpt' / 'orbax' / 'managed'
  checkpoint_manager = ocp.CheckpointManager(managed, orbax_checkpointer, options)
  # Inside a training loop
  for step in range(5):
    checkpoint_manager.save(step, ckpt, save_kwargs={'save_args': save_args})
  checkpoint_manager.wait_until_finished()
  # Because max_to_keep=2, only step 3 and 4 are retained
  assert sorted(os.listdir(managed)) == ['3', '4']
  step = checkpoint_manager.latest_step()  # step = 4
  assert step == 4
  raw = checkpoint_manager.restore(step)
  assert raw['model']['opt_state'] == [None, None]
  seed001.check_params(raw['model']['params'], guide['state'])
  restored = checkpoint_manager.restore(4, items=target)
  seed001.check_train_state(restored['model'], guide)

  custom_save_args = orbax_utils.save_args_from_target(guide['custom_ckpt'])
  assert checkpoint_manager.save(5, guide['custom_ckpt'],
                                 save_kwargs={'save_args': custom_save_args}) is True
  checkpoint_manager.wait_until_finished()
  # Scenario 1: the reference is partial; batch_stats is ignored.
  restored = checkpoint_manager.restore(5, items=target)
  assert type(restored['model']) == train_state.TrainState  # noqa: E721
  seed001.check_train_state(restored['model'], guide, step=0)
  # Scenario 2: the checkpoint is partial.
  custom_target = guide['custom_target']
  with pytest.raises(KeyError, match='batch_stats'):
    checkpoint_manager.restore(4, items=custom_target)
  custom_restore_args = orbax_utils.restore_args_from_target(custom_target)
  restored = checkpoint_manager.restore(
      4, items=custom_target,
      restore_kwargs={'transforms': {}, 'restore_args': custom_restore_args})
  assert type(restored['model']) == CustomTrainState  # noqa: E721
  np.testing.assert_equal(restored['model'].batch_stats, custom_target['model'].batch_stats)
  seed001.check_train_state(restored['model'], guide, cls=CustomTrainState)
  assert restored['config'] is None
  checkpoint_manager.close()


# ==================================================================================================
# Asynchronized and multi-host checkpointing
# ==================================================================================================


def test_seed001_async_and_multiprocess_legacy(tmp_path, guide):
  """AsyncCheckpointer with save_args_from_target; restore_args_from_target of a smaller
  sharded reference; save_checkpoint_multiprocess(..., orbax_checkpointer=async_checkpointer)
  returns '.../checkpoint_3' and restore_checkpoint gives the full (8, 2) int32 array back in
  the reference's sharding."""
  ckpt, target = guide['ckpt'], guide['target']
  ckpt_dir = tmp_path / 'flax_ckpt'
  (ckpt_dir / 'flax-checkpointing').mkdir(parents=True)
  save_args = orbax_utils.save_args_from_target(ckpt)
  async_checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(), timeout_secs=50)
  async_checkpointer.save(ckpt_dir / 'orbax' / 'single_save_async', ckpt, save_args=save_args)
  async_checkpointer.wait_until_finished()  # Blocks until the checkpoint saving is completed.
  restored = async_checkpointer.restore(ckpt_dir / 'orbax' / 'single_save_async', item=target)
  seed001.check_train_state(restored['model'], guide)

  # Create an array sharded across multiple devices.
  mesh_shape = (4, 2)
  devices = np.asarray(jax.devices()).reshape(*mesh_shape)
  mesh = jax.sharding.Mesh(devices, ('x', 'y'))
  mp_array = jax.device_put(np.arange(8 * 2).reshape(8, 2),
                            NamedSharding(mesh, PartitionSpec('x', 'y')))
  # Make it a pytree.
  mp_ckpt = {'model': mp_array}
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  async_checkpoint_manager = ocp.CheckpointManager(
      ckpt_dir / 'orbax' / 'managed_async', async_checkpointer, options)
  async_checkpoint_manager.save(0, mp_ckpt)
  async_checkpoint_manager.wait_until_finished()

  # The reference doesn't need to be as large as your checkpoint!
  mp_smaller = jax.device_put(np.arange(8).reshape(4, 2),
                              NamedSharding(mesh, PartitionSpec('x', 'y')))
  ref_ckpt = {'model': mp_smaller}
  restore_args = orbax_utils.restore_args_from_target(ref_ckpt)
  assert type(restore_args['model']) is ocp.ArrayRestoreArgs
  restored = async_checkpoint_manager.restore(
      0, items=ref_ckpt, restore_kwargs={'restore_args': restore_args})
  # {'model': Array([[ 0,  1], ..., [14, 15]], dtype=int32)}
  assert isinstance(restored['model'], jax.Array)
  _assert_array(restored['model'], np.arange(16).reshape(8, 2), np.int32)
  assert restored['model'].sharding == mp_smaller.sharding
  async_checkpoint_manager.close()

  # With the legacy Flax: use save_checkpoint_multiprocess
  async_checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(), timeout_secs=50)
  path = checkpoints.save_checkpoint_multiprocess(str(ckpt_dir), mp_ckpt, step=3, overwrite=True,
                                                  keep=4, orbax_checkpointer=async_checkpointer)
  assert path == f'{ckpt_dir}/checkpoint_3'
  mp_restored = checkpoints.restore_checkpoint(str(ckpt_dir), target=ref_ckpt, step=3,
                                               orbax_checkpointer=async_checkpointer)
  # {'model': Array([[ 0,  1], ..., [14, 15]], dtype=int32)}
  assert sorted(mp_restored) == ['model']
  assert isinstance(mp_restored['model'], jax.Array)
  _assert_array(mp_restored['model'], np.arange(16).reshape(8, 2), np.int32)
  assert mp_restored['model'].sharding == mp_smaller.sharding
  assert _listing(ckpt_dir) == ['checkpoint_3', 'flax-checkpointing', 'orbax']
  async_checkpointer.close()


# ==================================================================================================
# "Orbax-as-backend troubleshooting: If you don't save pytrees"
# ==================================================================================================


def test_seed001_orbax_backend_rejects_single_values(tmp_path, set_flag):
  """With the Orbax backend a single array or number is refused with a ValueError; wrapped in
  a pytree it saves."""
  set_flag(True)
  for value in (np.arange(3), 1.5):
    with pytest.raises(ValueError):
      checkpoints.save_checkpoint(tmp_path, value, 1)
  assert not os.path.exists(tmp_path / 'checkpoint_1')
  checkpoints.save_checkpoint(tmp_path, {'value': np.arange(3)}, 1)
  np.testing.assert_array_equal(checkpoints.restore_checkpoint(tmp_path, None)['value'],
                                np.arange(3))
