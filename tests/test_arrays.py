"""Array storage: chunking, direct reads of large chunks, deep OCDBT trees, damaged files."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
import tensorstore

from flaxckpt import _arrays, _metadata, _sources


def _big(seed=0, shape=(512, 1024)):  # 2 MiB: above the direct-read threshold.
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize('use_ocdbt', [True, False])
@pytest.mark.parametrize('writer', ['flaxckpt', 'orbax'])
def test_large_raw_chunks_are_read_directly(tmp_path, use_ocdbt, writer):
  tree = {'big': _big(), 'jbig': jax.numpy.asarray(_big(1)), 'small': np.arange(5)}
  path = tmp_path / 'c'
  if writer == 'flaxckpt':
    ocp.PyTreeCheckpointer(use_ocdbt=use_ocdbt).save(path, args=ocp.args.PyTreeSave(tree))
  else:
    orbax.Checkpointer(orbax.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(
        path, args=orbax.args.PyTreeSave(tree, save_args=jax.tree.map(
            lambda _: orbax.SaveArgs(), tree)))
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)))
  for key in tree:
    np.testing.assert_array_equal(restored[key], tree[key])
  assert restored['big'].flags.writeable


def test_direct_read_finds_values_in_a_deep_btree(tmp_path, monkeypatch):
  monkeypatch.setitem(_arrays._OCDBT_CONFIG, 'max_decoded_node_bytes', 2000)
  tree = {f'g{i:03d}': {'big': _big(i, (256, 1024)), 'n': np.full(3, i)} for i in range(6)}
  tree.update({f'pad{i:04d}': np.float32(i) for i in range(400)})
  ocp.PyTreeCheckpointer().save(tmp_path / 'c', args=ocp.args.PyTreeSave(tree))
  index = _sources.OcdbtIndexSource.load(tensorstore, tmp_path / 'c',
                                         {'driver': 'file', 'path': str(tmp_path / 'c') + '/'})
  path, offset, length = index.location('g003.big/0.0')
  assert length == 256 * 1024 * 4 and path.is_file() and offset >= 0
  assert index.collect(['pad0007/0']) == [np.float32(7).tobytes()]
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / 'c')
  for i in range(6):
    np.testing.assert_array_equal(restored[f'g{i:03d}']['big'], tree[f'g{i:03d}']['big'])


def test_truncated_data_file_is_reported(tmp_path):
  path = tmp_path / 'c'
  ocp.PyTreeCheckpointer(use_ocdbt=False).save(path, args=ocp.args.PyTreeSave({'w': _big()}))
  chunk = path / 'w' / '0.0'
  os.truncate(chunk, 1000)
  with pytest.raises(ocp.NotACheckpointError, match=r"'0.0' of array 'w' holds 1000 bytes"):
    ocp.PyTreeCheckpointer().restore(path)


@pytest.mark.parametrize('save_kwargs, expected', [
    ({'save_args': {'x': ocp.SaveArgs(chunk_byte_size=400)}}, [10, 10]),
    ({'ocdbt_target_data_file_size': 1000}, [10, 15]),
    ({}, [20, 30]),
])
def test_chunk_shapes_match_orbax(tmp_path, save_kwargs, expected):
  tree = {'x': jax.numpy.arange(600.0, dtype=np.float32).reshape(20, 30)}
  ours, theirs = tmp_path / 'ours', tmp_path / 'theirs'
  ocp.PyTreeCheckpointer().save(ours, args=ocp.args.PyTreeSave(tree, **save_kwargs))
  orbax_kwargs = dict(save_kwargs)
  if 'save_args' in orbax_kwargs:
    orbax_kwargs['save_args'] = {'x': orbax.SaveArgs(chunk_byte_size=400)}
  orbax.Checkpointer(orbax.PyTreeCheckpointHandler()).save(
      theirs, args=orbax.args.PyTreeSave(tree, **orbax_kwargs))
  for path in (ours, theirs):
    meta = json.loads((path / 'array_metadatas' / 'process_0').read_text())
    assert meta['array_metadatas'][0]['array_metadata']['chunk_shape'] == expected
  np.testing.assert_array_equal(ocp.PyTreeCheckpointer().restore(theirs)['x'], tree['x'])
  np.testing.assert_array_equal(
      orbax.Checkpointer(orbax.PyTreeCheckpointHandler()).restore(
          ours, args=orbax.args.PyTreeRestore(restore_args={'x': orbax.RestoreArgs(
              restore_type=np.ndarray)}))['x'], tree['x'])


def test_tree_metadata_json_is_byte_identical_to_json_dumps():
  leaves = (
      _metadata.LeafMetadata(('a',), (2,), 'jax.Array', False, (3,)),
      _metadata.LeafMetadata(("it's", '0', 'é"x'), (2, 1, 2), 'scalar'),
      _metadata.LeafMetadata(('e',), (2,), 'Dict', True),
  )
  meta = _metadata.TreeMetadata(leaves, True, False, True, {'x': [1, 'ü']})
  expected = {'tree_metadata': {}}
  for leaf in leaves:
    value = {'value_type': leaf.value_type, 'skip_deserialize': leaf.skip_deserialize}
    if leaf.write_shape is not None:
      value['write_shape'] = list(leaf.write_shape)
    expected['tree_metadata'][str(leaf.path)] = {
        'key_metadata': [{'key': k, 'key_type': t} for k, t in zip(leaf.path, leaf.key_types)],
        'value_metadata': value}
  expected.update(use_ocdbt=True, use_zarr3=False, store_array_data_equal_to_fill_value=True,
                  custom_metadata={'x': [1, 'ü']})
  assert _metadata.tree_metadata_json(meta) == json.dumps(expected)


def test_array_metadatas_json_is_byte_identical_to_json_dumps():
  entries = [_metadata.ArrayMetadata('a"é', (2, 3), (1, 3), None),
             _metadata.ArrayMetadata('k', (), (), {'random_key_impl': 'threefry2x32'})]
  expected = json.dumps({'array_metadatas': [{'array_metadata': {
      'param_name': e.param_name, 'write_shape': list(e.write_shape),
      'chunk_shape': list(e.chunk_shape), 'ext_metadata': e.ext_metadata}} for e in entries]})
  assert _metadata.array_metadatas_json(entries) == expected
  assert _metadata.parse_array_metadatas(expected) == entries


@pytest.mark.parametrize('options, chunk', [({'use_compression': True}, 'x/0'),
                                            ({'use_zarr3': True}, 'x/c/0')])
def test_missing_chunk_of_driver_read_array_is_an_error(tmp_path, options, chunk):
  path = tmp_path / 'c'
  ocp.PyTreeCheckpointer(use_ocdbt=False, **options).save(
      path, args=ocp.args.PyTreeSave({'x': np.arange(8.0)}))
  os.remove(path / chunk)
  with pytest.raises(ocp.NotACheckpointError, match="'x'"):
    ocp.PyTreeCheckpointer().restore(path)


def _zarray(path, name):
  kv = tensorstore.KvStore.open({'driver': 'ocdbt', 'base': f'file://{path}/'}).result()
  return json.loads(kv.read(f'{name}/.zarray').result().value)


def test_large_arrays_take_the_zero_copy_driver_path_and_orbax_reads_them(tmp_path):
  """Arrays above DRIVER_WRITE_MIN_BYTES go through the zarr driver: sharded over devices,
  split into several chunks, all zeros, bfloat16, saved beside small raw-key leaves."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('x', 'y'))
  sharded = jax.device_put(_big(2), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('x', 'y')))
  tree = {'sharded': sharded, 'zeros': jax.numpy.zeros((512, 512)),
          'chunked': _big(3), 'bf16': jax.numpy.asarray(_big(4), jax.numpy.bfloat16),
          'small': np.arange(7.0)}
  assert all(x.nbytes >= _arrays.DRIVER_WRITE_MIN_BYTES for k, x in tree.items() if k != 'small')
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), tree)
  save_args['chunked'] = ocp.SaveArgs(chunk_byte_size=1 << 19)
  ours, theirs = tmp_path / 'ours', tmp_path / 'theirs'
  ocp.PyTreeCheckpointer().save(ours, args=ocp.args.PyTreeSave(tree, save_args=save_args))
  orbax_save_args = jax.tree.map(lambda _: orbax.SaveArgs(), tree)
  orbax_save_args['chunked'] = orbax.SaveArgs(chunk_byte_size=1 << 19)
  orbax.Checkpointer(orbax.PyTreeCheckpointHandler()).save(
      theirs, args=orbax.args.PyTreeSave(tree, save_args=orbax_save_args))
  for name in ('zeros', 'chunked', 'bf16', 'small'):
    theirs_meta = _zarray(theirs, name)
    assert theirs_meta.pop('compressor') == {'id': 'zstd', 'level': 1}
    assert _zarray(ours, name) == {**theirs_meta, 'compressor': None}, name
  assert _zarray(ours, 'chunked')['chunks'] != [512, 1024]  # Really several chunks.
  kv = tensorstore.KvStore.open({'driver': 'ocdbt', 'base': f'file://{ours}/'}).result()
  assert len(kv.read('zeros/0.0').result().value) == 512 * 512 * 4  # Zero chunks are stored.
  with pytest.warns(UserWarning, match='Sharding info not provided'):
    by_orbax = orbax.PyTreeCheckpointer().restore(ours)
  by_us = ocp.PyTreeCheckpointer().restore(ours, args=ocp.args.PyTreeRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)))
  for key, value in tree.items():
    np.testing.assert_array_equal(np.asarray(by_orbax[key]), np.asarray(value))
    np.testing.assert_array_equal(np.asarray(by_us[key]), np.asarray(value))
  assert by_us['sharded'].sharding == sharded.sharding


@pytest.mark.parametrize('use_compression, expected', [(False, None), (True, {'id': 'zstd'})])
def test_btree_nodes_are_compressed_only_with_use_compression(tmp_path, use_compression,
                                                             expected):
  path = tmp_path / 'c'
  ocp.PyTreeCheckpointer(use_compression=use_compression).save(
      path, args=ocp.args.PyTreeSave({'x': np.arange(4)}))
  for db in (path, path / 'ocdbt.process_0'):
    base = tensorstore.KvStore.open({'driver': 'file', 'path': f'{db}/'}).result()
    config = tensorstore.ocdbt.dump(base).result()['config']
    assert config.get('compression') == expected, db
    assert config['max_inline_value_bytes'] == 1024
  assert orbax.PyTreeCheckpointer().restore(path)['x'].tolist() == [0, 1, 2, 3]
