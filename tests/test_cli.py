"""The ``flaxckpt`` command, run as users run it: the installed console script (and
``python -m flaxckpt``) in subprocesses, on checkpoints written by flaxckpt, Orbax and flax."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
from flax.training import checkpoints as flax_checkpoints
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxckpt as ocp
from flaxckpt.legacy import checkpoints as legacy_checkpoints

SCRIPT = pathlib.Path(sys.executable).with_name('flaxckpt')


def run(*args, module=False):
  command = [sys.executable, '-m', 'flaxckpt'] if module else [str(SCRIPT)]
  return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True,
                        timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def run_json(*args):
  result = run(*args, '--json')
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout)


def leaves_by_path(description):
  return {leaf['path']: leaf for leaf in description['leaves']}


def sharded_tree():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))
  return {
      'params': {'kernel': jax.device_put(jnp.arange(64.0).reshape(8, 8),
                                          NamedSharding(mesh, PartitionSpec('data', 'model'))),
                 'bias': jnp.ones(8, jnp.bfloat16)},
      'step': 12, 'name': 'run-1', 'empty': {}}


def flip_byte(path: pathlib.Path, offset: int) -> None:
  """Damages one byte in place, keeping the file's mtime (as a failing disk would)."""
  info = path.stat()
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x5A
  with open(path, 'r+b') as f:
    f.write(bytes(data))
  os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_inspect_flaxckpt_checkpoint(tmp_path):
  ocp.StandardCheckpointer().save(tmp_path / 'ck', sharded_tree())
  description = run_json('inspect', tmp_path / 'ck')
  assert description['format'] == 'orbax-pytree'
  assert description['storage'] == 'ocdbt+zarr2' and description['checksums']
  leaves = leaves_by_path(description)
  kernel = leaves['params/kernel']
  assert (kernel['shape'], kernel['dtype'], kernel['bytes']) == ([8, 8], 'float32', 256)
  assert kernel['sharding'] == "mesh(data=4, model=2) P('data', 'model')"
  assert leaves['params/bias']['dtype'] == 'bfloat16'
  assert leaves['name']['value'] == 'run-1' and leaves['empty']['kind'] == 'empty'
  assert description['totals'] == {'leaves': 5, 'arrays': 3, 'bytes': 256 + 16 + 8}
  text = run('inspect', tmp_path / 'ck', module=True)
  assert text.returncode == 0, text.stderr
  assert 'params/kernel' in text.stdout and '(8, 8)' in text.stdout
  assert '5 leaves, 3 arrays, 280 B' in text.stdout


@pytest.mark.parametrize('layout', ['ocdbt', 'zarr2-folders', 'zarr3-folders'])
def test_inspect_orbax_written_layouts(tmp_path, layout):
  handler = orbax.PyTreeCheckpointHandler(use_ocdbt=layout == 'ocdbt',
                                          use_zarr3=layout == 'zarr3-folders')
  with orbax.Checkpointer(handler) as checkpointer:
    checkpointer.save(tmp_path / 'ck', args=orbax.args.PyTreeSave(
        {'w': np.zeros((3, 5), np.int16), 'b': np.ones(2)}))
  description = run_json('inspect', tmp_path / 'ck')
  expected = {'ocdbt': 'ocdbt+zarr2', 'zarr2-folders': 'zarr2 per-array folders',
              'zarr3-folders': 'zarr3 per-array folders'}[layout]
  assert description['storage'] == expected and not description['checksums']
  assert leaves_by_path(description)['w']['shape'] == [3, 5]
  assert leaves_by_path(description)['w']['dtype'] == 'int16'


def test_inspect_flax_msgpack_directory(tmp_path, set_flag):
  set_flag(False)
  flax_checkpoints.save_checkpoint(tmp_path, {'w': np.arange(6.0), 'n': 3}, step=2, keep=5)
  flax_checkpoints.save_checkpoint(tmp_path, {'w': np.arange(7.0), 'n': 4}, step=5, keep=5)
  description = run_json('inspect', tmp_path)
  assert description['format'] == 'flax-dir'
  assert [s['step'] for s in description['steps']] == [2, 5]
  latest = description['latest']
  assert latest['format'] == 'flax-msgpack'
  assert leaves_by_path(latest)['w']['shape'] == [7]
  assert leaves_by_path(latest)['n']['value'] == 4


def test_inspect_manager_root_shows_steps_metrics_best_and_latest(tmp_path):
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m['accuracy'], max_to_keep=5)
  with ocp.CheckpointManager(tmp_path / 'run', options=options) as manager:
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.7)]:
      manager.save(step, args=ocp.args.StandardSave({'w': np.full(4, step)}),
                   metrics={'accuracy': accuracy})
  description = run_json('inspect', tmp_path / 'run')
  assert description['format'] == 'manager'
  steps = {s['step']: s for s in description['steps']}
  assert sorted(steps) == [1, 2, 3]
  assert steps[2]['metrics'] == {'accuracy': 0.9}
  assert (description['best_step'], description['latest_step']) == (2, 3)
  assert steps[2]['best'] and steps[3]['latest'] and not steps[1]['best']
  assert description['best_by'] == 'max accuracy'
  assert run_json('inspect', tmp_path / 'run', '--best-mode', 'min')['best_step'] == 1
  text = run('inspect', tmp_path / 'run').stdout
  assert 'CheckpointManager root, 3 steps, best by max accuracy' in text
  assert 'latest step 3:' in text


def test_inspect_orbax_manager_root(tmp_path):
  with orbax.CheckpointManager(tmp_path / 'run') as manager:
    for step in (10, 20):
      manager.save(step, args=orbax.args.StandardSave({'w': np.full(4, step)}))
  description = run_json('inspect', tmp_path / 'run')
  assert [s['step'] for s in description['steps']] == [10, 20]
  assert description['latest']['format'] == 'composite'
  assert leaves_by_path(description['latest']['items']['default'])['w']['shape'] == [4]


def test_verify_intact_checkpoints_of_every_writer(tmp_path, set_flag):
  ocp.StandardCheckpointer().save(tmp_path / 'ours', sharded_tree())
  with orbax.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'orbax', {'w': np.arange(10.0)})
  set_flag(False)
  flax_checkpoints.save_checkpoint(tmp_path / 'flax', {'w': np.arange(10.0)}, step=1)
  for name in ('ours', 'orbax', 'flax'):
    result = run('verify', tmp_path / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith('OK')


def test_verify_reports_each_damage_with_its_path(tmp_path, set_flag):
  tree = {'a': np.arange(1 << 18, dtype=np.float32), 'b': np.ones((16, 16))}
  ocp.StandardCheckpointer().save(tmp_path / 'ck', tree, force=True)
  data_files = sorted((tmp_path / 'ck').glob('ocdbt.process_0/d/*'),
                      key=lambda p: -p.stat().st_size)
  flip_byte(data_files[0], 1000)  # Inside array 'a', which is stored out of line.
  result = run('verify', tmp_path / 'ck', '--progress')
  assert result.returncode == 1
  assert "leaf 'a'" in result.stdout and 'ChecksumError' in result.stdout
  assert str(data_files[0]) in result.stdout
  assert 'verifying' in result.stderr and '100%' in result.stderr  # rich's bar, drawn once.
  assert '1 problem found' in result.stderr

  set_flag(False)
  flax_checkpoints.save_checkpoint(tmp_path / 'flax', {'w': np.arange(100.0)}, step=1)
  msgpack_file = tmp_path / 'flax' / 'checkpoint_1'
  msgpack_file.write_bytes(msgpack_file.read_bytes()[:-10])
  result = run('verify', tmp_path / 'flax')
  assert result.returncode == 1
  assert result.stdout.startswith(f'{msgpack_file}: ') and 'truncated' in result.stdout

  # Our msgpack files carry a crc32c sidecar: a flip inside array bytes, which decodes, is found.
  ours = pathlib.Path(legacy_checkpoints.save_checkpoint(tmp_path / 'ours', {'w': np.arange(100.0)},
                                                         step=1))
  assert 'flax-msgpack, checksums' in run('inspect', ours).stdout
  flip_byte(ours, ours.stat().st_size - 8)
  result = run('verify', tmp_path / 'ours')
  assert result.returncode == 1 and 'crc32c' in result.stdout and str(ours) in result.stdout
  flax_file = flax_checkpoints.save_checkpoint(tmp_path / 'flax2', {'w': np.arange(3.0)}, step=1)
  assert 'flax-msgpack, no checksums' in run('inspect', flax_file).stdout

  (tmp_path / 'half.orbax-checkpoint-tmp-1').mkdir()
  result = run('verify', tmp_path / 'half.orbax-checkpoint-tmp-1')
  assert result.returncode == 1


def test_convert_msgpack_to_orbax_and_back(tmp_path, set_flag):
  state = {'params': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4),
                      'bias': np.ones(4, jnp.bfloat16)},
           'step': 7, 'scale': np.float32(0.5), 'tag': 'v1', 'empty': {}}
  set_flag(False)
  flax_checkpoints.save_checkpoint(tmp_path / 'flax', state, step=7)
  source = tmp_path / 'flax' / 'checkpoint_7'
  result = run('convert', source, tmp_path / 'orbax', '--to', 'orbax')
  assert result.returncode == 0, result.stderr
  by_orbax = orbax.PyTreeCheckpointer().restore(tmp_path / 'orbax')
  np.testing.assert_array_equal(by_orbax['params']['kernel'], state['params']['kernel'])
  np.testing.assert_array_equal(by_orbax['params']['bias'], state['params']['bias'])
  assert by_orbax['params']['bias'].dtype == jnp.bfloat16
  assert by_orbax['step'] == 7 and by_orbax['tag'] == 'v1' and by_orbax['scale'] == 0.5

  result = run('convert', tmp_path / 'orbax', tmp_path / 'back', '--to', 'msgpack')
  assert result.returncode == 0, result.stderr
  back = flax_checkpoints.restore_checkpoint(tmp_path / 'back', None)
  original = flax_checkpoints.restore_checkpoint(source, None)
  assert sorted(back) == sorted(original)
  np.testing.assert_array_equal(back['params']['kernel'], original['params']['kernel'])
  assert back['params']['bias'].dtype == original['params']['bias'].dtype
  assert (back['step'], back['scale'], back['tag'], back['empty']) == (7, 0.5, 'v1', {})
  assert run('diff', source, tmp_path / 'orbax').returncode == 0
  assert run('diff', tmp_path / 'back', tmp_path / 'orbax').returncode == 0


PEAK_MEMORY_SCRIPT = '''
import sys, threading, time
from flaxckpt._cli import main

def anon_mib():
  for line in open('/proc/self/status'):
    if line.startswith('RssAnon'):
      return int(line.split()[1]) / 1024

base, peak, done = anon_mib(), [0.0], []
def sample():
  while not done:
    peak[0] = max(peak[0], anon_mib())
    time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
status = main(sys.argv[1:])
done.append(1)
thread.join()
print(peak[0] - base)
sys.exit(status)
'''


def test_convert_streams_instead_of_loading_the_state(tmp_path, set_flag):
  state = {f'layer{i}': np.full(2 << 20, i, np.float32) for i in range(12)}  # 12 x 8 MiB.
  set_flag(False)
  flax_checkpoints.save_checkpoint(tmp_path / 'flax', state, step=1)
  del state

  def peak_growth_mib(*args):
    result = subprocess.run([sys.executable, '-c', PEAK_MEMORY_SCRIPT, *map(str, args)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stderr
    return float(result.stdout.split()[-1])

  # The state is 96 MiB; a batch of 16 MiB or one 8 MiB leaf is what a conversion should hold.
  growth = peak_growth_mib('convert', tmp_path / 'flax' / 'checkpoint_1', tmp_path / 'orbax',
                           '--to', 'orbax', '--batch-mib', '16')
  assert growth < 60, f'msgpack -> orbax held {growth:.0f} MiB of a 96 MiB state'
  growth = peak_growth_mib('convert', tmp_path / 'orbax', tmp_path / 'back', '--to', 'msgpack')
  assert growth < 60, f'orbax -> msgpack held {growth:.0f} MiB of a 96 MiB state'
  restored = flax_checkpoints.restore_checkpoint(tmp_path / 'back', None)
  for i in range(12):
    np.testing.assert_array_equal(restored[f'layer{i}'], np.full(2 << 20, i, np.float32))


def test_diff_lists_added_removed_and_changed_leaves(tmp_path):
  first = {'w': np.arange(6.0), 'b': np.zeros(3, np.float32), 'old': 1, 'tag': 'a'}
  second = {'w': np.arange(6.0) + np.array([0, 0, 0.5, 0, 0, 0]), 'b': np.zeros(3, np.int32),
            'new': np.ones(2), 'tag': 'b'}
  ocp.StandardCheckpointer().save(tmp_path / 'a', first)
  ocp.StandardCheckpointer().save(tmp_path / 'b', second)
  result = run('diff', tmp_path / 'a', tmp_path / 'b')
  assert result.returncode == 1, result.stderr
  lines = result.stdout.splitlines()
  assert '- old' in lines and '+ new' in lines
  assert any(line.startswith('~ w: values differ') and 'max abs diff 0.5' in line
             for line in lines)
  assert any(line.startswith('~ b: dtype differ (float32[3] -> int32[3])') for line in lines)
  assert "~ tag: values differ ('a' -> 'b')" in lines
  report = run_json('diff', tmp_path / 'a', tmp_path / 'a')
  assert report['identical'] and report['same'] == 4


def test_rich_is_imported_only_to_draw_progress():
  script = ('import sys, flaxckpt, flaxckpt._cli, flaxckpt._verify, flaxckpt._convert\n'
            'print(sorted(name for name in sys.modules if name.split(".")[0] == "rich"))')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert (result.returncode, result.stdout) == (0, '[]\n'), result.stderr


def test_errors_are_one_line_naming_the_path(tmp_path):
  missing = tmp_path / 'nope'
  result = run('inspect', missing)
  assert result.returncode == 2
  assert result.stderr.strip() == f'flaxckpt inspect: error: {missing}: no such file or directory.'
  (tmp_path / 'stuff').mkdir()
  (tmp_path / 'stuff' / 'notes.txt').write_text('hi')
  result = run('verify', tmp_path / 'stuff')
  assert result.returncode == 1 and 'not a checkpoint' in result.stdout
  ocp.StandardCheckpointer().save(tmp_path / 'ck', {'w': np.ones(2)})
  result = run('convert', tmp_path / 'ck', tmp_path / 'ck', '--to', 'msgpack')
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
  assert 'already exists' in result.stderr
  result = run('convert', tmp_path / 'ck', tmp_path / 'x', '--to', 'orbax')
  assert result.returncode == 2 and 'already a orbax-pytree checkpoint' in result.stderr


OLD_FORMATS = pathlib.Path(__file__).parent / 'data' / 'old-formats' / 'f0102-ocp0102'


@pytest.mark.parametrize('case', sorted(p.name for p in OLD_FORMATS.iterdir()))
def test_verify_checkpoints_written_by_flax_and_orbax_0_10(case):
  result = run('verify', OLD_FORMATS / case)
  assert (result.returncode, result.stderr) == (0, ''), result.stdout + result.stderr


def test_inspect_flax_multiprocess_arrays(tmp_path):
  description = run_json('inspect', OLD_FORMATS / 'flax_gda' / 'checkpoint_4')
  leaves = leaves_by_path(description)
  assert leaves['b']['shape'] == [8] and leaves['b']['dtype'] == 'float32'
  assert leaves['b']['sharding'] == 'multi-process array in checkpoint_4_gda'
  assert leaves['step']['value'] == 5
