"""ocp.test_utils: the helpers projects import in their tests, beside Orbax's."""

from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as orbax
import orbax.checkpoint.test_utils as orbax_test_utils
import pytest
from absl.testing import absltest

import flaxckpt as ocp


def test_setup_pytree_and_sharded_pytree_match_orbax():
  for add in (0, 3):
    ours, theirs = ocp.test_utils.setup_pytree(add), orbax_test_utils.setup_pytree(add)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  ours, meshes, specs = ocp.test_utils.setup_sharded_pytree()
  theirs, their_meshes, their_specs = orbax_test_utils.setup_sharded_pytree()
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(a, b)
  assert jax.tree.leaves(specs) == jax.tree.leaves(their_specs)


def test_create_sharded_array_and_apply_function(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('x', 'y'))
  spec = jax.sharding.PartitionSpec('x', 'y')
  value = np.arange(32.0).reshape(8, 4)
  ours = ocp.test_utils.create_sharded_array(value, mesh, spec)
  theirs = orbax_test_utils.create_sharded_array(value, mesh, spec)
  assert ours.sharding == theirs.sharding and len(ours.addressable_shards) == 8
  np.testing.assert_array_equal(ours, value)
  assert ocp.test_utils.create_sharded_array(3, mesh, jax.sharding.PartitionSpec()).shape == ()
  doubled = ocp.test_utils.apply_function({'a': ours}, lambda x: x * 2)
  np.testing.assert_array_equal(doubled['a'], value * 2)
  assert doubled['a'].sharding.is_equivalent_to(ours.sharding, 2)
  # A sharded tree saved by us restores through Orbax equal to the original.
  tree, _, _ = ocp.test_utils.setup_sharded_pytree()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', tree)
  restored = orbax.StandardCheckpointer().restore(
      tmp_path / 'ckpt', jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
  ocp.test_utils.assert_tree_equal(None, tree, restored)


class _Case(absltest.TestCase):  # Orbax's helpers need absl's assertSameElements.
  def runTest(self):  # noqa: N802 (unittest's name)
    pass


def test_assert_tree_equal_with_a_test_case_and_with_none():
  tree = ocp.test_utils.setup_pytree()
  case = _Case()
  ocp.test_utils.assert_tree_equal(case, tree, ocp.test_utils.setup_pytree())
  orbax_test_utils.assert_tree_equal(case, tree, ocp.test_utils.setup_pytree())
  for bad in (ocp.test_utils.setup_pytree(1), {**tree, 'extra': np.ones(1)},
              jax.tree.map(lambda x: x.astype(np.float32), tree)):
    with pytest.raises(AssertionError):
      ocp.test_utils.assert_tree_equal(case, tree, bad)
    with pytest.raises(AssertionError):
      ocp.test_utils.assert_tree_equal(None, tree, bad)
  with pytest.raises(AssertionError, match="missing \\[\\('b',\\)\\]"):
    ocp.test_utils.assert_tree_equal(None, {'a': 1, 'b': 2}, {'a': 1})
  key = jax.random.key(0)
  ocp.test_utils.assert_tree_equal(None, {'k': key}, {'k': jax.random.key(0)})
  with pytest.raises(AssertionError):
    ocp.test_utils.assert_tree_equal(None, {'k': key}, {'k': jax.random.key(1)})
  ocp.test_utils.assert_tree_same_structure(case, tree, ocp.test_utils.setup_pytree(2))


def test_create_tmp_directory_and_directory_helpers(tmp_path, caplog):
  final = tmp_path / '5'
  tmp = tmp_path / ('5' + ocp.utils.TMP_DIR_SUFFIX)
  created = ocp.test_utils.create_tmp_directory(tmp, final, metadata_store=object(),
                                                path_permission_mode=0o750)
  assert created == tmp and tmp.is_dir() and (tmp.stat().st_mode & 0o777) == 0o750
  assert (tmp / '_CHECKPOINT_METADATA').is_file()
  (tmp / 'junk').write_text('x')
  ocp.test_utils.create_tmp_directory(tmp, final)  # An unfinished one is replaced.
  assert list(tmp.iterdir()) == []
  final.mkdir()
  with pytest.raises(FileExistsError, match='finalized'):
    ocp.test_utils.create_tmp_directory(final, final)
  with caplog.at_level(logging.INFO, logger='flaxckpt'):
    ocp.test_utils.print_directory(tmp_path)
  assert any(tmp.name in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match='does not exist'):
    ocp.test_utils.print_directory(tmp_path / 'nowhere')
  assert ocp.test_utils.empty_directory(tmp_path) and list(tmp_path.iterdir()) == []
  path = ocp.test_utils.erase_and_create_empty(tmp_path / 'fresh')
  assert path.is_dir() and list(path.iterdir()) == []


def test_ocdbt_checkpoint_context_restores_the_handlers(tmp_path):
  before = ocp.type_handlers.get_type_handler(np.ndarray)
  with ocp.test_utils.ocdbt_checkpoint_context(True, ocp.type_handlers.get_ts_context()):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp_path / 'ckpt', {'a': np.arange(3)})
  assert ocp.type_handlers.get_type_handler(np.ndarray) is before
  assert ocp.type_handlers.is_ocdbt_checkpoint(tmp_path / 'ckpt')
  restored = orbax.StandardCheckpointer().restore(tmp_path / 'ckpt')
  np.testing.assert_array_equal(restored['a'], np.arange(3))
