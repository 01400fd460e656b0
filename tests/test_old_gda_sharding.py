"""Multi-process (``_gda``) arrays and ``_sharding`` entries of checkpoints written by old releases.

``flax_gda`` (flax's ``save_checkpoint_multiprocess``: a msgpack file with ``//GDAPlaceholder:``
strings and a ``checkpoint_4_gda`` folder of zarr arrays) is restored from every era, without a
target (numpy, where flax raises ``MPARestoreTargetRequiredError``) and into numpy and jax targets.
``pytree_sharded`` of orbax 0.5.9 has ``_sharding`` entries without ``device_mesh``: its mesh is
rebuilt from the first devices of ``jax.devices()``; too few devices, or a ``sharding_type`` that
Orbax never rebuilt, leave the leaf as numpy.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import flaxckpt as ocp
from flaxckpt import _metadata
from flaxckpt.legacy import checkpoints
import old_formats

ERAS = ('f0610-ocp018', 'f070-ocp027', 'f082-ocp059', 'f0102-ocp0102')


@pytest.fixture(scope='module')
def state() -> Any:
  """The fixtures' ``state.py``, which rebuilds the saved trees bit for bit."""
  return old_formats.state


def _copy(tmp_path: pathlib.Path, path: str) -> pathlib.Path:
  """A scratch copy of the case at ``path``, so no test can alter tests/data."""
  return old_formats.copy_case(old_formats.case_at(path), tmp_path)


def _assert_exact(expected: np.ndarray, got: Any) -> None:
  got = np.asarray(got)
  assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
  assert got.tobytes() == expected.tobytes()


# --- flax_gda ------------------------------------------------------------------------------------


@pytest.mark.parametrize('era', ERAS)
def test_flax_gda_without_target_restores_numpy(tmp_path, state, era):
  directory = _copy(tmp_path, f'{era}/flax_gda')
  expected = state.expected('sharded_values')
  restored = checkpoints.restore_checkpoint(directory, None)
  assert set(restored) == {'w', 'b', 'step'} and restored['step'] == expected['step']
  for key in ('w', 'b'):
    assert type(restored[key]) is np.ndarray
    _assert_exact(expected[key], restored[key])
  state.tree_eq_loose(expected, restored)


@pytest.mark.parametrize('era', ERAS)
def test_flax_gda_partial_without_target_keeps_placeholders(tmp_path, era):
  """allow_partial_mpa_restoration keeps flax's behaviour: the placeholders stay strings."""
  directory = _copy(tmp_path, f'{era}/flax_gda')
  restored = checkpoints.restore_checkpoint(directory, None, allow_partial_mpa_restoration=True)
  assert restored == {'b': '//GDAPlaceholder:b', 'step': 5, 'w': '//GDAPlaceholder:w'}


@pytest.mark.parametrize('era', ERAS)
def test_flax_gda_numpy_target(tmp_path, state, era):
  directory = _copy(tmp_path, f'{era}/flax_gda')
  expected = state.expected('sharded_values')
  target = {'w': np.zeros((8, 8), np.float32), 'b': np.zeros(8, np.float32), 'step': 0}
  restored = checkpoints.restore_checkpoint(directory, target)
  assert restored['step'] == 5
  for key in ('w', 'b'):
    assert type(restored[key]) is np.ndarray
    _assert_exact(expected[key], restored[key])


@pytest.mark.parametrize('era', ERAS)
@pytest.mark.parametrize('abstract', [False, True], ids=['array', 'shape_dtype_struct'])
def test_flax_gda_jax_target_takes_its_shardings(tmp_path, state, era, abstract):
  directory = _copy(tmp_path, f'{era}/flax_gda')
  expected = state.expected('sharded_values')
  target = state.make_sharded()
  if abstract:
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, target)
  restored = checkpoints.restore_checkpoint(directory, target)
  assert restored['step'] == 5
  for key in ('w', 'b'):
    assert isinstance(restored[key], jax.Array)
    assert restored[key].sharding == target[key].sharding
    _assert_exact(expected[key], restored[key])
    for shard in restored[key].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[key][shard.index])


def test_flax_gda_target_without_array_there_reads_numpy(tmp_path, state):
  """A target leaf that is no array (here None) gets the stored array as numpy, where flax raises
  MPARestoreTargetRequiredError; with allow_partial_mpa_restoration its placeholder stays."""
  directory = _copy(tmp_path, 'f0610-ocp018/flax_gda')
  expected = state.expected('sharded_values')
  target = {'w': jax.ShapeDtypeStruct((8, 8), np.float32,
                                      sharding=SingleDeviceSharding(jax.devices()[1])),
            'b': None, 'step': 0}
  restored = checkpoints.restore_checkpoint(directory, target)
  assert restored['w'].sharding == target['w'].sharding
  _assert_exact(expected['w'], restored['w'])
  assert type(restored['b']) is np.ndarray
  _assert_exact(expected['b'], restored['b'])
  partial = checkpoints.restore_checkpoint(directory, target, allow_partial_mpa_restoration=True)
  assert partial['b'] == '//GDAPlaceholder:b'
  _assert_exact(expected['w'], partial['w'])


# --- _sharding of orbax 0.5.9 (no device_mesh) ---------------------------------------------------


def _rewrite_sharding(directory: pathlib.Path, leaf: str, **changes: Any) -> None:
  """Changes (or, for a value None, removes) fields of one leaf's ``_sharding`` entry."""
  path = directory / _metadata.SHARDING_FILE
  entries = json.loads(path.read_text())
  key = _metadata.sharding_key(leaf)
  entry = json.loads(entries[key])
  for field, value in changes.items():
    if value is None:
      entry.pop(field)
    else:
      entry[field] = value
  entries[key] = json.dumps(entry)
  path.write_text(json.dumps(entries))


def test_f082_sharded_without_target_rebuilds_named_sharding(tmp_path, state):
  directory = _copy(tmp_path, 'f082-ocp059/pytree_sharded')
  assert 'device_mesh' not in (directory / '_sharding').read_text()
  expected = state.expected('sharded_values')
  restored = ocp.PyTreeCheckpointer().restore(directory)
  assert restored['step'] == expected['step']
  mesh_devices = np.array(jax.devices()[:4], dtype=object).reshape(2, 2)
  for key, spec in (('w', PartitionSpec('x', 'y')), ('b', PartitionSpec())):
    array = restored[key]
    assert isinstance(array, jax.Array)
    assert isinstance(array.sharding, NamedSharding)
    assert array.sharding.mesh.axis_names == ('x', 'y')
    assert (array.sharding.mesh.devices == mesh_devices).all()
    assert array.sharding.spec == spec
    _assert_exact(expected[key], array)
  assert len(restored['w'].sharding.device_set) == 4
  assert restored['w'].addressable_shards[0].data.shape == (4, 4)


def test_f082_sharded_with_too_few_devices_restores_numpy(tmp_path, state):
  """A mesh larger than the devices present (4x4 > 8): the leaf restores as numpy."""
  directory = _copy(tmp_path, 'f082-ocp059/pytree_sharded')
  _rewrite_sharding(directory, 'w', shape=[4, 4])
  expected = state.expected('sharded_values')
  restored = ocp.PyTreeCheckpointer().restore(directory)
  assert type(restored['w']) is np.ndarray
  _assert_exact(expected['w'], restored['w'])
  assert isinstance(restored['b'].sharding, NamedSharding)


def test_unknown_sharding_type_restores_numpy(tmp_path, state):
  """A ``sharding_type`` Orbax never rebuilt (GSPMDSharding, PositionalSharding, a future
  kind) is no damage: the leaf restores as numpy, exactly."""
  directory = _copy(tmp_path, 'f082-ocp059/pytree_sharded')
  _rewrite_sharding(directory, 'w', sharding_type='GSPMDSharding')
  restored = ocp.PyTreeCheckpointer().restore(directory)
  assert type(restored['w']) is np.ndarray
  _assert_exact(state.expected('sharded_values')['w'], restored['w'])


def test_damaged_named_sharding_is_an_error(tmp_path):
  directory = _copy(tmp_path, 'f082-ocp059/pytree_sharded')
  _rewrite_sharding(directory, 'w', shape=None)
  with pytest.raises(ocp.NotACheckpointError, match="sharding of leaf 'w' is damaged"):
    ocp.PyTreeCheckpointer().restore(directory)


@pytest.mark.parametrize('text, kind', [
    ('{"sharding_type": "NamedSharding", "shape": [2, 2], "axis_names": ["x", "y"], '
     '"partition_spec": [["x", "y"], null]}', NamedSharding),
    ('{"sharding_type": "NamedSharding", "shape": [8], "axis_names": ["d"], '
     '"partition_spec": ["d"]}', NamedSharding),
    ('{"sharding_type": "NamedSharding", "shape": [3, 3], "axis_names": ["x", "y"], '
     '"partition_spec": []}', type(None)),
    ('{"sharding_type": "SingleDeviceSharding", "device_str": "TFRT_CPU_3"}',
     SingleDeviceSharding),
    ('{"sharding_type": "SingleDeviceSharding", "device_str": "cpu:5"}', SingleDeviceSharding),
    ('{"sharding_type": "SingleDeviceSharding", "device_str": "cpu:99"}', type(None)),
    ('{"sharding_type": "PositionalSharding"}', type(None)),
])
def test_sharding_from_json_old_forms(text, kind):
  sharding = _metadata.sharding_from_json(text)
  assert isinstance(sharding, kind)
  if isinstance(sharding, NamedSharding):
    size = sharding.mesh.devices.size
    assert list(sharding.mesh.devices.flat) == jax.devices()[:size]
  if isinstance(sharding, SingleDeviceSharding):
    (device,) = sharding.device_set
    assert device.id == int(json.loads(text)['device_str'][-1])


def test_device_names_of_old_jax_releases():
  assert _metadata._device_name('TFRT_CPU_2') == _metadata._device_name('cpu:2')
  assert _metadata._device_name('gpu:1') == _metadata._device_name('cuda:1')
  assert _metadata._device_name('rocm:1') == 'gpu:1'
  assert (_metadata._device_name('TPU_0(host=0,(0,0,0,0))')
          == _metadata._device_name('TPU_0(process=0,(0,0,0,0))'))
