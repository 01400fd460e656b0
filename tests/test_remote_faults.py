"""Saves on buckets under failures: transient faults injected by a proxy in front of the real
servers (tests/fault_proxy.py), saves that fail for good, writers killed with SIGKILL mid-save,
and a reader polling while another process saves.

tensorstore's own request retries (the ``s3_request_retries``/``gcs_request_retries`` context
resources) absorb the transient faults. Most tests make them fast (milliseconds between tries,
set through ``flaxckpt.object_store.configure``); one test keeps tensorstore's defaults. GCS
tests run their client in a subprocess: tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` once per
process, and this one already talks to the GCS server directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import flaxckpt as ocp
from fault_proxy import Fault, FaultProxy
from flaxckpt import _storage, object_store

pytest_plugins = ['object_store']

_FAST = {'max_retries': 6, 'initial_delay': '5ms', 'max_delay': '50ms'}

# A state whose values depend on the step; exec'd here and in the subprocesses.
_STATE = r'''
import numpy as np
def state(step, leaves=6, size=64):
  return {'params': {f'layer{i}': {'w': np.arange(size * size, dtype=np.float32).reshape(
              size, size) * (step + 1) + i, 'b': np.full(size, step * 10 + i, np.int16)}
                     for i in range(leaves)},
          'step': step, 'lr': 0.5 / (step + 1), 'name': f'run-{step}'}

def same(restored, expected):
  if restored.keys() != expected.keys():
    return f'keys {sorted(restored)}'
  for key in ('step', 'lr', 'name'):
    if restored[key] != expected[key]:
      return f'{key}: {restored[key]!r} != {expected[key]!r}'
  for name, layer in expected['params'].items():
    for leaf, value in layer.items():
      got = np.asarray(restored['params'][name][leaf])
      if got.dtype != value.dtype or not np.array_equal(got, value):
        return f'{name}/{leaf} differs'
  return 'ok'
'''
_ns: dict = {}
exec(_STATE, _ns)  # noqa: S102 - our own source text, shared with the subprocesses.
state, same = _ns['state'], _ns['same']


def _run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
         ) -> dict:
  """Runs ``script`` (after _STATE) in a new process; returns its last line, parsed as JSON."""
  result = subprocess.run([sys.executable, '-c', _STATE + textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _keys(url: str) -> set[str]:
  """Every object key under ``url`` (relative to it)."""
  import tensorstore as ts
  spec = _storage.kvstore_spec(_storage.as_storage_path(url))
  return {key.decode() for key in ts.KvStore.open(spec).result().list().result()}


def _no_local_scheme_dirs(*dirs) -> None:
  for directory in ('.', *dirs):
    for name in ('s3:', 'gs:'):
      assert not os.path.exists(os.path.join(directory, name)), f'{directory}/{name}'


@pytest.fixture
def fast_retries():
  """tensorstore retries each request 6 times, milliseconds apart."""
  object_store.configure('s3://', context={'s3_request_retries': _FAST})
  yield
  object_store.clear()


@pytest.fixture
def s3_proxy(s3_server, monkeypatch, tmp_path):
  """A fault proxy in front of moto; S3 requests of this process go through it."""
  monkeypatch.chdir(tmp_path)
  with FaultProxy(s3_server.endpoint, 's3') as proxy:
    monkeypatch.setenv('AWS_ENDPOINT_URL_S3', proxy.endpoint)
    yield proxy
  _no_local_scheme_dirs(tmp_path)


def _save_and_restore(root: str, way: str) -> None:
  """Saves ``way`` (a checkpointer or a manager, sync or async, with OCDBT or not) and restores
  exactly, in this process and through a fresh manager (the restores run under the faults)."""
  what, mode, layout = way.split('-')
  handler = ocp.StandardCheckpointHandler(use_ocdbt=layout == 'ocdbt')
  if what == 'checkpointer':
    ckptr = (ocp.AsyncCheckpointer if mode == 'async' else ocp.Checkpointer)(handler)
    with ckptr:
      ckptr.save(f'{root}/ckpt', args=ocp.args.StandardSave(state(1)))
      ckptr.wait_until_finished()
      assert same(ckptr.restore(f'{root}/ckpt'), state(1)) == 'ok'
    return
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=mode == 'async')
  with ocp.CheckpointManager(f'{root}/run', options=options, item_handlers=handler) as manager:
    for step in (0, 1):
      manager.save(step, args=ocp.args.StandardSave(state(step)))
    manager.wait_until_finished()
  fresh = ocp.CheckpointManager(f'{root}/run')
  assert fresh.all_steps() == [0, 1]
  assert same(fresh.restore(1), state(1)) == 'ok'


# Each kind of fault against one way of saving: every way, every kind, in 5 short tests.
_TRANSIENT = {
    '503': ('checkpointer-sync-ocdbt', lambda: [Fault('status', status=503, every=3)]),
    '429': ('checkpointer-async-zarr', lambda: [Fault('status', status=429, every=3)]),
    '500': ('manager-async-ocdbt', lambda: [Fault('status', status=500, every=3)]),
    'reset_request': ('manager-sync-zarr', lambda: [Fault('reset_request', every=3)]),
    # The server applies the request but its answer is lost: the conditional writes of OCDBT's
    # manifest see their own earlier write on the retry.
    'reset_response': ('checkpointer-sync-ocdbt', lambda: [
        Fault('reset_response', method='PUT', path_contains='manifest.ocdbt', limit=2),
        Fault('reset_response', every=4)]),
}


@pytest.mark.parametrize('kind', sorted(_TRANSIENT))
def test_s3_transient_faults_are_retried(s3_server, s3_proxy, fast_retries, kind):
  way, make_faults = _TRANSIENT[kind]
  faults = make_faults()
  s3_proxy.inject(*faults)
  _save_and_restore(s3_server.make_bucket(), way)
  assert all(fault.done for fault in faults), s3_proxy.log
  assert s3_proxy.injected[faults[0].label] >= 5, (dict(s3_proxy.injected),
                                                   dict(s3_proxy.requests))


def test_s3_default_retries_cover_each_kind(s3_server, s3_proxy):
  """tensorstore's default retries (no settings; a second or so between tries)."""
  s3_proxy.inject(Fault('status', status=503, method='PUT', limit=1),
                  Fault('reset_response', method='PUT', after=3, limit=1))
  root = s3_server.make_bucket() + '/run'
  with ocp.CheckpointManager(root) as manager:
    manager.save(3, args=ocp.args.StandardSave(state(3)))
    manager.wait_until_finished()
    assert same(manager.restore(3), state(3)) == 'ok'
  assert dict(s3_proxy.injected) == {'status 503': 1, 'reset_response': 1}


_FOR_GOOD = {
    # The commit marker's write fails for good: the last object of the save.
    'commit-503': (False, True, lambda: Fault('status', status=503, method='PUT',
                                              path_contains='run/1/commit_success.txt')),
    # OCDBT data-file writes fail for good (tensorstore's error names no bucket: flaxckpt's
    # names the step's URL).
    'arrays-503': (False, True, lambda: Fault('status', status=503, method='PUT',
                                              path_contains='run/1/default/ocdbt.process_0/d/')),
    # Every request about step 1 fails from its 6th on, whatever it is.
    'midway-500': (True, True, lambda: Fault('status', status=500, path_contains='run/1/',
                                             after=5)),
    # The server dies at the first array write of step 1 (the cleanup cannot reach it either).
    'server-dies': (True, False, lambda: Fault('die', method='PUT',
                                               path_contains='run/1/default/')),
}


@pytest.mark.parametrize('case', sorted(_FOR_GOOD))
def test_s3_save_failing_for_good(s3_server, s3_proxy, fast_retries, monkeypatch, case):
  """The save raises an error naming the step's URL; no step is listed; the server back, a new
  save of that step succeeds."""
  use_async, use_ocdbt, fault = _FOR_GOOD[case]
  root = s3_server.make_bucket() + '/run'
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=use_async)
  handler = ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)
  manager = ocp.CheckpointManager(root, options=options, item_handlers=handler)
  manager.save(0, args=ocp.args.StandardSave(state(0)))
  manager.wait_until_finished()
  s3_proxy.inject(fault())
  with pytest.raises((OSError, ocp.AsyncSaveError)) as info:
    manager.save(1, args=ocp.args.StandardSave(state(1)))
    manager.wait_until_finished()
  assert f'{root}/1' in str(info.value)
  assert s3_proxy.total_injected() >= 1
  if case == 'server-dies':
    monkeypatch.setenv('AWS_ENDPOINT_URL_S3', s3_server.endpoint)
  else:
    s3_proxy.clear()
  fresh = ocp.CheckpointManager(root)
  assert fresh.all_steps() == [0] and fresh.latest_step() == 0
  assert same(fresh.restore(0), state(0)) == 'ok'
  assert manager.all_steps() == [0]  # The failed save's manager knows it failed.
  assert manager.save(1, args=ocp.args.StandardSave(state(1)))  # The training loop goes on.
  manager.wait_until_finished()
  assert ocp.CheckpointManager(root).all_steps() == [0, 1]
  assert same(fresh.restore(1), state(1)) == 'ok'
  manager.close()


@pytest.mark.parametrize('use_ocdbt', [True, False])
def test_s3_restore_failing_for_good(s3_server, s3_proxy, fast_retries, use_ocdbt):
  """Array reads that fail for good raise an OSError naming the checkpoint's URL (not a
  damaged-checkpoint error, not tensorstore's bucket-less key); once the server answers again
  the same checkpointer restores exactly."""
  url = s3_server.make_bucket() + '/ckpt'
  with ocp.StandardCheckpointer(use_ocdbt=use_ocdbt) as ckptr:
    ckptr.save(url, state(1))
    s3_proxy.inject(Fault('status', status=503, method='GET',
                          path_contains='/d/' if use_ocdbt else 'params.layer0.w/'))
    with pytest.raises(OSError, match=rf'{url}\S*: reading .* failed: ABORTED'):
      ckptr.restore(url)
    assert s3_proxy.total_injected() >= 1
    s3_proxy.clear()
    assert same(ckptr.restore(url), state(1)) == 'ok'


_GCS_CLIENT = r'''
import json, sys, urllib.request
import flaxckpt as ocp
from flaxckpt import object_store
bucket, proxy = sys.argv[1:3]
object_store.configure('gs://', context={'gcs_request_retries': json.loads(sys.argv[3])})
out = {}
with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
  ckptr.save(f'{bucket}/sync', args=ocp.args.StandardSave(state(1)))
  out['sync'] = same(ckptr.restore(f'{bucket}/sync'), state(1))
with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
  ckptr.save(f'{bucket}/async', args=ocp.args.StandardSave(state(2)))
  ckptr.wait_until_finished()
  out['async'] = same(ckptr.restore(f'{bucket}/async'), state(2))
manager = ocp.CheckpointManager(f'{bucket}/run')
manager.save(0, args=ocp.args.StandardSave(state(0)))
manager.wait_until_finished()
try:  # The proxy fails every upload of step 1's commit marker.
  manager.save(1, args=ocp.args.StandardSave(state(1)))
  manager.wait_until_finished()
  out['failed'] = None
except (OSError, ocp.AsyncSaveError) as e:
  out['failed'] = str(e)
fresh = ocp.CheckpointManager(f'{bucket}/run')
out['after failure'] = [fresh.all_steps(), fresh.latest_step()]
urllib.request.urlopen(f'{proxy}/__fault_proxy__/clear').close()
fresh.save(1, args=ocp.args.StandardSave(state(1)))
fresh.wait_until_finished()
out['after retry'] = ocp.CheckpointManager(f'{bucket}/run').all_steps()
out['restored'] = same(fresh.restore(1), state(1))
print(json.dumps(out))
'''


def test_gcs_transient_faults_and_a_failed_commit(gcs_server, tmp_path):
  """As the S3 tests, on fake-gcs-server: uploads are POSTs there, reads GETs."""
  bucket = gcs_server.make_bucket()
  with FaultProxy(gcs_server.endpoint, 'gs') as proxy:
    proxy.inject(Fault('status', status=503, method='POST', path_contains='run/1/commit_success'),
                 Fault('status', status=503, method='POST', every=4),
                 Fault('status', status=429, method='GET', every=5),
                 Fault('status', status=500, every=7),
                 Fault('reset_request', every=9),
                 Fault('reset_response', every=11))
    out = _run(_GCS_CLIENT, bucket, proxy.endpoint, json.dumps(_FAST),
               env={'TENSORSTORE_GCS_HTTP_URL': proxy.endpoint})
  assert f'{bucket}/run/1' in out.pop('failed'), out
  assert out == {'sync': 'ok', 'async': 'ok', 'after failure': [[0], 0], 'after retry': [0, 1],
                 'restored': 'ok'}
  assert set(proxy.injected) == {'status 503', 'status 429', 'status 500', 'reset_request',
                                 'reset_response'}, dict(proxy.injected)
  assert proxy.injected['status 503'] >= 5  # The marker's upload: the first try and 4 retries.


_WRITER = r'''
import sys
import flaxckpt as ocp
root, use_async = sys.argv[1], sys.argv[2] == 'async'
options = ocp.CheckpointManagerOptions(enable_async_checkpointing=use_async)
manager = ocp.CheckpointManager(root, options=options)
manager.save(0, args=ocp.args.StandardSave(state(0, leaves=40, size=128)))
manager.wait_until_finished()
print('saving', flush=True)
manager.save(1, args=ocp.args.StandardSave(state(1, leaves=40, size=128)))
manager.wait_until_finished()
print('saved', flush=True)
'''

# Where the writer dies: a request the proxy holds (so it never lands) when it is killed.
_KILL_POINTS = {
    # Sync save, after some of step 1's objects landed: at an array write.
    'arrays': ('sync', lambda write: Fault('hang', method=write, path_contains='run/1/default/',
                                           after=4, delay_s=60)),
    # Async save, in the background finalize: at the commit marker's write.
    'commit': ('async', lambda write: Fault('hang', method=write,
                                            path_contains='run/1/commit_success.txt',
                                            delay_s=60)),
    # Whenever the kill lands after 'saving' (step 1 may even be committed by then).
    'saving': ('async', None),
}


def _normalized(keys: set[str]) -> set[str]:
  """Keys with OCDBT data-file names (random per save) replaced by 'D'."""
  return {key.rsplit('/d/', 1)[0] + '/d/D' if '/d/' in key else key for key in keys}


@pytest.mark.parametrize('scheme,point', [('s3', 'arrays'), ('gs', 'commit'), ('s3', 'commit'),
                                          ('gs', 'saving')])
def test_writer_killed_mid_save(request, scheme, point, tmp_path, monkeypatch):
  """A writer is SIGKILLed mid-save: a fresh manager lists only committed steps and restores
  the latest exactly; a new save of the killed step succeeds and replaces what it left."""
  server = request.getfixturevalue('s3_server' if scheme == 's3' else 'gcs_server')
  monkeypatch.chdir(tmp_path)
  root = server.make_bucket() + '/run'
  mode, fault = _KILL_POINTS[point]
  big = state(1, leaves=40, size=128)
  with FaultProxy(server.endpoint, scheme) as proxy:
    if fault is not None:  # Object writes are PUTs on S3, POSTs (uploads) on GCS.
      proxy.inject(fault('PUT' if scheme == 's3' else 'POST'))
    variable = 'AWS_ENDPOINT_URL_S3' if scheme == 's3' else 'TENSORSTORE_GCS_HTTP_URL'
    writer = subprocess.Popen(
        [sys.executable, '-c', _STATE + _WRITER, root, mode], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', variable: proxy.endpoint})
    assert writer.stdout is not None
    try:
      assert writer.stdout.readline() == 'saving\n', writer.communicate(timeout=60)
      if fault is not None:
        proxy.wait_for('hang')
      writer.send_signal(signal.SIGKILL)
      writer.communicate(timeout=60)
    finally:
      writer.kill()
    proxy.release()
  assert writer.returncode == -signal.SIGKILL
  manager = ocp.CheckpointManager(root)
  steps = manager.all_steps()
  leftover = _keys(f'{root}/1') if _storage.exists(_storage.as_storage_path(f'{root}/1')) \
      else set()
  if point == 'saving' and steps == [0, 1]:  # The save finished before the kill.
    assert same(manager.restore(1), big) == 'ok'
  else:
    assert steps == [0] and manager.latest_step() == 0
    assert same(manager.restore(0), state(0, leaves=40, size=128)) == 'ok'
    assert 'commit_success.txt' not in leftover
    if point != 'saving':
      assert leftover, 'the killed writer left nothing: the kill came too late'
  fresh = ocp.CheckpointManager(root)
  assert fresh.save(1, args=ocp.args.StandardSave(big), force=steps == [0, 1])
  fresh.wait_until_finished()
  assert ocp.CheckpointManager(root).all_steps() == [0, 1]
  assert same(fresh.restore(1), big) == 'ok'
  keys = _keys(f'{root}/1')
  assert _normalized(keys) == _normalized(_keys(f'{root}/0'))
  assert not {key for key in leftover if '/d/' in key} & keys  # Old data files are gone.
  _no_local_scheme_dirs(tmp_path)


_POLLED_WRITER = r'''
import sys
import flaxckpt as ocp
from flaxckpt import _storage
root = sys.argv[1]
# An uncommitted step newer than all: a reader must never list it.
_storage.write_text(_storage.as_storage_path(f'{root}/99/default/_METADATA'), '{}')
with ocp.CheckpointManager(root) as manager:  # Async saves, committed in the background.
  for step in range(5):
    manager.save(step, args=ocp.args.StandardSave(state(step)))
  manager.wait_until_finished()
print('{}')
'''


def test_reader_polls_while_another_process_saves(bucket_url, tmp_path, monkeypatch):
  """A manager made before the writer starts polls the bucket: it restores every step it
  lists exactly, never lists an uncommitted one, and in the end lists every step."""
  monkeypatch.chdir(tmp_path)
  root = bucket_url + '/run'
  reader = ocp.CheckpointManager(root)
  assert reader.all_steps() == []
  writer = subprocess.Popen([sys.executable, '-c', _STATE + _POLLED_WRITER, root],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  restored = []
  try:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      done = writer.poll() is not None
      reader.reload()
      steps = reader.all_steps()
      assert 99 not in steps
      for step in steps:
        if step not in restored:
          assert same(reader.restore(step), state(step)) == 'ok', step
          restored.append(step)
      if steps:
        assert reader.latest_step() == steps[-1]
      if done:
        break
      time.sleep(0.05)
    out, err = writer.communicate(timeout=60)
  finally:
    writer.kill()
  assert writer.returncode == 0, err[-3000:]
  assert restored == [0, 1, 2, 3, 4]
  assert reader.all_steps() == [0, 1, 2, 3, 4]
  _no_local_scheme_dirs(tmp_path)
