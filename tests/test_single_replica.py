"""``SingleReplicaArrayHandler``: restores read each array once, on the primary replica, and
broadcast it over the mesh's replica axis.

Registered the way MaxText does (``register_type_handler(jax.Array, ..., override=True)``), in
one process with 8 devices and in 2 real ``jax.distributed`` processes whose devices form the two
replicas. Reads are counted by wrapping flaxckpt's array reader, through which every byte of
array data is read: only the primary replica's process may call it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flaxckpt as ocp
import multiprocess
from flaxckpt import _arrays, _type_handlers

VALUES = {'w': np.arange(64, dtype=np.float32).reshape(16, 4) / 4,
          'b': np.arange(8, dtype=np.int32) - 3}


@pytest.fixture
def single_replica_handler():
  """Registers SingleReplicaArrayHandler for jax.Array, and the default one again afterwards."""
  registry = _type_handlers.REGISTRY
  saved = (list(registry._by_type), dict(registry._by_typestr), registry.customized)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.SingleReplicaArrayHandler(replica_axis_index=0,
                                                             primary_replica_id=0),
      override=True)
  yield
  registry._by_type[:], registry._by_typestr, registry.customized = saved
  registry.version += 1


@pytest.fixture
def counted_reads(monkeypatch):
  """The names of the arrays read from storage, call by call (the real reader still reads)."""
  calls: list[list[str]] = []
  real = _arrays.read_arrays

  def counting(directory, names, **kwargs):
    if names:
      calls.append(list(names))
    return real(directory, names, **kwargs)

  monkeypatch.setattr(_arrays, 'read_arrays', counting)
  return calls


def _restore_args(mesh: Mesh, spec: P) -> dict:
  sharding = NamedSharding(mesh, spec)
  return {key: ocp.type_handlers.SingleReplicaArrayRestoreArgs(
      sharding=sharding, global_shape=value.shape, dtype=value.dtype)
      for key, value in VALUES.items()}


def test_handler_replaces_the_array_handler_and_keeps_orbax_options(single_replica_handler):
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert isinstance(handler, ocp.type_handlers.SingleReplicaArrayHandler)
  assert isinstance(handler, ocp.type_handlers.ArrayHandler)
  assert ocp.type_handlers.get_type_handler('jax.Array') is handler
  args = ocp.type_handlers.SingleReplicaArrayRestoreArgs(shape=(2, 3))
  assert args.global_shape == (2, 3) and args.restore_type is jax.Array


def test_restore_reads_once_and_broadcasts_on_8_devices(single_replica_handler, counted_reads,
                                                         tmp_path):
  devices = np.array(jax.devices()).reshape(2, 4)
  mesh = Mesh(devices, ('replica', 'data'))
  saved = {key: jax.device_put(value, NamedSharding(mesh, P('data')))
           for key, value in VALUES.items()}
  ocp.PyTreeCheckpointer().save(tmp_path / 'ckpt', saved)
  orbax.PyTreeCheckpointer().save(tmp_path / 'orbax', saved)
  # Saving is unchanged: the same files as Orbax's, the saved shardings recorded.
  assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == sorted(
      [p.name for p in (tmp_path / 'orbax').iterdir()] + ['flaxckpt_checksums'])
  assert ((tmp_path / 'ckpt' / '_sharding').read_text()
          == (tmp_path / 'orbax' / '_sharding').read_text())
  restore_args = _restore_args(mesh, P('data'))
  restored = ocp.PyTreeCheckpointer().restore(
      tmp_path / 'ckpt', args=ocp.args.PyTreeRestore(restore_args=restore_args))
  assert counted_reads == [['b', 'w']]  # One read of each array, for both replicas.
  for key, value in VALUES.items():
    assert restored[key].sharding == restore_args[key].sharding
    assert restored[key].dtype == value.dtype
    for shard in restored[key].addressable_shards:  # Both replicas hold the data.
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def test_broadcast_in_groups_and_from_another_primary_replica(counted_reads, tmp_path):
  registry = _type_handlers.REGISTRY
  saved = (list(registry._by_type), dict(registry._by_typestr), registry.customized)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.SingleReplicaArrayHandler(
            replica_axis_index=1, primary_replica_id=1, broadcast_memory_limit_bytes=16),
        override=True)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'replica'))
    ocp.PyTreeCheckpointer().save(tmp_path / 'ckpt', {k: jnp.asarray(v) for k, v in
                                                       VALUES.items()})
    restore_args = _restore_args(mesh, P('data'))
    restored = ocp.PyTreeCheckpointer().restore(
        tmp_path / 'ckpt', args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    registry._by_type[:], registry._by_typestr, registry.customized = saved
    registry.version += 1
  for key, value in VALUES.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
    assert restored[key].sharding == restore_args[key].sharding


def test_needs_single_replica_restore_args_and_several_replicas(single_replica_handler,
                                                                tmp_path):
  ocp.PyTreeCheckpointer().save(tmp_path / 'ckpt', {'w': jnp.ones(8)})
  one_replica = Mesh(np.array(jax.devices()).reshape(1, 8), ('replica', 'data'))
  with pytest.raises(ValueError, match="'w'.*needs SingleReplicaArrayRestoreArgs"):
    ocp.PyTreeCheckpointer().restore(tmp_path / 'ckpt', args=ocp.args.PyTreeRestore(
        restore_args={'w': ocp.ArrayRestoreArgs(sharding=NamedSharding(one_replica, P()))}))
  with pytest.raises(ValueError, match='All devices are in the primary replica'):
    ocp.PyTreeCheckpointer().restore(tmp_path / 'ckpt', args=ocp.args.PyTreeRestore(
        restore_args={'w': ocp.type_handlers.SingleReplicaArrayRestoreArgs(
            sharding=NamedSharding(one_replica, P('data')), global_shape=(8,),
            dtype=np.float32)}))


def test_orbax_checkpoint_restores_through_the_handler(single_replica_handler, tmp_path):
  with orbax.PyTreeCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'orbax', args=orbax.args.PyTreeSave(
        {k: jnp.asarray(v) for k, v in VALUES.items()}))
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('replica', 'data'))
  restored = ocp.PyTreeCheckpointer().restore(
      tmp_path / 'orbax', args=ocp.args.PyTreeRestore(restore_args=_restore_args(mesh, P())))
  for key, value in VALUES.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)


_TWO_PROCESSES = r'''
import warnings
warnings.simplefilter('ignore')
import numpy as np
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import flaxckpt as ocp
from flaxckpt import _arrays

VALUES = {'w': np.arange(64, dtype=np.float32).reshape(16, 4) / 4,
          'b': np.arange(8, dtype=np.int32) - 3}
root = ARGS[0]
# Replica r is process r's 4 devices: the replica axis spans the processes.
devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))).reshape(2, 4)
assert [d.process_index for d in devices[:, 0]] == [0, 1]
mesh = Mesh(devices, ('replica', 'data'))
sharding = NamedSharding(mesh, P('data'))
tree = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
        for k, v in VALUES.items()}
ocp.PyTreeCheckpointer().save(f'{root}/ckpt', tree)

read = []
real = _arrays.read_arrays
def counting(directory, names, **kwargs):
  out = real(directory, names, **kwargs)
  read.extend((name, int(np.asarray(getattr(a, 'data', a)).nbytes)) for name, a in zip(names, out))
  return out
_arrays.read_arrays = counting

ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.SingleReplicaArrayHandler(), override=True)
restore_args = {k: ocp.type_handlers.SingleReplicaArrayRestoreArgs(
    sharding=sharding, global_shape=v.shape, dtype=v.dtype) for k, v in VALUES.items()}
restored = ocp.PyTreeCheckpointer().restore(
    f'{root}/ckpt', args=ocp.args.PyTreeRestore(restore_args=restore_args))
wrong = [f'{k}{s.index}' for k, v in VALUES.items() for s in restored[k].addressable_shards
         if not np.array_equal(np.asarray(s.data), v[s.index])]
report({'read': sorted(read), 'wrong': wrong,
        'shardings': all(restored[k].sharding == sharding for k in VALUES),
        'shards': sum(len(restored[k].addressable_shards) for k in VALUES)})
'''


def test_two_processes_only_the_primary_replica_reads(tmp_path):
  primary, other = multiprocess.run(_TWO_PROCESSES, 2, 4, str(tmp_path))
  full = sorted([key, value.nbytes] for key, value in VALUES.items())
  assert primary['read'] == full  # Replica 0 (process 0) read each array whole, once.
  assert other['read'] == []  # Replica 1 read nothing: it got the data by broadcast.
  for result in (primary, other):
    assert result['wrong'] == [] and result['shardings'] and result['shards'] == 8
