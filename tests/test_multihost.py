"""Checkpoints of arrays sharded over several real JAX processes (``jax.distributed`` on
localhost, CPU devices), against Orbax in the same processes, and restored on other topologies.
"""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxckpt as ocp
import multiprocess

# The tree every multi-process script saves, rebuilt here to check restores in this process.
VALUES = {'w': np.arange(64, dtype=np.float32).reshape(8, 8) / 4,
          'b': np.arange(8, dtype=np.int32) - 3,
          'r': np.linspace(0, 1, 4, dtype=np.float32)}

_TREE = r'''
import warnings
warnings.simplefilter('ignore')
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import flaxckpt as ocp
import orbax.checkpoint as orbax

VALUES = {'w': np.arange(64, dtype=np.float32).reshape(8, 8) / 4,
          'b': np.arange(8, dtype=np.int32) - 3,
          'r': np.linspace(0, 1, 4, dtype=np.float32)}
mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ('x', 'y'))
def sharded(key, spec):
  value = VALUES[key]
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec),
                                      lambda index: value[index])
tree = {'params': {'w': sharded('w', P('x', 'y')), 'b': sharded('b', P('y'))},
        'replicated': sharded('r', P()), 'host': np.arange(5)}
assert not tree['params']['w'].is_fully_addressable
abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.Array) else x, tree)

def matches(restored):
  """Every local shard holds the right values, with the target's sharding."""
  if not np.array_equal(restored['host'], np.arange(5)):
    return 'host differs'
  for path, key in ((('params', 'w'), 'w'), (('params', 'b'), 'b'), (('replicated',), 'r')):
    array, want = restored, abstract
    for part in path:
      array, want = array[part], want[part]
    if not isinstance(array, jax.Array) or array.sharding != want.sharding:
      return f'{key}: {type(array).__name__} {getattr(array, "sharding", None)}'
    for shard in array.addressable_shards:
      if not np.array_equal(np.asarray(shard.data), VALUES[key][shard.index]):
        return f'{key}: shard {shard.index} differs'
  return 'ok'
'''

_SAVE_AND_CROSS_RESTORE = _TREE + r'''
root = ARGS[0]
ours = ocp.StandardCheckpointer()
theirs = orbax.StandardCheckpointer()
ours.save(f'{root}/ours', tree)
theirs.save(f'{root}/orbax', tree)
theirs.wait_until_finished()
result = {}
for writer in ('ours', 'orbax'):
  result[f'{writer}->ours'] = matches(ours.restore(f'{root}/{writer}', abstract))
  result[f'{writer}->orbax'] = matches(theirs.restore(f'{root}/{writer}', abstract))
  # Without a target: the saved shardings, which exist in these same processes.
  as_saved = ocp.PyTreeCheckpointer().restore(f'{root}/{writer}')
  result[f'{writer}->ours, no target'] = matches(
      {**as_saved, 'params': {'w': as_saved['params']['w'], 'b': as_saved['params']['b']}})
report(result)
'''


@pytest.fixture(scope='module')
def two_process_checkpoints(tmp_path_factory):
  """Checkpoints of the same tree saved by flaxckpt and by Orbax from 2 processes x 2 devices,
  with what each process saw when both libraries restored both."""
  root = tmp_path_factory.mktemp('two_process')
  results = multiprocess.run(_SAVE_AND_CROSS_RESTORE, 2, 2, str(root))
  return root, results


def test_two_processes_save_and_restore_both_ways_with_orbax(two_process_checkpoints):
  _, results = two_process_checkpoints
  for process_id, result in enumerate(results):
    assert result == {'ours->ours': 'ok', 'ours->orbax': 'ok', 'orbax->ours': 'ok',
                      'orbax->orbax': 'ok', 'ours->ours, no target': 'ok',
                      'orbax->ours, no target': 'ok'}, process_id


def test_two_process_layout_is_orbax_layout(two_process_checkpoints):
  """Each process wrote its own database and array metadata; the primary wrote the tree
  metadata once and merged both databases into the root one."""
  root, _ = two_process_checkpoints
  for name in ('ours', 'orbax'):
    names = sorted(p.name for p in (root / name).iterdir())
    assert {'ocdbt.process_0', 'ocdbt.process_1', 'manifest.ocdbt', '_METADATA',
            '_sharding', 'array_metadatas', '_CHECKPOINT_METADATA'} <= set(names), (name, names)
    assert sorted(p.name for p in (root / name / 'array_metadatas').iterdir()) == [
        'process_0', 'process_1'], name
  # Each process recorded the checksums of the chunks it wrote, and together they cover every
  # chunk of every array.
  sums = [json.loads((root / 'ours' / 'flaxckpt_checksums' / f'process_{i}').read_text())['chunks']
          for i in range(2)]
  assert sums[0] and sums[1]
  for array, chunks in sums[0].items():
    assert not set(chunks) & set(sums[1].get(array, {})), array  # No chunk written twice.
  ours_meta = json.loads((root / 'ours' / '_METADATA').read_text())
  orbax_meta = json.loads((root / 'orbax' / '_METADATA').read_text())
  assert ours_meta['tree_metadata'].keys() == orbax_meta['tree_metadata'].keys()
  assert [p.name for p in (root / 'ours').iterdir() if 'tmp' in p.name] == []


@pytest.mark.parametrize('writer', ['ours', 'orbax'])
def test_two_process_checkpoint_restores_in_one_process_on_another_mesh(
    two_process_checkpoints, writer):
  """A 2-process checkpoint restores here (1 process, 8 devices) with other PartitionSpecs, as
  numpy, and without a target."""
  root, _ = two_process_checkpoints
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('a', 'b'))
  specs = {'w': PartitionSpec('b', 'a'), 'b': PartitionSpec('a'), 'r': PartitionSpec()}
  abstract = {'params': {key: jax.ShapeDtypeStruct(VALUES[key].shape, VALUES[key].dtype,
                                                   sharding=NamedSharding(mesh, specs[key]))
                         for key in ('w', 'b')},
              'replicated': jax.ShapeDtypeStruct((4,), np.float32,
                                                 sharding=NamedSharding(mesh, specs['r'])),
              'host': np.zeros(5, np.int64)}
  restored = ocp.StandardCheckpointer().restore(root / writer, abstract)
  for key, array in (('w', restored['params']['w']), ('b', restored['params']['b']),
                     ('r', restored['replicated'])):
    assert array.sharding == NamedSharding(mesh, specs[key])
    np.testing.assert_array_equal(np.asarray(array), VALUES[key])
  np.testing.assert_array_equal(restored['host'], np.arange(5))
  raw = ocp.PyTreeCheckpointer().restore(root / writer)
  np.testing.assert_array_equal(np.asarray(raw['params']['w']), VALUES['w'])


_RESTORE_IN_FOUR = _TREE + r'''
root = ARGS[0]
result = {}
for writer in ('ours', 'orbax'):
  result[writer] = matches(ocp.StandardCheckpointer().restore(f'{root}/{writer}', abstract))
report(result)
'''


def test_two_process_checkpoint_restores_in_four_processes(two_process_checkpoints):
  root, _ = two_process_checkpoints
  results = multiprocess.run(_RESTORE_IN_FOUR, 4, 2, str(root))
  assert results == [{'ours': 'ok', 'orbax': 'ok'}] * 4


def test_four_processes_save_and_restore_both_ways_with_orbax(tmp_path):
  results = multiprocess.run(_SAVE_AND_CROSS_RESTORE, 4, 2, str(tmp_path))
  assert results == [{'ours->ours': 'ok', 'ours->orbax': 'ok', 'orbax->ours': 'ok',
                      'orbax->orbax': 'ok', 'ours->ours, no target': 'ok',
                      'orbax->ours, no target': 'ok'}] * 4
  assert sorted(p.name for p in (tmp_path / 'ours' / 'array_metadatas').iterdir()) == [
      f'process_{i}' for i in range(4)]


_SAVE_ON_PRIMARY_ONLY = _TREE + r'''
import time
root = ARGS[0]
ocp.multihost.set_barrier_timeout(3)
result = {}
import flax
from flaxckpt.legacy import checkpoints
flax.config.update('flax_use_orbax_checkpointing', ARGS[1] == 'legacy-orbax')
if PROCESS_ID == 0:  # The classic mistake: only the primary saves.
  try:
    if ARGS[1] == 'core':
      ocp.StandardCheckpointer().save(f'{root}/lonely', tree)
    else:
      checkpoints.save_checkpoint_multiprocess(f'{root}/lonely', tree, 1)
    result['error'] = None
  except ocp.BarrierTimeoutError as e:
    result['error'] = str(e)
else:
  time.sleep(5)
result['listing'] = sorted(os.listdir(root))
report(result)
'''


@pytest.mark.parametrize('api', ['core', 'legacy-msgpack', 'legacy-orbax'])
def test_save_on_one_process_only_times_out_naming_the_missing_one(tmp_path, api):
  """A save called on process 0 alone raises BarrierTimeoutError naming process 1 (after the
  configured 3 s) instead of hanging, and leaves nothing behind."""
  results = multiprocess.run(_SAVE_ON_PRIMARY_ONLY, 2, 2, str(tmp_path), api)
  error = results[0]['error']
  assert error is not None and 'processes [1]' in error, error
  assert results[0]['listing'] == results[1]['listing'] == [], results


_MANAGER = _TREE + r'''
root = ARGS[0]
options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1)
with ocp.CheckpointManager(f'{root}/run', options=options) as manager:
  for step in range(4):
    manager.save(step, args=ocp.args.StandardSave(tree), metrics={'loss': 1.0 / (step + 1)})
  manager.wait_until_finished()
  steps = manager.all_steps()
  latest = manager.latest_step()
  restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
async_checkpointer = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
async_checkpointer.save(f'{root}/async', args=ocp.args.StandardSave(tree))
async_checkpointer.wait_until_finished()
from_async = ocp.StandardCheckpointer().restore(f'{root}/async', abstract)
report({'steps': steps, 'latest': latest, 'restored': matches(restored),
        'async': matches(from_async), 'listing': sorted(os.listdir(f'{root}/run'))})
'''


def test_manager_and_async_checkpointer_across_two_processes(tmp_path):
  """All processes agree on the steps, retention deletes once, async saves commit everywhere."""
  results = multiprocess.run(_MANAGER, 2, 2, str(tmp_path))
  assert results[0] == results[1] == {'steps': [2, 3], 'latest': 3, 'restored': 'ok',
                                      'async': 'ok', 'listing': ['2', '3']}, results
  assert (tmp_path / 'async' / 'commit_success.txt').exists()
  # Orbax reads what the manager wrote from two processes.
  import orbax.checkpoint as orbax
  as_numpy = orbax.RestoreArgs(restore_type=np.ndarray)
  restore_args = {'params': {'w': as_numpy, 'b': as_numpy}, 'replicated': as_numpy,
                  'host': as_numpy}
  restored = orbax.PyTreeCheckpointer().restore(
      tmp_path / 'run' / '3' / 'default', args=orbax.args.PyTreeRestore(
          restore_args=restore_args))
  np.testing.assert_array_equal(np.asarray(restored['params']['w']), VALUES['w'])


_RESTORE_OWN_COPY = r'''
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import flaxckpt as ocp
directory = f'{ARGS[0]}/process_{PROCESS_ID}'  # Holds only the chunks of this process's rows.
mesh = Mesh(np.array(jax.devices()), ('x',))
target = {'w': jax.ShapeDtypeStruct((8, 8), np.float32,
                                    sharding=NamedSharding(mesh, PartitionSpec('x')))}
checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(target))
expected = np.arange(64, dtype=np.float32).reshape(8, 8)
report(all(np.array_equal(np.asarray(s.data), expected[s.index])
           for s in restored['w'].addressable_shards))
'''


@pytest.mark.parametrize('compressed', [False, True], ids=['raw', 'zstd'])
def test_each_process_reads_only_the_chunks_of_its_shards(tmp_path, compressed):
  """Each process restores from a copy holding only its own rows' chunk files: it succeeds only
  if it never asks for the other rows' chunks."""
  import shutil
  mesh = Mesh(np.array(jax.devices()[:4]), ('x',))
  w = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                     NamedSharding(mesh, PartitionSpec('x')))
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=compressed)
  ocp.Checkpointer(handler).save(tmp_path / 'full', args=ocp.args.PyTreeSave({'w': w}))
  assert sorted(p.name for p in (tmp_path / 'full' / 'w').iterdir()) == [
      '.zarray', '0.0', '1.0', '2.0', '3.0']
  for process_id, foreign in ((0, ('2.0', '3.0')), (1, ('0.0', '1.0'))):
    copy = tmp_path / f'process_{process_id}'
    shutil.copytree(tmp_path / 'full', copy)
    for chunk in foreign:
      (copy / 'w' / chunk).unlink()
  assert multiprocess.run(_RESTORE_OWN_COPY, 2, 2, str(tmp_path)) == [True, True]
