"""Restore semantics: targets, casts, shapes, shardings, partial trees, and leaf kinds."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import flaxckpt as ocp


def _save(path, tree, handler=None, **save_kwargs):
  ckptr = ocp.Checkpointer(handler or ocp.PyTreeCheckpointHandler())
  ckptr.save(path, args=ocp.args.PyTreeSave(tree, **save_kwargs))
  return ckptr


def _mesh(shape=(4, 2), names=('x', 'y')):
  return jax.sharding.Mesh(np.asarray(jax.devices()).reshape(shape), names)


def test_no_target_returns_tree_as_stored(tmp_path):
  tree = {'l': [np.arange(2), 3.5, 'x'], 't': (1, 2), 'e': {}, 'el': [], 'et': (), 'n': None,
          'b': True, 'np': np.float16(1.5), 'j': jnp.arange(3)}
  restored = _save(tmp_path / 'c', tree).restore(tmp_path / 'c')
  assert restored['l'][1] == 3.5 and restored['l'][2] == 'x'
  assert restored['t'] == [1, 2]  # Non-empty tuples come back as lists, as in Orbax.
  assert restored['e'] == {} and restored['el'] == [] and restored['et'] == ()
  assert restored['n'] is None and restored['b'] is True
  assert type(restored['np']) is float and restored['np'] == 1.5
  assert isinstance(restored['j'], jax.Array)
  np.testing.assert_array_equal(restored['j'], np.arange(3))
  assert isinstance(restored['l'][0], np.ndarray)


def test_int_keys_come_back_as_strings(tmp_path):
  assert _save(tmp_path / 'c', {3: 1, 10: 2}).restore(tmp_path / 'c') == {'3': 1, '10': 2}


def test_twelve_element_list_keeps_order(tmp_path):
  tree = [np.full(1, i) for i in range(12)]
  restored = _save(tmp_path / 'c', tree).restore(tmp_path / 'c')
  assert [int(x[0]) for x in restored] == list(range(12))


def _train_state():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 5)))['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-3))
  grads = jax.tree.map(jnp.ones_like, state.params)
  return state.apply_gradients(grads=grads)


@pytest.mark.parametrize('abstract', [False, True])
def test_train_state_target_concrete_and_abstract(tmp_path, abstract):
  state = _train_state()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave(state))
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state) if abstract else state
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.StandardRestore(target))
  assert type(restored) is train_state.TrainState
  assert restored.apply_fn == state.apply_fn and restored.tx is state.tx
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)


def test_python_scalar_target_keeps_saved_python_type(tmp_path):
  ckptr = _save(tmp_path / 'c', {'i': 5, 'j': jnp.asarray(7)})
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.PyTreeRestore({'i': 0.0, 'j': 0}))
  assert restored == {'i': 5, 'j': 7}
  assert type(restored['i']) is int and type(restored['j']) is int


def test_dtype_cast_and_restore_type(tmp_path):
  ckptr = _save(tmp_path / 'c', {'a': jnp.arange(4, dtype=jnp.float32), 'b': np.ones(2)})
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.PyTreeRestore(
      restore_args={'a': ocp.RestoreArgs(restore_type=np.ndarray, dtype=jnp.bfloat16),
                    'b': ocp.ArrayRestoreArgs(dtype=np.int8)}))
  assert type(restored['a']) is np.ndarray and restored['a'].dtype == jnp.bfloat16
  assert isinstance(restored['b'], jax.Array) and restored['b'].dtype == np.int8


def test_abstract_target_with_sharding_places_arrays(tmp_path):
  mesh = _mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x', 'y'))
  ckptr = _save(tmp_path / 'c', {'w': np.arange(16.0).reshape(8, 2)})
  target = {'w': jax.ShapeDtypeStruct((8, 2), np.float32, sharding=sharding)}
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.PyTreeRestore(target))
  assert restored['w'].sharding == sharding and restored['w'].dtype == np.float32
  np.testing.assert_array_equal(restored['w'], np.arange(16.0).reshape(8, 2))


def test_sharded_save_records_sharding_and_restores_it(tmp_path):
  mesh = _mesh()
  tree = {'s': jax.device_put(jnp.arange(32.0).reshape(8, 4), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('x', 'y'))),
          'r': jax.device_put(jnp.ones((4, 4)), jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec()))}
  restored = _save(tmp_path / 'c', tree).restore(tmp_path / 'c')
  for key in tree:
    assert restored[key].sharding.is_equivalent_to(tree[key].sharding, 2)
    np.testing.assert_array_equal(restored[key], tree[key])


def test_reference_sharding_without_global_shape_restores_stored_shape(tmp_path):
  mesh = _mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x', 'y'))
  ckptr = _save(tmp_path / 'c', {'m': jax.device_put(np.arange(16).reshape(8, 2), sharding)})
  ref = {'m': jax.device_put(np.arange(8).reshape(4, 2), sharding)}
  restored = ckptr.restore(tmp_path / 'c', item=ref, restore_args={
      'm': ocp.ArrayRestoreArgs(sharding=ref['m'].sharding)})
  assert restored['m'].shape == (8, 2) and restored['m'].sharding == sharding
  np.testing.assert_array_equal(restored['m'], np.arange(16).reshape(8, 2))


def test_shape_mismatch_names_leaf_and_strict_false_pads_and_truncates(tmp_path):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave({'p': {'a': np.arange(4.0),
                                                               'b': np.arange(4.0)}}))
  target = {'p': {'a': jax.ShapeDtypeStruct((2,), np.float64),
                  'b': jax.ShapeDtypeStruct((6,), np.float64)}}
  with pytest.raises(ocp.StructureMismatchError, match=r"'p/a'.*\(4,\).*\(2,\)"):
    ckptr.restore(tmp_path / 'c', args=ocp.args.StandardRestore(target))
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.StandardRestore(target, strict=False))
  np.testing.assert_array_equal(restored['p']['a'], [0.0, 1.0])
  np.testing.assert_array_equal(restored['p']['b'], [0.0, 1.0, 2.0, 3.0, 0.0, 0.0])


def test_subset_target_and_missing_keys(tmp_path):
  ckptr = _save(tmp_path / 'c', {'a': np.arange(3), 'b': {'c': np.ones(2), 'd': 4}})
  assert ckptr.restore(tmp_path / 'c', item={'b': {'d': 0}}) == {'b': {'d': 4}}
  with pytest.raises(KeyError, match=r"\['b/e', 'z'\]"):
    ckptr.restore(tmp_path / 'c', item={'b': {'d': 0, 'e': np.zeros(1)}, 'z': 1})
  filled = ckptr.restore(tmp_path / 'c', item={'b': {'d': 0, 'e': np.zeros(1)}}, transforms={})
  assert filled['b']['d'] == 4 and filled['b']['e'].tolist() == [0.0]


def test_transforms_rename_regex_and_value_fn(tmp_path):
  ckptr = _save(tmp_path / 'c', {'old': {'w0': np.arange(2), 'w1': np.arange(3)}, 'x': 2})
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.PyTreeRestore(
      item={'new': {'w0': 0, 'w1': 0}, 'y': 0, 'keep': 'default'},
      restore_args={'new': {'w0': ocp.RestoreArgs(), 'w1': ocp.RestoreArgs()},
                    'y': ocp.RestoreArgs(), 'keep': ocp.RestoreArgs()},
      transforms={r'new/(w\d)': ocp.Transform(original_key=r'old/\1'),
                  'y': ocp.Transform(original_key='x', value_fn=lambda v: v * 10),
                  'keep': ocp.Transform(use_fallback=True)}))
  np.testing.assert_array_equal(restored['new']['w0'], np.arange(2))
  np.testing.assert_array_equal(restored['new']['w1'], np.arange(3))
  assert restored['y'] == 20 and restored['keep'] == 'default'
  with pytest.raises(KeyError, match="'nope'"):
    ckptr.restore(tmp_path / 'c', item={'q': 1},
                  transforms={'q': ocp.Transform(original_key='nope')})


@flax.struct.dataclass
class _Stats:
  mean: jax.Array
  count: int


def test_dataclass_target(tmp_path):
  stats = _Stats(mean=jnp.arange(3.0), count=4)
  ckptr = _save(tmp_path / 'c', {'s': stats})
  raw = ckptr.restore(tmp_path / 'c')
  assert set(raw['s']) == {'mean', 'count'}
  restored = ckptr.restore(tmp_path / 'c', item={'s': _Stats(mean=jnp.zeros(3), count=0)})
  assert isinstance(restored['s'], _Stats) and restored['s'].count == 4
  np.testing.assert_array_equal(restored['s'].mean, [0.0, 1.0, 2.0])


def test_beyond_orbax_zero_size_keys_and_standard_strings(tmp_path):
  tree = {'empty': np.zeros((0, 3), np.float32), 'jempty': jnp.zeros((2, 0)),
          'key': jax.random.key(7), 'keys': jax.random.split(jax.random.key(1), 3),
          'name': 'run-1'}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave(tree))
  for target in (None, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)):
    restored = ckptr.restore(tmp_path / 'c', args=ocp.args.StandardRestore(target))
    assert restored['empty'].shape == (0, 3) and restored['jempty'].shape == (2, 0)
    assert restored['name'] == 'run-1'
    for k in ('key', 'keys'):
      assert jax.dtypes.issubdtype(restored[k].dtype, jax.dtypes.prng_key)
      np.testing.assert_array_equal(jax.random.key_data(restored[k]),
                                    jax.random.key_data(tree[k]))
    np.testing.assert_array_equal(jax.random.normal(restored['key'], (2,)),
                                  jax.random.normal(tree['key'], (2,)))


def test_unsupported_leaf_is_named(tmp_path):
  with pytest.raises(ocp.UnsupportedLeafError, match=r"'a/0'.*complex"):
    _save(tmp_path / 'c', {'a': [1j]})
  assert not (tmp_path / 'c').exists()


def test_dotted_key_collision_is_refused(tmp_path):
  with pytest.raises(ocp.NameCollisionError, match="'a.b'"):
    _save(tmp_path / 'c', {'a.b': 1, 'a': {'b': 2}})


class _Net(nnx.Module):

  def __init__(self, rngs, extra=False):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    if extra:
      self.head = nnx.Linear(4, 2, rngs=rngs)


def test_nnx_state_and_optimizer_round_trip(tmp_path):
  model = _Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  state = nnx.state(optimizer)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave(state))
  abstract_opt = nnx.eval_shape(lambda: nnx.Optimizer(_Net(nnx.Rngs(1)), optax.adam(1e-2),
                                                      wrt=nnx.Param))
  restored = ckptr.restore(tmp_path / 'c', args=ocp.args.StandardRestore(
      nnx.state(abstract_opt)))
  nnx.update(abstract_opt, restored)
  for a, b in zip(jax.tree.leaves(nnx.state(abstract_opt)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  pure = nnx.to_pure_dict(nnx.state(model))
  ckptr.save(tmp_path / 'pure', args=ocp.args.StandardSave(pure))
  fresh = _Net(nnx.Rngs(5))
  fresh_state = nnx.state(fresh)
  nnx.replace_by_pure_dict(fresh_state, ckptr.restore(tmp_path / 'pure'))
  nnx.update(fresh, fresh_state)
  np.testing.assert_array_equal(fresh.lin.kernel[...], model.lin.kernel[...])


def test_string_names_nesting_into_each_other_are_refused(tmp_path):
  with pytest.raises(ocp.NameCollisionError, match='_strings.json'):
    _save(tmp_path / 'c', {'p': 'a', 'p/q': 'b'})
  assert not (tmp_path / 'c').exists()
  restored = _save(tmp_path / 'd', {'k/x': 'a', 'k/y': 'b', 'z': 'c'}).restore(tmp_path / 'd')
  assert restored == {'k/x': 'a', 'k/y': 'b', 'z': 'c'}


def test_metadata_describes_arrays_without_reading_them(tmp_path):
  tree = {'w': jnp.ones((3, 4), jnp.bfloat16), 'n': np.arange(2), 'i': 3, 's': 'x', 'e': {}}
  ckptr = _save(tmp_path / 'c', tree)
  meta = ckptr.metadata(tmp_path / 'c').item_metadata
  assert meta['w'].shape == (3, 4) and meta['w'].dtype == jnp.bfloat16
  assert isinstance(meta['w'], ocp.metadata.ArrayMetadata)
  assert meta['n'].shape == (2,) and meta['i'].shape == () and meta['i'].dtype == np.int64
  assert isinstance(meta['i'], ocp.metadata.ScalarMetadata)
  assert isinstance(meta['s'], ocp.metadata.StringMetadata) and meta['e'] == {}


def test_composite_without_names_accepts_any_items(tmp_path):
  handler = ocp.CompositeCheckpointHandler()
  ocp.Checkpointer(handler).save(tmp_path / 'c', args=ocp.args.Composite(
      state=ocp.args.StandardSave({'a': np.arange(2)}), extra=ocp.args.JsonSave({'n': 1})))
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(tmp_path / 'c')
  assert restored.extra == {'n': 1}
  np.testing.assert_array_equal(restored.state['a'], np.arange(2))


def test_type_handlers_namespace_names_the_same_classes():
  assert ocp.type_handlers.SaveArgs is ocp.SaveArgs
  assert ocp.type_handlers.ArrayRestoreArgs is ocp.ArrayRestoreArgs


def test_saved_mesh_axis_types_are_restored(tmp_path):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ('x', 'y'),
                           axis_types=(jax.sharding.AxisType.Explicit,
                                       jax.sharding.AxisType.Auto))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  restored = _save(tmp_path / 'c', {'w': jax.device_put(np.arange(8.0), sharding)}).restore(
      tmp_path / 'c')
  assert restored['w'].sharding.mesh.axis_types == mesh.axis_types
  assert restored['w'].sharding == sharding


@pytest.mark.parametrize('batched', [True, False])
def test_single_device_leaves_are_placed_like_device_put(tmp_path, monkeypatch, batched):
  """Restore places single-device leaves through jax's batched shard_args when this jax has
  it (it does today: a jax upgrade that drops it must be noticed), else via device_put."""
  from flaxckpt import _restore
  assert _restore._shard_args is not None
  if not batched:
    monkeypatch.setattr(_restore, '_shard_args', None)
  tree = {'f': jnp.arange(6.0).reshape(2, 3), 'b': jnp.array([True, False]),
          'bf': jnp.ones(3, jnp.bfloat16), 'k': jax.random.key(1)}
  ocp.PyTreeCheckpointer().save(tmp_path / 'c', args=ocp.args.PyTreeSave(tree))
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / 'c', args=ocp.args.PyTreeRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)))
  device = jax.devices()[0]
  for key in ('f', 'b', 'bf'):
    expected = jax.device_put(tree[key], device)
    assert restored[key].committed and restored[key].sharding == expected.sharding
    assert restored[key].dtype == expected.dtype and not restored[key].weak_type
    np.testing.assert_array_equal(restored[key], expected)
  assert jax.random.key_data(restored['k']).tolist() == jax.random.key_data(tree['k']).tolist()


def test_repeated_saves_of_one_structure_track_every_change(tmp_path):
  """Saves of a structure seen before reuse its cached metadata; a change of values, dtype,
  shape, sharding, key type or SaveArgs must still show up in what is written."""
  mesh = _mesh()
  ckptr = ocp.PyTreeCheckpointer()
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  variants = [
      {'a': jnp.arange(8.0), 'b': {'c': jnp.ones((2, 2), jnp.int32)}},
      {'a': jnp.arange(8.0) + 1, 'b': {'c': jnp.zeros((2, 2), jnp.int32)}},
      {'a': jnp.arange(8.0, dtype=jnp.bfloat16), 'b': {'c': jnp.ones((3,), jnp.int32)}},
      {'a': jax.device_put(jnp.arange(8.0), rows), 'b': {'c': jax.random.key(3)}},
  ]
  for i, tree in enumerate(variants * 2):
    path = tmp_path / str(i)
    ckptr.save(path, args=ocp.args.PyTreeSave(tree, custom_metadata={'i': i}))
    restored = ckptr.restore(path)
    assert restored['a'].dtype == tree['a'].dtype
    assert restored['a'].sharding == tree['a'].sharding
    np.testing.assert_array_equal(restored['a'], tree['a'])
    if jax.dtypes.issubdtype(tree['b']['c'].dtype, jax.dtypes.prng_key):
      assert jax.random.key_data(restored['b']['c']).tolist() == jax.random.key_data(
          tree['b']['c']).tolist()
    else:
      np.testing.assert_array_equal(restored['b']['c'], tree['b']['c'])
    assert json.loads((path / '_METADATA').read_text())['custom_metadata'] == {'i': i}
  cast = {'a': ocp.SaveArgs(dtype=jnp.float16), 'b': {'c': ocp.SaveArgs()}}
  ckptr.save(tmp_path / 'cast', args=ocp.args.PyTreeSave(variants[0], save_args=cast))
  assert ckptr.restore(tmp_path / 'cast')['a'].dtype == jnp.float16


def test_repeated_saves_keep_none_and_empty_containers(tmp_path):
  """Flattening caches paths per structure; structures that differ only in None or empty
  containers must not share an entry, and those nodes must survive every repeat."""
  x = jnp.arange(3.0)
  variants = [
      {'a': x},
      {'a': x, 'e': None},
      {'a': x, 'e': {}},
      {'a': x, 'e': [], 'opt': (optax.EmptyState(), {'n': x})},
  ]
  ckptr = ocp.PyTreeCheckpointer()
  for i, tree in enumerate(variants * 2):
    ckptr.save(tmp_path / str(i), args=ocp.args.PyTreeSave(tree))
    restored = ckptr.restore(tmp_path / str(i), args=ocp.args.PyTreeRestore(tree))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
    np.testing.assert_array_equal(restored['a'], x)
    as_stored = ckptr.restore(tmp_path / str(i))
    assert set(as_stored) == set(tree)
