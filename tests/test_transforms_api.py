"""``ocp.transform_utils`` on in-memory trees: the same calls through Orbax give the same trees."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

_ORIGINAL = {'a': 1, 'b': {'c': 5, 'd': [0, 1, 2, 3]}, 'f': 2, 'b1': {'c': 2}, 'b2': {'c': 3}}
_NEW = {'a1': ..., 'b': {'c': ...}, 'c1': ..., 'x': ..., 'y': ..., 'z': ..., 'f': ..., 'g': 5,
        'x1': {'c': ...}, 'x2': {'c': ...}}


def _transformations(lib):
  return {
      'a1': lib.Transform(original_key='a'),
      'b': {'c': lib.Transform(multi_value_fn=lambda k, t: t['b']['c'] * 2)},
      'c1': lib.Transform(original_key='b/c', value_fn=lambda v: v + 100),
      'x': lib.Transform(multi_value_fn=lambda k, t: t['b']['d'][0]),
      'y': lib.Transform(multi_value_fn=lambda k, t: (k, t['b']['d'][1:])),
      'z': lib.Transform(multi_value_fn=lambda k, t: t['a'] * 2 + sum(t['b']['d'])),
      r'x(\d)/c': lib.Transform(original_key=r'b\1/c'),
  }


@pytest.mark.parametrize('default_to_original', [True, False])
def test_apply_transformations_agrees_with_orbax(default_to_original):
  ours = ocp.apply_transformations(_ORIGINAL, _transformations(ocp), _NEW, default_to_original)
  theirs = orbax.apply_transformations(_ORIGINAL, _transformations(orbax), _NEW,
                                       default_to_original)
  assert ours == theirs
  assert ours['b']['c'] == 10 and ours['c1'] == 105 and ours['y'] == ('y', [1, 2, 3])
  assert ours['x1'] == {'c': 2} and ours['g'] == 5
  assert ours['f'] == (2 if default_to_original else ...)


def test_apply_transformations_fallback_and_errors():
  transforms = {'f': ocp.Transform(use_fallback=True)}
  assert ocp.apply_transformations(_ORIGINAL, transforms, {'f': 7}) == {'f': 7}
  assert ocp.apply_transformations(_ORIGINAL, transforms, {'f': 7}, False) == {'f': 2}
  with pytest.raises(ValueError, match="'q'.*original key 'nope'"):
    ocp.apply_transformations(_ORIGINAL, {'q': ocp.Transform(original_key='nope')}, {'q': 0})
  assert ocp.apply_transformations(_ORIGINAL, {}, {}) == {}


def test_merge_and_intersect_trees_agree_with_orbax():
  a = {'x': 1, 'y': {'z': np.arange(2), 'w': 3}}
  b = {'y': {'w': 30, 'v': 4}, 'u': [5, 6]}
  for fn in ('merge_trees', 'intersect_trees'):
    ours = getattr(ocp.transform_utils, fn)(a, b)
    theirs = getattr(orbax.transform_utils, fn)(a, b)
    assert ours.keys() == theirs.keys()
    assert repr(ours) == repr(theirs)
  assert ocp.merge_trees(a, b)['y'] == {'z': a['y']['z'], 'w': 30, 'v': 4}
  assert ocp.transform_utils.intersect_trees(a, b) == {'y': {'w': 30}}
  target = {'y': {'w': 0}}
  assert ocp.transform_utils.intersect_trees(a, b, target=target) == {'y': {'w': 30}}


def test_transform_is_one_thing_and_placeholder_is_orbaxs():
  assert ocp.PLACEHOLDER is orbax.PLACEHOLDER is ocp.transform_utils.PLACEHOLDER
  assert ocp.transform_utils.Transform is ocp.Transform
  for kwargs in ({'original_key': 'a', 'use_fallback': True},
                 {'use_fallback': True, 'value_fn': abs},
                 {'original_key': 'a', 'multi_value_fn': max}):
    with pytest.raises(ValueError, match='A Transform takes one of'):
      ocp.Transform(**kwargs)
  with pytest.raises(ValueError, match='without a multi_value_fn'):
    ocp.RestoreTransform(multi_value_fn_input_args={'a': ocp.RestoreArgs()})


@pytest.mark.parametrize('default_to_original', [True, False])
def test_restore_transforms_default_to_original_agrees_with_orbax(tmp_path, default_to_original):
  """A result key no transform matches comes from the checkpoint, or (False) keeps its target
  value; both libraries restore the same tree from the same file."""
  saved = {'a': np.arange(3.0), 'b': np.full(2, 5.0), 'c': np.ones(4)}
  orbax.PyTreeCheckpointer().save(tmp_path / 'ckpt', saved)
  target = {'a': np.zeros(3), 'b': np.zeros(2), 'renamed': np.zeros(4)}
  results = []
  for lib in (ocp, orbax):
    args = lib.args.PyTreeRestore(
        target, restore_args=jax_free_restore_args(lib, target),
        transforms={'renamed': lib.Transform(original_key='c')},
        transforms_default_to_original=default_to_original)
    results.append(lib.PyTreeCheckpointer().restore(tmp_path / 'ckpt', args=args))
  ours, theirs = results
  assert sorted(ours) == sorted(theirs) == ['a', 'b', 'renamed']
  for key in ours:
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]))
  expected_a = saved['a'] if default_to_original else target['a']
  np.testing.assert_array_equal(np.asarray(ours['a']), expected_a)
  np.testing.assert_array_equal(np.asarray(ours['renamed']), saved['c'])


def jax_free_restore_args(lib, target):
  return {k: lib.RestoreArgs(restore_type=np.ndarray) for k in target}
