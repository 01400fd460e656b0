"""Sharded checkpoints on buckets: saved by 2 real ``jax.distributed`` processes (each holding
half of every array) to moto's S3 server and fake-gcs-server, restored here by one process on
other shardings; and a single process's 2-device save restored on other shardings."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxckpt as ocp
import multiprocess
from flaxckpt import _storage

pytest_plugins = ['object_store']

W = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 3
B = np.arange(8, dtype=np.int32) - 4

_SAVE = r'''
import warnings
warnings.simplefilter('ignore')
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import flaxckpt as ocp

W = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 3
B = np.arange(8, dtype=np.int32) - 4
mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ('x', 'y'))
def sharded(value, spec):
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec),
                                      lambda index: value[index])
def train_state(step):
  return {'params': {'w': sharded(W * step, P('x', 'y')), 'b': sharded(B, P('y'))},
          'opt_state': {'mu': sharded(W / 10, P('x')), 'count': sharded(np.int32(step), P())},
          'step': step}
assert not train_state(1)['params']['w'].is_fully_addressable
abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.Array) else x, train_state(2))

def local_shards_match(restored, step):
  for array, value in ((restored['params']['w'], W * step), (restored['params']['b'], B),
                       (restored['opt_state']['mu'], W / 10)):
    for shard in array.addressable_shards:
      if not np.array_equal(np.asarray(shard.data), value[shard.index]):
        return f'shard {shard.index} differs'
  return 'ok' if restored['step'] == step else f'step {restored["step"]}'

result = {}
for bucket in ARGS:
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(f'{bucket}/run', options=options) as manager:
    for step in (1, 2, 3):
      manager.save(step, args=ocp.args.StandardSave(train_state(step)))
    manager.wait_until_finished()
    result[f'{bucket} steps'] = manager.all_steps()
    result[f'{bucket} restored'] = local_shards_match(
        manager.restore(3, args=ocp.args.StandardRestore(abstract)), 3)
  with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(f'{bucket}/global', args=ocp.args.StandardSave({'w': train_state(1)['params']['w']}))
    ckptr.wait_until_finished()
report(result)
'''


def _abstract(mesh: Mesh, specs: dict[str, PartitionSpec]) -> dict:
  def like(value, key):
    return jax.ShapeDtypeStruct(value.shape, value.dtype,
                                sharding=NamedSharding(mesh, specs[key]))
  return {'params': {'w': like(W, 'w'), 'b': like(B, 'b')},
          'opt_state': {'mu': like(W, 'mu'), 'count': like(np.int32(0), 'count')}, 'step': 0}


def test_two_processes_save_to_buckets_one_restores(s3_server, gcs_server, tmp_path,
                                                     monkeypatch):
  monkeypatch.chdir(tmp_path)
  buckets = [s3_server.make_bucket(), gcs_server.make_bucket()]
  results = multiprocess.run(_SAVE, 2, 2, *buckets)
  for bucket in buckets:
    for result in results:
      assert result[f'{bucket} steps'] == [2, 3]
      assert result[f'{bucket} restored'] == 'ok'
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('a', 'b'))
  specs = {'w': PartitionSpec('b', 'a'), 'b': PartitionSpec('a'), 'mu': PartitionSpec(),
           'count': PartitionSpec()}
  for bucket in buckets:
    manager = ocp.CheckpointManager(f'{bucket}/run')  # A fresh process's view: this one's.
    assert manager.all_steps() == [2, 3] and manager.latest_step() == 3
    assert not _storage.exists(_storage.as_storage_path(f'{bucket}/run/1'))  # Retention.
    restored = manager.restore(3, args=ocp.args.StandardRestore(_abstract(mesh, specs)))
    assert restored['params']['w'].sharding == NamedSharding(mesh, specs['w'])
    np.testing.assert_array_equal(np.asarray(restored['params']['w']), W * 3)
    np.testing.assert_array_equal(np.asarray(restored['params']['b']), B)
    np.testing.assert_array_equal(np.asarray(restored['opt_state']['mu']), W / 10)
    assert int(restored['opt_state']['count']) == 3 and restored['step'] == 3
    single = NamedSharding(Mesh(np.array(jax.devices()[:1]), ('one',)), PartitionSpec())
    restored = ocp.StandardCheckpointer().restore(
        f'{bucket}/global', {'w': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=single)})
    assert restored['w'].sharding == single
    np.testing.assert_array_equal(np.asarray(restored['w']), W)
  for name in ('s3:', 'gs:'):
    assert not os.path.exists(tmp_path / name)


@pytest.mark.parametrize('use_ocdbt', [True, False])
def test_two_device_save_restores_on_other_shardings(bucket_url, tmp_path, monkeypatch,
                                                     use_ocdbt):
  """Saved from 2 devices (rows split), restored on 4 (columns split) and on 1."""
  monkeypatch.chdir(tmp_path)
  two = Mesh(np.array(jax.devices()[:2]), ('x',))
  w = jax.device_put(W, NamedSharding(two, PartitionSpec('x')))
  assert len(w.addressable_shards) == 2
  with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)) as ckptr:
    ckptr.save(f'{bucket_url}/two', args=ocp.args.StandardSave({'w': w, 'b': B}))
    ckptr.wait_until_finished()
  four = NamedSharding(Mesh(np.array(jax.devices()[:4]), ('y',)), PartitionSpec(None, 'y'))
  one = NamedSharding(Mesh(np.array(jax.devices()[5:6]), ('z',)), PartitionSpec())
  for sharding in (four, one):
    target = {'w': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=sharding), 'b': B}
    restored = ocp.StandardCheckpointer().restore(f'{bucket_url}/two', target)
    assert restored['w'].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored['w']), W)
    np.testing.assert_array_equal(np.asarray(restored['b']), B)
  for name in ('s3:', 'gs:'):
    assert not os.path.exists(tmp_path / name)
