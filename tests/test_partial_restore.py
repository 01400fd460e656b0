"""Partial restore, as public projects use it: just the ``params`` of a flax TrainState
checkpoint (``PLACEHOLDER`` leaves or ``partial_restore=True``), ``multi_value_fn``
transforms and ``legacy_transform_fn``; each checked against the real Orbax on the same calls and
the same files, in both directions."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as orbax
import pytest
from etils import epath
from flax.training import train_state

import flaxckpt as ocp

LIBS = {'flaxckpt': ocp, 'orbax': orbax}
pytestmark = pytest.mark.filterwarnings(
    'ignore:Sharding info not provided when restoring:UserWarning')


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def _state() -> train_state.TrainState:
  model = _Mlp()
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
  return state.replace(step=7)


def _save(lib: str, path, state) -> None:
  with LIBS[lib].PyTreeCheckpointer() as ckptr:
    ckptr.save(path, args=LIBS[lib].args.PyTreeSave(state))


def _restore(lib: str, path, **kwargs):
  with LIBS[lib].PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=LIBS[lib].args.PyTreeRestore(**kwargs))


def _assert_trees_equal(a, b) -> None:
  """Same structure and values (Orbax restores jax arrays where a numpy target gets numpy from
  flaxckpt: the leaf types are not what these tests compare)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('writer', LIBS)
@pytest.mark.parametrize('reader', LIBS)
def test_params_only_with_placeholders(tmp_path, writer, reader):
  """MaxText/simply style: the metadata tree, every leaf but ``params`` a PLACEHOLDER."""
  state = _state()
  path = epath.Path(tmp_path / 'ckpt')
  _save(writer, path, state)
  meta = LIBS[reader].PyTreeCheckpointHandler().metadata(path).tree

  def pick(keypath, m):
    if jax.tree_util.keystr(keypath).startswith("['params']"):
      return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(
          jax.devices()[0]))
    return LIBS[reader].PLACEHOLDER

  target = jax.tree_util.tree_map_with_path(pick, meta)
  restored = _restore(reader, path, item=target,
                      restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                      if reader == 'flaxckpt' else
                      orbax.checkpoint_utils.construct_restore_args(target))
  assert restored['step'] is ocp.PLACEHOLDER and restored['step'] is orbax.PLACEHOLDER
  assert all(leaf is ocp.PLACEHOLDER for leaf in jax.tree.leaves(restored['opt_state']))
  _assert_trees_equal(restored['params'], jax.tree.map(jnp.asarray, state.params))


@pytest.mark.parametrize('writer', LIBS)
def test_params_only_with_partial_restore_agrees_with_orbax(tmp_path, writer):
  state = _state()
  path = epath.Path(tmp_path / 'ckpt')
  _save(writer, path, state)
  target = {'params': jax.tree.map(np.zeros_like, state.params)}
  ours = _restore('flaxckpt', path, item=target, partial_restore=True)
  theirs = _restore('orbax', path, item=target, partial_restore=True)
  _assert_trees_equal(ours, theirs)
  assert set(ours) == {'params'}
  _assert_trees_equal(ours['params'], jax.tree.map(np.asarray, state.params))


def test_partial_restore_keeps_target_values_for_keys_the_checkpoint_lacks(tmp_path):
  path = epath.Path(tmp_path / 'ckpt')
  _save('flaxckpt', path, {'a': np.arange(3), 'b': {'c': np.ones(2), 'd': 4}})
  target = {'b': {'d': 0, 'new': np.full(2, 9)}, 'extra': np.zeros(1)}
  ours = _restore('flaxckpt', path, item=target, partial_restore=True)
  theirs = _restore('orbax', path, item=target, partial_restore=True)
  _assert_trees_equal(ours, theirs)
  assert ours['b']['d'] == 4 and ours['b']['new'].tolist() == [9, 9]
  # Without partial_restore a key the checkpoint lacks is an error that says what to do.
  with pytest.raises(KeyError, match=r"\['b/new', 'extra'\].*transforms=\{\}"):
    _restore('flaxckpt', path, item=target)


@pytest.mark.parametrize('writer', LIBS)
def test_placeholder_leaves_agree_with_orbax(tmp_path, writer):
  tree = {'params': {'w': np.arange(3.0), 'b': np.ones(2)}, 'opt': {'mu': np.zeros(3), 'n': 4},
          'step': 5}
  path = epath.Path(tmp_path / 'ckpt')
  _save(writer, path, tree)
  target = {'params': {'w': np.zeros(3), 'b': np.zeros(2)},
            'opt': {'mu': ocp.PLACEHOLDER, 'n': 0}, 'step': ocp.PLACEHOLDER}
  ours, theirs = _restore('flaxckpt', path, item=target), _restore('orbax', path, item=target)
  _assert_trees_equal(ours, theirs)
  assert ours['opt']['mu'] is ocp.PLACEHOLDER and ours['opt']['n'] == 4


def test_placeholder_in_restore_args_and_for_a_whole_subtree(tmp_path):
  path = epath.Path(tmp_path / 'ckpt')
  _save('flaxckpt', path, {'params': {'w': np.arange(3.0)}, 'opt': {'mu': np.zeros(3), 'n': 4}})
  restored = _restore('flaxckpt', path, restore_args={
      'params': {'w': ocp.RestoreArgs(restore_type=np.ndarray)},
      'opt': {'mu': ocp.PLACEHOLDER, 'n': ocp.RestoreArgs()}})
  assert restored['opt'] == {'mu': ocp.PLACEHOLDER, 'n': 4}
  np.testing.assert_array_equal(restored['params']['w'], np.arange(3.0))
  # A PLACEHOLDER may stand for a whole subtree (Orbax insists on one per leaf).
  subtree = _restore('flaxckpt', path, item={'params': {'w': np.zeros(3)}, 'opt': ocp.PLACEHOLDER})
  assert subtree['opt'] is ocp.PLACEHOLDER
  np.testing.assert_array_equal(subtree['params']['w'], np.arange(3.0))


def test_placeholder_with_transforms_only_shapes_the_result(tmp_path):
  """With transforms a target leaf's value does not matter (the seed's ``'c': ...``)."""
  path = epath.Path(tmp_path / 'ckpt')
  _save('flaxckpt', path, {'a': np.arange(3), 'b': np.ones(2)})
  ours, theirs = (_restore(name, path, item={'c': ..., 'd': np.arange(8)},
                           restore_args={'c': lib.RestoreArgs(restore_type=np.ndarray),
                                         'd': lib.RestoreArgs()},
                           transforms={'c': lib.Transform(original_key='a')})
                  for name, lib in LIBS.items())
  _assert_trees_equal(ours, theirs)
  np.testing.assert_array_equal(ours['c'], np.arange(3))


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('writer', LIBS)
def test_multi_value_fn_agrees_with_orbax(tmp_path, writer):
  tree = {'layers': {'0': {'w': np.arange(4.0)}, '1': {'w': np.ones(4)}}, 'scale': 2.0}
  path = epath.Path(tmp_path / 'ckpt')
  _save(writer, path, tree)
  results = {}
  for name, lib in LIBS.items():
    stacked = lib.RestoreTransform(
        multi_value_fn=lambda key, t, args: np.stack(
            [t['layers']['0']['w'], t['layers']['1']['w']]) * t['scale'],
        multi_value_fn_input_args={r'layers/\d/w': lib.RestoreArgs(restore_type=np.ndarray),
                                   'scale': lib.RestoreArgs()})
    results[name] = _restore(name, path, item={'stacked': 0, 'scale': 0.0},
                             restore_args={'stacked': lib.RestoreArgs(),
                                           'scale': lib.RestoreArgs()},
                             transforms={'stacked': stacked})
  _assert_trees_equal(results['flaxckpt'], results['orbax'])
  np.testing.assert_array_equal(results['flaxckpt']['stacked'],
                                np.stack([np.arange(4.0), np.ones(4)]) * 2)


def test_multi_value_fn_sees_only_its_inputs(tmp_path):
  path = epath.Path(tmp_path / 'ckpt')
  _save('flaxckpt', path, {'a': np.arange(2), 'b': np.arange(3)})
  seen = {}

  def fn(key, tree, args):
    seen.update(key=key, tree=tree, args=args)
    return tree['a'] + 1

  restored = _restore('flaxckpt', path, item={'x': 0}, restore_args={'x': ocp.RestoreArgs()},
                      transforms={'x': ocp.RestoreTransform(
                          multi_value_fn=fn, multi_value_fn_input_args={'a': ocp.RestoreArgs()})})
  assert restored['x'].tolist() == [1, 2]
  assert seen['key'] == 'x' and seen['tree']['b'] is ocp.PLACEHOLDER
  assert isinstance(seen['args'], ocp.RestoreArgs)


def test_multi_value_fn_needs_a_restore_transform_with_inputs(tmp_path):
  path = epath.Path(tmp_path / 'ckpt')
  _save('flaxckpt', path, {'a': np.arange(2)})
  with pytest.raises(ValueError, match="'x': must use RestoreTransform"):
    _restore('flaxckpt', path, item={'x': 0},
             transforms={'x': ocp.Transform(multi_value_fn=lambda k, t: t['a'])})
  with pytest.raises(ValueError, match='multi_value_fn_input_args'):
    _restore('flaxckpt', path, item={'x': 0},
             transforms={'x': ocp.RestoreTransform(multi_value_fn=lambda k, t, a: t['a'])})
  with pytest.raises(ValueError, match='one of original_key'):
    ocp.Transform(original_key='a', use_fallback=True)


@pytest.mark.parametrize('writer', LIBS)
def test_legacy_transform_fn_agrees_with_orbax(tmp_path, writer):
  path = epath.Path(tmp_path / 'ckpt')
  _save(writer, path, {'old': {'w': np.arange(3.0)}, 'keep': np.ones(2)})

  def rename(item, structure, param_infos):
    del item
    return ({'new': structure['old'], 'keep': structure['keep']},
            {'new': param_infos['old'], 'keep': param_infos['keep']})

  results = {name: _restore(name, path, item={'new': {'w': 0}, 'keep': 0},
                            legacy_transform_fn=rename) for name in LIBS}
  _assert_trees_equal(results['flaxckpt'], results['orbax'])
  np.testing.assert_array_equal(results['flaxckpt']['new']['w'], np.arange(3.0))
  with pytest.raises(ValueError, match='both `transforms` and `legacy_transform_fn`'):
    _restore('flaxckpt', path, item={'keep': 0}, transforms={}, legacy_transform_fn=rename)


def test_restore_target_from_metadata(tmp_path):
  """The metadata object (mapped to abstract arrays) is a restore target as it is."""
  state = _state()
  path = epath.Path(tmp_path / 'ckpt')
  _save('flaxckpt', path, state)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, 'item_metadata', meta)  # StepMetadata once Checkpointer returns it.
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
    restored = ckptr.restore(path, abstract)
  restored = getattr(restored, 'tree', restored)
  _assert_trees_equal(restored['params'], jax.tree.map(np.asarray, state.params))
  assert not re.search('Metadata', type(restored).__name__)
