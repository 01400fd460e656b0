"""ocp.tree gives Orbax's results on the same calls (orbax.checkpoint.tree side by side)."""

from __future__ import annotations

import collections
import dataclasses
import json

import flax
import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp


@flax.struct.dataclass
class _State:
  step: int
  params: dict
  opt_state: tuple


Point = collections.namedtuple('Point', ['x', 'y'])


@dataclasses.dataclass
class _Unregistered:  # A leaf: jax does not know how to flatten it.
  value: int


TREES = {
    'nested_dicts': {'a': 1, 'b': {'c': np.arange(3), 'd': {'e': 2.0}}},
    'lists_and_tuples': {'layers': [{'w': 1}, {'w': 2}], 'pair': (3, [4, 5])},
    'empty_nodes': {'a': 1, 'b': {}, 'c': [], 'd': None, 'e': {'f': (), 'g': 2}},
    'flax_struct': _State(step=3, params={'dense': {'kernel': np.ones((2, 2))}},
                          opt_state=({'mu': 1.0}, Point(x=1, y={'z': 2}))),
    'int_keys': {1: 'one', 2: {3: 'three'}},
    'top_level_list': [1, [2, {'a': 3}]],
    'unregistered_leaf': {'a': _Unregistered(1)},
}


def _same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('name', TREES)
@pytest.mark.parametrize('kwargs', [{}, {'sep': '/'}, {'keep_empty_nodes': True},
                                    {'sep': '.', 'keep_empty_nodes': True}])
def test_to_flat_dict_matches_orbax(name, kwargs):
  ours = ocp.tree.to_flat_dict(TREES[name], **kwargs)
  theirs = orbax.tree.to_flat_dict(TREES[name], **kwargs)
  assert list(ours) == list(theirs)
  _same(list(ours.values()), list(theirs.values()))


@pytest.mark.parametrize('name', TREES)
@pytest.mark.parametrize('sep', [None, '/'])
def test_from_flat_dict_matches_orbax(name, sep):
  tree = TREES[name]
  flat = orbax.tree.to_flat_dict(tree, sep=sep)
  # With a target: the target's structure comes back (tuples, named tuples, flax structs).
  _same(ocp.tree.from_flat_dict(dict(flat), target=tree, sep=sep),
        orbax.tree.from_flat_dict(dict(flat), target=tree, sep=sep))
  _same(ocp.tree.from_flat_dict(dict(flat), target=tree, sep=sep), jax.tree.map(
      lambda x: x, tree))
  # Without: nested dicts keyed by the names.
  if name != 'empty_nodes' or sep is None:
    _same(ocp.tree.from_flat_dict(dict(flat), sep=sep),
          orbax.tree.from_flat_dict(dict(flat), sep=sep))


def test_from_flat_dict_inplace_empties_the_dict():
  flat = {('a',): 1, ('b', 'c'): 2}
  assert ocp.tree.from_flat_dict(flat, inplace=True) == {'a': 1, 'b': {'c': 2}}
  assert flat == {}
  assert ocp.tree.from_flat_dict({(): 5}) == orbax.tree.from_flat_dict({(): 5}) == 5


def test_from_flat_dict_names_the_missing_or_colliding_key():
  with pytest.raises(KeyError, match="'b', 'c'"):
    ocp.tree.from_flat_dict({('a',): 1}, target={'a': 0, 'b': {'c': 0}})
  with pytest.raises(ValueError, match="goes through 'a'"):
    ocp.tree.from_flat_dict({('a',): 1, ('a', 'b'): 2})


@pytest.mark.parametrize('name', TREES)
@pytest.mark.parametrize('keep_empty_nodes', [False, True])
def test_serialize_and_deserialize_tree_match_orbax(name, keep_empty_nodes):
  tree = TREES[name]
  ours = ocp.utils.serialize_tree(tree, keep_empty_nodes=keep_empty_nodes)
  theirs = orbax.utils.serialize_tree(tree, keep_empty_nodes=keep_empty_nodes)
  _same(ours, theirs)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  back = ocp.utils.deserialize_tree(ours, target=tree, keep_empty_nodes=keep_empty_nodes)
  _same(back, orbax.utils.deserialize_tree(theirs, tree, keep_empty_nodes=keep_empty_nodes))
  _same(back, tree)


def test_serialize_tree_of_nothing_is_refused_as_by_orbax():
  with pytest.raises(ValueError, match='empty flattened list'):
    ocp.tree.serialize_tree({'a': {}})
  with pytest.raises(ValueError, match='empty flattened list'):
    orbax.tree.serialize_tree({'a': {}})


@pytest.mark.parametrize('name', TREES)
@pytest.mark.parametrize('include_empty_nodes', [False, True])
def test_get_param_names_matches_orbax(name, include_empty_nodes):
  ours = ocp.tree.get_param_names(TREES[name], include_empty_nodes=include_empty_nodes)
  theirs = orbax.tree.get_param_names(TREES[name], include_empty_nodes=include_empty_nodes)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert jax.tree.leaves(ours) == jax.tree.leaves(theirs)


def test_param_names_are_the_names_of_the_saved_leaves(tmp_path):
  # What projects use get_param_names for: finding each leaf's entry in a checkpoint.
  state = {'params': {'dense': {'kernel': np.ones((2, 2)), 'bias': np.zeros(2)}}}
  ocp.PyTreeCheckpointer().save(tmp_path / 'ckpt', state)
  names = jax.tree.leaves(ocp.tree.get_param_names(state))
  assert names == ['params.dense.bias', 'params.dense.kernel']
  entries = json.loads((tmp_path / 'ckpt' / '_METADATA').read_text())['tree_metadata']
  saved = sorted('.'.join(str(k['key']) for k in entry['key_metadata'])
                 for entry in entries.values())
  assert saved == names
  # And Orbax restores by the same names.
  restored = orbax.PyTreeCheckpointer().restore(tmp_path / 'ckpt')
  assert jax.tree.leaves(orbax.tree.get_param_names(restored)) == names


@pytest.mark.parametrize('value', [1, None, {}, [], (), {'a': 1}, [None], np.ones(2),
                                   _Unregistered(1), Point(1, 2), Point((), {})])
def test_node_predicates_match_orbax(value):
  assert ocp.tree.is_empty_node(value) == orbax.utils.is_empty_node(value)
  assert ocp.tree.is_empty_or_leaf(value) == orbax.utils.is_empty_or_leaf(value)


def test_flat_dict_and_keypath_helpers_match_orbax():
  for tree in ({'a': 1, 'b': 2}, {'a': {'b': 1}}, {}, [1]):
    assert ocp.tree.is_flat_dict(tree) == orbax.tree.is_flat_dict(tree)
  path = (jax.tree_util.DictKey('a'), jax.tree_util.SequenceKey(0),
          jax.tree_util.GetAttrKey('w'), jax.tree_util.FlattenedIndexKey(2))
  assert ocp.tree.str_keypath(path) == orbax.tree.str_keypath(path) == ('a', '0', 'w', '2')
  assert ocp.utils.tuple_path_from_keypath(path) == orbax.utils.tuple_path_from_keypath(path)
  flat = jax.tree_util.tree_flatten_with_path(TREES['lists_and_tuples'])[0]
  assert (ocp.utils.from_flattened_with_keypath(flat)
          == orbax.utils.from_flattened_with_keypath(flat))
  with pytest.raises(ValueError, match='Unsupported KeyEntry'):
    ocp.tree.get_key_name('a')
