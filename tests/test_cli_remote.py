"""The ``flaxckpt`` command on gs:// and s3:// URLs, against real servers on loopback
(tests/object_store.py): moto's S3 server and fake-gcs-server, every test on both. Commands run
in-process (``_cli.main``), and as users run them (``python -m flaxckpt`` in a subprocess, which
reaches the same servers through the environment) where the process's own output is the point:
progress on a terminal, one-line errors."""

import json
import os
import pathlib
import pty
import select
import subprocess
import sys

import flax.serialization
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import checkpoints as flax_checkpoints

import flaxckpt as ocp
from flaxckpt import _cli, _storage

pytest_plugins = ['object_store']

STATE = {'params': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4),
                    'bias': np.ones(4, jnp.bfloat16)},
         'step': 7, 'scale': np.float32(0.5), 'tag': 'v1'}


@pytest.fixture
def bucket(bucket_url, tmp_path, monkeypatch):
  """A new bucket on each server in turn; the test runs in ``tmp_path``, where no local 's3:'
  or 'gs:' folder may appear (nor anywhere else the test writes)."""
  monkeypatch.chdir(tmp_path)
  yield bucket_url
  for place in (tmp_path, pathlib.Path.cwd()):
    assert not (place / 's3:').exists() and not (place / 'gs:').exists()


def cli(capsys, *args):
  """(exit status, stdout, stderr) of ``flaxckpt ARGS`` run in this process."""
  status = _cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return status, out, err


def cli_json(capsys, *args):
  status, out, err = cli(capsys, *args, '--json')
  assert status == 0, err
  return json.loads(out)


def run(*args, **kwargs):
  """``python -m flaxckpt ARGS`` in a subprocess, which inherits the servers' variables."""
  return subprocess.run([sys.executable, '-m', 'flaxckpt', *map(str, args)], capture_output=True,
                        text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                        **kwargs)


def path(url):
  return _storage.as_path(url)


def save(url, tree, **handler_options):
  with ocp.Checkpointer(ocp.StandardCheckpointHandler(**handler_options)) as checkpointer:
    checkpointer.save(url, args=ocp.args.StandardSave(tree))


def leaves_by_path(description):
  return {leaf['path']: leaf for leaf in description['leaves']}


def flip_object_byte(url, offset):
  """Damages one byte of an object, rewriting it whole (as bit rot would look to a reader)."""
  data = bytearray(_storage.read_bytes(path(url), max_bytes=None))
  data[offset] ^= 0x5A
  _storage.write_bytes(path(url), bytes(data))


def assert_state_equal(restored, state=STATE):
  for name in ('kernel', 'bias'):
    np.testing.assert_array_equal(np.asarray(restored['params'][name]), state['params'][name])
    assert np.asarray(restored['params'][name]).dtype == state['params'][name].dtype
  assert (restored['step'], restored['scale'], restored['tag']) == (7, 0.5, 'v1')


def test_inspect_pytree_checkpoint_and_flax_msgpack_object(bucket, capsys):
  save(bucket + '/ck', STATE)
  description = cli_json(capsys, 'inspect', bucket + '/ck')
  assert (description['format'], description['path']) == ('orbax-pytree', bucket + '/ck')
  assert description['storage'] == 'ocdbt+zarr2' and description['checksums']
  leaves = leaves_by_path(description)
  assert (leaves['params/kernel']['shape'], leaves['params/kernel']['dtype']) == ([3, 4],
                                                                                 'float32')
  assert leaves['params/bias']['dtype'] == 'bfloat16' and leaves['tag']['value'] == 'v1'
  assert description['totals'] == {'leaves': 5, 'arrays': 4, 'bytes': 48 + 8 + 8 + 4}
  status, out, _ = cli(capsys, 'inspect', bucket + '/ck')
  assert status == 0 and f'{bucket}/ck: orbax-pytree, ocdbt+zarr2' in out

  # flax's own bytes, as flax.training.checkpoints writes them, in a flax checkpoint "folder".
  _storage.write_bytes(path(bucket + '/flax/checkpoint_7'), flax.serialization.to_bytes(STATE))
  description = cli_json(capsys, 'inspect', bucket + '/flax/checkpoint_7')
  assert (description['format'], description['saved']) == ('flax-msgpack', 'unknown')
  leaves = leaves_by_path(description)
  assert leaves['params/kernel']['shape'] == [3, 4] and leaves['step']['value'] == 7
  description = cli_json(capsys, 'inspect', bucket + '/flax')
  assert description['format'] == 'flax-dir' and description['latest_step'] == 7
  assert leaves_by_path(description['latest'])['tag']['value'] == 'v1'


def test_inspect_manager_root_lists_committed_steps_only(bucket, capsys):
  root = bucket + '/run'
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m['loss'], best_mode='min',
                                         max_to_keep=10)
  with ocp.CheckpointManager(root, options=options) as manager:
    for step in range(1, 6):
      manager.save(step, args=ocp.args.StandardSave({'w': np.full(4, step, np.int32)}),
                   metrics={'loss': 1.0 / step})
  # A save cut off before its commit: on a bucket, step 5 without commit_success.txt.
  _storage.remove(path(f'{root}/5/commit_success.txt'))

  description = cli_json(capsys, 'inspect', root, '--best-mode', 'min')
  assert description['format'] == 'manager'
  assert [entry['step'] for entry in description['steps']] == [1, 2, 3, 4]
  assert (description['latest_step'], description['best_step']) == (4, 4)
  assert description['steps'][1]['metrics'] == {'loss': 0.5}
  latest = description['latest']
  assert latest['format'] == 'composite' and sorted(latest['items']) == ['default', 'metrics']
  assert leaves_by_path(latest['items']['default'])['w']['dtype'] == 'int32'
  status, out, _ = cli(capsys, 'inspect', root)
  assert status == 0 and f'{root}: CheckpointManager root, 4 steps' in out

  step = cli_json(capsys, 'inspect', f'{root}/2')
  assert step['format'] == 'composite' and step['path'] == f'{root}/2'
  status, out, err = cli(capsys, 'inspect', f'{root}/5')
  assert status == 2 and len(err.splitlines()) == 1
  assert f'{root}/5' in err and 'commit_success.txt' in err

  status, out, _ = cli(capsys, 'verify', root)
  assert (status, out) == (0, f'{root}: OK\n')
  status, out, _ = cli(capsys, 'verify', f'{root}/5')
  assert status == 1 and out.startswith(f'{root}/5: ') and 'commit_success.txt' in out


@pytest.mark.parametrize('use_ocdbt', [True, False])
def test_verify_reports_a_damaged_object_by_its_url(bucket, capsys, use_ocdbt):
  ck = bucket + '/ck'
  save(ck, {'a': np.arange(1 << 14, dtype=np.float32), 'b': np.ones((4, 4))},
       use_ocdbt=use_ocdbt)
  assert cli(capsys, 'verify', ck)[:2] == (0, f'{ck}: OK\n')
  if use_ocdbt:  # The largest data file holds array 'a'.
    data = f'{ck}/ocdbt.process_0/d'
    chunk = max((f'{data}/{name}' for name in _storage.list_names(path(data))),
                key=lambda url: len(_storage.read_bytes(path(url), max_bytes=None)))
  else:
    chunk = f'{ck}/a/0'
  flip_object_byte(chunk, 1000)
  status, out, err = cli(capsys, 'verify', ck)
  assert status == 1
  # Named by the checkpoint's URL, the leaf and the chunk (the data file only on local disk).
  assert out.startswith(f"{ck}: leaf 'a': ChecksumError: ") and len(out.splitlines()) == 1
  assert "chunk '0' of array 'a'" in out and 'was recorded when it was saved' in out
  assert f'1 problem found in {ck}' in err


def test_convert_local_msgpack_to_a_bucket_and_back(bucket, capsys, tmp_path, set_flag):
  set_flag(False)
  source = pathlib.Path(flax_checkpoints.save_checkpoint(tmp_path / 'flax', STATE, step=7))
  target = bucket + '/orbax'
  status, out, err = cli(capsys, 'convert', source, target, '--to', 'orbax')
  assert (status, out) == (0, f'wrote {target}\n'), err
  assert 'commit_success.txt' in _storage.list_names(path(target))
  with ocp.StandardCheckpointer() as checkpointer:
    assert_state_equal(checkpointer.restore(target))

  # Bucket Orbax -> local msgpack, read back by flax.
  status, _, err = cli(capsys, 'convert', target, tmp_path / 'back', '--to', 'msgpack')
  assert status == 0, err
  assert_state_equal(flax_checkpoints.restore_checkpoint(tmp_path / 'back', None))

  # Bucket -> bucket, both ways; the object holds what the local file does.
  status, _, err = cli(capsys, 'convert', target, bucket + '/m/checkpoint_7', '--to', 'msgpack')
  assert status == 0, err
  data = _storage.read_bytes(path(bucket + '/m/checkpoint_7'), max_bytes=None)
  assert data == (tmp_path / 'back').read_bytes()
  assert_state_equal(flax.serialization.msgpack_restore(data))
  status, _, err = cli(capsys, 'convert', bucket + '/m/checkpoint_7', bucket + '/again',
                       '--to', 'orbax')
  assert status == 0, err
  with ocp.StandardCheckpointer() as checkpointer:
    assert_state_equal(checkpointer.restore(bucket + '/again'))

  # Written with its crc32c sidecar, as legacy save_checkpoint writes one on a bucket: a flipped
  # byte inside array data, which still decodes, is found.
  assert cli_json(capsys, 'inspect', bucket + '/m/checkpoint_7')['checksums']
  assert cli(capsys, 'verify', bucket + '/m')[:2] == (0, f'{bucket}/m: OK\n')
  flip_object_byte(bucket + '/m/checkpoint_7',
                   data.find(STATE['params']['kernel'].tobytes()) + 4)
  status, out, _ = cli(capsys, 'verify', bucket + '/m')
  assert status == 1 and out.startswith(f'{bucket}/m/checkpoint_7: ') and 'crc32c' in out


def test_convert_never_overwrites_on_a_bucket(bucket, capsys, tmp_path, set_flag):
  set_flag(False)
  source = flax_checkpoints.save_checkpoint(tmp_path / 'flax', STATE, step=7)
  save(bucket + '/ck', {'w': np.arange(3)})
  _storage.write_bytes(path(bucket + '/file'), b'not a checkpoint')
  for target, to in ((bucket + '/ck', 'orbax'), (bucket + '/file', 'msgpack')):
    status, _, err = cli(capsys, 'convert', source if to == 'orbax' else bucket + '/ck',
                         target, '--to', to)
    assert status == 2 and err == f'flaxckpt convert: error: {target}: already exists; ' \
        'convert writes a new checkpoint and never overwrites one.\n'
  assert _storage.read_bytes(path(bucket + '/file')) == b'not a checkpoint'
  with ocp.StandardCheckpointer() as checkpointer:
    np.testing.assert_array_equal(checkpointer.restore(bucket + '/ck')['w'], np.arange(3))

  _storage.remove(path(bucket + '/ck/commit_success.txt'))  # Now a save cut off midway.
  status, _, err = cli(capsys, 'convert', source, bucket + '/ck', '--to', 'orbax')
  assert status == 2 and 'holds a save that never committed (no commit_success.txt)' in err


def test_diff_between_buckets_and_local(bucket, capsys, tmp_path):
  first = {'w': np.arange(6.0), 'tag': 'a', 'old': 1}
  second = {'w': np.arange(6.0) + np.array([0, 0, 0.5, 0, 0, 0]), 'tag': 'b', 'new': 2}
  save(bucket + '/a', first)
  save(bucket + '/b', second)
  save(tmp_path / 'a', first)
  status, out, err = cli(capsys, 'diff', bucket + '/a', tmp_path / 'a')
  assert (status, out) == (0, '0 removed, 0 added, 0 changed, 3 equal\n'), err
  status, out, _ = cli(capsys, 'diff', bucket + '/a', bucket + '/b')
  assert status == 1
  lines = out.splitlines()
  assert '- old' in lines and '+ new' in lines and "~ tag: values differ ('a' -> 'b')" in lines
  assert any(line.startswith('~ w: values differ') and 'max abs diff 0.5' in line
             for line in lines)
  status, out, _ = cli(capsys, 'diff', tmp_path / 'a', bucket + '/b', '--json')
  report = json.loads(out)
  assert (status, report['identical'], report['added'], report['removed']) == (
      1, False, ['new'], ['old'])


def test_missing_bucket_and_object_are_one_line_errors(bucket, capsys):
  missing_bucket = bucket + '-missing/run'
  for command in ('inspect', 'diff'):
    args = [missing_bucket] * (2 if command == 'diff' else 1)
    status, out, err = cli(capsys, command, *args)
    assert status == 2 and out == '' and len(err.splitlines()) == 1, err
    assert err.startswith(f'flaxckpt {command}: error: {missing_bucket}: ')
    # moto answers that the bucket does not exist; fake-gcs-server lists nothing in it.
    assert 'does not exist' in err or 'no such file or directory' in err
  status, out, err = cli(capsys, 'inspect', bucket + '/nothing')
  assert (status, err) == (2, f'flaxckpt inspect: error: {bucket}/nothing: no such file or '
                           'directory.\n')
  status, out, err = cli(capsys, 'verify', missing_bucket)
  assert status == 1 and out.startswith(f'{missing_bucket}: ') and len(out.splitlines()) == 1
  status, out, err = cli(capsys, 'convert', bucket + '/nothing', bucket + '/x', '--to', 'orbax')
  assert (status, err) == (2, f'flaxckpt convert: error: {bucket}/nothing: no such file or '
                           'directory.\n')

  # As users see it: the last line of stderr, and no traceback.
  result = run('inspect', missing_bucket)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.splitlines()[-1].startswith(f'flaxckpt inspect: error: {missing_bucket}')


def run_on_terminal(*args):
  """(exit status, what the terminal showed) of ``python -m flaxckpt ARGS`` with stdout and
  stderr on a pseudo-terminal, as when a user runs it."""
  leader, follower = pty.openpty()
  process = subprocess.Popen(
      [sys.executable, '-m', 'flaxckpt', *map(str, args)], stdin=subprocess.DEVNULL,
      stdout=follower, stderr=follower, close_fds=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'TERM': 'xterm', 'COLUMNS': '100'})
  os.close(follower)
  shown = b''
  try:
    while True:
      ready, _, _ = select.select([leader], [], [], 120)
      if not ready:
        raise TimeoutError(f'flaxckpt {args} printed nothing for 120 s')
      try:
        chunk = os.read(leader, 1 << 16)
      except OSError:  # EIO: the process closed the terminal.
        break
      if not chunk:
        break
      shown += chunk
  finally:
    os.close(leader)
    status = process.wait(timeout=120)
  return status, shown.decode('utf-8', 'replace')


def test_progress_on_a_terminal_only(s3_server, capsys, tmp_path, monkeypatch):
  """Long work on an object store shows rich's bar on a terminal; none when the output is not
  a terminal, or with --no-progress, and never inside the results."""
  monkeypatch.chdir(tmp_path)
  bucket = s3_server.make_bucket()
  save(bucket + '/ck', {'w': np.arange(1 << 16, dtype=np.float32)})
  status, shown = run_on_terminal('verify', bucket + '/ck')
  assert status == 0 and 'verifying' in shown and '━' in shown and '256.0/256.0 KiB' in shown
  assert shown.rstrip().endswith(f'{bucket}/ck: OK')
  status, shown = run_on_terminal('convert', bucket + '/ck', bucket + '/m', '--to', 'msgpack',
                                  '--no-progress')
  assert (status, shown) == (0, f'wrote {bucket}/m\r\n')

  # Not a terminal (here, pytest's capture): results only.
  assert cli(capsys, 'verify', bucket + '/ck') == (0, f'{bucket}/ck: OK\n', '')
  assert cli(capsys, 'convert', bucket + '/m', bucket + '/o', '--to', 'orbax') == (
      0, f'wrote {bucket}/o\n', '')
  assert os.listdir(tmp_path) == []  # No URL became a local path.
