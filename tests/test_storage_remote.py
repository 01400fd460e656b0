"""The object-store backend of flaxckpt._storage against real servers on loopback: moto's S3
server and fake-gcs-server (tests/object_store.py), every test on both."""

import concurrent.futures
import os
import pathlib
import socket

import numpy as np
import pytest
import tensorstore as ts

from flaxckpt import _errors, _storage
from flaxckpt._storage import _remote
from flaxckpt._storage._remote import RemotePath

pytest_plugins = ['object_store']


@pytest.fixture
def root(bucket_url, tmp_path, monkeypatch):
  """``bucket_url/run`` as a storage path; the test runs in an empty cwd, checked afterwards
  for a local folder a URL could have become."""
  monkeypatch.chdir(tmp_path)
  yield _storage.as_storage_path(bucket_url + '/run')
  assert sorted(os.listdir(tmp_path)) == [], 'a URL became a local path'
  for name in ('s3:', 'gs:'):
    assert not os.path.exists(name)


# --- RemotePath (no server) ---

def test_remote_path_behaves_like_a_path():
  path = RemotePath.parse('gs://bucket/run/1')
  assert (path.scheme, path.bucket, path.key) == ('gs', 'bucket', 'run/1')
  assert str(path) == os.fspath(path) == 'gs://bucket/run/1'
  assert path / 'state' / 'a/b' == RemotePath('gs', 'bucket', 'run/1/state/a/b')
  assert path.name == '1' and path.parent == RemotePath.parse('gs://bucket/run')
  assert path.with_name('2') == RemotePath.parse('gs://bucket/run/2')
  assert str(path.parent.parent) == 'gs://bucket' and path.parent.parent.parent.key == ''
  assert RemotePath.parse('s3://b//x/./y/') == RemotePath('s3', 'b', 'x/y')
  assert len({path, RemotePath.parse('gs://bucket/run/1/'), path.with_name('2')}) == 2
  assert path != RemotePath.parse('s3://bucket/run/1')
  assert _storage.as_storage_path('s3://b/k') == RemotePath('s3', 'b', 'k')
  assert _storage.as_storage_path(path) is path
  assert _storage.as_storage_path('rel') == pathlib.Path(os.path.abspath('rel'))
  assert not _storage.renames_atomically(path)
  assert _storage.renames_atomically(pathlib.Path('/tmp'))


@pytest.mark.parametrize('url', ['gs://', 's3:///key', 'gs://bucket/a/../b', 's3://b/..',
                                 'gs://bad/bucket\x00', 'gs://b@d/x', 'ftp://b/x'])
def test_remote_path_refuses_malformed_urls(url):
  with pytest.raises(ValueError):
    RemotePath.parse(url)


def test_remote_path_refuses_escaping_joins():
  path = RemotePath.parse('s3://b/run')
  for name in ('..', 'a/../..', '/abs'):
    with pytest.raises(ValueError):
      path / name


def test_as_path_takes_urls_and_as_local_path_refuses_them():
  for url in ('gs://b/x', 's3://b/x'):
    assert _storage.as_path(url) == RemotePath.parse(url)
    with pytest.raises(NotImplementedError, match=f'{url}: this needs a local path'):
      _storage.as_local_path(url)
  with pytest.raises(NotImplementedError, match='https://host/x: http.s. URLs are not supported'):
    _storage.as_path('https://host/x')


def test_s3_spec_from_the_environment(monkeypatch, tmp_path):
  for name in ('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'AWS_REGION', 'AWS_DEFAULT_REGION',
               'AWS_ACCESS_KEY_ID', 'AWS_PROFILE'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', str(tmp_path / 'none'))
  path = RemotePath.parse('s3://b/run/1')
  assert _storage.kvstore_spec(path) == {
      'driver': 's3', 'bucket': 'b', 'path': 'run/1/', 'aws_credentials': {'type': 'default'}}
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://h:1/')
  monkeypatch.setenv('AWS_DEFAULT_REGION', 'eu-west-1')
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'k')
  assert _storage.kvstore_spec(path) == {
      'driver': 's3', 'bucket': 'b', 'path': 'run/1/', 'endpoint': 'http://h:1',
      'aws_region': 'eu-west-1', 'aws_credentials': {'type': 'environment'}}
  monkeypatch.setenv('AWS_ENDPOINT_URL_S3', 'http://s3:2')  # Wins over AWS_ENDPOINT_URL.
  monkeypatch.setenv('AWS_REGION', 'ap-south-1')
  monkeypatch.delenv('AWS_DEFAULT_REGION')
  spec = _storage.kvstore_spec(path)
  assert (spec['endpoint'], spec['aws_region']) == ('http://s3:2', 'ap-south-1')
  monkeypatch.delenv('AWS_REGION')
  assert _storage.kvstore_spec(path)['aws_region'] == 'us-east-1'  # A custom endpoint's default.
  assert _storage.kvstore_spec(RemotePath.parse('gs://b/run/1')) == {
      'driver': 'gcs', 'bucket': 'b', 'path': 'run/1/'}
  assert _storage.kvstore_spec(RemotePath.parse('gs://b'))['path'] == ''


# --- Against the servers ---

def test_write_read_list_exists_remove(root):
  _storage.make_dirs(root)  # Nothing to do on an object store.
  assert not _storage.exists(root) and not _storage.is_dir(root)
  _storage.write_text(root / 'a.json', '{"x": 1}')
  _storage.write_bytes(root / 'sub' / 'deep' / 'b.bin', b'\x00\x01')
  _storage.write_bytes(root / 'sub' / 'c', b'')
  _storage.write_bytes(root.with_name('run2') / 'z', b'other prefix')
  assert _storage.read_text(root / 'a.json') == '{"x": 1}'
  assert _storage.read_bytes(root / 'sub/deep/b.bin') == b'\x00\x01'
  assert _storage.read_bytes(root / 'sub' / 'c') == b''
  assert _storage.list_names(root) == ['a.json', 'sub']
  assert _storage.list_names(root / 'sub') == ['c', 'deep']
  assert _storage.list_names(root.parent) == ['run', 'run2']
  assert _storage.exists(root) and _storage.is_dir(root) and not _storage.is_file(root)
  assert _storage.is_file(root / 'a.json') and not _storage.is_dir(root / 'a.json')
  assert _storage.exists(root / 'sub' / 'deep') and not _storage.exists(root / 'su')
  assert not _storage.is_link(root / 'a.json')
  with pytest.raises(FileNotFoundError):
    _storage.list_names(root / 'missing')
  with pytest.raises(FileNotFoundError):
    _storage.read_bytes(root / 'missing')

  _storage.remove_tree(root / 'sub')
  assert _storage.list_names(root) == ['a.json']
  _storage.remove(root / 'a.json')
  _storage.remove_tree(root / 'never-there')
  assert not _storage.exists(root)
  assert _storage.read_bytes(root.with_name('run2') / 'z') == b'other prefix'  # Untouched.
  with pytest.raises(ValueError, match='everything in a bucket'):
    _storage.remove_tree(root.parent)


def test_read_limits(root):
  _storage.write_bytes(root / 'ten', b'0123456789')
  assert _storage.read_bytes(root / 'ten', max_bytes=10) == b'0123456789'
  assert _storage.read_bytes(root / 'ten', max_bytes=None) == b'0123456789'
  for limit in (0, 9):
    with pytest.raises(_errors.LimitExceededError, match=f'/run/ten: more than the {limit} '):
      _storage.read_bytes(root / 'ten', max_bytes=limit)
  _storage.write_bytes(root / 'empty', b'')
  assert _storage.read_bytes(root / 'empty', max_bytes=0) == b''


def test_exclusive_write(root):
  _storage.write_bytes(root / 'once', b'1', exclusive=True)
  with pytest.raises(_errors.UnsafeCheckpointError, match='already exists'):
    _storage.write_bytes(root / 'once', b'2', exclusive=True)
  assert _storage.read_bytes(root / 'once') == b'1'


def test_names_that_are_not_directories(root):
  """A key that is a prefix of another (``run/a`` and ``run/a0``, ``run/a.b``) is not mistaken
  for its directory."""
  for name in ('a0', 'a.b', 'a-c'):
    _storage.write_bytes(root / name, b'x')
  assert not _storage.is_dir(root / 'a') and not _storage.exists(root / 'a')
  _storage.write_bytes(root / 'a' / 'in', b'y')
  assert _storage.list_names(root / 'a') == ['in']
  _storage.remove_tree(root / 'a')
  assert _storage.list_names(root) == ['a-c', 'a.b', 'a0']


def test_missing_bucket_is_named(object_server, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = RemotePath(object_server.scheme, 'no-such-bucket-flaxckpt', 'run/x')
  setting = 'AWS_ENDPOINT_URL_S3' if path.scheme == 's3' else 'TENSORSTORE_GCS_HTTP_URL'
  with pytest.raises(FileNotFoundError, match=(
      f"{path}: the bucket 'no-such-bucket-flaxckpt' does not exist on "
      f'{object_server.endpoint} .*; create it, or check the URL and {setting}')):
    _storage.write_bytes(path, b'x')
  if path.scheme == 's3':  # fake-gcs-server (like tensorstore on GCS) lists nothing instead.
    with pytest.raises(FileNotFoundError, match='does not exist'):
      _storage.list_names(path.parent)
  assert os.listdir(tmp_path) == []


def test_s3_denied_credentials_name_the_variables(s3_server, s3_server_denying, monkeypatch):
  monkeypatch.setenv('AWS_ENDPOINT_URL_S3', s3_server_denying.endpoint)
  path = RemotePath.parse('s3://any-bucket/run/x')
  for operation in (lambda: _storage.write_bytes(path, b'x'),
                    lambda: _storage.read_bytes(path),
                    lambda: _storage.exists(path)):
    with pytest.raises(PermissionError, match=(
        rf'{path}: access denied by {s3_server_denying.endpoint} \(PERMISSION_DENIED.*; '
        'set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY')):
      operation()


def test_timeout_names_the_url(s3_server, monkeypatch):
  """A server that accepts connections and never answers: the wait ends with the URL."""
  with socket.socket() as silent:
    silent.bind(('127.0.0.1', 0))
    silent.listen(16)
    endpoint = f'http://127.0.0.1:{silent.getsockname()[1]}'
    monkeypatch.setenv('AWS_ENDPOINT_URL_S3', endpoint)
    monkeypatch.setattr(_remote, 'REQUEST_TIMEOUT_SECS', 0.5)
    path = RemotePath.parse('s3://quiet/run/x')
    with pytest.raises(TimeoutError, match=(
        f'{path}: no answer from {endpoint} in 0.5 s while reading it')):
      _storage.read_bytes(path, max_bytes=None)


def test_array_through_the_kvstore_spec(root):
  """A zarr array over OCDBT over the s3/gcs kvstore, as flaxckpt's arrays are stored
  (_arrays._ocdbt_spec, _array_kvstore): the spec reaches the server end to end."""
  base = {'driver': 'ocdbt', 'base': _storage.kvstore_spec(root / 'step')}
  spec = {'driver': 'zarr', 'kvstore': {**base, 'path': 'params.w/'}}
  value = np.arange(24, dtype=np.float32).reshape(4, 6)
  store = ts.open(spec, create=True, dtype=value.dtype, shape=value.shape,
                  chunk_layout=ts.ChunkLayout(chunk_shape=[2, 3])).result()
  store.write(value).result()
  assert _storage.is_file(root / 'step' / 'manifest.ocdbt')
  assert 'd' in _storage.list_names(root / 'step')
  np.testing.assert_array_equal(ts.open(spec).result().read().result(), value)
  _storage.remove_tree(root / 'step')
  assert not _storage.exists(root / 'step')


def test_threads_share_the_store(root):
  """Concurrent writers and readers through the one cached kvstore."""
  def work(i):
    _storage.write_bytes(root / f'f{i}', bytes([i]) * 1000)
    assert _storage.read_bytes(root / f'f{i}') == bytes([i]) * 1000
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(work, range(8)))
  assert _storage.list_names(root) == sorted(f'f{i}' for i in range(8))
