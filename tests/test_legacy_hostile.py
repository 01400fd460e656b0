"""Legacy ``flax.training.checkpoints`` against hostile directories and concurrent writers: two
processes saving into one directory never mix their files, a caller's ``prefix`` never leads
outside ``ckpt_dir``, planted links are never written through, readers never hang on a FIFO or
read through a link out of the directory, and a checksum sidecar never blocks a file that flax
rewrote. Real processes, real flax as the peer, and the sandbox of ``hostile.py``."""

import ast
import json
import os
import pathlib
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from flax.training import checkpoints as flax_ckpts

import hostile
from flaxckpt import _checksums
from flaxckpt.legacy import _sidecar, checkpoints

_SIZE = 1 << 15  # Elements per leaf: files big enough that two writers overlap in time.


def _sidecar_of(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f'.{path.name}.crc32c')


def _value(writer: int, step: int) -> int:
  return writer * 100_000 + step


# --- two writers on one directory ------------------------------------------------------------

_WRITER = """
import sys, warnings
import numpy as np
import flax
flax.config.update('flax_use_orbax_checkpointing', False)
from flax import errors
from flaxckpt.legacy import checkpoints
directory, writer, overwrite, use_async = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', \\
    sys.argv[4] == '1'
manager = checkpoints.AsyncManager() if use_async else None
import os, time
open(os.path.join(directory, f'.ready-{writer}'), 'w').close()  # Start together.
while len([n for n in os.listdir(directory) if n.startswith('.ready-')]) < 2:
  time.sleep(0.001)
refused = 0
for step in range(60):
  value = writer * 100_000 + step
  state = {'a': np.full(%d, value, np.int64), 'b': np.full(%d, -value, np.int64),
           'writer': writer, 'step': step}
  try:
    checkpoints.save_checkpoint(directory, state, step, keep=8, overwrite=overwrite,
                                async_manager=manager)
    if manager:
      manager.wait_previous_save()
  except errors.InvalidCheckpointError:
    refused += 1  # The other writer committed this step or a later one first.
print('refused', refused)
""" % (_SIZE, _SIZE)


def _check_every_listed_step(directory: pathlib.Path) -> list[int]:
  """Each listed step restores, checksum checked, as exactly one writer's state for it."""
  steps = checkpoints.available_steps(directory)
  assert steps == flax_ckpts.available_steps(directory)
  for step in steps:
    state = checkpoints.restore_checkpoint(directory, None, step=step)
    writer = state['writer']
    assert state['step'] == step and writer in (1, 2)
    np.testing.assert_array_equal(state['a'], np.full(_SIZE, _value(writer, step)))
    np.testing.assert_array_equal(state['b'], np.full(_SIZE, -_value(writer, step)))
    path = directory / f'checkpoint_{step}'
    recorded = json.loads(_sidecar_of(path).read_text())
    info = path.stat()
    assert (recorded['inode'], recorded['mtime_ns'], recorded['size']) == (
        info.st_ino, info.st_mtime_ns, info.st_size), f'sidecar of another file at step {step}'
  return steps


@pytest.mark.parametrize('overwrite', [False, True])
def test_two_processes_saving_into_one_directory_never_mix_files(tmp_path, overwrite):
  """One writer saves synchronously, the other through an AsyncManager, the same 60 steps with
  different values: every listed step is one writer's, whole, with that file's sidecar."""
  processes = [subprocess.Popen([sys.executable, '-c', _WRITER, str(tmp_path), str(writer),
                                 str(int(overwrite)), str(int(writer == 2))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for writer in (1, 2)]
  for process in processes:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
  steps = _check_every_listed_step(tmp_path)
  assert steps and steps[-1] == 59
  assert [name for name in os.listdir(tmp_path) if 'tmp' in name] == []


# --- names from the caller ----------------------------------------------------------------------


@pytest.mark.parametrize('prefix', ['../', 'a/b_', '/abs/ckpt_', 'x\x00'])
def test_prefix_that_leads_outside_ckpt_dir_is_refused_everywhere(tmp_path, set_flag, prefix):
  sandbox = hostile.Sandbox(tmp_path)
  ckpt_dir = sandbox.box / 'ckpts'
  (sandbox.box / 'sibling').mkdir()
  calls = {
      'save_checkpoint': lambda: checkpoints.save_checkpoint(ckpt_dir, {'x': np.ones(2)}, 1,
                                                             prefix=prefix),
      'save_checkpoint_multiprocess': lambda: checkpoints.save_checkpoint_multiprocess(
          ckpt_dir, {'x': np.ones(2)}, 1, prefix=prefix),
      'restore_checkpoint': lambda: checkpoints.restore_checkpoint(ckpt_dir, None, prefix=prefix),
      'restore_checkpoint(step)': lambda: checkpoints.restore_checkpoint(ckpt_dir, None, step=1,
                                                                         prefix=prefix),
      'latest_checkpoint': lambda: checkpoints.latest_checkpoint(ckpt_dir, prefix),
      'available_steps': lambda: checkpoints.available_steps(ckpt_dir, prefix),
  }
  for use_orbax in (False, True):
    set_flag(use_orbax)
    for name, call in calls.items():
      with pytest.raises(ValueError, match='prefix=') as info:
        call()
      assert repr(prefix) in str(info.value), name
  assert sorted(os.listdir(sandbox.box)) == ['sibling']
  sandbox.assert_canary_untouched()


def test_step_that_is_not_a_name_is_refused(tmp_path, set_flag):
  set_flag(False)
  for step in ('../../canary', 'a/1', '.'):
    with pytest.raises(ValueError, match='not an entry of ckpt_dir'):
      checkpoints.save_checkpoint(tmp_path / 'ckpts', {'x': 1}, step, prefix='')
  assert os.listdir(tmp_path) == []


# --- planted links ------------------------------------------------------------------------------


def test_links_planted_at_temporary_and_sidecar_names_are_never_written_through(tmp_path,
                                                                                 set_flag):
  """Links to the canary at every name a save (ours, flax's or Orbax's) has used for its
  temporaries: the save writes its own new files; retention removes a linked checkpoint's link,
  never its target."""
  sandbox = hostile.Sandbox(tmp_path)
  ckpt_dir = sandbox.box
  for name in ('checkpoint_tmp', 'checkpoint_tmp_gda', '.checkpoint_5.crc32c',
               '.checkpoint_5.crc32c.tmp', '.checkpoint_6.crc32c'):
    os.symlink(sandbox.secret, ckpt_dir / name)
  for name in ('checkpoint_6.orbax-checkpoint-tmp', 'checkpoint_5_gda'):
    os.symlink(sandbox.canary / 'empty', ckpt_dir / name)
  os.symlink(sandbox.canary / 'empty', ckpt_dir / 'checkpoint_1')  # Retention deletes it.
  set_flag(False)
  checkpoints.save_checkpoint(ckpt_dir, {'x': np.arange(4)}, 5, keep=2)
  set_flag(True)
  checkpoints.save_checkpoint(ckpt_dir, {'x': np.arange(6)}, 6, keep=2)
  assert not os.path.lexists(ckpt_dir / 'checkpoint_1')
  assert checkpoints.available_steps(ckpt_dir) == [5, 6]
  assert checkpoints.restore_checkpoint(ckpt_dir, None, step=5)['x'].tolist() == list(range(4))
  assert checkpoints.restore_checkpoint(ckpt_dir, None)['x'].tolist() == list(range(6))
  assert not _sidecar_of(ckpt_dir / 'checkpoint_5').is_symlink()
  sandbox.assert_canary_untouched()


# --- readers ------------------------------------------------------------------------------------


_READERS = """
import os, json, msgpack, numpy as np
import flax
flax.config.update('flax_use_orbax_checkpointing', False)
from flaxckpt.legacy import checkpoints
box = os.path.abspath('box')
def attempt(name, ckpt_dir, **kwargs):
  try:
    value = checkpoints.restore_checkpoint(ckpt_dir, None, **kwargs)
    return ('ok', repr(value)[:300])
  except Exception as e:
    return (type(e).__name__, str(e)[:400])
def placeholder_ckpt(directory, subpath):
  os.makedirs(directory)
  with open(os.path.join(directory, 'checkpoint_1'), 'wb') as f:
    f.write(msgpack.packb({subpath: '//GDAPlaceholder:' + subpath}))
  return directory
result = {}
os.makedirs('box/fifo'); os.mkfifo('box/fifo/checkpoint_1')
result['fifo'] = attempt('fifo', 'box/fifo')
result['fifo_given'] = attempt('fifo', 'box/fifo/checkpoint_1')
os.makedirs('box/zero'); os.symlink('/dev/zero', 'box/zero/checkpoint_1')
result['dev_zero_link'] = attempt('zero', 'box/zero')
result['dev_zero_given'] = attempt('zero', 'box/zero/checkpoint_1')
os.makedirs('box/out'); os.symlink(os.path.abspath('canary/secret.bin'), 'box/out/checkpoint_1')
result['link_out'] = attempt('out', 'box/out')
result['link_out_step'] = attempt('out', 'box/out', step=1)
os.makedirs('box/side')
checkpoints.save_checkpoint('box/side', {'x': np.arange(3)}, 1)
os.remove('box/side/.checkpoint_1.crc32c'); os.mkfifo('box/side/.checkpoint_1.crc32c')
result['fifo_sidecar'] = attempt('side', 'box/side')
d = placeholder_ckpt('box/gda_escape', '../../canary')
result['gda_dotdot'] = attempt('gda', d)
d = placeholder_ckpt('box/gda_nul', 'w\\x00x')
result['gda_nul'] = attempt('gda', d)
d = placeholder_ckpt('box/gda_fifo', 'w')
os.makedirs(d + '/checkpoint_1_gda/w'); os.mkfifo(d + '/checkpoint_1_gda/w/.zarray')
result['gda_fifo'] = attempt('gda', d)
d = placeholder_ckpt('box/gda_link', 'w')
os.symlink(os.path.abspath('canary'), d + '/checkpoint_1_gda')
result['gda_link_out'] = attempt('gda', d)
"""


def test_readers_never_hang_nor_read_outside(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  outcome = sandbox.run(_READERS, timeout=60)
  assert outcome.ok, outcome.describe()
  results = ast.literal_eval(outcome.result)
  expected = {'fifo': 'UnsafeCheckpointError', 'fifo_given': 'UnsafeCheckpointError',
              'dev_zero_link': 'UnsafeCheckpointError', 'dev_zero_given': 'UnsafeCheckpointError',
              'link_out': 'UnsafeCheckpointError', 'link_out_step': 'UnsafeCheckpointError',
              'fifo_sidecar': 'UnsafeCheckpointError', 'gda_dotdot': 'UnsafeCheckpointError',
              'gda_nul': 'UnsafeCheckpointError', 'gda_fifo': 'UnsafeCheckpointError',
              'gda_link_out': 'UnsafeCheckpointError'}
  assert {case: kind for case, (kind, _) in results.items()} == expected, results
  for case, (_, message) in results.items():
    assert 'box' in message, (case, message)  # The message names the path.
  sandbox.assert_canary_untouched(outcome)


@pytest.mark.parametrize('shape', [[1] * 65, [0, 2**63], [0] + [2**62 - 1] * 60,
                                   [2**61] * 64])
def test_declared_array_shapes_are_bounded_before_use(tmp_path, shape):
  """Shapes with too many axes, axes numpy cannot hold, or a product too big to compute
  quickly: refused at once, naming the file."""
  path = tmp_path / 'checkpoint_1'
  inner = msgpack.packb([shape, 'float32', b''])
  path.write_bytes(msgpack.packb({'w': msgpack.ExtType(1, inner)}))
  started = time.monotonic()
  with pytest.raises(checkpoints.CorruptCheckpointError, match='shape') as info:
    checkpoints.restore_checkpoint(path, None)
  assert str(path) in str(info.value) and time.monotonic() - started < 5


# --- sidecars and flax as a second writer -------------------------------------------------------


def test_sidecar_of_a_file_flax_rewrote_is_skipped(tmp_path, set_flag):
  """flax's save_checkpoint (overwrite=True) replaces our file; restore reads flax's file."""
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path, {'x': np.zeros(64)}, 5)
  for value in range(1, 6):  # Repeatedly: a freed inode number may come back.
    flax_ckpts.save_checkpoint(tmp_path, {'x': np.full(64, float(value))}, 5, overwrite=True)
    restored = checkpoints.restore_checkpoint(tmp_path, None)
    np.testing.assert_array_equal(restored['x'], np.full(64, float(value)))
  assert _sidecar_of(tmp_path / 'checkpoint_5').exists()


def _damage_keeping_mtime(path: pathlib.Path, data: bytes) -> None:
  info = path.stat()
  with open(path, 'r+b') as f:  # In place: the same inode.
    f.write(data)
    f.truncate(len(data))
  os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
  assert path.stat().st_ino == info.st_ino


def test_damage_to_the_same_file_still_raises(tmp_path, set_flag):
  set_flag(False)
  path = pathlib.Path(checkpoints.save_checkpoint(tmp_path, {'x': np.arange(64.0)}, 5))
  data = path.read_bytes()
  flipped = bytearray(data)
  flipped[-9] ^= 0x40  # Inside the array's bytes: decodes to a wrong value.
  _damage_keeping_mtime(path, bytes(flipped))
  with pytest.raises(checkpoints.ChecksumMismatchError, match='crc32c'):
    checkpoints.restore_checkpoint(tmp_path, None)
  _damage_keeping_mtime(path, data[:-16])
  with pytest.raises(checkpoints.ChecksumMismatchError,
                     match=f'has {len(data) - 16} bytes, but {len(data)} were written'):
    checkpoints.restore_checkpoint(tmp_path, None)


def test_sidecar_without_identity_is_checked_as_before(tmp_path, set_flag):
  set_flag(False)
  path = pathlib.Path(checkpoints.save_checkpoint(tmp_path, {'x': np.arange(64.0)}, 5))
  checksum = _sidecar.Checksum(path.stat().st_size, _checksums.of_bytes(path.read_bytes()))
  _sidecar_of(path).write_text(
      f'{{"algorithm": "crc32c", "size": {checksum.size}, "crc32c": {checksum.crc32c}}}')
  assert checkpoints.restore_checkpoint(tmp_path, None)['x'].tolist() == list(range(64))
  data = bytearray(path.read_bytes())
  data[-9] ^= 0x40
  path.write_bytes(data)  # A new mtime: without an identity the sidecar still applies.
  with pytest.raises(checkpoints.ChecksumMismatchError):
    checkpoints.restore_checkpoint(tmp_path, None)


def test_sidecar_of_a_file_flax_retention_deleted_goes_with_our_next_save(tmp_path, set_flag):
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path, {'x': np.zeros(2)}, 1, keep=5)
  flax_ckpts.save_checkpoint(tmp_path, {'x': np.ones(2)}, 2, keep=1)  # Deletes checkpoint_1.
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_1.crc32c', 'checkpoint_2']
  checkpoints.save_checkpoint(tmp_path, {'x': np.ones(2)}, 3, keep=5)
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_3.crc32c', 'checkpoint_2', 'checkpoint_3']


# --- a writer killed mid-save -------------------------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
import numpy as np
import flax
flax.config.update('flax_use_orbax_checkpointing', False)
from flaxckpt.legacy import _msgpack, checkpoints
write = _msgpack.write
def write_then_die(file, state):
  file.write(b'partial')
  os.kill(os.getpid(), signal.SIGKILL)
_msgpack.write = write_then_die
checkpoints.save_checkpoint(sys.argv[1], {'x': np.arange(4)}, 3, keep=5)
"""


def test_temporary_of_a_killed_writer_is_unlisted_and_removed_later(tmp_path, set_flag):
  result = subprocess.run([sys.executable, '-c', _KILLED_WRITER, str(tmp_path)], timeout=120,
                          capture_output=True, text=True)
  assert result.returncode == -9, result.stderr[-2000:]
  [stale] = os.listdir(tmp_path)
  assert stale.startswith('.checkpoint_3.flaxckpt-tmp-')
  # Neither flax nor we list it, and flax's retention does not count it.
  assert checkpoints.available_steps(tmp_path) == flax_ckpts.available_steps(tmp_path) == []
  set_flag(False)
  # Its writer no longer holds its lock: the next save removes it, however fresh.
  checkpoints.save_checkpoint(tmp_path, {'x': np.arange(4)}, 3, keep=5)
  assert stale not in os.listdir(tmp_path)


def test_temporary_of_a_live_writer_is_kept(tmp_path, set_flag):
  """A save in flight holds a lock on its temporary; another save's cleanup leaves it."""
  import fcntl
  set_flag(False)
  live = tmp_path / '.checkpoint_9.flaxckpt-tmp-1-abcdef'
  live.write_bytes(b'in flight')
  old = time.time() - 60
  os.utime(live, (old, old))
  with open(live, 'rb') as held:
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    checkpoints.save_checkpoint(tmp_path, {'x': 1}, 1, keep=5)
    assert live.exists()
  checkpoints.save_checkpoint(tmp_path, {'x': 2}, 2, keep=5)
  assert not live.exists()
  assert checkpoints.available_steps(tmp_path) == [1, 2]
