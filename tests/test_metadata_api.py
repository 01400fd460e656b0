"""``ocp.metadata`` and the tree metadata ``PyTreeCheckpointHandler.metadata`` returns, compared
with Orbax's on the same files (written by either library)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
from etils import epath

import flaxckpt as ocp

LIBS = {'flaxckpt': ocp, 'orbax': orbax}


def _tree():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  sharded = jax.device_put(jnp.arange(8.0).reshape(2, 4),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x')))
  return {'params': {'w': sharded, 'b': jnp.ones(3, jnp.bfloat16)}, 'np': np.arange(2),
          'np0': np.array(1.5),
          'step': 3, 'lr': 0.5, 'name': 'run', 'empty': {}, 'none': None}


def _save(lib, path, tree, **kwargs):
  with LIBS[lib].PyTreeCheckpointer() as ckptr:
    ckptr.save(path, args=LIBS[lib].args.PyTreeSave(tree, **kwargs))


@pytest.mark.parametrize('writer', LIBS)
def test_tree_metadata_agrees_with_orbax(tmp_path, writer):
  path = epath.Path(tmp_path / 'ckpt')
  _save(writer, path, _tree(), custom_metadata={'note': 'x'})
  ours = ocp.PyTreeCheckpointHandler().metadata(path)
  theirs = orbax.PyTreeCheckpointHandler().metadata(path)
  assert isinstance(ours, ocp.metadata.TreeMetadata)
  assert ours.custom_metadata == theirs.custom_metadata == {'note': 'x'}
  flat_ours = jax.tree_util.tree_leaves_with_path(ours)
  flat_theirs = jax.tree_util.tree_leaves_with_path(theirs)
  assert [p for p, _ in flat_ours] == [p for p, _ in flat_theirs]
  for (keypath, a), (_, b) in zip(flat_ours, flat_theirs):
    assert type(a).__name__ == type(b).__name__, keypath
    assert a.name == b.name and a.directory == path, keypath
    if isinstance(a, ocp.metadata.ArrayMetadata):
      assert (a.shape, a.dtype) == (b.shape, b.dtype), keypath
      assert [(m.chunk_shape, m.write_shape) if m else None for m in (a.storage, b.storage)
              ] == [(b.storage.chunk_shape, b.storage.write_shape) if b.storage else None] * 2, (
                  keypath)  # Chunk and write shapes, numpy leaves included.
      assert (a.sharding is None) == (b.sharding is None), keypath
      if a.sharding is not None:
        assert a.sharding.to_jax_sharding() == b.sharding.to_jax_sharding()
        assert json.loads(a.sharding.to_serialized_string()) == json.loads(
            b.sharding.to_serialized_string())
  assert ours['empty'] == {} and ours['none'] is None
  assert isinstance(ours['params']['w'].sharding, ocp.metadata.NamedShardingMetadata)
  assert ours['params']['w'].storage.write_shape == theirs['params']['w'].storage.write_shape


def test_metadata_as_public_projects_use_it(tmp_path):
  path = epath.Path(tmp_path / 'ckpt')
  tree = _tree()
  _save('flaxckpt', path, tree)
  meta = ocp.PyTreeCheckpointHandler().metadata(path)
  assert 'params' in meta and set(meta.keys()) == set(tree) and len(meta) == len(tree)
  assert meta['params']['w'].shape == (2, 4) and meta['step'].dtype == np.int64
  assert isinstance(meta['name'], ocp.metadata.StringMetadata)
  assert isinstance(meta['lr'], ocp.metadata.ScalarMetadata)
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=m.sharding.to_jax_sharding()),
      meta.tree['params'])
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item={'params': abstract}, restore_args=ocp.checkpoint_utils.construct_restore_args(
          {'params': abstract})))
  assert restored['params']['w'].sharding == tree['params']['w'].sharding
  np.testing.assert_array_equal(restored['params']['w'], tree['params']['w'])
  shapes = jax.tree.map(lambda m: getattr(m, 'shape', None), meta)  # Still a TreeMetadata.
  assert isinstance(shapes, ocp.metadata.TreeMetadata) and shapes['np'] == (2,)


def test_value_metadata_equality_as_orbax():
  a = ocp.metadata.ArrayMetadata(name='a', directory=None, shape=(2,), sharding=None,
                                 dtype=np.dtype('float32'))
  b = ocp.metadata.ArrayMetadata(name='b', directory=None, shape=(2,), sharding=None,
                                 dtype=np.dtype('float32'))
  assert a == b and a != ocp.metadata.ScalarMetadata(name='a', directory=None)
  sds = jax.ShapeDtypeStruct((2,), jnp.float32)
  assert ocp.metadata.ArrayMetadata.from_shape_dtype_struct(sds) == a
  single = ocp.metadata.SingleDeviceShardingMetadata(str(jax.devices()[0]))
  assert single.to_jax_sharding() == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(ValueError, match='not among jax.local_devices'):
    ocp.metadata.SingleDeviceShardingMetadata('tpu:99').to_jax_sharding()
  entry = ocp.metadata.tree.ValueMetadataEntry(value_type='jax.Array', write_shape=(2,))
  assert entry.to_json() == orbax.metadata.tree.ValueMetadataEntry(
      value_type='jax.Array', write_shape=(2,)).to_json()


@pytest.mark.parametrize('writer', LIBS)
def test_get_step_metadata_agrees_with_orbax(tmp_path, writer):
  path = epath.Path(tmp_path / 'ckpt')
  with LIBS[writer].Checkpointer(LIBS[writer].PyTreeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=LIBS[writer].args.PyTreeSave({'a': np.arange(2)}),
               custom_metadata={'run': 'r1'})
  ours, theirs = ocp.metadata.get_step_metadata(path), orbax.metadata.get_step_metadata(path)
  for field in ('item_handlers', 'metrics', 'init_timestamp_nsecs', 'commit_timestamp_nsecs',
                'custom_metadata'):
    assert getattr(ours, field) == getattr(theirs, field), field
  assert ours.custom_metadata == {'run': 'r1'} and ours.item_metadata is None
  assert ours.commit_timestamp_nsecs >= ours.init_timestamp_nsecs > 0
  meta = ocp.PyTreeCheckpointHandler().metadata(path)
  step = ocp.metadata.read_step_metadata(path, meta)
  assert step.item_metadata is meta and step.item_handlers == ours.item_handlers


def test_step_metadata_files_are_untrusted(tmp_path):
  with pytest.raises(ValueError, match='Step metadata not found'):
    ocp.metadata.get_step_metadata(tmp_path)
  assert ocp.metadata.read_step_metadata(tmp_path).item_handlers is None
  file = tmp_path / '_CHECKPOINT_METADATA'
  file.write_text('[' * 5000 + ']' * 5000)
  with pytest.raises(ocp.LimitExceededError, match='_CHECKPOINT_METADATA'):
    ocp.metadata.get_step_metadata(tmp_path)
  file.write_text('{"init_timestamp_nsecs": "soon"}')
  with pytest.raises(ocp.NotACheckpointError, match="'init_timestamp_nsecs' should be int"):
    ocp.metadata.get_step_metadata(tmp_path)
  file.write_text('{"custom_metadata": {}, "extra": 1}')
  assert ocp.metadata.get_step_metadata(tmp_path).custom_metadata == {'extra': 1}
  file.write_text('not json')
  with pytest.raises(ocp.NotACheckpointError, match='not JSON'):
    ocp.metadata.read_step_metadata(tmp_path)
  file.unlink()
  file.symlink_to('/etc/hostname')
  with pytest.raises(ocp.UnsafeCheckpointError):
    ocp.metadata.get_step_metadata(tmp_path)
