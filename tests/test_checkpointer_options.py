"""Checkpointer-level options (AsyncOptions, MultiprocessingOptions, FileOptions) and the commit
protocols of ``ocp.path.atomicity``, checked on real files and against Orbax."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
from flaxckpt.path import atomicity

STATE = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(2, np.int32)}


def test_async_wait_until_finished_raises_timeout_error(tmp_path):
  release = threading.Event()

  class SlowWriter(ocp.JsonCheckpointHandler, ocp.AsyncCheckpointHandler):
    def async_save(self, directory, args):
      return lambda: (release.wait(30), ocp.JsonCheckpointHandler.save(self, directory, args))

  ckptr = ocp.AsyncCheckpointer(SlowWriter(), async_options=ocp.AsyncOptions(timeout_secs=1))
  ckptr.save(tmp_path / 'c', args=ocp.args.JsonSave([1, 2]))
  with pytest.raises(TimeoutError, match=r'did not finish within 1 s'):
    ckptr.wait_until_finished()
  assert not (tmp_path / 'c').exists()
  release.set()
  ckptr.wait_until_finished()  # The save went on and commits.
  assert ckptr.restore(tmp_path / 'c') == [1, 2]
  # The positional timeout wins over the options' one, as in Orbax.
  assert ocp.AsyncCheckpointer(SlowWriter(), 5, async_options=ocp.AsyncOptions(
      timeout_secs=1))._timeout == 5  # noqa: SLF001


def test_post_finalization_callback_runs_after_the_commit(tmp_path):
  seen = []

  def callback():
    seen.append(sorted(os.listdir(tmp_path)))
    seen.append((tmp_path / 'c' / 'commit_success.txt').exists())

  with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), async_options=ocp.AsyncOptions(
      post_finalization_callback=callback)) as ckptr:
    ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave(STATE))
    ckptr.wait_until_finished()
    assert seen == [['c'], True]  # Called once, with the temporary directory renamed away.
    ckptr.save(tmp_path / 'd', args=ocp.args.StandardSave(STATE))
  assert len(seen) == 4


def test_options_have_orbax_fields_and_defaults():
  for ours, theirs in ((ocp.AsyncOptions, orbax.AsyncOptions),
                       (ocp.options.MultiprocessingOptions, orbax.options.MultiprocessingOptions),
                       (ocp.options.FileOptions, orbax.options.FileOptions)):
    mine = {f.name: f.default for f in ours.__dataclass_fields__.values()}
    orbax_fields = {f.name: f.default for f in theirs.__dataclass_fields__.values()}
    assert mine == orbax_fields


def test_multiprocessing_options_refuse_what_is_not_supported():
  handler = ocp.StandardCheckpointHandler()
  with pytest.raises(ValueError, match=r'primary_host=1 is not a process of this job'):
    ocp.Checkpointer(handler, multiprocessing_options=ocp.MultiprocessingOptions(primary_host=1))
  with pytest.raises(NotImplementedError, match=r'primary_host=None'):
    ocp.Checkpointer(handler,
                     multiprocessing_options=ocp.MultiprocessingOptions(primary_host=None))
  with pytest.raises(NotImplementedError, match=r'active_processes=\[0, 3\]'):
    ocp.AsyncCheckpointer(handler, multiprocessing_options=ocp.MultiprocessingOptions(
        active_processes={0, 3}))
  ocp.Checkpointer(handler, multiprocessing_options=ocp.MultiprocessingOptions(
      active_processes={0}, barrier_sync_key_prefix='eval'))  # Every process of this job.


def _dir_modes(root):
  modes = {}
  for dirpath, _, _ in os.walk(root):
    modes[os.path.relpath(dirpath, root)] = stat.S_IMODE(os.stat(dirpath).st_mode)
  return modes


@pytest.mark.parametrize('temporary_path_class', [None, atomicity.CommitFileTemporaryPath])
def test_path_permission_mode_applies_to_every_directory(tmp_path, temporary_path_class):
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                           file_options=ocp.FileOptions(path_permission_mode=0o750),
                           temporary_path_class=temporary_path_class)
  ckptr.save(tmp_path / 'c', args=ocp.args.Composite(
      state=ocp.args.PyTreeSave({'a': {'b': np.arange(3)}}), meta=ocp.args.JsonSave({})))
  modes = _dir_modes(tmp_path / 'c')
  assert {'.', 'state', 'meta'} <= set(modes)
  assert set(modes.values()) == {0o750}, modes
  restored = orbax.Checkpointer(orbax.CompositeCheckpointHandler()).restore(
      tmp_path / 'c', args=orbax.args.Composite(state=orbax.args.PyTreeRestore(),
                                                meta=orbax.args.JsonRestore()))
  np.testing.assert_array_equal(restored.state['a']['b'], np.arange(3))


def test_commit_file_writes_in_place_and_orbax_restores_it(tmp_path):
  written_to = []

  class Recording(ocp.StandardCheckpointHandler):
    def save(self, directory, args):
      written_to.append(directory)
      super().save(directory, args)

  ckptr = ocp.Checkpointer(Recording(), temporary_path_class=atomicity.CommitFileTemporaryPath)
  ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave(STATE))
  assert written_to == [tmp_path / 'c']  # No temporary directory, no rename.
  assert (tmp_path / 'c' / 'commit_success.txt').read_text().startswith(
      'Checkpoint commit was successful to')
  restored = orbax.StandardCheckpointer().restore(tmp_path / 'c')
  np.testing.assert_array_equal(restored['w'], STATE['w'])
  ckptr.save(tmp_path / 'c', args=ocp.args.StandardSave({'x': np.zeros(1)}), force=True)
  assert set(ocp.StandardCheckpointer().restore(tmp_path / 'c')) == {'x'}


def test_atomic_rename_writes_into_a_temporary_directory(tmp_path):
  written_to = []

  class Recording(ocp.StandardCheckpointHandler):
    def save(self, directory, args):
      written_to.append(directory)
      super().save(directory, args)

  ocp.Checkpointer(Recording(), temporary_path_class=atomicity.AtomicRenameTemporaryPath).save(
      tmp_path / 'c', args=ocp.args.StandardSave(STATE))
  assert written_to[0].name.startswith('c.orbax-checkpoint-tmp')
  assert os.listdir(tmp_path) == ['c']


def test_temporary_path_classes_have_orbax_methods(tmp_path):
  final = tmp_path / 'step_1'
  rename = atomicity.AtomicRenameTemporaryPath.from_final(final)
  assert rename.get_final() == final and rename.get() != final
  assert atomicity.AtomicRenameTemporaryPath.from_temporary(rename.get()).get_final() == final
  assert asyncio.run(rename.create()) == rename.get() and rename.get().is_dir()
  asyncio.run(rename.finalize())
  assert final.is_dir() and not rename.get().exists()
  asyncio.run(atomicity.AtomicRenameTemporaryPath.validate_final(final))
  with pytest.raises(atomicity.ValidationError):
    asyncio.run(atomicity.AtomicRenameTemporaryPath.validate(final))

  other = tmp_path / 'step_2'
  commit = atomicity.CommitFileTemporaryPath.from_final(other)
  assert commit.get() == commit.get_final() == other
  asyncio.run(commit.create())
  asyncio.run(atomicity.CommitFileTemporaryPath.validate(other))
  with pytest.raises(atomicity.ValidationError, match='commit_success.txt'):
    asyncio.run(atomicity.CommitFileTemporaryPath.validate_final(other))
  asyncio.run(commit.finalize())
  asyncio.run(atomicity.CommitFileTemporaryPath.validate_final(other))
  assert issubclass(atomicity.CommitFileTemporaryPath, ocp.path.atomicity.TemporaryPath)
  with pytest.raises(TypeError, match='temporary_path_class must be'):
    ocp.Checkpointer(ocp.StandardCheckpointHandler(), temporary_path_class=str)


_CRASH = textwrap.dedent('''
    import os, sys
    import numpy as np
    import flaxckpt as ocp
    from flaxckpt.path import atomicity

    class Dies(ocp.StandardCheckpointHandler):
      def save(self, directory, args):
        super().save(directory, args)
        os._exit(3)  # The process dies with every file written but before the commit.

    ckptr = ocp.Checkpointer(Dies(), temporary_path_class=atomicity.CommitFileTemporaryPath)
    ckptr.save(sys.argv[1], args=ocp.args.StandardSave({'w': np.ones(4)}))
''')


def test_crash_mid_save_in_place_leaves_an_incomplete_checkpoint(tmp_path):
  root = tmp_path / 'ckpts'
  with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
      temporary_path_class=atomicity.CommitFileTemporaryPath)) as mngr:
    mngr.save(1, args=ocp.args.StandardSave({'w': np.zeros(4)}))
  proc = subprocess.run([sys.executable, '-c', _CRASH, str(root / '2')], capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert (root / '2' / '_METADATA').exists() and not (root / '2' / 'commit_success.txt').exists()
  with pytest.raises(ocp.IncompleteCheckpointError, match='never committed'):
    ocp.StandardCheckpointer().restore(root / '2')
  assert not atomicity.is_finalized(root / '2')
  with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
      temporary_path_class=atomicity.CommitFileTemporaryPath)) as mngr:
    assert mngr.all_steps() == [1]
    assert mngr.latest_step() == 1
    # The resumed run saves step 2 again: the dead save's directory is reclaimed, as Orbax does.
    assert mngr.save(2, args=ocp.args.StandardSave({'w': np.full(4, 2.0)}))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2]
  np.testing.assert_array_equal(
      orbax.CheckpointManager(root).restore(2, args=orbax.args.StandardRestore())['w'],
      np.full(4, 2.0))


def test_commit_file_save_never_takes_a_directory_a_live_save_is_writing(tmp_path):
  """An unfinished in-place save whose writer is alive (it holds the directory's lock) is not
  reclaimed: the second writer gets a clear error and the first one's files stay."""
  path = tmp_path / 'ckpt'
  first = atomicity.CommitFileTemporaryPath.from_final(path)
  first.create_sync()  # What a Checkpointer writes first: metadata without a commit time.
  (path / '_CHECKPOINT_METADATA').write_text('{"init_timestamp_nsecs": 1, '
                                             '"commit_timestamp_nsecs": null}')
  (path / 'partial').write_text('written by the first save')
  ckptr = ocp.StandardCheckpointer(temporary_path_class=atomicity.CommitFileTemporaryPath)
  with pytest.raises(ocp.CheckpointExistsError, match='writing this checkpoint in place'):
    ckptr.save(path, args=ocp.args.StandardSave({'w': np.ones(2)}))
  assert (path / 'partial').read_text() == 'written by the first save'
  first.discard()
  ckptr.save(path, args=ocp.args.StandardSave({'w': np.ones(2)}))
  assert (path / 'commit_success.txt').exists()


_TWO_PROCESSES = textwrap.dedent(r'''
    import warnings
    warnings.simplefilter('ignore')
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import flaxckpt as ocp
    from flaxckpt import _multihost

    root = ARGS[0]
    mesh = Mesh(np.array(jax.devices()), ('x',))
    value = np.arange(8, dtype=np.float32)
    tree = {'w': jax.make_array_from_callback((8,), NamedSharding(mesh, P('x')),
                                              lambda i: value[i])}
    keys = []
    def barrier_sync_fn(*, key, timeout_ms):
      keys.append(key)
      _multihost._client().wait_at_barrier(key, timeout_ms)
    options = ocp.MultiprocessingOptions(primary_host=1, barrier_sync_key_prefix='eval')
    created_by = {}
    class Watching(ocp.StandardCheckpointHandler):
      def finalize(self, directory):
        created_by['finalize'] = jax.process_index()
        super().finalize(directory)
    with ocp.AsyncCheckpointer(Watching(), multiprocessing_options=options,
                               async_options=ocp.AsyncOptions(
                                   barrier_sync_fn=barrier_sync_fn)) as ckptr:
      ckptr.save(f'{root}/c', args=ocp.args.StandardSave(tree))
      ckptr.wait_until_finished()
    restored = ocp.StandardCheckpointer().restore(f'{root}/c', args=ocp.args.StandardRestore(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                     tree)))
    ok = bool(np.array_equal(np.concatenate([np.asarray(s.data) for s in
                                             restored['w'].addressable_shards]),
                             value[[i for s in restored['w'].addressable_shards
                                    for i in range(8)[s.index[0]]]]))
    report({'finalized_by': created_by.get('finalize'), 'keys': keys, 'restored': ok})
''')


def test_primary_host_prefix_and_barrier_sync_fn_in_two_processes(tmp_path):
  """Process 1 finalizes and commits; the commit's barriers go through barrier_sync_fn, with
  the prefix in their keys; Orbax restores the checkpoint."""
  import multiprocess
  results = multiprocess.run(_TWO_PROCESSES, 2, 2, str(tmp_path))
  assert [r['finalized_by'] for r in results] == [None, 1]
  for r in results:
    assert r['restored']
    assert len(r['keys']) == 2 and all(k.startswith('flaxckpt/eval_save-') for k in r['keys'])
  restored = orbax.PyTreeCheckpointer().restore(tmp_path / 'c', args=orbax.args.PyTreeRestore(
      restore_args={'w': orbax.RestoreArgs(restore_type=np.ndarray)}))
  np.testing.assert_array_equal(restored['w'], np.arange(8, dtype=np.float32))


def _data_files(path) -> list[int]:
  return sorted(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path)
                for name in names if os.path.basename(root) == 'd')


def test_ocdbt_target_data_file_size_splits_the_data_files(tmp_path):
  """PyTreeSave(ocdbt_target_data_file_size=) bounds OCDBT's data files as in Orbax (the
  optimized-checkpointing guide's knob); both libraries read the result."""
  tree = {f'a{i}': np.random.default_rng(i).random((64, 1024), np.float32) for i in range(8)}
  for size in (None, 300_000):
    path = tmp_path / f'size-{size}'
    ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(
        tree, ocdbt_target_data_file_size=size))
    files = _data_files(path)
    if size is None:
      assert max(files) >= 8 * 64 * 1024 * 4  # One file holds all 2 MiB.
    else:
      assert len(files) >= 4 and max(files) <= 2 * size, files
    for lib in (ocp, orbax):
      restored = lib.PyTreeCheckpointer().restore(path)
      for key, value in tree.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value)
  with pytest.raises(ValueError, match='ocdbt_target_data_file_size .* must be an int >= 0'):
    ocp.PyTreeCheckpointer().save(tmp_path / 'bad', args=ocp.args.PyTreeSave(
        tree, ocdbt_target_data_file_size=-1))
  assert not (tmp_path / 'bad').exists()
