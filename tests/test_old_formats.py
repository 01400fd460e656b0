"""Checkpoints written by old Orbax and flax releases (tests/data/old-formats, four eras from
orbax 0.1.8 / flax 0.6.10 to orbax 0.10.2 / flax 0.10.2) restore exactly through the calls users
make: without a target, into a concrete target, into an abstract target, and with the older
``restore(path, item=..., restore_args=...)`` form. Manager directories: test_old_managers.py;
``_gda`` and old ``_sharding`` entries: test_old_gda_sharding.py.

The cases come from the fixtures' manifest, so every PyTree and flax case of every era runs.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt.legacy import checkpoints
import old_formats
from old_formats import DATA, state

pytestmark = pytest.mark.filterwarnings(
    'ignore:Sharding info not provided when restoring:UserWarning:orbax',
    'ignore:Couldn.t find sharding info under RestoreArgs:UserWarning')

def _cases(kind, exclude=()):
  return [pytest.param(case, id=case['path']) for case in old_formats.cases(kind)
          if case['case'] not in exclude]


@pytest.fixture
def copy_of(tmp_path):
  """A scratch copy of a case (restores never write into tests/data)."""
  return lambda case: old_formats.copy_case(case, tmp_path)


def _expected(case):
  return state.expected(case['state']['fn'], **case['state']['kw'])


def _assert_exact(expected, got, path='/'):
  """Same structure as ``expected`` (types of containers included) and leaves equal in dtype,
  shape and bytes."""
  assert jax.tree.structure(expected) == jax.tree.structure(got), path
  for (key, want), have in zip(jax.tree_util.tree_leaves_with_path(expected),
                               jax.tree.leaves(got)):
    where = jax.tree_util.keystr(key)
    if isinstance(want, str):
      assert have == want, where
      continue
    if isinstance(want, (int, float)) and not isinstance(want, np.generic):
      assert type(have) is type(want) and have == want, (where, have)
      continue
    want, have_np = np.asarray(want), np.asarray(have)
    assert (have_np.dtype, have_np.shape) == (want.dtype, want.shape), where
    assert have_np.tobytes() == want.tobytes(), where


def _as_jax(tree):
  return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic))
                      else x, tree)


def _target(case, kind):
  """The case's tree as a restore target: 'concrete' (jax arrays where the writer had them,
  numpy elsewhere) or 'abstract' (jax.ShapeDtypeStruct for every array)."""
  fn, kw = case['state']['fn'], case['state']['kw']
  if fn == 'make_train_state':
    tree = state.make_train_state(as_jax=True)
  elif fn in ('make_state', 'make_array_state'):
    tree = getattr(state, fn)(**kw, as_jax=True)
  elif fn == 'sharded_values':
    tree = state.make_sharded()
  else:
    tree = _as_jax(_expected(case))
  if kind == 'abstract':
    tree = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, tree)
  return tree


def _check_target_result(case, target, restored):
  """A restore into ``target`` gives ``target``'s structure and leaf kinds with the values the
  case was written from."""
  expected = _expected(case)
  if case['state']['fn'] == 'make_train_state':
    expected = state.make_train_state(as_jax=False)
  _assert_exact(jax.tree.map(np.asarray, expected) if not isinstance(expected, dict) else
                expected, jax.tree.map(lambda x: x, restored))
  for want, have in zip(jax.tree.leaves(target), jax.tree.leaves(restored)):
    if isinstance(want, (jax.Array, jax.ShapeDtypeStruct)):
      assert isinstance(have, jax.Array) and have.sharding == want.sharding


# ==================================================================================================
# Orbax PyTree / Standard checkpoints
# ==================================================================================================

PYTREE_CASES = _cases('orbax_pytree')


@pytest.mark.parametrize('case', PYTREE_CASES)
def test_pytree_without_target_is_the_tree_as_stored(case, copy_of):
  path = copy_of(case)
  restored = ocp.PyTreeCheckpointer().restore(path)
  state.tree_eq_loose(_expected(case), restored)
  for leaf in jax.tree.leaves(restored):
    if isinstance(leaf, np.ndarray):
      assert leaf.flags.writeable


@pytest.mark.parametrize('kind', ['concrete', 'abstract'])
@pytest.mark.parametrize('case', PYTREE_CASES)
def test_pytree_into_a_target(case, kind, copy_of):
  path = copy_of(case)
  target = _target(case, kind)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  restored = ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
  _check_target_result(case, target, restored)


@pytest.mark.parametrize('case', PYTREE_CASES)
def test_pytree_older_call_form(case, copy_of):
  """``restore(path, item=..., restore_args=...)``, as seed 001 and older code call it."""
  path = copy_of(case)
  target = _target(case, 'concrete')
  restored = ocp.PyTreeCheckpointer().restore(
      path, item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  _check_target_result(case, target, restored)


def test_orbax_0_1_lists_restore_into_list_targets_and_none_into_empty_state(copy_of):
  """orbax 0.1.8 stored the TrainState's optax state as [adam state, None]: a TrainState
  target gets its tuple of (ScaleByAdamState, EmptyState) back."""
  case = old_formats.case_at('f0610-ocp018/ts_pytree')
  path = copy_of(case)
  stored = ocp.PyTreeCheckpointer().restore(path)
  assert isinstance(stored['opt_state'], list) and stored['opt_state'][1] is None
  target = state.make_train_state(as_jax=True)
  restored = ocp.PyTreeCheckpointer().restore(path, item=target)
  assert type(restored) is type(target)
  assert type(restored.opt_state[1]) is type(target.opt_state[1])
  np.testing.assert_array_equal(restored.opt_state[0].mu['Dense_0']['kernel'],
                                target.opt_state[0].mu['Dense_0']['kernel'])


def test_a_damaged_tree_file_is_named(copy_of):
  case = old_formats.case_at('f070-ocp027/pytree')
  path = copy_of(case)
  (path / 'checkpoint').write_bytes((path / 'checkpoint').read_bytes()[:100])
  with pytest.raises(ocp.NotACheckpointError, match=f"{path / 'checkpoint'}: the tree file"):
    ocp.PyTreeCheckpointer().restore(path)


def test_a_placeholder_without_its_array_is_named(copy_of):
  case = old_formats.case_at('f0610-ocp018/pytree')
  path = copy_of(case)
  shutil.rmtree(path / 'f32')
  with pytest.raises(ocp.NotACheckpointError, match="array 'f32'"):
    ocp.PyTreeCheckpointer().restore(path)


def test_a_foreign_directory_names_what_it_holds(tmp_path):
  (tmp_path / 'notes.txt').write_text('not a checkpoint')
  (tmp_path / 'weights.bin').write_bytes(b'\0' * 8)
  with pytest.raises(ocp.NotACheckpointError) as info:
    ocp.PyTreeCheckpointer().restore(tmp_path)
  assert str(tmp_path) in str(info.value) and 'notes.txt' in str(info.value)
  assert '_METADATA' in str(info.value)  # What was expected.


def test_a_format_from_the_future_is_named(tmp_path, copy_of):
  """A _METADATA whose layout this release does not know (say, a later Orbax's)."""
  case = old_formats.case_at('f0102-ocp0102/pytree')
  path = copy_of(case)
  (path / '_METADATA').write_text('{"format_version": 7, "leaves": []}')
  with pytest.raises(ocp.NotACheckpointError, match=f"{path / '_METADATA'}: unreadable"):
    ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(verify_checksums=False))


# ==================================================================================================
# flax.training.checkpoints (msgpack files and the Orbax backend)
# ==================================================================================================

FLAX_CASES = _cases('flax', exclude=('flax_gda',))


@pytest.mark.parametrize('case', FLAX_CASES)
def test_flax_checkpoint_without_target(case, copy_of):
  path = copy_of(case)
  prefix = case.get('prefix', 'checkpoint_')
  step_type = float if any(isinstance(s, float) for s in case['steps']) else int
  assert checkpoints.available_steps(path, prefix, step_type) == case['steps']
  latest = checkpoints.restore_checkpoint(path, None, prefix=prefix)
  state.tree_eq_loose(_expected(case), latest)
  for step in case['steps']:
    state.tree_eq_loose(_expected(case),
                        checkpoints.restore_checkpoint(path, None, step=step, prefix=prefix))


@pytest.mark.parametrize('case', FLAX_CASES)
def test_flax_checkpoint_into_a_target(case, copy_of, set_flag):
  path = copy_of(case)
  prefix = case.get('prefix', 'checkpoint_')
  target = _target(case, 'concrete')
  for use_orbax in (False, True):  # Whatever the flag says, the format on disk decides.
    set_flag(use_orbax)
    restored = checkpoints.restore_checkpoint(path, target, prefix=prefix)
    expected = _expected(case)
    if case['state']['fn'] == 'make_train_state':
      expected = state.make_train_state(as_jax=False)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    state.tree_eq_loose(expected, restored)


# ==================================================================================================
# metadata, inspect and verify on old layouts
# ==================================================================================================


@pytest.mark.parametrize('case', PYTREE_CASES)
def test_metadata_describes_every_array_of_an_old_checkpoint(case, copy_of):
  path = copy_of(case)
  described = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  expected = _expected(case)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
      state.canon(state._state_dict(expected)))}
  got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
      state.canon(state._state_dict(described)))}
  for key, value in flat.items():
    if isinstance(value, np.ndarray):
      assert (got[key].shape, got[key].dtype) == (value.shape, value.dtype), key


@pytest.mark.parametrize('path, layout', [
    ('f0610-ocp018/pytree', 'checkpoint file, no _METADATA'),
    ('f070-ocp027/pytree_ocdbt', 'checkpoint file, no _METADATA'),
    ('f082-ocp059/flax_orbax/checkpoint_2', '_METADATA and checkpoint file'),
    ('f0102-ocp0102/pytree', '_METADATA (Orbax 0.6 on'),
    ('f090-ocp064/pytree', '_METADATA (Orbax 0.6 on'),
    ('f068-ocp010/pytree', 'checkpoint file, no _METADATA (Orbax 0.1 to 0.3)'),
    ('f075-ocp048/pytree', '_METADATA and checkpoint file (Orbax 0.3 to 0.5)'),
])
def test_inspect_names_the_layout_family_and_verify_passes(path, layout):
  from flaxckpt import _inspect, _verify
  described = _inspect.describe(DATA / path)
  assert described['format'] == 'orbax-pytree' and layout in described['layout']
  by_path = {leaf['path']: leaf for leaf in described['leaves']}
  assert by_path['f32']['shape'] == [4, 3] and by_path['f32']['dtype'] == 'float32'
  assert _verify.verify(DATA / path) == []


@pytest.mark.parametrize('case', _cases('orbax_manager'))
def test_inspect_and_verify_read_old_manager_roots(case):
  from flaxckpt import _inspect, _verify
  described = _inspect.describe(DATA / case['path'])
  assert described['format'] == 'manager'
  assert [step['step'] for step in described['steps']] == case['steps']
  assert _verify.verify(DATA / case['path']) == []
