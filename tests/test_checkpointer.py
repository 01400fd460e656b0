"""Commit protocol, async saves, older call forms and bad input."""

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import flaxckpt as ocp
from trees import assert_trees_equal


def _tree():
  return {'w': jnp.arange(6.0).reshape(2, 3), 'b': np.ones(3, np.int32), 'n': 7, 's': 'hi'}


def test_commit_layout_and_markers(tmp_path):
  path = tmp_path / 'ckpt'
  ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(_tree()))
  names = sorted(os.listdir(path))
  assert names == ['_CHECKPOINT_METADATA', '_METADATA', '_sharding', '_strings.json',
                   'array_metadatas', 'commit_success.txt', 'd', 'flaxckpt_checksums',
                   'manifest.ocdbt', 'ocdbt.process_0']
  assert (path / 'commit_success.txt').read_text() == (
      f'Checkpoint commit was successful to {path}')
  meta = json.loads((path / '_CHECKPOINT_METADATA').read_text())
  assert meta['item_handlers'].endswith('PyTreeCheckpointHandler')
  assert meta['commit_timestamp_nsecs'] >= meta['init_timestamp_nsecs'] > 0
  assert not list(tmp_path.glob('*.orbax-checkpoint-tmp*'))


def test_existing_path_needs_force(tmp_path):
  path = tmp_path / 'ckpt'
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, args=ocp.args.StandardSave({'a': np.zeros(2)}))
  with pytest.raises(ocp.CheckpointExistsError, match='already exists.*force=True'):
    ckptr.save(path, args=ocp.args.StandardSave({'a': np.ones(2)}))
  np.testing.assert_array_equal(ckptr.restore(path)['a'], np.zeros(2))
  ckptr.save(path, args=ocp.args.StandardSave({'a': np.ones(2)}), force=True)
  np.testing.assert_array_equal(ckptr.restore(path)['a'], np.ones(2))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


def test_failed_save_leaves_nothing_and_keeps_old_checkpoint(tmp_path):
  path = tmp_path / 'ckpt'
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(path, args=ocp.args.PyTreeSave({'a': np.arange(3)}))
  with pytest.raises(ocp.UnsupportedLeafError, match=r"'bad/x'.*object"):
    ckptr.save(path, args=ocp.args.PyTreeSave({'a': np.arange(3), 'bad': {'x': object()}}),
               force=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  np.testing.assert_array_equal(ckptr.restore(path)['a'], np.arange(3))
  with pytest.raises(ocp.UnsupportedLeafError):
    ckptr.save(tmp_path / 'new', args=ocp.args.PyTreeSave({'f': lambda: 0}))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


def test_failure_while_writing_cleans_up(tmp_path, monkeypatch):
  """A write that fails midway (here: the disk refuses the OCDBT commit) leaves no directory."""
  from flaxckpt import _arrays

  def broken(*args, **kwargs):
    raise OSError('No space left on device')

  monkeypatch.setattr(_arrays, 'merge_process_databases', broken)
  with pytest.raises(OSError, match='No space left'):
    ocp.PyTreeCheckpointer().save(tmp_path / 'ckpt', args=ocp.args.PyTreeSave(_tree()))
  assert list(tmp_path.iterdir()) == []


def test_half_written_and_foreign_directories_are_refused(tmp_path):
  path = tmp_path / 'ckpt'
  ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(_tree()))
  tmp_dir = tmp_path / 'other.orbax-checkpoint-tmp'
  os.rename(path, tmp_dir)
  with pytest.raises(ocp.IncompleteCheckpointError, match='never committed'):
    ocp.PyTreeCheckpointer().restore(tmp_dir)
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('x')
  with pytest.raises(ocp.NotACheckpointError, match=r"foreign.*_METADATA.*notes.txt"):
    ocp.PyTreeCheckpointer().restore(foreign)
  with pytest.raises(FileNotFoundError, match='missing'):
    ocp.PyTreeCheckpointer().restore(tmp_path / 'missing')


def test_damaged_checkpoint_names_the_array(tmp_path):
  path = tmp_path / 'ckpt'
  ocp.PyTreeCheckpointer(use_ocdbt=False).save(path, args=ocp.args.PyTreeSave(
      {'p': {'w': np.arange(4.0)}}))
  os.remove(path / 'p.w' / '0')
  with pytest.raises(ocp.NotACheckpointError, match="chunk '0' of array 'p.w' is missing"):
    ocp.PyTreeCheckpointer().restore(path)


@pytest.mark.parametrize('make_path', [str, pathlib.Path, lambda p: os.path.relpath(p)])
def test_path_types(tmp_path, make_path, monkeypatch):
  monkeypatch.chdir(tmp_path.parent)
  path = make_path(tmp_path / 'ckpt')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, args=ocp.args.StandardSave({'a': np.arange(3)}))
  np.testing.assert_array_equal(ckptr.restore(path)['a'], np.arange(3))


def test_older_call_forms_are_adapters(tmp_path):
  tree = {'a': np.arange(4.0), 'b': 3}
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(tmp_path / 'c', tree, save_args={'a': ocp.SaveArgs(dtype=np.dtype(np.float16)),
                                              'b': ocp.SaveArgs()})
  restored = ckptr.restore(tmp_path / 'c', item={'a': np.zeros(4, np.float16), 'b': 0})
  assert restored['a'].dtype == np.float16 and restored['b'] == 3
  restored = ckptr.restore(tmp_path / 'c', restore_args={'a': ocp.RestoreArgs(
      restore_type=np.ndarray, dtype=np.dtype(np.float32))})
  assert restored == {'a': pytest.approx(np.arange(4.0))} or restored['a'].dtype == np.float32
  with pytest.raises(TypeError, match='either args'):
    ckptr.save(tmp_path / 'd', tree, args=ocp.args.PyTreeSave(tree))
  ckptr.save(tmp_path / 'e', tree, force=True)
  assert_trees_equal(ckptr.restore(tmp_path / 'e'), tree)


def test_async_save_returns_before_commit_and_waits(tmp_path):
  ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), timeout_secs=60)
  state = {'x': jnp.ones((256, 256))}
  ckptr.save(tmp_path / 'a', args=ocp.args.StandardSave(state))
  state = None  # The caller may drop or change its arrays right away.
  ckptr.wait_until_finished()
  assert (tmp_path / 'a' / 'commit_success.txt').exists()
  np.testing.assert_array_equal(ckptr.restore(tmp_path / 'a')['x'], np.ones((256, 256)))
  ckptr.close()


def test_async_snapshot_is_taken_at_save_time(tmp_path):
  ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
  data = np.zeros(1000)
  ckptr.save(tmp_path / 'a', args=ocp.args.PyTreeSave({'d': data}))
  data[:] = 5  # Mutating after save() returns must not change what is written.
  ckptr.wait_until_finished()
  np.testing.assert_array_equal(ckptr.restore(tmp_path / 'a')['d'], np.zeros(1000))


def test_async_save_keeps_jax_arrays_the_caller_donates_and_deletes(tmp_path, monkeypatch):
  """An async save returns holding host views of the caller's jax.Arrays, not copies (their
  data cannot change): a training step that donates them, their deletion and new arrays
  allocated meanwhile leave what is written as it was when save returned."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from flaxckpt import _save
  release, held = threading.Event(), []
  write = _save.Prepared.write

  def held_back(prepared):
    held.extend(prepared.arrays)
    assert release.wait(60)
    write(prepared)

  monkeypatch.setattr(_save.Prepared, 'write', held_back)
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  state = {'w': jnp.arange(1 << 16, dtype=jnp.float32),
           'sharded': jax.device_put(np.arange(1 << 16, dtype=np.float32).reshape(8, -1),
                                     NamedSharding(mesh, PartitionSpec('x')))}
  expected = {key: np.array(value) for key, value in state.items()}
  with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / 'a', args=ocp.args.StandardSave(state))
    while not held:
      time.sleep(0.01)
    w_write = next(a for a in held if a.name == 'w')
    assert np.shares_memory(w_write.blocks[0][1], np.asarray(state['w']))  # not a copy
    step = jax.jit(lambda tree: jax.tree.map(lambda x: -x - 1, tree), donate_argnums=0)
    new = jax.block_until_ready(step(state))
    for value in state.values():
      value.delete()
    filler = jax.block_until_ready([jnp.full(1 << 16, 9.0) for _ in range(16)])
    release.set()
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / 'a')
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
  np.testing.assert_array_equal(np.asarray(new['w']), -expected['w'] - 1)
  del filler


def test_async_restore_waits_for_inflight_save(tmp_path):
  with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / 'a', args=ocp.args.StandardSave({'v': np.arange(10**5)}))
    np.testing.assert_array_equal(ckptr.restore(tmp_path / 'a')['v'], np.arange(10**5))


def _failing_async_save(ckptr, path, monkeypatch):
  from flaxckpt import _arrays
  monkeypatch.setattr(_arrays, 'merge_process_databases',
                      lambda *a, **k: (_ for _ in ()).throw(OSError('disk full')))
  ckptr.save(path, args=ocp.args.StandardSave({'v': np.arange(5)}))


@pytest.mark.parametrize('surface', ['wait_until_finished', 'check_for_errors', 'close',
                                     'save'])
def test_async_failure_surfaces(tmp_path, monkeypatch, surface):
  ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
  _failing_async_save(ckptr, tmp_path / 'a', monkeypatch)
  if surface in ('check_for_errors', 'save'):
    ckptr._thread.join()  # Let the background save fail before probing.
  with pytest.raises(ocp.AsyncSaveError, match='disk full') as info:
    if surface == 'save':
      monkeypatch.undo()
      ckptr.save(tmp_path / 'b', args=ocp.args.StandardSave({'v': 1}))
    else:
      getattr(ckptr, surface)()
  assert isinstance(info.value.__cause__, OSError)
  assert not (tmp_path / 'a').exists()
  assert not list(tmp_path.glob('*.orbax-checkpoint-tmp*'))


def test_async_save_inside_running_event_loop(tmp_path):
  """Jupyter runs user code inside an event loop; saves must neither need nor create one."""

  async def main():
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    ckptr.save(tmp_path / 'a', args=ocp.args.StandardSave({'v': jnp.arange(4)}))
    ckptr.wait_until_finished()
    return ckptr.restore(tmp_path / 'a')

  restored = asyncio.run(main())
  np.testing.assert_array_equal(restored['v'], np.arange(4))


def test_import_does_not_pull_orbax_or_test_utils():
  code = ('import sys, flaxckpt; '
          'bad = [m for m in sys.modules if m.startswith(("orbax", "flaxckpt.test_utils"))]; '
          'print(bad)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


def test_erase_and_create_empty(tmp_path):
  target = tmp_path / 'x'
  (target / 'old').mkdir(parents=True)
  path = ocp.test_utils.erase_and_create_empty(str(target))
  assert isinstance(path, pathlib.Path) and list(path.iterdir()) == []
  assert (path / '1').parent == path


_KILLED_SAVE = '''
import os, sys, numpy as np, flaxckpt as ocp
ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
tree = {f'w{i}': np.full((1024, 1024), i, np.float32) for i in range(24)}
ckptr.save(sys.argv[1], args=ocp.args.StandardSave(tree), force=True)
os._exit(3)  # The process dies while the background thread is still writing.
'''


def test_process_killed_mid_save_never_leaves_a_complete_looking_checkpoint(tmp_path):
  path = tmp_path / 'ckpt'
  ocp.StandardCheckpointer().save(path, args=ocp.args.StandardSave({'old': np.arange(3)}))
  result = subprocess.run([sys.executable, '-c', _KILLED_SAVE, str(path)], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 3, result.stderr
  # The earlier checkpoint at the same path is intact; the new one was never committed.
  restored = ocp.StandardCheckpointer().restore(path)
  assert list(restored) == ['old']
  leftovers = list(tmp_path.glob('*.orbax-checkpoint-tmp*'))
  assert leftovers, 'the save finished before the process died; nothing was tested'
  for leftover in leftovers:
    with pytest.raises(ocp.IncompleteCheckpointError):
      ocp.StandardCheckpointer().restore(leftover)
  # Saving again cleans up the leftover temporary directory: its writer is gone (it no longer
  # holds the directory's lock).
  ocp.StandardCheckpointer().save(path, args=ocp.args.StandardSave({'new': np.ones(2)}),
                                  force=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  assert list(ocp.StandardCheckpointer().restore(path)) == ['new']


def test_unserializable_custom_metadata_fails_before_writing(tmp_path):
  with pytest.raises(TypeError, match='custom_metadata.*JSON-serializable'):
    ocp.PyTreeCheckpointer().save(tmp_path / 'c', args=ocp.args.PyTreeSave(
        {'a': np.arange(3)}, custom_metadata={'bad': object()}))
  assert list(tmp_path.iterdir()) == []


def test_interpreter_exit_waits_for_a_pending_async_save(tmp_path):
  code = ('import sys, numpy as np, flaxckpt as ocp\n'
          'c = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())\n'
          'c.save(sys.argv[1], args=ocp.args.StandardSave({"w": np.ones((512, 1024))}))\n')
  subprocess.run([sys.executable, '-c', code, str(tmp_path / 'c')], check=True, timeout=120)
  np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(tmp_path / 'c')['w'],
                                np.ones((512, 1024)))


def test_without_atomic_renames_the_commit_marker_is_the_commit(tmp_path, monkeypatch):
  """On storage whose renames are not atomic (object stores) a save writes in place and the
  commit marker, written last, is what makes it a checkpoint: readers and managers ignore a
  directory without one. Simulated on local disk by declaring renames non-atomic."""
  from flaxckpt import _storage
  monkeypatch.setattr(_storage, 'renames_atomically', lambda path: False)
  tree = {'w': np.arange(4.0), 'b': {'c': np.ones(2)}}
  seen = []
  real_write_text = _storage.write_text

  def recording_write_text(path, text, sync=False):
    seen.append(path.name)
    real_write_text(path, text, sync)

  monkeypatch.setattr(_storage, 'write_text', recording_write_text)
  ocp.PyTreeCheckpointer().save(tmp_path / 'ckpt', args=ocp.args.PyTreeSave(tree))
  assert seen[-1] == 'commit_success.txt'
  assert [p.name for p in tmp_path.iterdir()] == ['ckpt']  # No temporary directory.
  np.testing.assert_array_equal(ocp.PyTreeCheckpointer().restore(tmp_path / 'ckpt')['w'],
                                tree['w'])
  (tmp_path / 'ckpt' / 'commit_success.txt').unlink()  # A save that died before its commit.
  with pytest.raises(ocp.IncompleteCheckpointError, match='commit_success.txt'):
    ocp.PyTreeCheckpointer().restore(tmp_path / 'ckpt')

  with ocp.CheckpointManager(tmp_path / 'run', options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)) as manager:
    for step in (1, 2):
      manager.save(step, args=ocp.args.StandardSave(tree))
  (tmp_path / 'run' / '2' / 'commit_success.txt').unlink()
  with ocp.CheckpointManager(tmp_path / 'run') as manager:
    assert manager.all_steps() == [1]


@pytest.mark.parametrize('use_ocdbt', [True, False])
def test_save_concurrent_gb_writes_in_batches_that_both_libraries_restore(tmp_path, use_ocdbt):
  import orbax.checkpoint as orbax
  tree = {f'layer{i}': {'w': np.full((1 << 16,), i, np.float32), 'b': np.arange(i + 1.0)}
          for i in range(6)}
  tree['step'] = 3
  limit_gb = 300_000 / 2**30  # Fewer bytes than two 256 KiB arrays: one per batch.
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, save_concurrent_gb=limit_gb)
  ocp.Checkpointer(handler).save(tmp_path / 'ck', args=ocp.args.PyTreeSave(tree))
  if use_ocdbt:  # Batches commit to one per-process database, merged into the root once;
    # each commit writes data files of its own (one commit writes a single one).
    assert sorted(p.name for p in tmp_path.glob('ck/ocdbt.process_*')) == ['ocdbt.process_0']
    assert len(list(tmp_path.glob('ck/ocdbt.process_0/d/*'))) >= 6
  sums = json.loads((tmp_path / 'ck/flaxckpt_checksums/process_0').read_text())['chunks']
  assert {f'layer{i}.w' for i in range(6)} <= set(sums)
  assert_trees_equal(ocp.PyTreeCheckpointer().restore(tmp_path / 'ck'), tree)
  restored = orbax.PyTreeCheckpointer().restore(tmp_path / 'ck')
  for i in range(6):
    np.testing.assert_array_equal(restored[f'layer{i}']['w'], tree[f'layer{i}']['w'])
