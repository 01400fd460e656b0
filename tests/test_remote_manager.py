"""CheckpointManager features on buckets, against real servers on loopback (tests/object_store.py):
every test runs on moto's S3 server and on fake-gcs-server. What a manager deletes is gone from
the bucket listing, not only from ``all_steps``; what it records (metrics, root metadata) a fresh
manager reads back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt import _storage

pytest_plugins = ['object_store']

_COMMIT = 'commit_success.txt'


@pytest.fixture
def root(bucket_url, tmp_path, monkeypatch):
  """``bucket_url/run``; the test runs in an empty cwd, checked afterwards for a local folder
  a URL could have become."""
  monkeypatch.chdir(tmp_path)
  yield bucket_url + '/run'
  for name in ('s3:', 'gs:'):
    assert not os.path.exists(name) and not (tmp_path / name).exists()


def _names(url: str) -> list[str]:
  path = _storage.as_storage_path(url)
  return _storage.list_names(path) if _storage.is_dir(path) else []


def _steps_in_bucket(url: str) -> list[str]:
  """The step-like prefixes under ``url``, committed or not."""
  return [n for n in _names(url) if n[-1:].isdigit()]


def _state(step: int) -> dict[str, Any]:
  return {'w': np.arange(4, dtype=np.float32) + step, 'step': step}


def _save(manager: ocp.CheckpointManager, step: int, **kwargs: Any) -> bool:
  saved = manager.save(step, args=ocp.args.StandardSave(_state(step)), **kwargs)
  manager.wait_until_finished()
  return saved


def _check_restore(manager: ocp.CheckpointManager, step: int) -> None:
  restored = manager.restore(step, args=ocp.args.StandardRestore(_state(step)))
  np.testing.assert_array_equal(restored['w'], _state(step)['w'])
  assert restored['step'] == step


def test_max_to_keep_deletes_from_the_bucket_and_delete_removes_a_step(root):
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(root, options=options) as manager:
    for step in range(4):
      assert _save(manager, step)
    assert manager.all_steps() == [2, 3]
    assert _steps_in_bucket(root) == ['2', '3']
    manager.delete(2)
    assert manager.all_steps() == [3] and _steps_in_bucket(root) == ['3']
    with pytest.raises(FileNotFoundError, match=f'No step 2 under {root}'):
      manager.delete(2)
  fresh = ocp.CheckpointManager(root, options=options)
  assert fresh.all_steps() == [3]
  _check_restore(fresh, 3)


_LOSSES = {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3}


def _best_run(directory: Any, **options: Any) -> tuple[list[int], int | None]:
  """Steps 0-4 with the losses above and step 5 without metrics; the steps kept and the
  best step as a fresh manager sees them, after checking that it reads every metric back."""
  def make():
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        best_fn=lambda m: m['loss'], max_to_keep=2, **options))
  with make() as manager:
    for step, loss in _LOSSES.items():
      _save(manager, step, metrics={'loss': loss})
    _save(manager, 5)
    kept = manager.all_steps()
  fresh = make()
  assert fresh.all_steps() == kept
  for step in kept:
    assert fresh.metrics(step) == ({'loss': _LOSSES[step]} if step in _LOSSES else None)
  return kept, fresh.best_step()


@pytest.mark.parametrize('mode, without_metrics', [('min', True), ('max', False)])
def test_best_metric_retention_matches_a_local_disk(root, tmp_path, mode, without_metrics):
  """best_fn/best_mode/keep_checkpoints_without_metrics keep the same steps on a bucket as on
  a local disk, the others are gone from the bucket, and a fresh manager reads the metrics."""
  options = {'best_mode': mode, 'keep_checkpoints_without_metrics': without_metrics}
  kept, best = _best_run(root, **options)
  assert (kept, best) == _best_run(tmp_path / 'local', **options)
  scored = sorted(_LOSSES, key=lambda s: _LOSSES[s], reverse=mode == 'max')
  assert best == scored[0]
  assert set(scored[:2]) <= set(kept)  # The two best of max_to_keep=2.
  assert (5 in kept) == without_metrics
  assert _steps_in_bucket(root) == [str(s) for s in kept]


def test_root_metadata_is_written_once_and_read_by_a_fresh_manager(root):
  with ocp.CheckpointManager(root, metadata={'model': 'mlp', 'width': 64}) as manager:
    _save(manager, 0)
    assert manager.metadata() == {'model': 'mlp', 'width': 64}
  assert ocp.CheckpointManager(root).metadata() == {'model': 'mlp', 'width': 64}
  # Orbax does not rewrite it either: the first run's metadata stands.
  assert ocp.CheckpointManager(root, metadata={'model': 'cnn'}).metadata() == {
      'model': 'mlp', 'width': 64}
  assert 'metadata' in _names(root) and ocp.CheckpointManager(root).all_steps() == [0]


def test_cleanup_tmp_directories_removes_uncommitted_steps_at_start(root):
  """On a bucket a save is written in place, so what a killed save leaves is a step prefix
  without commit_success.txt (and, from a local disk copied up, a '.orbax-checkpoint-tmp'
  directory): a manager with cleanup_tmp_directories removes both when it starts; without it,
  they stay and are never listed."""
  with ocp.CheckpointManager(root) as manager:
    _save(manager, 1)
  leftovers = [f'{root}/3/default/_METADATA', f'{root}/ckpt_4/default/x',
               f'{root}/5.orbax-checkpoint-tmp-123/default/x']
  for url in leftovers:
    _storage.write_text(_storage.as_storage_path(url), 'from a save that died')
  assert ocp.CheckpointManager(root).all_steps() == [1]
  assert set(_names(root)) >= {'1', '3', 'ckpt_4', '5.orbax-checkpoint-tmp-123'}
  options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True)
  with ocp.CheckpointManager(root, options=options) as manager:
    assert manager.all_steps() == [1]
    assert _names(root) == ['1']
    _check_restore(manager, 1)


def test_save_decisions_interval_save_on_steps_force_and_preemption(root):
  """save_interval_steps and save_on_steps decide which steps reach the bucket; force saves
  regardless. Without JAX's distributed runtime there is no preemption sync point, so
  reached_preemption is False (as in Orbax) and a save at preemption is a forced save."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=3, save_on_steps=[4])
  with ocp.CheckpointManager(root, options=options) as manager:
    # Step 0's save goes on in the background (it has no temporary directory on a bucket):
    # it counts as saved, so step 1 is not due.
    assert manager.save(0, args=ocp.args.StandardSave(_state(0)))
    assert not manager.should_save(1) and not _save(manager, 1)
    assert [step for step in range(1, 8) if _save(manager, step)] == [3, 4, 6]
    assert not manager.reached_preemption(7) and not manager.should_save(7)
    assert _save(manager, 7, force=True)
    assert manager.all_steps() == [0, 3, 4, 6, 7]
    with pytest.raises(ocp.checkpoint_manager.StepAlreadyExistsError):
      _save(manager, 7, force=True)
  assert _steps_in_bucket(root) == ['0', '3', '4', '6', '7']
  assert ocp.CheckpointManager(root).all_steps() == [0, 3, 4, 6, 7]


def test_step_prefix_and_fixed_length_name_the_objects(root):
  options = ocp.CheckpointManagerOptions(step_prefix='ckpt', step_format_fixed_length=4,
                                         max_to_keep=1)
  with ocp.CheckpointManager(root, options=options) as manager:
    for step in (2, 12):
      _save(manager, step)
    assert manager.all_steps() == [12]
  assert _steps_in_bucket(root) == ['ckpt_0012']
  fresh = ocp.CheckpointManager(root, options=options)
  assert fresh.all_steps() == [12]
  _check_restore(fresh, 12)
  assert ocp.CheckpointManager(root).all_steps() == []  # Without the prefix: not its steps.
  iterated = list(ocp.checkpoint_utils.checkpoints_iterator(
      root, timeout=0, step_prefix='ckpt', step_format_fixed_length=4))
  assert iterated == [12]


def test_iterator_snapshots_a_bucket_step_into_a_local_directory(root, tmp_path):
  """With snapshot_dir, each step of a bucket root is downloaded into the local directory
  while the loop body runs (restorable there, without the reader's lock), and the copy is
  removed afterwards; wait_for_new_checkpoint does the same."""
  snapshots = tmp_path / 'snapshots'
  with ocp.CheckpointManager(root) as manager:
    for step in (0, 1):
      _save(manager, step)
  (snapshots / '0').mkdir(parents=True)  # Left by a reader that crashed.
  seen = []
  for step in ocp.checkpoint_utils.checkpoints_iterator(root, timeout=0, seconds_to_sleep=0.05,
                                                        snapshot_dir=snapshots):
    copy = snapshots / str(step)
    assert sorted(os.listdir(snapshots)) == [str(step)]
    assert _COMMIT in os.listdir(copy) and 'LOCKED' not in os.listdir(copy)
    restored = ocp.StandardCheckpointer().restore(copy / 'default')
    np.testing.assert_array_equal(restored['w'], _state(step)['w'])
    assert 'LOCKED' in _names(f'{root}/{step}')  # The bucket's step is held meanwhile.
    seen.append(step)
  assert seen == [1] and os.listdir(snapshots) == []
  with ocp.checkpoint_utils.wait_for_new_checkpoint(root, timeout=0, snapshot_dir=snapshots,
                                                    until_step=1) as step:
    assert step == 1 and (snapshots / '1' / 'default' / '_METADATA').is_file()
  assert os.listdir(snapshots) == [] and 'LOCKED' not in _names(f'{root}/1')
  with pytest.raises(NotImplementedError, match='s3://elsewhere/snapshots'):
    with ocp.checkpoint_utils.wait_for_new_checkpoint(root, timeout=0,
                                                      snapshot_dir='s3://elsewhere/snapshots'):
      pass


def test_a_manager_in_another_process_sees_each_step_once_committed(root, tmp_path):
  """A reader process reloads its manager until each step appears and restores it; the
  writer saves the next step only after the reader has read the previous one, so each step
  was seen as soon as it committed, by the same long-lived manager. A step prefix without
  commit_success.txt is never listed."""
  script = textwrap.dedent(f'''
      import sys, time
      import flaxckpt as ocp
      manager = ocp.CheckpointManager({root!r}, options=ocp.CheckpointManagerOptions(
          read_only=True))
      print('ready', manager.all_steps(), flush=True)
      for want in range(3):
        deadline = time.monotonic() + 60
        while want not in manager.all_steps(read=True):
          assert time.monotonic() < deadline, manager.all_steps()
          time.sleep(0.02)
        restored = manager.restore(want)
        print('seen', want, int(restored['w'][0]), manager.all_steps(), flush=True)
      ''')
  errors = tmp_path / 'reader.err'
  with open(errors, 'w') as stderr, subprocess.Popen(
      [sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=stderr, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'}) as child:
    try:
      assert child.stdout is not None
      assert child.stdout.readline().split() == ['ready', '[]'], errors.read_text()
      _storage.write_text(_storage.as_storage_path(f'{root}/9/default/_METADATA'), 'unfinished')
      with ocp.CheckpointManager(root) as manager:
        for step in range(3):
          _save(manager, step)
          line = child.stdout.readline().split()
          assert line[:3] == ['seen', str(step), str(step)], (line, errors.read_text())
          assert '9]' not in line[-1]
      assert child.wait(60) == 0, errors.read_text()
    finally:
      if child.poll() is None:
        child.kill()


def test_a_save_at_a_preemption_sync_point_ignores_the_interval(root, tmp_path):
  """In a process of JAX's distributed runtime (one process here) that gets SIGTERM, JAX's
  preemption sync manager picks a sync point a few steps later: there reached_preemption is
  True and the manager saves that step although save_interval_steps would skip it (Orbax's
  semantics), and the step is committed on the bucket."""
  script = textwrap.dedent(f'''
      import os, signal, socket, time
      import jax
      with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
      jax.distributed.initialize(f'127.0.0.1:{{port}}', num_processes=1, process_id=0)
      import flaxckpt as ocp
      import numpy as np
      options = ocp.CheckpointManagerOptions(save_interval_steps=1000)
      with ocp.CheckpointManager({root!r}, options=options) as manager:
        saved = [s for s in (0, 1, 2) if manager.save(s, args=ocp.args.JsonSave({{'s': s}}))]
        os.kill(os.getpid(), signal.SIGTERM)  # The notice a preempted VM gets.
        for step in range(3, 600):
          if manager.save(step, args=ocp.args.JsonSave({{'s': step}})):
            saved.append(step)
            break
          time.sleep(0.02)
        manager.wait_until_finished()
        print('saved', *saved, flush=True)
      jax.distributed.shutdown()
      ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  words = result.stdout.split()
  assert words[:2] == ['saved', '0'] and len(words) == 3, result.stdout
  preempted = int(words[2])
  assert preempted > 1
  assert ocp.CheckpointManager(root).all_steps() == [0, preempted]
  assert _COMMIT in _names(f'{root}/{preempted}')
