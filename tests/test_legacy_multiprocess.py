"""Legacy multi-process arrays (``<checkpoint>_gda`` folders), written and read.

Two processes (two CPU devices each) join one ``jax.distributed`` runtime on localhost and save
the same tree with flax's module and with ours; each then restores both checkpoints with both
modules, with the msgpack backend and with the Orbax one. The msgpack files must match flax's:
the msgpack file byte for byte and the ``_gda`` zarr folders file for file. A ``_gda`` checkpoint
written by flax 0.10.2 restores too.
"""

import pathlib
import sys

import pytest

import multiprocess
from trees import files_under

_SCRIPT = r'''
root = ARGS[0]
import warnings
warnings.simplefilter('ignore', DeprecationWarning)
import flax
import numpy as np
from flax.training import checkpoints as flax_checkpoints
from jax.experimental.array_serialization.serialization import GlobalAsyncCheckpointManager
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flaxckpt.legacy import checkpoints as our_checkpoints

''' + multiprocess.SHARDED_ACROSS_PROCESSES + r'''
assert not w.is_fully_addressable and not b.is_fully_addressable
tree = {'params': {'w': w, 'b': b}, 'step': 7, 'host': np.arange(3)}
manager = GlobalAsyncCheckpointManager()
modules = {'flax': flax_checkpoints, 'ours': our_checkpoints}
for name, module in modules.items():
  module.save_checkpoint_multiprocess(f'{root}/{name}', tree, 7, gda_manager=manager)
  manager.wait_until_finished()
  multihost_utils.sync_global_devices(f'saved {name}')

def restores_correctly(module, directory, **kwargs):
  """Whether ``module`` restores the tree from ``directory``, shards in place."""
  restored = module.restore_checkpoint(directory, tree, **kwargs)
  ok = restored['step'] == 7 and np.array_equal(restored['host'], np.arange(3))
  for key in ('w', 'b'):
    array = restored['params'][key]
    ok = ok and array.sharding == tree['params'][key].sharding
    ok = ok and all(np.array_equal(shard.data, values[key][shard.index])
                    for shard in array.addressable_shards)
  return bool(ok)

results = {}
for writer in modules:
  for reader, module in modules.items():
    results[f'{writer}->{reader}'] = restores_correctly(module, f'{root}/{writer}',
                                                        gda_manager=manager)
  # Without a target flax raises MPARestoreTargetRequiredError; we read the arrays as numpy.
  raw = our_checkpoints.restore_checkpoint(f'{root}/{writer}', None)
  results[f'{writer}:no-target'] = bool(
      all(type(raw['params'][k]) is np.ndarray and np.array_equal(raw['params'][k], values[k])
          for k in values) and raw['step'] == 7)

# The Orbax backend: both modules write Orbax directories from both processes.
flax.config.update('flax_use_orbax_checkpointing', True)
for name, module in modules.items():
  module.save_checkpoint_multiprocess(f'{root}/{name}_orbax', tree, 7)
  multihost_utils.sync_global_devices(f'saved {name} orbax')
for writer in modules:
  for reader, module in modules.items():
    results[f'orbax:{writer}->{reader}'] = restores_correctly(module, f'{root}/{writer}_orbax')
report(results)
'''


def test_multiprocess_arrays_match_flax_both_ways(tmp_path):
  results = multiprocess.run(_SCRIPT, 2, 2, str(tmp_path))
  for process_id, result in enumerate(results):
    assert result == {
        'flax->flax': True, 'flax->ours': True, 'ours->flax': True, 'ours->ours': True,
        'flax:no-target': True, 'ours:no-target': True,
        'orbax:flax->flax': True, 'orbax:flax->ours': True, 'orbax:ours->flax': True,
        'orbax:ours->ours': True}, (process_id, result)

  for name in ('flax_orbax', 'ours_orbax'):
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ['checkpoint_7']
    assert {'ocdbt.process_0', 'ocdbt.process_1', '_METADATA'} <= {
        p.name for p in (tmp_path / name / 'checkpoint_7').iterdir()}
  flax_files, our_files = files_under(tmp_path / 'flax'), files_under(tmp_path / 'ours')
  our_files = {name: data for name, data in our_files.items()  # Less flaxckpt's sidecar.
               if not name.endswith('.crc32c')}
  assert sorted(our_files) == sorted(flax_files)
  assert 'checkpoint_7' in our_files and 'checkpoint_7_gda/params/w/.zarray' in our_files
  assert {name for name in our_files if name.startswith('checkpoint_7_gda/params/w/')} == {
      f'checkpoint_7_gda/params/w/{chunk}' for chunk in ('.zarray', '0.0', '1.0', '2.0', '3.0')}
  for name, data in flax_files.items():
    if name.endswith('.zarray') or name == 'checkpoint_7':
      assert our_files[name] == data, name
  assert b'//GDAPlaceholder:params/w' in our_files['checkpoint_7']


_OLD_FORMATS = pathlib.Path(__file__).parent / 'data' / 'old-formats'


@pytest.fixture
def old_state():
  sys.path.insert(0, str(_OLD_FORMATS))
  try:
    import state  # The fixtures' own generator: rebuilds the saved values bit for bit.
    yield state
  finally:
    sys.path.remove(str(_OLD_FORMATS))


def test_restores_gda_checkpoint_written_by_flax_0_10(tmp_path, old_state):
  """A ``save_checkpoint_multiprocess`` checkpoint of flax 0.10.2 (msgpack file plus ``_gda``
  zarr folders) restores into a single-process target with the target's shardings."""
  import jax
  import numpy as np
  import shutil
  from flaxckpt.legacy import checkpoints
  shutil.copytree(_OLD_FORMATS / 'f0102-ocp0102' / 'flax_gda', tmp_path / 'ckpts')
  target = old_state.make_sharded()
  restored = checkpoints.restore_checkpoint(tmp_path / 'ckpts', target)
  expected = old_state.sharded_values()
  assert restored['step'] == expected['step'] == 5
  for key in ('w', 'b'):
    assert isinstance(restored[key], jax.Array)
    assert restored[key].sharding == target[key].sharding
    np.testing.assert_array_equal(np.asarray(restored[key]), expected[key])
  host_target = {'w': np.zeros((8, 8), np.float32), 'b': np.zeros(8, np.float32), 'step': 0}
  as_numpy = checkpoints.restore_checkpoint(tmp_path / 'ckpts', host_target)
  assert type(as_numpy['w']) is np.ndarray
  np.testing.assert_array_equal(as_numpy['w'], expected['w'])
  raw = checkpoints.restore_checkpoint(tmp_path / 'ckpts', None)  # flax: MPARestoreTargetRequired.
  assert type(raw['w']) is np.ndarray and raw['w'].tobytes() == expected['w'].tobytes()
  partial = checkpoints.restore_checkpoint(tmp_path / 'ckpts', None,
                                           allow_partial_mpa_restoration=True)
  assert partial['w'] == '//GDAPlaceholder:w' and partial['step'] == 5
  shutil.rmtree(tmp_path / 'ckpts' / 'checkpoint_4_gda')
  with pytest.raises(ValueError, match='checkpoint_4_gda'):
    checkpoints.restore_checkpoint(tmp_path / 'ckpts', target)
