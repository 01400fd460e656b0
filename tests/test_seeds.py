"""The documented examples of Orbax and Flax, run with ``import flaxckpt as ocp``.

Seeds (in /work/shared/seeds/):
  000  Orbax "API Overview": CompositeCheckpointHandler + Checkpointer,
       Checkpointer/AsyncCheckpointer constructions (the CheckpointManager parts are tested
       elsewhere).
  001  Flax "Save and load checkpoints": the PyTreeCheckpointer/AsyncCheckpointer parts
       (CheckpointManager and flax.training.checkpoints parts are tested elsewhere).
  002  Orbax "PyTree handlers": StandardCheckpointHandler and PyTreeCheckpointHandler in full.

Each test follows the seed's code and asserts the output the seed shows. Paths under /tmp become
``tmp_path``. Two mechanical adaptations to today's libraries:
  * ``jax.ShapeDtypeStruct`` is immutable now, so the seed's ``x.dtype = ...`` /
    ``x.sharding = ...`` become ``x.update(dtype=...)`` / ``x.update(sharding=...)``.
  * Seed 001 builds ``save_args`` with ``flax.training.orbax_utils.save_args_from_target`` (which
    makes *orbax's* SaveArgs); the equivalent ``jax.tree.map(lambda _: ocp.SaveArgs(), ckpt)`` is
    used instead, and ``restore_args_from_target`` is spelled out the same way.
The random numbers of seed 001 differ from the page (jax's PRNG changed since), so restored
values are compared with the values that were saved, not with the page's digits; values that do not
depend on the PRNG (bias -0.001, step, dimensions, arange data) are compared with the page exactly.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

import flaxckpt as ocp
import seed001
from seed001 import CustomTrainState


def _assert_array(actual, expected, dtype=None):
  assert isinstance(actual, (np.ndarray, jax.Array)), type(actual)
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
  if dtype is not None:
    assert actual.dtype == np.dtype(dtype)
  else:
    assert actual.shape == np.shape(expected)


# ==================================================================================================
# ocp.test_utils
# ==================================================================================================


def test_erase_and_create_empty_returns_empty_dir_supporting_slash(tmp_path):
  target = tmp_path / 'my-checkpoints'
  (target / 'old' / 'nested').mkdir(parents=True)
  (target / 'old' / 'file.txt').write_text('stale')
  (target / 'top.txt').write_text('stale')

  # The seeds pass a string with a trailing slash.
  path = ocp.test_utils.erase_and_create_empty(str(target) + '/')

  assert os.path.isdir(path)
  assert os.listdir(path) == []
  assert os.path.samefile(path, target)
  child = path / 'composite_checkpoint'
  assert os.fspath(child) == os.path.join(os.fspath(target), 'composite_checkpoint')
  assert os.fspath(path / '1') == os.path.join(os.fspath(target), '1')


def test_erase_and_create_empty_accepts_path_objects(tmp_path):
  path = ocp.test_utils.erase_and_create_empty(tmp_path / 'fresh')
  assert os.path.isdir(path) and os.listdir(path) == []
  assert os.fspath(path / 'x') == os.fspath(tmp_path / 'fresh' / 'x')


# ==================================================================================================
# Seed 000: API overview
# ==================================================================================================

_COMPOSITE_STATE = {'layer0': {'bias': 0, 'weight': 1}}
_COMPOSITE_METADATA = {'version': 1.0}
_COMPOSITE_DATASET = {'my_data': 2}


@pytest.fixture
def composite_checkpoint(tmp_path):
  """The seed's save: returns (checkpointer, path of the saved checkpoint)."""
  path = ocp.test_utils.erase_and_create_empty(tmp_path / 'my-checkpoints/')
  handler = ocp.CompositeCheckpointHandler('state', 'metadata', 'dataset')
  state = {'layer0': {'bias': 0, 'weight': 1}}
  metadata = {'version': 1.0}
  dataset = {'my_data': 2}
  checkpointer = ocp.Checkpointer(handler)
  checkpointer.save(
      path / 'composite_checkpoint',
      ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          metadata=ocp.args.JsonSave(metadata),
          dataset=ocp.args.JsonSave(dataset),
      )
  )
  return checkpointer, path / 'composite_checkpoint'


def _check_composite_repr(result, documented_body):
  # The page prints ``CompositeArgs({...})`` (current Orbax prints ``Composite({...})``); the
  # items must print exactly as documented, sorted by name.
  text = repr(result)
  assert text in (f'CompositeArgs({documented_body})', f'Composite({documented_body})'), text


def test_seed000_composite_restore_all_items(composite_checkpoint):
  checkpointer, path = composite_checkpoint
  assert os.path.isdir(path)

  result = checkpointer.restore(path)

  assert isinstance(result, ocp.args.Composite)
  assert sorted(result) == ['dataset', 'metadata', 'state']
  assert len(result) == 3
  # Attribute and key access.
  assert result.state == {'layer0': {'bias': 0, 'weight': 1}}
  assert result['state'] == {'layer0': {'bias': 0, 'weight': 1}}
  assert result.metadata == {'version': 1.0}
  assert result['metadata'] == {'version': 1.0}
  assert result.dataset == {'my_data': 2}
  assert result['dataset'] == {'my_data': 2}
  assert 'state' in result and 'other' not in result
  # Exact types as printed: ints stay ints, the JSON float stays a float.
  assert type(result.state['layer0']['bias']) is int
  assert type(result.state['layer0']['weight']) is int
  assert type(result.metadata['version']) is float
  assert type(result.dataset['my_data']) is int
  _check_composite_repr(
      result,
      "{'dataset': {'my_data': 2}, 'metadata': {'version': 1.0}, "
      "'state': {'layer0': {'bias': 0, 'weight': 1}}}")


def test_seed000_composite_attribute_access_to_missing_item_raises(composite_checkpoint):
  checkpointer, path = composite_checkpoint
  result = checkpointer.restore(path, ocp.args.Composite(state=ocp.args.StandardRestore()))
  with pytest.raises(AttributeError):
    result.metadata  # noqa: B018
  with pytest.raises(KeyError):
    result['metadata']  # noqa: B018


def test_seed000_composite_restore_subset(composite_checkpoint):
  checkpointer, path = composite_checkpoint

  result = checkpointer.restore(
      path,
      ocp.args.Composite(
          state=ocp.args.StandardRestore(),
      )
  )

  assert isinstance(result, ocp.args.Composite)
  assert list(result) == ['state']
  assert result.state == {'layer0': {'bias': 0, 'weight': 1}}
  assert result['state'] == {'layer0': {'bias': 0, 'weight': 1}}
  assert type(result.state['layer0']['bias']) is int
  _check_composite_repr(result, "{'state': {'layer0': {'bias': 0, 'weight': 1}}}")


def test_seed000_composite_restore_subset_with_target(composite_checkpoint):
  checkpointer, path = composite_checkpoint
  state = {'layer0': {'bias': 0, 'weight': 1}}

  result = checkpointer.restore(
      path,
      ocp.args.Composite(
          state=ocp.args.StandardRestore(state),
      )
  )

  assert isinstance(result, ocp.args.Composite)
  assert list(result) == ['state']
  assert result.state == {'layer0': {'bias': 0, 'weight': 1}}
  assert type(result.state['layer0']['weight']) is int
  _check_composite_repr(result, "{'state': {'layer0': {'bias': 0, 'weight': 1}}}")


def test_seed000_composite_restore_with_args_keyword(composite_checkpoint):
  # Same call as the seed's, with the ``args=`` keyword Orbax also accepts.
  checkpointer, path = composite_checkpoint
  result = checkpointer.restore(
      path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore(),
                                    dataset=ocp.args.JsonRestore()))
  assert sorted(result) == ['dataset', 'metadata']
  assert result.metadata == {'version': 1.0}
  assert result.dataset == {'my_data': 2}


def test_seed000_checkpointer_constructions(tmp_path):
  ckptr = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  assert isinstance(ckptr, ocp.Checkpointer)
  ckptr.save(tmp_path / 'json', args=ocp.args.JsonSave({'version': 1.0, 'step': 0}))
  assert ckptr.restore(tmp_path / 'json') == {'version': 1.0, 'step': 0}

  ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
  assert isinstance(ckptr, ocp.AsyncCheckpointer)
  ckptr.save(tmp_path / 'std', args=ocp.args.StandardSave({'layer0': {'bias': 0, 'weight': 1}}))
  ckptr.wait_until_finished()
  assert ckptr.restore(tmp_path / 'std') == {'layer0': {'bias': 0, 'weight': 1}}
  ckptr.close()


def test_seed000_standard_checkpointer_shorthand(tmp_path):
  # "StandardCheckpointer, which is just Checkpointer(StandardCheckpointHandler())".
  ckptr = ocp.StandardCheckpointer()
  assert isinstance(ckptr, ocp.Checkpointer)
  state = {'layer0': {'bias': 0, 'weight': 1}}
  ckptr.save(tmp_path / 'std', args=ocp.args.StandardSave(state))
  assert ckptr.restore(tmp_path / 'std') == state
  assert ckptr.restore(tmp_path / 'std', args=ocp.args.StandardRestore(state)) == state


# ==================================================================================================
# Seed 002: PyTree handlers
# ==================================================================================================


def _seed002_sharding():
  return jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('model',)),
      jax.sharding.PartitionSpec(
          'model',
      ),
  )


def _seed002_state():
  sharding = _seed002_sharding()
  create_sharded_array = lambda x: jax.device_put(x, sharding)
  state = {
      'a': np.arange(16),
      'b': np.ones(16),
  }
  return jax.tree_util.tree_map(create_sharded_array, state)


@pytest.fixture(scope='module')
def basic(tmp_path_factory):
  """Seed 002's first save: (ckptr, path, state, abstract_state)."""
  state = _seed002_state()
  abstract_state = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  path = ocp.test_utils.erase_and_create_empty(tmp_path_factory.mktemp('seed002') / 'basic/')
  # Make sure to use async for improved performance!
  ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
  ckptr.save(path / '1', args=ocp.args.StandardSave(state))
  ckptr.wait_until_finished()
  assert os.path.isdir(path / '1')
  return ckptr, path, state, abstract_state


def test_seed002_state_setup():
  state = _seed002_state()
  assert len(jax.devices()) == 8
  assert state['a'].dtype == np.int32 and state['b'].dtype == np.float32
  assert state['a'].sharding == _seed002_sharding()
  abstract_state = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  assert isinstance(abstract_state['a'], jax.ShapeDtypeStruct)
  assert abstract_state['a'].shape == (16,) and abstract_state['a'].dtype == np.int32
  assert abstract_state['a'].sharding == _seed002_sharding()


def test_seed002_restore_with_abstract_state(basic):
  ckptr, path, _, abstract_state = basic
  restored = ckptr.restore(path / '1', args=ocp.args.StandardRestore(abstract_state))
  assert sorted(restored) == ['a', 'b']
  assert isinstance(restored['a'], jax.Array) and isinstance(restored['b'], jax.Array)
  _assert_array(restored['a'], np.arange(16), np.int32)
  _assert_array(restored['b'], np.ones(16), np.float32)
  assert restored['a'].sharding == _seed002_sharding()
  assert restored['b'].sharding == _seed002_sharding()


def test_seed002_restore_with_concrete_state(basic):
  ckptr, path, state, _ = basic
  restored = ckptr.restore(path / '1', args=ocp.args.StandardRestore(state))
  assert isinstance(restored['a'], jax.Array) and isinstance(restored['b'], jax.Array)
  _assert_array(restored['a'], np.arange(16), np.int32)
  _assert_array(restored['b'], np.ones(16), np.float32)
  assert restored['a'].sharding == state['a'].sharding
  assert restored['b'].sharding == state['b'].sharding


def test_seed002_restore_cast_dtype(basic):
  ckptr, path, _, abstract_state = basic

  def set_restore_dtype(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return x.update(dtype=np.int16)  # The seed's `x.dtype = np.int16`.

  cast_dtype_abstract_state = jax.tree_util.tree_map(set_restore_dtype, abstract_state)
  restored = ckptr.restore(
      path / '1',
      args=ocp.args.StandardRestore(cast_dtype_abstract_state),
  )
  assert isinstance(restored['a'], jax.Array) and isinstance(restored['b'], jax.Array)
  _assert_array(restored['a'], np.arange(16), np.int16)
  _assert_array(restored['b'], np.ones(16), np.int16)
  assert restored['a'].sharding == _seed002_sharding()


def _different_shape_abstract_state(abstract_state):
  return {
      'a': jax.ShapeDtypeStruct(
          shape=(8,),
          dtype=abstract_state['a'].dtype,
          sharding=abstract_state['a'].sharding
      ),
      'b': jax.ShapeDtypeStruct(
          shape=(32,),
          dtype=abstract_state['b'].dtype,
          sharding=abstract_state['b'].sharding
      ),
  }


def test_seed002_different_shape_target_raises(basic):
  ckptr, path, _, abstract_state = basic
  different_shape_abstract_state = _different_shape_abstract_state(abstract_state)
  with pytest.raises(ValueError) as info:
    ckptr.restore(
        path / '1',
        args=ocp.args.StandardRestore(different_shape_abstract_state),
    )
  message = str(info.value)
  names_a = "'a'" in message and '(16,)' in message and '(8,)' in message
  names_b = "'b'" in message and '(16,)' in message and '(32,)' in message
  assert names_a or names_b, message
  assert 'strict=False' in message


def test_seed002_one_different_shape_names_that_leaf(basic):
  ckptr, path, _, abstract_state = basic
  target = dict(abstract_state, b=_different_shape_abstract_state(abstract_state)['b'])
  with pytest.raises(ValueError) as info:
    ckptr.restore(path / '1', args=ocp.args.StandardRestore(target))
  message = str(info.value)
  assert "'b'" in message and '(16,)' in message and '(32,)' in message, message


def test_seed002_strict_false_pads_and_truncates(basic):
  ckptr, path, _, abstract_state = basic
  different_shape_abstract_state = _different_shape_abstract_state(abstract_state)
  restored = ckptr.restore(
      path / '1',
      args=ocp.args.StandardRestore(different_shape_abstract_state, strict=False),
  )
  assert isinstance(restored['a'], jax.Array) and isinstance(restored['b'], jax.Array)
  # Page: a = Array([0..7], int32); b = 16 ones then 16 zeros, float32.
  _assert_array(restored['a'], np.arange(8), np.int32)
  _assert_array(restored['b'], np.concatenate([np.ones(16), np.zeros(16)]), np.float32)
  assert restored['a'].shape == (8,) and restored['b'].shape == (32,)
  assert restored['a'].sharding == abstract_state['a'].sharding
  assert restored['b'].sharding == abstract_state['b'].sharding


def test_seed002_restore_without_target_keeps_saved_sharding(basic):
  ckptr, path, _, _ = basic
  restored = ckptr.restore(path / '1')
  assert isinstance(restored['a'], jax.Array) and isinstance(restored['b'], jax.Array)
  assert restored['a'].sharding == _seed002_sharding()
  assert restored['b'].sharding == _seed002_sharding()
  _assert_array(restored['a'], np.arange(16), np.int32)
  _assert_array(restored['b'], np.ones(16), np.float32)


def test_seed002_change_sharding_on_restore(basic):
  ckptr, path, _, abstract_state = basic
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('x',)),
      jax.sharding.PartitionSpec(),
  )

  def set_sharding(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return x.update(sharding=sharding)  # The seed's `x.sharding = sharding`.

  change_sharding_abstract_state = jax.tree_util.tree_map(set_sharding, abstract_state)
  restored = ckptr.restore(
      path / '1',
      args=ocp.args.StandardRestore(change_sharding_abstract_state),
  )
  assert restored['a'].sharding == sharding
  assert restored['b'].sharding == sharding
  assert restored['a'].sharding.mesh.axis_names == ('x',)
  assert restored['a'].sharding.spec == PartitionSpec()
  _assert_array(restored['a'], np.arange(16), np.int32)
  _assert_array(restored['b'], np.ones(16), np.float32)


@pytest.fixture(scope='module')
def advanced(tmp_path_factory):
  """Seed 002's PyTreeCheckpointHandler saves '1' (plain) and '2' (a saved as int16)."""
  state = _seed002_state()
  path = ocp.test_utils.erase_and_create_empty(tmp_path_factory.mktemp('seed002') / 'advanced/')
  # Make sure to use async for improved performance!
  ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
  ckptr.save(path / '1', args=ocp.args.PyTreeSave(state))
  ckptr.wait_until_finished()
  ckptr.save(
      path / '2',
      args=ocp.args.PyTreeSave(
          state,
          save_args={
              # We must set one ocp.SaveArgs per leaf.
              'a': ocp.SaveArgs(dtype=np.dtype(np.int16)),
              'b': ocp.SaveArgs()
          }
      ),
  )
  ckptr.wait_until_finished()
  return ckptr, path


def test_seed002_pytree_handler_save_and_restore(advanced):
  ckptr, path = advanced
  restored = ckptr.restore(path / '1')
  assert restored['a'].dtype == np.int32
  assert restored['b'].dtype == np.float32
  _assert_array(restored['a'], np.arange(16), np.int32)
  _assert_array(restored['b'], np.ones(16), np.float32)
  assert isinstance(restored['a'], jax.Array)
  assert restored['a'].sharding == _seed002_sharding()


def test_seed002_pytree_handler_save_args_dtype(advanced):
  ckptr, path = advanced
  restored = ckptr.restore(path / '2')
  assert restored['a'].dtype == np.int16
  assert restored['b'].dtype == np.float32
  _assert_array(restored['a'], np.arange(16), np.int16)
  _assert_array(restored['b'], np.ones(16), np.float32)


def test_seed002_pytree_restore_args(advanced):
  ckptr, path = advanced
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('x',)),
      jax.sharding.PartitionSpec(),
  )
  restored = ckptr.restore(
      path / '2',
      args=ocp.args.PyTreeRestore(
          restore_args={
              # RestoreArgs is the parent class for ArrayRestoreArgs.
              # We must set one RestoreArgs per leaf.
              'a': ocp.RestoreArgs(restore_type=np.ndarray),
              'b': ocp.ArrayRestoreArgs(dtype=np.dtype(np.int16), sharding=sharding)
          }
      ),
  )
  assert sorted(restored) == ['a', 'b']
  # "Note that "a" was restored as np.ndarray rather than jax.Array."
  assert type(restored['a']) is np.ndarray
  _assert_array(restored['a'], np.arange(16), np.int16)
  assert isinstance(restored['b'], jax.Array)
  _assert_array(restored['b'], np.ones(16), np.int16)
  assert restored['b'].sharding == sharding


def test_seed002_transforms_rename_and_add_keys(advanced):
  ckptr, path = advanced
  restored = ckptr.restore(
      path / '2',
      args=ocp.args.PyTreeRestore(
          # `item` serves as a guide to what the result tree structure should look
          # like.
          item={
              # Value doesn't really matter here, as long as it's not None.
              'c': ...,
              # Can add in extra keys.
              'd': np.arange(8)
          },
          # `restore_args` must be relative to the result tree, not the
          # checkpoint.
          restore_args={
              'c': ocp.RestoreArgs(restore_type=np.ndarray),
          },
          transforms={
              'c': ocp.Transform(original_key='a')
          },
      ),
  )
  # Page: {'c': array([0..15], dtype=int16), 'd': array([0..7])}
  assert sorted(restored) == ['c', 'd']
  assert type(restored['c']) is np.ndarray
  _assert_array(restored['c'], np.arange(16), np.int16)
  assert type(restored['d']) is np.ndarray
  _assert_array(restored['d'], np.arange(8), np.arange(8).dtype)


# ==================================================================================================
# Seed 001: Flax save and load guide (Checkpointer parts)
# ==================================================================================================


@pytest.fixture(scope='module')
def flax_setup():
  """The guide's objects: model, ckpt, target, custom_state, custom_target."""
  return seed001.guide_objects()


@pytest.fixture(scope='module')
def single_save(flax_setup, tmp_path_factory):
  """``orbax_checkpointer.save('.../orbax/single_save', ckpt, save_args=save_args)``."""
  ckpt = flax_setup['ckpt']
  path = tmp_path_factory.mktemp('flax_ckpt') / 'orbax' / 'single_save'
  orbax_checkpointer = ocp.PyTreeCheckpointer()
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), ckpt)
  orbax_checkpointer.save(path, ckpt, save_args=save_args)
  return orbax_checkpointer, path


def test_seed001_ckpt_setup(flax_setup):
  state = flax_setup['state']
  assert state.step == 1
  np.testing.assert_allclose(np.asarray(state.params['bias']), np.full(3, -0.001), rtol=1e-6)
  assert state.opt_state == (optax.EmptyState(), optax.EmptyState())


def test_seed001_raw_restore(single_save, flax_setup):
  orbax_checkpointer, path = single_save
  raw_restored = orbax_checkpointer.restore(path)

  # {'config': {'dimensions': array([5, 3])},
  #  'data': [array([...], dtype=float32)],
  #  'model': {'opt_state': [None, None],
  #   'params': {'bias': array([-0.001, -0.001, -0.001], dtype=float32), 'kernel': array(...)},
  #   'step': 1}}
  assert type(raw_restored) is dict
  assert sorted(raw_restored) == ['config', 'data', 'model']

  assert type(raw_restored['config']) is dict
  assert sorted(raw_restored['config']) == ['dimensions']
  assert type(raw_restored['config']['dimensions']) is np.ndarray
  _assert_array(raw_restored['config']['dimensions'], np.array([5, 3]), np.array([5, 3]).dtype)

  assert type(raw_restored['data']) is list and len(raw_restored['data']) == 1
  _assert_array(raw_restored['data'][0], np.asarray(flax_setup['x1']), np.float32)

  model = raw_restored['model']
  assert type(model) is dict
  assert sorted(model) == ['opt_state', 'params', 'step']
  assert model['opt_state'] == [None, None]
  assert type(model['opt_state']) is list
  assert model['step'] == 1
  assert type(model['step']) is int
  assert type(model['params']) is dict
  seed001.check_params(model['params'], flax_setup['state'])


def test_seed001_raw_restore_key_order_as_printed(single_save):
  # The page prints the raw tree with every dict's keys in sorted order (as Orbax builds it),
  # although the saved tree was {'model', 'config', 'data'} and TrainState's fields are
  # (step, ..., params, ..., opt_state).
  orbax_checkpointer, path = single_save
  raw_restored = orbax_checkpointer.restore(path)
  assert list(raw_restored) == ['config', 'data', 'model']
  assert list(raw_restored['model']) == ['opt_state', 'params', 'step']
  assert list(raw_restored['model']['params']) == ['bias', 'kernel']


def test_seed001_restore_with_target(single_save, flax_setup):
  orbax_checkpointer, path = single_save
  target = flax_setup['target']
  state_restored = orbax_checkpointer.restore(path, item=target)

  assert type(state_restored) is dict
  assert sorted(state_restored) == ['config', 'data', 'model']
  seed001.check_train_state(state_restored['model'], flax_setup)
  _assert_array(state_restored['config']['dimensions'], np.array([5, 3]),
                np.array([5, 3]).dtype)
  assert type(state_restored['data']) is list and len(state_restored['data']) == 1
  _assert_array(state_restored['data'][0], np.asarray(flax_setup['x1']), np.float32)
  # The target is not modified.
  np.testing.assert_array_equal(target['config']['dimensions'], [0, 0])
  np.testing.assert_array_equal(target['model'].params['bias'], np.zeros(3))


def test_seed001_restore_with_target_positional_item(single_save, flax_setup):
  # ``restore(path, item)``: the older positional spelling of the same call.
  orbax_checkpointer, path = single_save
  state_restored = orbax_checkpointer.restore(path, flax_setup['target'])
  seed001.check_train_state(state_restored['model'], flax_setup)


def test_seed001_async_checkpointer(flax_setup, tmp_path):
  ckpt, target = flax_setup['ckpt'], flax_setup['target']
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), ckpt)
  path = tmp_path / 'orbax' / 'single_save_async'

  async_checkpointer = ocp.AsyncCheckpointer(
      ocp.PyTreeCheckpointHandler(), timeout_secs=50)

  # Save your job:
  async_checkpointer.save(path, ckpt, save_args=save_args)
  # ... Until a time when you want to wait until the save completes:
  async_checkpointer.wait_until_finished()  # Blocks until the checkpoint saving is completed.
  assert os.path.isdir(path)
  restored = async_checkpointer.restore(path, item=target)

  assert sorted(restored) == ['config', 'data', 'model']
  seed001.check_train_state(restored['model'], flax_setup)
  _assert_array(restored['config']['dimensions'], np.array([5, 3]), np.array([5, 3]).dtype)
  _assert_array(restored['data'][0], np.asarray(flax_setup['x1']), np.float32)
  async_checkpointer.close()


def test_seed001_scenario1_reference_is_partial(flax_setup, tmp_path):
  # A CustomTrainState checkpoint (with batch_stats) read into a plain TrainState target.
  custom_ckpt, target = flax_setup['custom_ckpt'], flax_setup['target']
  path = tmp_path / 'custom'
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(path, custom_ckpt, save_args=jax.tree.map(lambda _: ocp.SaveArgs(), custom_ckpt))

  restored = ckptr.restore(path, item=target)

  assert not hasattr(restored, 'batch_stats')
  assert type(restored['model']) == train_state.TrainState  # noqa: E721
  assert not hasattr(restored['model'], 'batch_stats')
  # custom_state was freshly created: the page shows step=0.
  seed001.check_train_state(restored['model'], flax_setup, step=0)
  _assert_array(restored['config']['dimensions'], np.array([5, 3]), np.array([5, 3]).dtype)
  _assert_array(restored['data'][0], np.asarray(flax_setup['x1']), np.float32)


def test_seed001_scenario2_checkpoint_is_partial_raises_key_error(single_save, flax_setup):
  orbax_checkpointer, path = single_save
  with pytest.raises(KeyError) as info:
    orbax_checkpointer.restore(path, item=flax_setup['custom_target'])
  assert 'batch_stats' in str(info.value)


def test_seed001_scenario2_transforms_fill_from_target(single_save, flax_setup):
  orbax_checkpointer, path = single_save
  custom_target = flax_setup['custom_target']

  # Step 4 is an original `TrainState`, without the `batch_stats`
  custom_restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding) if isinstance(x, jax.Array)
      else ocp.RestoreArgs(), custom_target)
  restored = orbax_checkpointer.restore(path, item=custom_target,
                                        transforms={}, restore_args=custom_restore_args)

  assert type(restored['model']) == CustomTrainState  # noqa: E721
  np.testing.assert_equal(restored['model'].batch_stats,
                          custom_target['model'].batch_stats)
  # Page: 'config': None, 'data': [Array(...)], model CustomTrainState(step=1, params=Arrays,
  # batch_stats=array([0..9])).
  assert sorted(restored) == ['config', 'data', 'model']
  assert restored['config'] is None
  seed001.check_train_state(restored['model'], flax_setup, cls=CustomTrainState, step=1)
  _assert_array(restored['model'].batch_stats, np.arange(10), np.arange(10).dtype)
  for name in ('bias', 'kernel'):
    leaf = restored['model'].params[name]
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding == custom_target['model'].params[name].sharding
  data = restored['data']
  assert type(data) is list and len(data) == 1
  assert isinstance(data[0], jax.Array)
  assert data[0].sharding == custom_target['data'][0].sharding
  _assert_array(data[0], np.asarray(flax_setup['x1']), np.float32)


def test_seed001_multi_host_restore_with_reference_sharding(tmp_path):
  # Create an array sharded across multiple devices.
  mesh_shape = (4, 2)
  devices = np.asarray(jax.devices()).reshape(*mesh_shape)
  mesh = jax.sharding.Mesh(devices, ('x', 'y'))

  mp_array = jax.device_put(np.arange(8 * 2).reshape(8, 2),
                            NamedSharding(mesh, PartitionSpec('x', 'y')))

  # Make it a pytree.
  mp_ckpt = {'model': mp_array}
  path = tmp_path / 'mp'
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(path, mp_ckpt)

  # The reference doesn't need to be as large as your checkpoint!
  # Just make sure it has the `.sharding` you want.
  mp_smaller = jax.device_put(np.arange(8).reshape(4, 2),
                              NamedSharding(mesh, PartitionSpec('x', 'y')))
  ref_ckpt = {'model': mp_smaller}

  restore_args = {'model': ocp.ArrayRestoreArgs(sharding=mp_smaller.sharding)}
  restored = ckptr.restore(path, item=ref_ckpt, restore_args=restore_args)

  assert sorted(restored) == ['model']
  assert isinstance(restored['model'], jax.Array)
  # Page: Array([[0, 1], ..., [14, 15]], dtype=int32)
  _assert_array(restored['model'], np.arange(16).reshape(8, 2), np.int32)
  assert restored['model'].shape == (8, 2)
  assert restored['model'].sharding == mp_smaller.sharding
