"""Checkpointers, handlers and managers on gs:// and s3:// URLs, against real servers on
loopback (tests/object_store.py): moto's S3 server and fake-gcs-server, every test on both."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxckpt as ocp
from flaxckpt import _storage

pytest_plugins = ['object_store']


@pytest.fixture
def root(bucket_url, tmp_path, monkeypatch):
  """``bucket_url/run``; the test runs in an empty cwd, checked afterwards for a local folder
  a URL could have become."""
  monkeypatch.chdir(tmp_path)
  yield bucket_url + '/run'
  assert sorted(os.listdir(tmp_path)) == [], 'a URL became a local path'
  for name in ('s3:', 'gs:'):
    assert not os.path.exists(name)


def _tree():
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  sharded = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4),
                           NamedSharding(mesh, PartitionSpec('x')))
  return {'params': {'w': sharded, 'b': np.arange(6, dtype=np.int16).reshape(2, 3)},
          'step': 7, 'lr': 0.5, 'name': 'run-a'}


def _check(restored, tree):
  assert restored['step'] == tree['step'] and restored['lr'] == tree['lr']
  assert restored['name'] == tree['name']
  np.testing.assert_array_equal(np.asarray(restored['params']['w']),
                                np.asarray(tree['params']['w']))
  np.testing.assert_array_equal(np.asarray(restored['params']['b']), tree['params']['b'])
  assert np.asarray(restored['params']['b']).dtype == np.int16


def _names(url):
  return _storage.list_names(_storage.as_storage_path(url))


@pytest.mark.parametrize('use_ocdbt', [True, False])
def test_standard_save_restore(root, use_ocdbt):
  tree = _tree()
  with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)) as ckptr:
    ckptr.save(root + '/1', tree)
  assert 'commit_success.txt' in _names(root + '/1')
  with ocp.StandardCheckpointer() as ckptr:
    _check(ckptr.restore(root + '/1'), tree)
    target = jax.tree.map(lambda x: x, tree)
    restored = ckptr.restore(root + '/1', target)
    _check(restored, tree)
    assert restored['params']['w'].sharding == tree['params']['w'].sharding
    with pytest.raises(ocp.CheckpointExistsError):
      ckptr.save(root + '/1', tree)


@pytest.mark.parametrize('use_ocdbt', [True, False])
def test_pytree_save_restore(root, use_ocdbt):
  tree = _tree()
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt))
  ckptr.save(root + '/p', args=ocp.args.PyTreeSave(tree))
  _check(ckptr.restore(root + '/p'), tree)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding) if isinstance(x, jax.Array)
      else ocp.RestoreArgs(), tree)
  restored = ckptr.restore(root + '/p', args=ocp.args.PyTreeRestore(
      tree, restore_args=restore_args))
  _check(restored, tree)
  assert restored['params']['w'].sharding == tree['params']['w'].sharding


def test_async_and_composite(root):
  tree = _tree()
  with ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(root + '/c', args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({'epoch': 3})))
    ckptr.wait_until_finished()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(root + '/c', args=ocp.args.Composite(
        state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()))
  _check(restored.state, tree)
  assert restored.meta == {'epoch': 3}


def test_unfinished_save_is_reclaimed(root):
  step = _storage.as_storage_path(root + '/9')
  _storage.write_text(step / 'leftover' / 'x', 'from a save that died')
  tree = _tree()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root + '/9', tree)
    _check(ckptr.restore(root + '/9'), tree)
  assert 'leftover' not in _names(root + '/9')


def test_manager_retention_and_fresh_process(root):
  tree = _tree()
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(root + '/m', options=options,
                             item_names=('state', 'meta')) as manager:
    for step in range(4):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({**tree, 'step': step}),
          meta=ocp.args.JsonSave({'loss': 1.0 / (step + 1)})),
          metrics={'loss': 1.0 / (step + 1)})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
  _storage.write_text(_storage.as_storage_path(root + '/m/7/state/x'), 'uncommitted')
  assert _names(root + '/m') == ['2', '3', '7']
  script = textwrap.dedent(f'''
      import flaxckpt as ocp, numpy as np
      manager = ocp.CheckpointManager({root + '/m'!r}, item_names=('state', 'meta'))
      assert manager.all_steps() == [2, 3], manager.all_steps()
      assert manager.latest_step() == 3
      restored = manager.restore(3)
      print(restored.state['step'], np.asarray(restored.state['params']['w']).sum(),
            restored.meta)
      ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['3', '496.0', "{'loss':", '0.25}']


def _step_dir(url, step):
  return _storage.as_storage_path(f'{url}/{step}')


def test_checkpoints_iterator_follows_a_writer(root):
  """A manager in a thread saves steps while the iterator polls the bucket: each committed step
  comes once, in order, locked while it is read (retention leaves it alone then); a step
  without commit_success.txt never comes."""
  import threading
  from flaxckpt import _steps
  acks = {step: threading.Event() for step in range(4)}
  saved = {step: threading.Event() for step in range(4)}
  errors = []

  def write():
    try:
      options = ocp.CheckpointManagerOptions(max_to_keep=1)
      with ocp.CheckpointManager(root, options=options) as manager:
        for step in range(4):
          manager.save(step, args=ocp.args.JsonSave({'step': step}))
          manager.wait_until_finished()
          saved[step].set()
          assert acks[step].wait(60), f'step {step} never reached the reader'
    except BaseException as e:  # noqa: BLE001 - reported by the test below.
      errors.append(e)
      for event in (*acks.values(), *saved.values()):
        event.set()

  writer = threading.Thread(target=write)
  writer.start()
  seen = []
  try:
    for step in ocp.checkpoint_utils.checkpoints_iterator(root, seconds_to_sleep=0.05,
                                                          timeout=3):
      seen.append(step)
      assert _steps.is_locked(_step_dir(root, step))
      assert _storage.exists(_step_dir(root, step) / 'commit_success.txt')
      if step == 0:  # Uncommitted, and newer than every step the writer saves.
        _storage.write_text(_step_dir(root, 50) / 'default' / 'x', 'uncommitted')
      acks[step].set()
      if step == 1:  # Step 2 saved while 1 is read: max_to_keep=1 must spare locked 1.
        assert saved[2].wait(60)
        assert _storage.exists(_step_dir(root, 1) / 'commit_success.txt')
  finally:
    for event in acks.values():
      event.set()
    writer.join(120)
  assert not errors, errors
  assert seen == [0, 1, 2, 3]
  assert not _steps.is_locked(_step_dir(root, 3))
  assert '50' in _names(root)


def test_wait_for_new_checkpoint_on_a_bucket(root):
  import threading
  import time
  from flaxckpt import _steps
  wait = ocp.checkpoint_utils.wait_for_new_checkpoint
  started = time.monotonic()
  with wait(root, seconds_to_sleep=0.05, timeout=0.3) as step:
    assert step == -1
  assert time.monotonic() - started < 30
  with ocp.CheckpointManager(root) as manager:
    manager.save(0, args=ocp.args.JsonSave({'step': 0}))
    manager.wait_until_finished()
    _storage.write_text(_step_dir(root, 5) / 'default' / 'x', 'uncommitted')
    with wait(root, until_step=1, seconds_to_sleep=0.05, timeout=0.3) as step:
      assert step == -1
    with wait(root, seconds_to_sleep=0.05, timeout=5) as step:
      assert step == 0
      assert _steps.is_locked(_step_dir(root, 0))
    assert not _steps.is_locked(_step_dir(root, 0))

    def save_later():
      time.sleep(0.5)
      manager.save(1, args=ocp.args.JsonSave({'step': 1}))
      manager.wait_until_finished()

    writer = threading.Thread(target=save_later)
    writer.start()
    try:
      with wait(root, until_step=1, seconds_to_sleep=0.05, timeout=60) as step:
        assert step == 1
        assert _steps.is_locked(_step_dir(root, 1))
    finally:
      writer.join(60)
    assert not _steps.is_locked(_step_dir(root, 1))
    calls = iter([False, True])
    with wait(root, until_step=2, seconds_to_sleep=0.05, timeout=0.1,
              timeout_fn=lambda: next(calls)) as step:
      assert step == -1
  ocp.checkpoint_utils.unlock_existing_checkpoints(root)
