"""Hostile checkpoints and directories against the core reader and writer.

Each test builds one crafted input in a sandbox (``tests/hostile.py``), runs the operation in a
fresh process with a deadline and an address-space cap, and checks that it ended with a clear
``CheckpointError`` subclass (or did the safe thing) and that nothing beside the sandbox was
read, created or changed. The OCDBT B-tree, the CLI and the legacy API have their own modules
(``test_hostile_ocdbt.py``, ``test_cli_hostile.py``, ``test_legacy_hostile.py``).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt import _safe_json, _storage, _zarr

import hostile

_CHECKPOINTER = 'import flaxckpt as ocp\nckptr = ocp.PyTreeCheckpointer()\n'


@pytest.fixture
def sandbox(tmp_path):
  return hostile.Sandbox(tmp_path)


def _save(path: pathlib.Path, tree: dict, use_ocdbt: bool = True) -> pathlib.Path:
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(
      path, args=ocp.args.PyTreeSave(tree))
  return path


def _edit_json(path: pathlib.Path, edit) -> None:
  """Rewrites a JSON file of a checkpoint; its recorded checksum is dropped with it (an
  attacker rewrites that too), so the reader's other checks are what is tested."""
  value = json.loads(path.read_text())
  path.write_text(json.dumps(edit(value)))
  _drop_checksums(next(p for p in path.parents if (p / '_METADATA').exists()))


def _drop_checksums(directory: pathlib.Path) -> None:
  shutil.rmtree(directory / 'flaxckpt_checksums', ignore_errors=True)


def _rename_leaf(directory: pathlib.Path, old: str, new_keys: list[str]) -> None:
  hostile.rename_leaf(directory, old, new_keys)
  _drop_checksums(directory)


def _restore_both_ways(sandbox: hostile.Sandbox, path: str, target: str | None = None
                       ) -> list[hostile.Outcome]:
  """Restores without a target and (if given) with the target expression ``target``."""
  outcomes = [sandbox.run(_CHECKPOINTER + f'result = ckptr.restore({path!r})')]
  if target is not None:
    outcomes.append(sandbox.run(
        _CHECKPOINTER + f'import numpy as np\nresult = ckptr.restore({path!r}, item={target})'))
  return outcomes


def _assert_refused(sandbox: hostile.Sandbox, outcomes: list[hostile.Outcome], error: str,
                    *words: str) -> None:
  for outcome in outcomes:
    assert outcome.raised(error), outcome.describe()
    for word in words:
      assert word in outcome.message, outcome.describe()
    sandbox.assert_canary_untouched(outcome)


# --- names read from checkpoint files -------------------------------------------------------------


@pytest.mark.parametrize('name', ['../../canary', '/etc', 'a/../../../canary'])
def test_a_string_leaf_named_outside_the_checkpoint_is_refused(sandbox, name):
  """Orbax 0.3 kept a string in ``<name>/_strings.json``; a name from _METADATA must never
  become a path outside the checkpoint (zarr folder layout, where that file is looked for)."""
  path = _save(sandbox.box / 'ckpt', {'text': 'hello', 'w': np.arange(3)}, use_ocdbt=False)
  _rename_leaf(path, "'text'", [name])
  outcomes = _restore_both_ways(sandbox, 'box/ckpt')
  _assert_refused(sandbox, outcomes, 'UnsafeCheckpointError', repr(name))


def test_an_array_leaf_named_outside_the_checkpoint_is_refused(sandbox):
  """An array's name is its zarr folder: '../canary/empty' would read (or probe) outside."""
  (sandbox.canary / 'empty' / '.zarray').exists()
  path = _save(sandbox.box / 'ckpt', {'w': np.arange(3)}, use_ocdbt=False)
  _rename_leaf(path, "'w'", ['../../canary/empty'])
  _assert_refused(sandbox, _restore_both_ways(sandbox, 'box/ckpt'), 'UnsafeCheckpointError')


def test_an_old_aggregate_placeholder_outside_the_checkpoint_is_refused(sandbox):
  """Orbax 0.1-0.4 checkpoints: the tree is a msgpack ``checkpoint`` file whose array leaves are
  ``PLACEHOLDER://<name>``; the name must stay inside."""
  path = sandbox.box / 'old'
  path.mkdir()
  name = '../../canary'
  (path / 'checkpoint').write_bytes(msgpack.packb({name: f'PLACEHOLDER://{name}'}))
  _assert_refused(sandbox, _restore_both_ways(sandbox, 'box/old'), 'UnsafeCheckpointError')


def test_leaf_paths_and_json_nesting_are_bounded(sandbox):
  path = _save(sandbox.box / 'ckpt', {'w': np.arange(3)})
  _rename_leaf(path, "'w'", ['k'] * 5000)  # A path of 5000 keys: restore would recurse 5000 deep.
  deep = _save(sandbox.box / 'deep', {'w': np.arange(3)})
  text = (deep / '_METADATA').read_text()
  (deep / '_METADATA').write_text(text[:-1] + ', "deep": ' + '[' * 50000 + ']' * 50000 + '}')
  _drop_checksums(deep)
  outcomes = _restore_both_ways(sandbox, 'box/ckpt') + _restore_both_ways(sandbox, 'box/deep')
  _assert_refused(sandbox, outcomes, 'LimitExceededError')
  assert '5000 keys' in outcomes[0].message and 'nested more than' in outcomes[1].message


@pytest.mark.parametrize('file', ['_sharding', '_CHECKPOINT_METADATA'])
def test_deeply_nested_side_files_are_refused_in_bounded_time(sandbox, file):
  path = _save(sandbox.box / 'ckpt', {'w': np.arange(3)})
  (path / file).write_text('{"a":' * 100000 + '1' + '}' * 100000)
  _drop_checksums(path)
  code = _CHECKPOINTER + '''
import jax
target = {'w': jax.device_put(np.arange(3))}
result = ckptr.restore('box/ckpt', args=ocp.args.PyTreeRestore(target, restore_args={
    'w': ocp.ArrayRestoreArgs(sharding=None)}))
ckptr.metadata('box/ckpt')
''' if file == '_sharding' else '''
import flaxckpt as ocp
result = ocp.CheckpointManager('box/run').restore(1)
'''
  if file == '_CHECKPOINT_METADATA':  # A manager step reads it to tell its items' handlers.
    manager_step = sandbox.box / 'run' / '1'
    manager_step.mkdir(parents=True)
    shutil.move(path, manager_step / 'state')
    (manager_step / file).write_text('{"a":' * 100000 + '1' + '}' * 100000)
  outcome = sandbox.run('import numpy as np\n' + code)
  assert not outcome.timed_out and not outcome.crashed, outcome.describe()
  assert 'RecursionError' not in outcome.mro, outcome.describe()
  if not outcome.ok:
    assert outcome.raised('CheckpointError'), outcome.describe()
  sandbox.assert_canary_untouched(outcome)


def test_safe_json_measures_nesting_outside_strings():
  assert _safe_json.depth(b'[' * 300 + b']' * 300) == 300
  assert _safe_json.depth(b'["' + b'[' * 300 + b'"]') <= 1  # Brackets inside a string.
  assert _safe_json.depth(b'["\\\\"' + b',[' * 300 + b']' * 301) == 301  # An escaped backslash.
  assert _safe_json.depth(json.dumps(['\\"[' * 300] + [[[[]]]] * 100).encode()) == 4
  with pytest.raises(ocp.LimitExceededError, match='nested more than'):
    _safe_json.loads(b'{"a":' * 300 + b'1' + b'}' * 300, 'x.json')
  assert _safe_json.loads(b'{"a": [[1]]}', 'x.json') == {'a': [[1]]}


# --- what a checkpoint directory may hold ---------------------------------------------------------


def test_a_fifo_or_a_device_link_among_the_checksums_never_hangs_a_restore(sandbox):
  """Orbax ignores flaxckpt_checksums/, flaxckpt reads it on every default restore."""
  fifo = _save(sandbox.box / 'fifo', {'w': np.arange(3)})
  os.mkfifo(fifo / 'flaxckpt_checksums' / 'process_1')
  zero = _save(sandbox.box / 'zero', {'w': np.arange(3)})
  (zero / 'flaxckpt_checksums' / 'process_1').symlink_to('/dev/zero')
  outcomes = (_restore_both_ways(sandbox, 'box/fifo', "{'w': np.zeros(3, int)}") +
              _restore_both_ways(sandbox, 'box/zero', "{'w': np.zeros(3, int)}"))
  _assert_refused(sandbox, outcomes, 'UnsafeCheckpointError')
  assert 'FIFO' in outcomes[0].message and '/dev/zero' in outcomes[2].message


@pytest.mark.parametrize('where', ['chunk', 'zarray', 'array_metadatas', 'strings'])
def test_fifos_inside_a_checkpoint_are_refused_without_blocking(sandbox, where):
  import jax
  path = _save(sandbox.box / 'ckpt', {'w': jax.numpy.arange(3), 's': 'text'}, use_ocdbt=False)
  file = {'chunk': path / 'w' / '0', 'zarray': path / 'w' / '.zarray',
          'array_metadatas': path / 'array_metadatas' / 'process_0',
          'strings': path / '_strings.json'}[where]
  file.unlink()
  os.mkfifo(file)
  _assert_refused(sandbox, _restore_both_ways(sandbox, 'box/ckpt', "{'w': np.zeros(3, int), "
                                                                   "'s': ''}"),
                  'UnsafeCheckpointError', 'FIFO')


def test_symlinked_leaf_folders_and_files_leading_outside_are_refused(sandbox):
  """A leaf's zarr folder (or its chunk) linked to a look-alike outside the checkpoint: the
  outside data must not come back as the leaf."""
  outside = _save(sandbox.canary / 'lookalike', {'w': np.frombuffer(hostile.SECRET, np.uint8)},
                  use_ocdbt=False)
  sandbox._before = hostile.snapshot(sandbox.canary)
  folder = _save(sandbox.box / 'folder', {'w': np.zeros(120, np.uint8)}, use_ocdbt=False)
  shutil.rmtree(folder / 'w')
  (folder / 'w').symlink_to(outside / 'w')
  chunk = _save(sandbox.box / 'chunk', {'w': np.zeros(120, np.uint8)}, use_ocdbt=False)
  (chunk / 'w' / '0').unlink()
  (chunk / 'w' / '0').symlink_to(outside / 'w' / '0')
  _drop_checksums(folder)
  _drop_checksums(chunk)
  outcomes = (_restore_both_ways(sandbox, 'box/folder', "{'w': np.zeros(120, np.uint8)}") +
              _restore_both_ways(sandbox, 'box/chunk', "{'w': np.zeros(120, np.uint8)}"))
  _assert_refused(sandbox, outcomes, 'UnsafeCheckpointError', 'outside')


def test_links_that_stay_inside_the_checkpoint_are_followed(tmp_path):
  """Deduplicated copies (a leaf folder linked to an identical one in the same checkpoint)
  stay readable."""
  path = _save(tmp_path / 'ckpt', {'a': np.arange(4), 'b': np.arange(4)}, use_ocdbt=False)
  shutil.rmtree(path / 'b')
  (path / 'b').symlink_to('a')
  _drop_checksums(path)
  restored = ocp.PyTreeCheckpointer().restore(path)
  np.testing.assert_array_equal(restored['b'], np.arange(4))


def test_a_manager_step_or_item_linked_outside_the_root_is_refused(sandbox):
  manager = ocp.CheckpointManager(sandbox.canary / 'run', options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False))
  manager.save(7, args=ocp.args.StandardSave({'w': np.frombuffer(hostile.SECRET, np.uint8)}))
  sandbox._before = hostile.snapshot(sandbox.canary)
  root = sandbox.box / 'run'
  root.mkdir()
  (root / '7').symlink_to(sandbox.canary / 'run' / '7')
  (root / '8').mkdir()
  (root / '8' / 'default').symlink_to(sandbox.canary / 'run' / '7' / 'default')
  outcomes = [sandbox.run(f'''
import flaxckpt as ocp
result = ocp.CheckpointManager('box/run').restore({step})''') for step in (7, 8)]
  _assert_refused(sandbox, outcomes, 'UnsafeCheckpointError', 'outside')


def test_an_oversized_metadata_file_is_refused_before_it_is_read(sandbox):
  path = _save(sandbox.box / 'ckpt', {'w': np.arange(3)})
  with open(path / '_METADATA', 'r+b') as f:  # Sparse: no disk used, 2 GiB declared.
    f.truncate(_storage.MAX_METADATA_FILE_BYTES + 1)
  _assert_refused(sandbox, _restore_both_ways(sandbox, 'box/ckpt'), 'LimitExceededError',
                  'bytes')


# --- sizes a checkpoint declares -----------------------------------------------------------------


def _declare(path: pathlib.Path, leaf: str, **fields) -> None:
  _edit_json(path / leaf / '.zarray', lambda meta: {**meta, **fields})


def test_a_zarray_declaring_a_trillion_chunks_is_refused_at_once(sandbox):
  path = _save(sandbox.box / 'ckpt', {'w': np.arange(3, dtype=np.float32)}, use_ocdbt=False)
  _declare(path, 'w', shape=[10**12], chunks=[1])
  outcomes = _restore_both_ways(sandbox, 'box/ckpt', "{'w': np.zeros(3, np.float32)}")
  _assert_refused(sandbox, outcomes, 'LimitExceededError', 'chunks')


@pytest.mark.parametrize('compressed', [False, True])
def test_a_zarray_declaring_more_bytes_than_memory_is_refused_before_allocating(sandbox,
                                                                               compressed):
  """One chunk of 400 GB (raw: our reader; zstd: tensorstore's driver): either way nothing of
  that size may be allocated (the process has a 3 GiB address-space cap)."""
  path = sandbox.box / 'ckpt'
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=compressed)
                   ).save(path, args=ocp.args.PyTreeSave({'w': np.arange(3, dtype=np.float32)}))
  _declare(path, 'w', shape=[10**11], chunks=[10**11])
  for outcome in _restore_both_ways(sandbox, 'box/ckpt'):
    assert not outcome.crashed and not outcome.timed_out, outcome.describe()
    assert outcome.raised('CheckpointError'), outcome.describe()
    assert 'MemoryError' not in outcome.mro
    sandbox.assert_canary_untouched(outcome)


def test_zarr3_metadata_declaring_more_bytes_than_memory_is_refused(sandbox):
  path = sandbox.box / 'ckpt'
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)).save(
      path, args=ocp.args.PyTreeSave({'w': np.arange(3, dtype=np.float32)}))
  def grow(meta):
    meta['shape'] = [10**11]
    meta['chunk_grid']['configuration']['chunk_shape'] = [10**11]
    meta['codecs'][0]['configuration']['chunk_shape'] = [10**11]
    return meta
  _edit_json(path / 'w' / 'zarr.json', grow)
  outcomes = _restore_both_ways(sandbox, 'box/ckpt')
  _assert_refused(sandbox, outcomes, 'LimitExceededError', 'bytes')


def test_chunk_grid_and_allocation_bounds_are_checked_before_use():
  with pytest.raises(ocp.LimitExceededError, match='chunks'):
    _zarr.check_grid((10**9, 10**9), (1, 1), 'x')
  with pytest.raises(ValueError, match='whole numbers'):
    _zarr.check_grid((4,), (0,), 'x')
  with pytest.raises(ValueError, match='whole numbers'):
    _zarr.check_grid((4.0,), (2,), 'x')
  _zarr.check_grid((10**6, 10**6), (10**5, 10**5), 'x')  # 100 chunks: fine.
  with pytest.raises(ocp.LimitExceededError, match='memory'):
    _zarr.check_allocation((10**13,), np.dtype(np.float32), 'x')


# --- values --------------------------------------------------------------------------------------


def test_a_missing_zarr2_chunk_reads_as_the_fill_value_as_orbax_does(tmp_path):
  """zarr v2 fills a chunk that was never written with the .zarray's fill_value; Orbax (through
  tensorstore) restores that, and so must flaxckpt, not zeros."""
  import orbax.checkpoint as orbax
  values = np.arange(1, 9, dtype=np.float32)
  path = _save(tmp_path / 'ckpt', {'w': values, 'n': np.arange(8, dtype=np.int32)},
               use_ocdbt=False)
  for leaf, fill in (('w', 'NaN'), ('n', 7)):
    _declare(path, leaf, chunks=[4], fill_value=fill)
    (path / leaf / '0').write_bytes((values if leaf == 'w' else np.arange(8, dtype=np.int32)
                                     )[:4].astype('<f4' if leaf == 'w' else '<i4').tobytes())
    (path / leaf / '1').unlink(missing_ok=True)
  _edit_json(path / '_METADATA',
             lambda meta: {**meta, 'store_array_data_equal_to_fill_value': False})
  ours = ocp.PyTreeCheckpointer().restore(path)
  theirs = orbax.PyTreeCheckpointer().restore(path)
  np.testing.assert_array_equal(ours['w'], [1, 2, 3, 4, np.nan, np.nan, np.nan, np.nan])
  np.testing.assert_array_equal(ours['n'], [0, 1, 2, 3, 7, 7, 7, 7])
  for leaf in ('w', 'n'):
    np.testing.assert_array_equal(ours[leaf], np.asarray(theirs[leaf]))


# --- names from the caller ------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['../x', '/abs', 'a/b', '..', '.', '', 'a\\b', 'a\x00b'])
def test_item_names_and_step_prefixes_that_leave_the_directory_are_refused(tmp_path, name):
  with pytest.raises(ValueError, match='item name'):
    ocp.args.Composite({name: ocp.args.StandardSave({'w': np.arange(2)})})
  with pytest.raises(ValueError, match='Item name'):
    ocp.CheckpointManager(tmp_path / 'run', item_names=(name,))
  if name:
    with pytest.raises(ValueError, match='step_prefix'):
      ocp.CheckpointManager(tmp_path / 'run', options=ocp.CheckpointManagerOptions(
          step_prefix=name))
  assert sorted(p.name for p in tmp_path.iterdir()) in ([], ['run'])
  assert not (tmp_path / 'run').exists() or list((tmp_path / 'run').iterdir()) == []


# --- what a save writes through -------------------------------------------------------------------


_FIXED_CLOCK = '''
import flaxckpt as ocp, numpy as np
from flaxckpt import _metadata
_metadata.now_ns = lambda: 1234  # The attacker knows the temporary name this save will take.
'''


@pytest.mark.parametrize('kind', ['checkpointer', 'async', 'manager'])
def test_a_link_planted_at_the_temporary_name_is_never_written_through(sandbox, kind):
  name = '1' if kind == 'manager' else 'ckpt'
  target = sandbox.box / 'run' if kind == 'manager' else sandbox.box
  target.mkdir(exist_ok=True)
  (target / f'{name}.orbax-checkpoint-tmp-1234').symlink_to(sandbox.canary / 'empty')
  (target / f'{name}.orbax-checkpoint-tmp').symlink_to(sandbox.canary / 'empty')  # Older name.
  save = {
      'checkpointer': "ocp.StandardCheckpointer().save('box/ckpt', {'w': np.arange(3)})",
      'async': ("c = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())\n"
                "c.save('box/ckpt', args=ocp.args.StandardSave({'w': np.arange(3)}))\n"
                "c.wait_until_finished()"),
      'manager': ("m = ocp.CheckpointManager('box/run')\n"
                  "m.save(1, args=ocp.args.StandardSave({'w': np.arange(3)}))\n"
                  "m.wait_until_finished()"),
  }[kind]
  outcome = sandbox.run(_FIXED_CLOCK + save)
  assert outcome.raised('UnsafeCheckpointError'), outcome.describe()
  assert 'symbolic link' in outcome.message
  sandbox.assert_canary_untouched(outcome)
  assert (target / f'{name}.orbax-checkpoint-tmp-1234').is_symlink()  # Refused, not removed.
  assert not (target / name).exists()


_WRITER = '''
import sys, numpy as np, flaxckpt as ocp
root, writer = sys.argv[1], int(sys.argv[2])
options = ocp.CheckpointManagerOptions(max_to_keep=4, enable_async_checkpointing=writer == 1)
manager = ocp.CheckpointManager(root, options=options)
failures = 0
for step in range(40):
  tree = {'w': np.full(20000, writer * 1000 + step, np.int64), 'b': np.full(7, writer, np.int8)}
  try:
    manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()
  except Exception as e:  # Another writer got there first: a clear error is allowed.
    failures += 1
    clear = (ocp.CheckpointError, ocp.checkpoint_manager.StepAlreadyExistsError, FileNotFoundError)
    assert isinstance(e, clear) or isinstance(e.__cause__, ocp.CheckpointError), repr(e)
print(failures)
'''


def test_two_managers_writing_one_directory_never_leave_a_mixed_step(tmp_path):
  """Two processes save the same steps into one directory with their own values. Either may
  fail a save with a clear error; every step listed afterwards is exactly one writer's."""
  root = tmp_path / 'run'
  procs = [subprocess.Popen([sys.executable, '-c', _WRITER, str(root), str(writer)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
           for writer in (1, 2)]
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  manager = ocp.CheckpointManager(root)
  steps = manager.all_steps()
  assert steps, os.listdir(root)
  for step in steps:
    restored = manager.restore(step)
    writer = int(restored['b'][0])
    assert writer in (1, 2)
    np.testing.assert_array_equal(restored['b'], np.full(7, writer, np.int8))
    np.testing.assert_array_equal(restored['w'], np.full(20000, writer * 1000 + step))


def test_cleanup_and_later_saves_leave_a_running_save_alone(tmp_path):
  """A save holds a lock on its temporary directory while it runs: a manager's cleanup and a
  later save to the same path remove only directories whose writer is gone."""
  import threading
  gate, started = threading.Event(), threading.Event()

  class Slow(ocp.PyTreeCheckpointHandler):
    def save(self, directory, args):
      started.set()
      gate.wait(60)
      super().save(directory, args)

  errors = []

  def save_slowly():
    try:
      ocp.Checkpointer(Slow()).save(tmp_path / 'run' / '1',
                                    args=ocp.args.PyTreeSave({'w': np.arange(3)}))
    except ocp.CheckpointExistsError as e:
      errors.append(e)

  thread = threading.Thread(target=save_slowly)
  thread.start()
  assert started.wait(60)
  (running,) = (tmp_path / 'run').glob('1.orbax-checkpoint-tmp-*')
  dead = tmp_path / 'run' / '1.orbax-checkpoint-tmp-1'  # A writer that died long ago.
  dead.mkdir()
  os.utime(dead, (1, 1))
  ocp.CheckpointManager(tmp_path / 'run', options=ocp.CheckpointManagerOptions(
      cleanup_tmp_directories=True))
  assert running.is_dir() and not dead.exists()
  dead.mkdir()
  os.utime(dead, (1, 1))
  ocp.StandardCheckpointer().save(tmp_path / 'run' / '1', {'w': np.arange(4)})
  assert running.is_dir() and not dead.exists()
  gate.set()
  thread.join(60)
  assert len(errors) == 1  # The second save got there first.
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['1']
  np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(tmp_path / 'run' / '1')['w'],
                                np.arange(4))
