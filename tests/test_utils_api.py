"""ocp.utils extras, ocp.future, ocp.multihost id maps and checkpoints_iterator(snapshot_dir=),
beside Orbax where it runs the same calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
from tests import multiprocess


# --- placeholders ---------------------------------------------------------------------------

@pytest.mark.parametrize('value', ['PLACEHOLDER://a.b', 'AGGREGATED://x', 'PLACEHOLDER://',
                                   'placeholder://a', 'a', 3, None])
def test_placeholders_match_orbax(value):
  assert ocp.utils.leaf_is_placeholder(value) == orbax.utils.leaf_is_placeholder(value)
  if orbax.utils.leaf_is_placeholder(value):
    assert (ocp.utils.name_from_leaf_placeholder(value)
            == orbax.utils.name_from_leaf_placeholder(value))
  elif isinstance(value, str):
    with pytest.raises(ValueError, match='PLACEHOLDER://'):
      ocp.utils.name_from_leaf_placeholder(value)
  assert ocp.utils.leaf_placeholder('a.b') == orbax.utils.leaf_placeholder('a.b')
  tree = {'a': ocp.utils.leaf_placeholder('a'), 'b': [value]}
  assert (ocp.utils.all_leaves_are_placeholders(tree)
          == orbax.utils.all_leaves_are_placeholders(tree))


def test_placeholders_name_the_leaves_of_an_aggregate_checkpoint(tmp_path):
  # Orbax's msgpack aggregate file holds 'PLACEHOLDER://<name>' for each array stored apart.
  state = {'params': {'w': np.arange(6.0)}, 'step': 3}
  orbax.PyTreeCheckpointer().save(tmp_path / 'ckpt', state)
  names = jax.tree.leaves(ocp.tree.get_param_names(state))
  placeholders = [ocp.utils.leaf_placeholder(n) for n in names]
  assert [ocp.utils.name_from_leaf_placeholder(p) for p in placeholders] == names
  assert ocp.utils.all_leaves_are_placeholders(placeholders)


# --- replicated to global -------------------------------------------------------------------

def test_pmap_replicated_state_becomes_global_arrays_as_with_orbax(tmp_path):
  # flax's examples/imagenet: a pmap-replicated TrainState is made global before saving.
  state = {'params': {'w': jnp.arange(12.0).reshape(3, 4), 'b': jnp.ones(4)},
           'step': jnp.asarray(7)}
  replicated = flax.jax_utils.replicate(state)
  replicated = jax.pmap(lambda s: jax.tree.map(lambda x: x * 2, s))(replicated)
  assert replicated['params']['w'].shape == (8, 3, 4)
  ours = jax.tree.map(ocp.utils.fully_replicated_host_local_array_to_global_array, replicated)
  theirs = jax.tree.map(orbax.utils.fully_replicated_host_local_array_to_global_array,
                        replicated)
  for a, b, original in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                            jax.tree.leaves(state)):
    assert a.shape == b.shape == original.shape
    assert a.sharding == b.sharding
    assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8
    np.testing.assert_array_equal(a, original * 2)
  # The global state saves, and Orbax restores it.
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', ours)
  restored = orbax.StandardCheckpointer().restore(tmp_path / 'ckpt')
  np.testing.assert_array_equal(restored['params']['w'], np.arange(12.0).reshape(3, 4) * 2)


def test_already_global_replicated_array_keeps_its_shape():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  x = jax.device_put(jnp.arange(5.0), jax.sharding.NamedSharding(mesh,
                                                                 jax.sharding.PartitionSpec()))
  y = ocp.utils.fully_replicated_host_local_array_to_global_array(x)
  assert y.shape == (5,)
  np.testing.assert_array_equal(y, np.arange(5.0))
  scalar = ocp.utils.fully_replicated_host_local_array_to_global_array(
      jax.pmap(lambda v: v)(jnp.arange(8)))
  assert scalar.shape == () and int(scalar) == 0
  with pytest.raises(TypeError, match='jax.Array'):
    ocp.utils.fully_replicated_host_local_array_to_global_array(np.ones(3))


def test_record_saved_duration_records_the_time_since_the_previous_checkpoint():
  recorded = []

  def listener(event, duration, **kwargs):
    if event == '/jax/checkpoint/write/duration_since_last_checkpoint_secs':
      recorded.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    start = time.time()
    ocp.utils.record_saved_duration(start)
    ocp.utils.record_saved_duration(start + 5)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(recorded) == 2 and recorded[1] == pytest.approx(5)


def test_utils_names_of_other_modules():
  assert ocp.utils.is_primary_host(0) and ocp.utils.is_primary_host(None)
  assert not ocp.utils.is_primary_host(1)
  ocp.utils.sync_global_processes('one process: returns at once')
  assert ocp.utils.is_scalar(np.float32(1)) and not ocp.utils.is_scalar(np.ones(1))
  assert ocp.utils.to_shape_dtype_struct is ocp.tree.to_shape_dtype_struct
  assert 'checkpoint_steps' in dir(ocp.utils)


# --- futures --------------------------------------------------------------------------------

def test_commit_future_runs_a_coroutine_in_the_background():
  started, release = threading.Event(), threading.Event()

  async def commit():
    started.set()
    await asyncio.to_thread(release.wait)
    return 'done'

  future = ocp.future.CommitFutureAwaitingContractedSignals(commit(), name='commit')
  assert started.wait(10)  # Running before result() is called.
  with pytest.raises(TimeoutError):
    future.result(timeout=0.05)
  release.set()
  assert future.result() == 'done'


def test_commit_future_takes_a_callable_and_reraises_its_error():
  assert ocp.future.CommitFuture(lambda: 3).result() == 3

  def fail():
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    ocp.future.CommitFuture(fail).result()
  with pytest.raises(NotImplementedError, match='signals'):
    ocp.future.CommitFuture(lambda: 1, receive_signals=['x'])


def test_commit_future_cancel_stops_a_coroutine():
  async def forever():
    while True:
      await asyncio.sleep(0.01)

  future = ocp.future.CommitFuture(forever())
  time.sleep(0.05)
  future.cancel()
  with pytest.raises(concurrent.futures.CancelledError):
    future.result(timeout=10)


def test_chained_and_noop_futures_as_orbax_s():
  done = []
  for lib in (ocp, orbax):
    pool = concurrent.futures.ThreadPoolExecutor(2)
    futures = [pool.submit(time.sleep, 0.01), lib.future.NoopFuture()]
    assert lib.future.ChainedFuture(futures, lambda lib=lib: done.append(lib)).result() is None
    slow = pool.submit(time.sleep, 2)
    with pytest.raises(TimeoutError, match='completed 0/1'):
      lib.future.ChainedFuture([slow], lambda: None).result(timeout=0.05)
    pool.shutdown(wait=True)
  assert done == [ocp, orbax]
  assert isinstance(ocp.future.NoopFuture(), ocp.future.Future)  # Protocol, duck-typed.


class _AsyncTextHandler(ocp.AsyncCheckpointHandler):
  """A user's async handler whose background write is a CommitFuture, as Orbax users do."""

  async def async_save(self, directory, args=None, item=None):
    text = item if args is None else args

    async def write():
      await asyncio.sleep(0.05)
      (directory / 'text.txt').write_text(text)

    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name='text')]

  def save(self, directory, args=None, item=None):
    for f in asyncio.run(self.async_save(directory, args=args, item=item)):
      f.result()

  def restore(self, directory, args=None, item=None):
    return (directory / 'text.txt').read_text()


def test_async_checkpointer_waits_for_a_handler_s_commit_future(tmp_path):
  with ocp.AsyncCheckpointer(_AsyncTextHandler()) as ckptr:
    ckptr.save(tmp_path / 'ckpt', 'hello')
    ckptr.wait_until_finished()
  assert (tmp_path / 'ckpt' / 'text.txt').read_text() == 'hello'


# --- multihost ------------------------------------------------------------------------------

def test_id_maps_in_one_process():
  ocp.multihost.initialize_runtime_to_distributed_ids()
  ocp.multihost.initialize_distributed_to_device_ids()
  assert ocp.multihost.runtime_to_distributed_ids() == [0]
  assert ocp.multihost.runtime_to_distributed_process_id(0) == 0
  assert ocp.multihost.distributed_to_device_ids() == [[d.id for d in jax.local_devices()]]
  assert ocp.multihost.is_runtime_to_distributed_ids_initialized()


_ID_MAPS = r'''
import flaxckpt as ocp
import orbax.checkpoint as orbax
ocp.multihost.initialize_runtime_to_distributed_ids()
ocp.multihost.initialize_distributed_to_device_ids()
orbax.multihost.initialize_runtime_to_distributed_ids()
from orbax.checkpoint._src.multihost import multihost as orbax_multihost
orbax_multihost.initialize_distributed_to_device_ids()
report({'ours': [ocp.multihost.runtime_to_distributed_ids(),
                 ocp.multihost.distributed_to_device_ids()],
        'theirs': [orbax_multihost.runtime_to_distributed_ids(),
                   orbax_multihost.distributed_to_device_ids()],
        'broadcast': int(ocp.multihost.broadcast_one_to_all(np.int32(PROCESS_ID + 10)))})
'''


def test_id_maps_across_two_processes_match_orbax():
  results = multiprocess.run('import numpy as np\n' + _ID_MAPS, 2, 2)
  for result in results:
    assert result['ours'] == result['theirs']
    assert result['ours'][0] == [0, 1]
    assert [len(ids) for ids in result['ours'][1]] == [2, 2]
    assert result['broadcast'] == 10  # Process 0's value everywhere.


# --- checkpoints_iterator -------------------------------------------------------------------

def _manager_with_steps(root, steps):
  with ocp.CheckpointManager(root) as mngr:
    for step in steps:
      mngr.save(step, args=ocp.args.StandardSave({'x': np.full(3, step)}))
    mngr.wait_until_finished()


def test_checkpoints_iterator_holds_a_snapshot_of_each_step(tmp_path):
  root, snapshots = tmp_path / 'root', tmp_path / 'snapshots'
  _manager_with_steps(root, [1, 2])
  (snapshots / '9').mkdir(parents=True)  # Left by a reader that crashed.
  (snapshots / 'notes').mkdir()  # Not a snapshot: kept.
  seen = []
  for step in ocp.checkpoint_utils.checkpoints_iterator(root, timeout=0, seconds_to_sleep=0.01,
                                                        snapshot_dir=snapshots):
    # The copy is a whole checkpoint that both libraries read.
    restored = orbax.StandardCheckpointer().restore(snapshots / str(step) / 'default')
    np.testing.assert_array_equal(restored['x'], np.full(3, step))
    assert sorted(p.name for p in snapshots.iterdir()) == sorted([str(step), 'notes'])
    assert (root / str(step) / 'LOCKED').is_dir()
    seen.append(step)
  assert seen == [2]  # The latest step when the iterator started.
  assert sorted(p.name for p in snapshots.iterdir()) == ['notes']
  assert not (root / '2' / 'LOCKED').exists()


def test_wait_for_new_checkpoint_with_a_name_format_and_timeout_fn(tmp_path):
  root = tmp_path / 'root'
  options = ocp.CheckpointManagerOptions(step_prefix='s', step_format_fixed_length=3)
  with ocp.CheckpointManager(root, options=options) as mngr:
    mngr.save(4, args=ocp.args.StandardSave({'x': np.zeros(2)}))
    mngr.wait_until_finished()
  fmt = ocp.step.standard_name_format(step_prefix='s', step_format_fixed_length=3)
  with ocp.checkpoint_utils.wait_for_new_checkpoint(root, step_name_format=fmt, timeout=0,
                                                    snapshot_dir=tmp_path / 'snap') as step:
    assert step == 4 and (tmp_path / 'snap' / 's_004' / 'default').is_dir()
    assert (root / 's_004' / 'LOCKED').is_dir()
  assert not (tmp_path / 'snap' / 's_004').exists()
  calls = []
  with ocp.checkpoint_utils.wait_for_new_checkpoint(
      root, until_step=5, step_name_format=fmt, timeout=0, seconds_to_sleep=0.01,
      timeout_fn=lambda: calls.append(1) or len(calls) >= 2) as step:
    assert step == -1 and len(calls) == 2
