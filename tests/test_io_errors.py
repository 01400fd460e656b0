"""Saves that hit a full disk or a permission error: the error reaches the caller, no final or
temporary directory is left behind, earlier checkpoints restore unchanged, and the next save
works.

Two kinds of failure: a real ``EFBIG`` from the kernel (a subprocess with ``RLIMIT_FSIZE``, so
tensorstore's own writes fail exactly as they would on a full disk, without needing root to
make a small filesystem), and ``ENOSPC`` / ``EACCES`` raised at each step of the commit through
the storage module, which every file operation of a save goes through.
"""

import errno
import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax
import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt import _storage
from flaxckpt.legacy import checkpoints
from trees import assert_trees_equal, files_under


def _state(step: int, size: int = 64) -> dict:
  return {'w': np.arange(size, dtype=np.float32) * (step + 1), 'step': np.int32(step)}


def _leftovers(root: pathlib.Path) -> list[str]:
  """Names under ``root`` that belong to an unfinished save."""
  return sorted(str(p.relative_to(root)) for p in root.rglob('*')
                if 'tmp' in p.name or 'partial' in p.name)


# ==================================================================================================
# A real EFBIG: tensorstore and our own writes both hit the file-size limit
# ==================================================================================================

_EFBIG_SCRIPT = textwrap.dedent('''
    import json, resource, signal, sys
    import numpy as np
    import flax
    import flaxckpt as ocp
    from flaxckpt.legacy import checkpoints

    kind, root = sys.argv[1], sys.argv[2]
    small = {'w': np.arange(1000, dtype=np.float32), 'step': np.int32(1)}
    big = {'w': np.ones(4 << 20, dtype=np.float32), 'step': np.int32(2)}   # 16 MiB
    later = {'w': np.full(1000, 3, dtype=np.float32), 'step': np.int32(3)}

    def save(state, step):
      if kind in ('checkpointer', 'async_checkpointer'):
        checkpointer = (ocp.StandardCheckpointer() if kind == 'checkpointer'
                        else ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()))
        checkpointer.save(f'{root}/ckpt_{step}', args=ocp.args.StandardSave(state))
        checkpointer.wait_until_finished()
        checkpointer.close()
      elif kind == 'manager':
        with ocp.CheckpointManager(root) as manager:
          manager.save(step, args=ocp.args.StandardSave(state))
          manager.wait_until_finished()
      else:
        flax.config.update('flax_use_orbax_checkpointing', kind == 'legacy_orbax')
        checkpoints.save_checkpoint(root, state, step, keep=5)

    save(small, 1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
      save(big, 2)
      outcome = 'saved'
    except BaseException as e:
      chain, seen = [], e
      while seen is not None:
        chain.append(f'{type(seen).__name__}: {seen}')
        seen = seen.__cause__ or seen.__context__
      outcome = ' <- '.join(chain)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    save(later, 3)
    print(json.dumps(outcome))
''')

_KINDS = ['checkpointer', 'async_checkpointer', 'manager', 'legacy_msgpack', 'legacy_orbax']


@pytest.mark.parametrize('kind', _KINDS)
def test_file_size_limit_fails_the_save_and_loses_nothing(tmp_path, kind):
  root = tmp_path / 'ckpts'
  result = subprocess.run([sys.executable, '-c', _EFBIG_SCRIPT, kind, str(root)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  outcome = json.loads(result.stdout.strip().splitlines()[-1])
  assert outcome != 'saved'
  assert 'File too large' in outcome or 'EFBIG' in outcome or 'errno 27' in outcome.lower(), (
      outcome)
  assert _leftovers(root) == []
  if kind in ('checkpointer', 'async_checkpointer'):
    assert sorted(os.listdir(root)) == ['ckpt_1', 'ckpt_3']
    restored = [ocp.StandardCheckpointer().restore(root / f'ckpt_{s}') for s in (1, 3)]
  elif kind == 'manager':
    with ocp.CheckpointManager(root) as manager:
      assert manager.all_steps() == [1, 3]
      restored = [manager.restore(s) for s in (1, 3)]
  else:
    assert checkpoints.available_steps(root) == [1, 3]
    restored = [checkpoints.restore_checkpoint(root, None, step=s) for s in (1, 3)]
  assert [int(r['step']) for r in restored] == [1, 3]
  np.testing.assert_array_equal(restored[0]['w'], np.arange(1000, dtype=np.float32))
  np.testing.assert_array_equal(restored[1]['w'], np.full(1000, 3, dtype=np.float32))


# ==================================================================================================
# ENOSPC / EACCES at each storage operation a save performs
# ==================================================================================================


class _Injected:
  """Makes the first call of ``_storage.<name>`` whose path (for ``rename`` and ``link_new``, the
  target) matches raise ``error``; all other calls run unchanged."""

  def __init__(self, monkeypatch, name: str, error: OSError, match=lambda path: True):
    self.fired = False
    original = getattr(_storage, name)

    @functools.wraps(original)
    def failing(*args, **kwargs):
      if not self.fired and match(str(args[-1] if name in ('rename', 'link_new') else args[0])):
        self.fired = True
        raise error
      return original(*args, **kwargs)

    monkeypatch.setattr(_storage, name, failing)


_ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
_EACCES = PermissionError(errno.EACCES, os.strerror(errno.EACCES))

# (storage function, which call) for every step of an Orbax-layout save.
_ORBAX_FAULTS = {
    'make tmp dir': ('make_new_dir', lambda p: '.orbax-checkpoint-tmp-' in p, _EACCES),
    'write _METADATA': ('write_bytes', lambda p: p.endswith('/_METADATA'), _ENOSPC),
    'write checksums': ('write_text', lambda p: 'flaxckpt_checksums' in p, _ENOSPC),
    'write commit marker': ('write_text', lambda p: p.endswith('commit_success.txt'), _ENOSPC),
    'fsync': ('sync_tree', lambda p: True, _ENOSPC),
    'commit rename': ('rename', lambda p: not p.endswith('tmp'), _EACCES),
}


def _save_with(kind: str, root: pathlib.Path, step: int, state: dict, force: bool = False):
  """Saves ``state`` as step ``step`` with ``kind``; returns the restore function for a step."""
  if kind in ('checkpointer', 'async_checkpointer'):
    checkpointer = (ocp.StandardCheckpointer() if kind == 'checkpointer'
                    else ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()))
    try:
      checkpointer.save(root / f'ckpt_{step}', args=ocp.args.StandardSave(state), force=force)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
  elif kind == 'manager':
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=5))
    try:
      manager.save(step, args=ocp.args.StandardSave(state), force=force)
      manager.wait_until_finished()
    finally:
      manager.close()
  else:
    flax.config.update('flax_use_orbax_checkpointing', kind == 'legacy_orbax')
    checkpoints.save_checkpoint(root, state, step, keep=5, overwrite=force)


def _steps(kind: str, root: pathlib.Path) -> list[int]:
  if kind in ('checkpointer', 'async_checkpointer'):
    return sorted(int(name.split('_')[1]) for name in os.listdir(root)
                  if name.startswith('ckpt_'))
  if kind == 'manager':
    with ocp.CheckpointManager(root) as manager:
      return manager.all_steps()
  return checkpoints.available_steps(root)


def _restore(kind: str, root: pathlib.Path, step: int):
  if kind in ('checkpointer', 'async_checkpointer'):
    return ocp.StandardCheckpointer().restore(root / f'ckpt_{step}')
  if kind == 'manager':
    with ocp.CheckpointManager(root) as manager:
      return manager.restore(step)
  return checkpoints.restore_checkpoint(root, None, step=step)


def _assert_raises_oserror(call, expected: OSError):
  """``call`` raises ``expected`` itself, or an error caused by it (async saves wrap it)."""
  with pytest.raises(BaseException) as info:
    call()
  seen = info.value
  while seen is not None and seen is not expected:
    seen = seen.__cause__ or seen.__context__
  assert seen is expected, f'{info.value!r} was not caused by {expected!r}'


@pytest.fixture
def legacy_flag(set_flag):
  set_flag(False)  # Reset afterwards; _save_with sets it per kind.


@pytest.mark.parametrize('fault', list(_ORBAX_FAULTS))
@pytest.mark.parametrize('kind', ['checkpointer', 'async_checkpointer', 'manager',
                                  'legacy_orbax'])
def test_orbax_layout_save_failing_at_each_step(tmp_path, monkeypatch, legacy_flag, kind, fault):
  root = tmp_path / 'ckpts'
  _save_with(kind, root, 1, _state(1))
  before = files_under(root)
  name, match, error = _ORBAX_FAULTS[fault]
  injected = _Injected(monkeypatch, name, error, match)
  _assert_raises_oserror(lambda: _save_with(kind, root, 2, _state(2)), error)
  assert injected.fired
  monkeypatch.undo()
  assert _leftovers(root) == [] and _steps(kind, root) == [1]
  after = files_under(root)
  assert {k: v for k, v in after.items() if k in before} == before  # Step 1 untouched.
  _save_with(kind, root, 3, _state(3))
  assert _steps(kind, root) == [1, 3]
  for step in (1, 3):
    assert_trees_equal(_restore(kind, root, step), _state(step))


@pytest.mark.parametrize('fault', ['write _METADATA', 'fsync', 'commit rename'])
@pytest.mark.parametrize('kind', ['checkpointer'])
def test_failed_overwrite_keeps_the_checkpoint_it_would_replace(tmp_path, monkeypatch, kind,
                                                                fault):
  """force=True replaces a checkpoint only once the new one is complete. (A manager never
  replaces a step: save(step, force=True) of an existing one raises StepAlreadyExistsError.)"""
  root = tmp_path / 'ckpts'
  _save_with(kind, root, 1, _state(1))
  name, match, error = _ORBAX_FAULTS[fault]
  if fault == 'commit rename':  # The new checkpoint onto the old one's name (moved aside).
    match = lambda p: p.endswith(('ckpt_1', '/1'))  # noqa: E731
  injected = _Injected(monkeypatch, name, error, match)
  _assert_raises_oserror(lambda: _save_with(kind, root, 1, _state(7), force=True), error)
  assert injected.fired
  monkeypatch.undo()
  assert _leftovers(root) == [] and _steps(kind, root) == [1]
  assert_trees_equal(_restore(kind, root, 1), _state(1))


_MSGPACK_FAULTS = {
    'open file': ('open_for_write', lambda p: True, _ENOSPC),
    'commit rename': ('link_new', lambda p: p.endswith('checkpoint_2'), _EACCES),
}


@pytest.mark.parametrize('use_async', [False, True], ids=['sync', 'async'])
@pytest.mark.parametrize('fault', list(_MSGPACK_FAULTS))
def test_msgpack_save_failing_at_each_step(tmp_path, monkeypatch, set_flag, fault, use_async):
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path, _state(1), 1, keep=5)
  before = files_under(tmp_path)
  name, match, error = _MSGPACK_FAULTS[fault]
  injected = _Injected(monkeypatch, name, error, match)
  _assert_raises_oserror(lambda: _msgpack_save(tmp_path, 2, use_async), error)
  assert injected.fired
  monkeypatch.undo()
  assert _leftovers(tmp_path) == [] and checkpoints.available_steps(tmp_path) == [1]
  after = files_under(tmp_path)
  assert after == before
  _msgpack_save(tmp_path, 3, use_async)
  assert_trees_equal(checkpoints.restore_checkpoint(tmp_path, None), _state(3))
  assert_trees_equal(checkpoints.restore_checkpoint(tmp_path, None, step=1), _state(1))


def _msgpack_save(root, step: int, use_async: bool) -> None:
  manager = checkpoints.AsyncManager() if use_async else None
  checkpoints.save_checkpoint(root, _state(step), step, keep=5, async_manager=manager)
  if manager:
    manager.wait_previous_save()


def test_msgpack_save_whose_sidecar_fails_is_complete_and_says_so(tmp_path, monkeypatch,
                                                                  set_flag, caplog):
  """The sidecar is written after the commit rename. If that write fails the checkpoint is
  still complete: the save succeeds with a warning, and the file restores unchecked, like one
  flax wrote."""
  set_flag(False)
  injected = _Injected(monkeypatch, 'open_for_write', _ENOSPC, lambda p: 'crc32c' in p)
  with caplog.at_level('WARNING'):
    checkpoints.save_checkpoint(tmp_path, _state(2), 2)
  assert injected.fired
  assert 'without its checksum file' in caplog.text and 'checkpoint_2' in caplog.text
  assert os.listdir(tmp_path) == ['checkpoint_2']
  assert_trees_equal(checkpoints.restore_checkpoint(tmp_path, None), _state(2))
