"""The ``flaxckpt`` command on hostile checkpoints, run as users run it (``python -m flaxckpt``
in a subprocess with a deadline and a memory cap, see ``hostile.py``).

Whatever the input: no traceback, no hang, one line per error naming the file, no raw control
character reaching the terminal, nothing read or written outside the checkpoint.
"""

import json
import os
import pathlib
import re
import subprocess
import time

import hostile
import jax.numpy as jnp
import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt import _cli

# What must never reach a terminal raw. Lines are split on '\n' only: str.splitlines would also
# split on '\r', '\x1c'... and hide them.
CONTROL = re.compile('[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e'
                     '\u2066-\u2069\ufeff]')
DEEP_JSON = b'[' * 100_000 + b']' * 100_000
TIMEOUT = 60


def cli(sandbox: hostile.Sandbox, *args) -> subprocess.CompletedProcess:
  """Runs the command in the sandbox; checks it ended in time, without a traceback, printing
  nothing that could drive a terminal."""
  started = time.monotonic()
  result = hostile.run_cli([str(arg) for arg in args], sandbox.root, timeout=TIMEOUT)
  assert result is not None, f'flaxckpt {args} hung (no answer in {TIMEOUT} s)'
  assert 'Traceback' not in result.stderr, result.stderr
  for stream in (result.stdout, result.stderr):
    for line in stream.split('\n'):
      assert not CONTROL.search(line), f'raw control character in output: {line!r}'
  result.seconds = time.monotonic() - started
  return result


def one_error_line(result, exit_code: int = 2) -> str:
  assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
  lines = result.stderr.strip().split('\n')
  assert len(lines) == 1, result.stderr
  return lines[0]


def problems(result) -> list[str]:
  """verify's problem lines (it exits 1 and counts them on stderr)."""
  assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
  assert 'problem' in result.stderr and 'found in' in result.stderr, result.stderr
  return result.stdout.strip().split('\n')


def without_checksums(directory: pathlib.Path) -> None:
  """Makes a checkpoint look as Orbax writes it, so a damaged file is parsed (checksums would
  flag it first)."""
  for found in directory.rglob(ocp._checksums.DIR):
    for name in os.listdir(found):
      os.remove(found / name)
    os.rmdir(found)


def manager_root(root: pathlib.Path) -> pathlib.Path:
  """A CheckpointManager root of one step with metrics and a sharded jax array (so the step
  has ``_sharding``, ``_CHECKPOINT_METADATA`` and ``metrics/metrics``), without checksums."""
  options = ocp.CheckpointManagerOptions(best_fn=lambda metrics: metrics['loss'])
  with ocp.CheckpointManager(root, options=options) as manager:
    manager.save(1, args=ocp.args.StandardSave({'w': jnp.arange(4.0), 's': 'text'}),
                 metrics={'loss': 0.5})
    manager.wait_until_finished()
  without_checksums(root)
  return root


def replace(path: pathlib.Path, data: bytes) -> None:
  os.chmod(path.parent, 0o755)
  if path.exists():
    os.chmod(path, 0o644)
  path.write_bytes(data)


@pytest.mark.parametrize('file', ['default/_METADATA', 'default/_sharding',
                                  '_CHECKPOINT_METADATA', 'metrics/metrics'])
def test_deeply_nested_json_is_one_line_never_a_traceback(tmp_path, file):
  sandbox = hostile.Sandbox(tmp_path)
  root = manager_root(sandbox.box / 'run')
  damaged = root / '1' / file
  assert damaged.is_file()
  replace(damaged, DEEP_JSON)

  shown = cli(sandbox, 'inspect', root)
  if file in ('_CHECKPOINT_METADATA', 'metrics/metrics'):  # Listing the steps still works.
    assert shown.returncode == 0, shown.stderr
    assert 'unreadable (LimitExceededError)' in shown.stdout
  else:
    line = one_error_line(shown)
    assert line.startswith('flaxckpt inspect: error: ') and str(root / '1') in line
    assert 'nested' in line
  found = problems(cli(sandbox, 'verify', root))
  assert any(line.startswith(str(damaged.parent)) and 'nested' in line for line in found), found
  sandbox.assert_canary_untouched()


def test_huge_timestamps_are_shown_invalid_and_reported_by_verify(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  root = manager_root(sandbox.box / 'run')
  meta_file = root / '1' / '_CHECKPOINT_METADATA'
  meta = json.loads(meta_file.read_text())
  text = json.dumps({**meta, 'commit_timestamp_nsecs': 1e300}).replace(
      '"init_timestamp_nsecs": ' + str(meta['init_timestamp_nsecs']),
      '"init_timestamp_nsecs": ' + str(10**400))
  replace(meta_file, text.encode())

  shown = cli(sandbox, 'inspect', root)
  assert shown.returncode == 0, shown.stderr
  assert 'invalid (1e+300)' in shown.stdout
  as_json = cli(sandbox, 'inspect', root, '--json')
  assert json.loads(as_json.stdout)['steps'][0]['saved'] == 'invalid (1e+300)'
  replace(meta_file, json.dumps({**meta, 'commit_timestamp_nsecs': None,
                                 'init_timestamp_nsecs': 10**400}).encode())
  assert re.search(r'invalid \(1000000000000000000\d*\.\.\.\)', cli(sandbox, 'inspect',
                                                                     root).stdout)
  found = problems(cli(sandbox, 'verify', root))
  assert found == [f'{meta_file}: ValueError: init_timestamp_nsecs is {str(10**400)[:37]}..., '
                   'not a time in nanoseconds since 1970 (an integer from 0 to '
                   '253402214400000000000)']
  sandbox.assert_canary_untouched()


NAMES = {'a\x1b[31mred': np.arange(2.0), 'b\rX\x07': np.ones(3), 'c\u202eevil': 1,
         'd': 'value \x1b]0;title\x07 \x9b'}


def test_control_characters_in_names_and_values_are_escaped(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  first, second = sandbox.box / 'first', sandbox.box / 'second'
  ocp.StandardCheckpointer().save(first, NAMES)
  ocp.StandardCheckpointer().save(second, {'e\x1b[2J': 1.0, **NAMES, 'c\u202eevil': 2})

  shown = cli(sandbox, 'inspect', first)
  assert shown.returncode == 0, shown.stderr
  for escaped in ('a\\x1b[31mred', 'b\\x0dX\\x07', 'c\\u202eevil', "'value \\x1b]0;title"):
    assert escaped in shown.stdout, shown.stdout
  keys = {leaf['path'] for leaf in json.loads(cli(sandbox, 'inspect', first,
                                                  '--json').stdout)['leaves']}
  assert keys == set(NAMES)  # JSON output keeps the names exactly, as \u escapes.

  differences = cli(sandbox, 'diff', first, second)
  assert differences.returncode == 1
  assert '+ e\\x1b[2J' in differences.stdout
  assert '~ c\\u202eevil: values differ (1 -> 2)' in differences.stdout

  for data in (first / 'd').iterdir():  # Verify's problem names the leaves it affects.
    replace(data, b'\0' * data.stat().st_size)
  found = problems(cli(sandbox, 'verify', first))
  assert any('a\\x1b[31mred' in line for line in found), found

  line = one_error_line(cli(sandbox, 'inspect', sandbox.box / 'no\x1b[2Jsuch'))
  assert line.endswith('no\\x1b[2Jsuch: no such file or directory.')
  sandbox.assert_canary_untouched()


@pytest.mark.parametrize('file', ['_strings.json', '_sharding', 'array_metadatas/process_0',
                                  'flaxckpt_checksums/process_0', 'd/data'])
def test_fifo_in_a_checkpoint_is_reported_without_hanging(tmp_path, file):
  sandbox = hostile.Sandbox(tmp_path)
  directory = sandbox.box / 'ck'
  ocp.StandardCheckpointer().save(directory, {'w': jnp.arange(4.0), 's': 'text'})
  fifo = directory / file
  if fifo.parent.name == 'd':  # An OCDBT data file, read by tensorstore.
    fifo = next(fifo.parent.iterdir())
  os.chmod(directory, 0o755)
  fifo.parent.mkdir(exist_ok=True)
  if fifo.exists():
    os.chmod(fifo.parent, 0o755)
    os.remove(fifo)
  os.mkfifo(fifo)

  found = problems(cli(sandbox, 'verify', directory))
  assert found == [f'{directory}: UnsafeCheckpointError: {fifo}: expected a regular file, found a '
                   'FIFO; a checkpoint holds only regular files and directories, and reading '
                   'this one could block forever or never end.']
  line = one_error_line(cli(sandbox, 'inspect', directory))
  assert f'{fifo}: expected a regular file, found a FIFO' in line
  sandbox.assert_canary_untouched()


def test_links_to_dev_zero_and_out_of_the_checkpoint_are_refused(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  to_zero, to_canary = sandbox.box / 'zero', sandbox.box / 'canary-link'
  for directory, target in ((to_zero, '/dev/zero'),
                            (to_canary, sandbox.canary / '_strings.json')):
    ocp.StandardCheckpointer().save(directory, {'w': np.arange(4.0), 's': 'text'})
    without_checksums(directory)
    os.chmod(directory, 0o755)
    os.remove(directory / '_strings.json')
    os.symlink(target, directory / '_strings.json')
    for command in ('inspect', 'verify', 'diff'):
      result = cli(sandbox, command, directory, *([directory] if command == 'diff' else []))
      text = result.stdout + result.stderr
      assert f'{directory}/_strings.json: a symbolic link to {os.path.realpath(target)}' in text
      assert 'outside the checkpoint' in text and hostile.SECRET.decode()[:20] not in text
      if command == 'verify':
        assert len(problems(result)) == 1
      else:
        one_error_line(result)
  sandbox.assert_canary_untouched()


def zarr_checkpoint(directory: pathlib.Path, zarr3: bool) -> pathlib.Path:
  """A per-array-folder checkpoint of one array whose metadata declares 10**12 elements in
  chunks of one element."""
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=zarr3)
  ocp.Checkpointer(handler).save(directory, args=ocp.args.PyTreeSave({'w': np.arange(4.0)}))
  without_checksums(directory)
  meta_file = directory / 'w' / ('zarr.json' if zarr3 else '.zarray')
  meta = json.loads(meta_file.read_text())
  if zarr3:
    meta['shape'] = [10**6, 10**6]
    meta['chunk_grid']['configuration']['chunk_shape'] = [1, 1]
    meta['codecs'][0]['configuration']['chunk_shape'] = [1, 1]
  else:
    meta['shape'], meta['chunks'] = [10**12], [1]
  replace(meta_file, json.dumps(meta).encode())
  return directory


@pytest.mark.parametrize('zarr3', [False, True], ids=['zarr2', 'zarr3'])
def test_a_declared_huge_chunk_grid_is_refused_in_bounded_time(tmp_path, zarr3):
  sandbox = hostile.Sandbox(tmp_path)
  directory = zarr_checkpoint(sandbox.box / 'ck', zarr3)

  shown = cli(sandbox, 'inspect', directory)  # Metadata only: the declared size is shown.
  assert shown.returncode == 0, shown.stderr
  assert '7.3 TiB' in shown.stdout
  checked = cli(sandbox, 'verify', directory)
  (line,) = problems(checked)
  assert line.startswith(f"{directory}: leaf 'w': LimitExceededError: "), line
  assert checked.seconds < 30
  sandbox.assert_canary_untouched()


def test_convert_never_writes_through_what_stands_at_its_output(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  source = sandbox.box / 'ck'
  ocp.StandardCheckpointer().save(source, {'w': np.arange(4.0), 'step': 3})

  # A link planted at the staging name, into the canary: removed itself, then written anew.
  out = sandbox.box / 'out'
  os.symlink(sandbox.secret, sandbox.box / '.out.partial')
  result = cli(sandbox, 'convert', source, out, '--to', 'msgpack')
  assert result.returncode == 0, result.stderr
  assert out.is_file() and not out.is_symlink() and not (sandbox.box / '.out.partial').exists()
  # A hard link to the canary's file there: its name is removed, the canary's bytes stay.
  os.link(sandbox.secret, sandbox.box / '.hard.partial')
  assert cli(sandbox, 'convert', source, sandbox.box / 'hard', '--to', 'msgpack').returncode == 0
  assert (sandbox.box / 'hard').read_bytes() == out.read_bytes()

  # A directory there is not ours to remove: refused, left as it was.
  (sandbox.box / '.dir.partial').mkdir()
  line = one_error_line(cli(sandbox, 'convert', source, sandbox.box / 'dir', '--to', 'msgpack'))
  assert f'{sandbox.box}/.dir.partial: expected nothing, or a file left by an earlier convert' \
      in line
  assert (sandbox.box / '.dir.partial').is_dir() and not (sandbox.box / 'dir').exists()

  # Links at the destination itself, dangling or into the canary: never replaced or followed.
  os.symlink(sandbox.canary / 'missing', sandbox.box / 'dangling')
  os.symlink(sandbox.canary / 'empty', sandbox.box / 'into-canary')
  for name, to in (('dangling', 'msgpack'), ('into-canary', 'msgpack'), ('into-canary', 'orbax')):
    line = one_error_line(cli(sandbox, 'convert', out if to == 'orbax' else source,
                              sandbox.box / name, '--to', to))
    assert f'{sandbox.box / name}: already exists' in line
    assert (sandbox.box / name).is_symlink()
  sandbox.assert_canary_untouched()


def test_printable_escapes_whatever_acts_on_a_terminal():
  assert _cli.printable('params/dense/kernel é 日本 ok') == 'params/dense/kernel é 日本 ok'
  assert _cli.printable('a\x1b[31mb\rc\x07d\x9be\x7f') == 'a\\x1b[31mb\\x0dc\\x07d\\x9be\\x7f'
  assert _cli.printable('x\u202ey\u2066z\u200b\u2028\ufeff\udcff') == (
      'x\\u202ey\\u2066z\\u200b\\u2028\\ufeff\\udcff')
  assert _cli.printable('one\ntwo\tthree') == 'one\\x0atwo\\x09three'
  assert _cli.printable('\U000e0001 tag') == '\\U000e0001 tag'


def test_any_failure_is_one_line_naming_the_path():
  paths = ['/ck/run']
  assert _cli.error_line(RecursionError('maximum recursion depth exceeded'), paths) == (
      '/ck/run: nested too deeply to read (RecursionError); the checkpoint is damaged or hostile')
  assert _cli.error_line(OverflowError('int too large'), paths) == (
      '/ck/run: holds a number too large to use (OverflowError: int too large); the checkpoint '
      'is damaged or hostile')
  assert _cli.error_line(MemoryError(), paths).startswith('/ck/run: declares more data than')
  assert _cli.error_line(RuntimeError('boom\n  at\x1b[31m x'), paths) == (
      '/ck/run: RuntimeError: boom at\\x1b[31m x')
  assert _cli.error_line(FileNotFoundError('/ck/run/x: missing'), paths) == '/ck/run/x: missing'
  assert _cli.error_line(ocp.NotACheckpointError('/elsewhere: bad'), paths) == '/elsewhere: bad'
