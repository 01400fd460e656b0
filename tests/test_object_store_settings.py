"""Explicit object-store settings (``flaxckpt.object_store``) and the configuration read from the
environment (profile files, STORAGE_EMULATOR_HOST), against the loopback servers."""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
from flaxckpt import _storage
from flaxckpt._storage import _remote, _settings
from flaxckpt._storage._remote import RemotePath

pytest_plugins = ['object_store']


@pytest.fixture(autouse=True)
def no_settings():
  """Each test starts and ends with nothing configured."""
  ocp.object_store.clear()
  yield
  ocp.object_store.clear()


def _tree(leaves=3, floats=1000):
  return {f'w{i}': np.arange(floats, dtype=np.float32) + i for i in range(leaves)}


def _round_trip(url, tree):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(url, tree)
    restored = ckptr.restore(url)
  assert restored.keys() == tree.keys()
  for key in tree:
    np.testing.assert_array_equal(np.asarray(restored[key]), tree[key])


def _keys(url):
  path = RemotePath.parse(url)
  return sorted(key.decode() for key in _remote._list(path))


# --- Settings and scopes (no server) ---

@pytest.mark.parametrize('fields, message', [
    ({'request_concurrency': 0}, 'request_concurrency=0: expected a positive int'),
    ({'max_retries': -1}, 'max_retries=-1: expected a non-negative int'),
    ({'data_file_size': 1.5}, 'data_file_size=1.5'),
    ({'read_part_size': 0}, 'read_part_size=0: expected a positive int'),
    ({'read_ahead': -1}, 'read_ahead=-1: expected a positive int'),
    ({'timeout_secs': 0}, 'timeout_secs=0: expected seconds > 0'),
    ({'endpoint': ''}, "endpoint='': expected a non-empty string"),
    ({'context': [1]}, 'context: expected a dict'),
])
def test_bad_settings_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    ocp.object_store.Settings(**fields)


@pytest.mark.parametrize('scope', ['s3', 'file://x', 's3://b/prefix', 'http://b', 7])
def test_bad_scopes_are_refused(scope):
  with pytest.raises((ValueError, TypeError), match='scope|expected a scope'):
    ocp.object_store.configure(scope, region='x')


def test_bucket_settings_win_over_scheme_settings_field_by_field(monkeypatch):
  for name in ('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'AWS_REGION', 'AWS_DEFAULT_REGION'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'k')
  ocp.object_store.configure('s3://', region='eu-west-1', request_concurrency=8)
  ocp.object_store.configure('s3://bucket-a/', endpoint='http://minio:9000', max_retries=2,
                             context={'s3_request_retries': {'max_delay': '2s'}})
  assert ocp.object_store.settings_for('s3://bucket-a/run/1') == ocp.object_store.Settings(
      endpoint='http://minio:9000', region='eu-west-1', request_concurrency=8, max_retries=2,
      context={'s3_request_retries': {'max_delay': '2s'}})
  path = RemotePath.parse('s3://bucket-a/run')
  assert _storage.kvstore_spec(path) == {
      'driver': 's3', 'bucket': 'bucket-a', 'path': 'run/', 'endpoint': 'http://minio:9000',
      'aws_region': 'eu-west-1', 'aws_credentials': {'type': 'environment'}}
  assert _storage.context_resources(path) == {  # The context given last wins over the fields.
      's3_request_concurrency': {'limit': 8}, 's3_request_retries': {'max_delay': '2s'}}
  other = _storage.kvstore_spec(RemotePath.parse('s3://bucket-b/run'))
  assert 'endpoint' not in other and other['aws_region'] == 'eu-west-1'
  ocp.object_store.configure('s3://bucket-a', None)
  assert ocp.object_store.settings_for('s3://bucket-a/x').endpoint is None
  with pytest.raises(TypeError, match='not both'):
    ocp.object_store.configure('s3://', ocp.object_store.Settings(), region='x')


def test_gcs_requester_pays_needs_a_project(monkeypatch):
  monkeypatch.delenv('GOOGLE_CLOUD_PROJECT', raising=False)
  ocp.object_store.configure('gs://paid-bucket', requester_pays=True)
  with pytest.raises(ValueError, match='gs://paid-bucket: requester_pays needs the project to '
                     'bill; set billing_project .* or GOOGLE_CLOUD_PROJECT'):
    _storage.context_resources(RemotePath.parse('gs://paid-bucket/x'))
  monkeypatch.setenv('GOOGLE_CLOUD_PROJECT', 'env-project')
  assert _storage.context_resources(RemotePath.parse('gs://paid-bucket/x')) == {
      'gcs_user_project': {'project_id': 'env-project'}}
  ocp.object_store.configure('gs://paid-bucket', billing_project='my-project')
  assert _storage.context_resources(RemotePath.parse('gs://paid-bucket/x')) == {
      'gcs_user_project': {'project_id': 'my-project'}}


def test_a_gcs_endpoint_is_per_process():
  with pytest.raises(ValueError, match='applies to the whole process.*scope "gs://"'):
    ocp.object_store.configure('gs://one-bucket', endpoint='http://127.0.0.1:1')


# --- Against the servers ---

def test_explicit_s3_endpoint_without_the_environment(s3_server, tmp_path, monkeypatch):
  """Everything the environment gave, given in code instead; reads and writes go through."""
  bucket = s3_server.make_bucket()
  monkeypatch.chdir(tmp_path)
  for name in ('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'AWS_REGION'):
    monkeypatch.delenv(name, raising=False)
  ocp.object_store.configure(bucket, endpoint=s3_server.endpoint, region='us-east-1',
                             request_concurrency=2, max_retries=3, requester_pays=True)
  spec = _storage.kvstore_spec(RemotePath.parse(bucket + '/run'))
  assert spec['endpoint'] == s3_server.endpoint and spec['requester_pays'] is True
  assert _storage.context_resources(RemotePath.parse(bucket)) == {
      's3_request_concurrency': {'limit': 2}, 's3_request_retries': {'max_retries': 3}}
  _round_trip(bucket + '/run/1', _tree())
  with ocp.CheckpointManager(bucket + '/managed') as manager:
    manager.save(0, args=ocp.args.StandardSave(_tree()))
    manager.wait_until_finished()
    assert manager.all_steps() == [0]
  assert os.listdir(tmp_path) == []


def test_s3_credentials_from_profile_files(s3_server, tmp_path, monkeypatch):
  """moto refuses unsigned requests: a save that works was signed with the profile's keys."""
  bucket = s3_server.make_bucket()
  credentials = tmp_path / 'credentials'
  credentials.write_text('[ckpt]\naws_access_key_id = AKIAPROFILE\n'
                         'aws_secret_access_key = profile-secret\n')
  for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', str(credentials))
  monkeypatch.setenv('AWS_CONFIG_FILE', str(tmp_path / 'no-config'))
  monkeypatch.setenv('AWS_EC2_METADATA_DISABLED', 'true')
  monkeypatch.setenv('AWS_PROFILE', 'ckpt')
  _round_trip(bucket + '/by-env-profile', _tree())
  monkeypatch.delenv('AWS_PROFILE')
  ocp.object_store.configure('s3://', profile='ckpt')
  _round_trip(bucket + '/by-settings-profile', _tree())
  ocp.object_store.clear()
  credentials.write_text(credentials.read_text().replace('[ckpt]', '[default]'))
  _round_trip(bucket + '/by-default-profile', _tree())
  assert _storage.kvstore_spec(RemotePath.parse(bucket))['aws_credentials']['profile'] == \
      'default'
  ocp.object_store.configure('s3://', profile='missing')
  with pytest.raises(PermissionError, match=(
      f"{bucket}/unsigned\\S*: no AWS credentials could be loaded from the profile 'missing' of "
      f'{credentials}.*set AWS_ACCESS_KEY_ID')):
    _round_trip(bucket + '/unsigned', _tree())
  ocp.object_store.clear()
  assert not _storage.exists(RemotePath.parse(bucket + '/unsigned/commit_success.txt'))


def test_data_files_on_buckets_are_small_and_orbax_reads_them(bucket_url, tmp_path):
  """OCDBT data files default to 4 MiB on object stores (a value is never split); with
  data_file_size=0 one file takes everything. Orbax restores both, downloaded."""
  tree = _tree(leaves=10, floats=(1 << 20) // 4)  # 10 leaves of 1 MiB.
  for name, size in (('small-files', None), ('one-file', 0)):
    if size is not None:
      ocp.object_store.configure(bucket_url, data_file_size=size)
    url = f'{bucket_url}/{name}'
    _round_trip(url, tree)
    data_files = [key for key in _keys(url) if '/d/' in key]
    assert (len(data_files) >= 3) if size is None else (len(data_files) == 1), data_files
    local = tmp_path / name
    for key in _keys(url):
      target = local / key
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(_storage.read_bytes(RemotePath.parse(f'{url}/{key}'), None))
    restored = orbax.StandardCheckpointer().restore(local)
    for key in tree:
      np.testing.assert_array_equal(np.asarray(restored[key]), tree[key])


def test_timeout_from_settings_names_the_url(s3_server):
  with socket.socket() as silent:
    silent.bind(('127.0.0.1', 0))
    silent.listen(16)
    endpoint = f'http://127.0.0.1:{silent.getsockname()[1]}'
    ocp.object_store.configure('s3://quiet-bucket', endpoint=endpoint, timeout_secs=0.5)
    path = RemotePath.parse('s3://quiet-bucket/run/x')
    with pytest.raises(TimeoutError, match=f'{path}: no answer from {endpoint} in 0.5 s'):
      _storage.read_bytes(path, max_bytes=None)


_GCS_CHILD = textwrap.dedent('''
    import os, sys
    import numpy as np
    import flaxckpt as ocp
    bucket, how = sys.argv[1], sys.argv[2]
    if how == 'configure':
      ocp.object_store.configure('gs://', endpoint=sys.argv[3])
    tree = {'w': np.arange(12, dtype=np.float32)}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(bucket + '/' + how, tree)
      np.testing.assert_array_equal(ckptr.restore(bucket + '/' + how)['w'], tree['w'])
    try:
      ocp.object_store.configure('gs://', endpoint='http://127.0.0.1:9')
    except ValueError as e:
      print('REFUSED', e)
    print('SERVER', os.environ['TENSORSTORE_GCS_HTTP_URL'])
''')


@pytest.mark.parametrize('how', ['STORAGE_EMULATOR_HOST', 'configure'])
def test_gcs_server_from_emulator_host_or_settings(gcs_server, tmp_path, how):
  """In a fresh process (tensorstore fixes the GCS server on first use) without
  TENSORSTORE_GCS_HTTP_URL: the server named the way Google's own clients name an emulator,
  or in code; another one afterwards is refused by name."""
  bucket = gcs_server.make_bucket()
  env = {k: v for k, v in os.environ.items() if k != 'TENSORSTORE_GCS_HTTP_URL'}
  host = gcs_server.endpoint.removeprefix('http://')
  if how == 'STORAGE_EMULATOR_HOST':
    env['STORAGE_EMULATOR_HOST'] = host
  result = subprocess.run([sys.executable, '-c', _GCS_CHILD, bucket, how, gcs_server.endpoint],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'SERVER {gcs_server.endpoint}' in result.stdout
  assert (f'REFUSED GCS endpoint http://127.0.0.1:9: this process already talks to '
          f'{gcs_server.endpoint}') in result.stdout
  assert _storage.is_file(RemotePath.parse(f'{bucket}/{how}/commit_success.txt'))
  assert os.listdir(tmp_path) == []


def test_settings_reach_the_arrays(s3_server, monkeypatch):
  """The arrays' own tensorstore specs carry the settings: with the endpoint only in the
  settings, a sharded save's array writes reach the server too."""
  bucket = s3_server.make_bucket()
  monkeypatch.delenv('AWS_ENDPOINT_URL_S3')
  ocp.object_store.configure(bucket, endpoint=s3_server.endpoint)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('x',))
  sharded = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x')))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(bucket + '/sharded', {'w': sharded})
    restored = ckptr.restore(bucket + '/sharded')
  np.testing.assert_array_equal(np.asarray(restored['w']), np.asarray(sharded))
  assert not pathlib.Path('s3:').exists()
  assert _settings.for_bucket('s3', bucket.removeprefix('s3://')).endpoint == s3_server.endpoint


_STALLED_CHILD = textwrap.dedent('''
    import os, sys, time
    import numpy as np
    import flaxckpt as ocp
    from flaxckpt import _storage
    url = sys.argv[1]
    _storage.exists(_storage.as_path(url))  # The first request on a bucket.
    print('DEFAULTS', os.environ['TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS'],
          os.environ['TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES'])
    tree = {'w': np.arange(1 << 16, dtype=np.float32)}
    start = time.monotonic()
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(url + '/1', tree)
      np.testing.assert_array_equal(ckptr.restore(url + '/1')['w'], tree['w'])
    print('SAVED', round(time.monotonic() - start, 1))
''')


def test_a_request_the_server_never_answers_is_dropped_and_retried(s3_server, tmp_path):
  """A data-file PUT the server holds for good: curl drops it once it stalls, and the retry
  completes the save. The child's stall limit is 2 s instead of the default 60 s (which the
  first request on a bucket sets where the environment sets none)."""
  from fault_proxy import Fault, FaultProxy
  bucket = s3_server.make_bucket()
  env = {k: v for k, v in os.environ.items() if not k.startswith('TENSORSTORE_CURL_LOW_SPEED')}
  result = subprocess.run([sys.executable, '-c', _STALLED_CHILD, bucket + '/defaults'],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'DEFAULTS {_remote.STALLED_REQUEST_SECS} 256' in result.stdout
  with FaultProxy(s3_server.endpoint, 's3') as proxy:
    proxy.inject(Fault('hang', method='PUT', path_contains='/d/', limit=1, delay_s=300))
    env.update(AWS_ENDPOINT_URL_S3=proxy.endpoint, TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS='2')
    result = subprocess.run([sys.executable, '-c', _STALLED_CHILD, bucket + '/held'],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.injected['hang'] == 1
  assert 'DEFAULTS 2 256' in result.stdout and 'SAVED' in result.stdout
  assert os.listdir(tmp_path) == []
