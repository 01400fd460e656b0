"""benchmarks/gpu.py, the GPU comparison of the device machine, runs unchanged on CPU: with a tiny
state every contender round-trips bit-exact, every ratio line is printed (with the host-memory
check of the save's staging budget), and its scratch files are gone afterwards."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
CONTENDERS = {'raw', 'flaxckpt', 'orbax', 'flaxckpt-async', 'orbax-async', 'flax-msgpack'}
RATIOS = ('save flaxckpt/raw', 'restore orbax/flaxckpt', 'async block flaxckpt/orbax',
          'restore flaxckpt/raw', 'save orbax/flaxckpt', 'async total flaxckpt/orbax',
          'save flax-msgpack/flaxckpt', 'restore flax-msgpack/flaxckpt')
TARGETED = {'save flaxckpt/raw': '<=1.1x', 'restore orbax/flaxckpt': '>=2.0x',
            'async block flaxckpt/orbax': '<=0.5x'}


def test_gpu_bench_runs_on_cpu(tmp_path):
  scratch, out = tmp_path / 'scratch', tmp_path / 'gpu.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)  # one CPU device, as the device machine has one GPU
  proc = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / 'gpu.py'), '--mib', '8', '--repeats', '1',
       '--dir', str(scratch), '--json', str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = [line.strip() for line in proc.stdout.splitlines()]
  assert any(line.startswith('device: cpu (platform cpu') for line in lines), proc.stdout
  assert ' failed: ' not in proc.stdout, proc.stdout  # no contender failed
  for label in RATIOS:
    row = [line for line in lines if line.startswith(label + ' ')]
    assert len(row) == 1, (label, proc.stdout)
    if label in TARGETED:
      assert f'target {TARGETED[label]}' in row[0] and row[0].endswith(('PASS', 'MISS')), row

  results = json.loads(out.read_text())
  assert results['device']['platform'] == 'cpu'
  assert results['state']['leaves'] == 92
  assert set(results['contenders']) == CONTENDERS
  for name, r in results['contenders'].items():
    assert r.get('check') == 'ok', (name, r)
    times = ('block_ms', 'total_ms') if name.endswith('-async') else ('save_ms', 'restore_ms')
    medians = r['medians']
    assert all(medians[k] > 0 for k in times), (name, medians)
    assert all(medians[k] >= 0 for k in medians if '_rss_' in k), (name, medians)
    assert 'save_rss_mib' in medians, (name, medians)  # Linux: the peak can be reset
  *timed, save_staging, restore_staging = results['ratios']
  assert [row['ratio'] for row in timed] == list(RATIOS)
  assert all(row['value'] > 0 for row in timed), timed
  # flaxckpt's host memory against its device-to-host budget: judged only for states larger
  # than the budget (1 GiB), so not this one.
  for op, row in (('save', save_staging), ('restore', restore_staging)):
    assert row['ratio'] == f'{op} host RSS flaxckpt/budget (1024 MiB)', row
    assert row['value'] >= 0 and row['verdict'] is None, row
  assert not pathlib.Path(results['scratch']).exists()
  assert not scratch.exists()
