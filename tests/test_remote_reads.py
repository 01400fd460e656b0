"""How OCDBT checkpoints are read from buckets (flaxckpt._sources.ObjectIndexSource): one ranged
request per data file instead of one per value, and the same refusals of crafted B+trees as on
a local disk (tests/test_hostile_ocdbt.py crafts them; here they are uploaded and read from
moto's S3 server and fake-gcs-server)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import flaxckpt as ocp
import test_hostile_ocdbt as crafted
from fault_proxy import FaultProxy
from flaxckpt import _errors, _storage

pytest_plugins = ['object_store']


def _upload(local: pathlib.Path, url: str) -> None:
  """Copies a local checkpoint to ``url`` and commits it there (commit_success.txt last)."""
  for path in sorted(p for p in local.rglob('*') if p.is_file()):
    _storage.write_bytes(_storage.as_path(f'{url}/{path.relative_to(local)}'), path.read_bytes())
  _storage.write_bytes(_storage.as_path(f'{url}/commit_success.txt'), b'')


def test_values_of_one_data_file_come_in_one_request(s3_server, tmp_path, monkeypatch):
  """Eight arrays of 64 KiB share one 4 MiB data file: the restore reads it with one request
  (tensorstore's own reads would send eight), whole or in part."""
  monkeypatch.chdir(tmp_path)
  tree = {f'w{i}': np.full(1 << 14, i, np.float32) for i in range(8)}
  url = s3_server.make_bucket() + '/ckpt'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(url, tree)
  data_files = [k for k in _storage.list_names(_storage.as_path(url + '/ocdbt.process_0/d'))]
  assert len(data_files) == 1, data_files
  with FaultProxy(s3_server.endpoint, 's3') as proxy:
    monkeypatch.setenv('AWS_ENDPOINT_URL_S3', proxy.endpoint)
    for wanted in (tree, {'w3': tree['w3'], 'w6': tree['w6']}):
      proxy.log.clear()
      with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(url, args=ocp.args.PyTreeRestore(
            wanted, partial_restore=True) if len(wanted) < len(tree) else None)
      assert restored.keys() == wanted.keys()
      for key in wanted:
        np.testing.assert_array_equal(np.asarray(restored[key]), tree[key])
      reads = [path for method, path, _ in proxy.log
               if method == 'GET' and data_files[0] in path]
      assert len(reads) == 1, proxy.log
  assert os.listdir(tmp_path) == []


def _crafted_cases(box: pathlib.Path) -> dict[str, tuple[str, str]]:
  """Crafted checkpoints below ``box``: name -> (error class, fragment of its message)."""
  crafted.save(box / 'escaping')
  crafted.point_value(box / 'escaping', b'x/0', 'ocdbt.process_0/', '../../../elsewhere/secret')
  for name, (offset, length) in {'past-end': (None, 120), 'huge-length': (0, 1 << 62),
                                 'big-past-end': (None, 4 * crafted.BIG)}.items():
    crafted.save(box / name)
    data = crafted.data_file(box / name)
    key = b'big/0' if name.startswith('big') else b'x/0'
    crafted.point_value(box / name, key, 'ocdbt.process_0/', 'd/' + data.name,
                        data.stat().st_size - 10 if offset is None else offset, length)
  crafted.self_referencing_root(box / 'cycle')
  return {'escaping': ('UnsafeCheckpointError', 'could lead outside the checkpoint'),
          'past-end': ('NotACheckpointError', 'the checkpoint is damaged'),
          'huge-length': ('NotACheckpointError', 'the checkpoint is damaged'),
          'big-past-end': ('NotACheckpointError', 'the checkpoint is damaged'),
          'cycle': ('NotACheckpointError', 'a second time')}


def test_crafted_trees_are_refused_on_buckets(bucket_url, tmp_path):
  cases = _crafted_cases(tmp_path / 'box')
  for name, (error, fragment) in cases.items():
    url = f'{bucket_url}/{name}'
    _upload(tmp_path / 'box' / name, url)
    with pytest.raises(getattr(_errors, error), match=fragment) as raised:
      ocp.StandardCheckpointer().restore(url)
    assert url in str(raised.value), raised.value
  assert not pathlib.Path('s3:').exists() and not pathlib.Path('gs:').exists()


def _data_files(url: str) -> list[str]:
  return list(_storage.list_names(_storage.as_path(url + '/ocdbt.process_0/d')))


def _restore_logged(s3_server, monkeypatch, bucket: str, url: str, **settings: int):
  """Restores ``url`` through a logging proxy, with ``settings`` on ``bucket`` meanwhile;
  returns the tree and the proxy's log of requests."""
  if settings:
    ocp.object_store.configure(bucket, **settings)
  try:
    with FaultProxy(s3_server.endpoint, 's3') as proxy:
      monkeypatch.setenv('AWS_ENDPOINT_URL_S3', proxy.endpoint)
      with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(url)
  finally:
    ocp.object_store.configure(bucket, None)
  return restored, proxy.log


def test_large_values_are_read_in_parts(s3_server, tmp_path, monkeypatch):
  """A value larger than ``read_part_size`` comes in ranged requests of that size, each
  copied into the array it belongs to: the restore is exact, whatever the part boundaries."""
  monkeypatch.chdir(tmp_path)
  bucket = s3_server.make_bucket()
  url = bucket + '/ckpt'
  rng = np.random.default_rng(0)
  big = rng.standard_normal((1 << 20) + 3, dtype=np.float32)  # 4 MiB + 12 bytes: 5 parts.
  tree = {'big': big, 'two': rng.standard_normal((512, 1024)).astype(np.float32),
          'small': np.arange(10, dtype=np.int32)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(url, tree)
  before = set(_data_files(url))
  restored, log = _restore_logged(s3_server, monkeypatch, bucket, url,
                                  read_part_size=1 << 20, read_ahead=3 << 20)
  for key, value in tree.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
    assert np.asarray(restored[key]).dtype == value.dtype
  gets = [path for method, path, _ in log
          if method == 'GET' and any(name in path for name in before)]
  # 'big' in 5 parts and 'two' (2 MiB) in 2: no fewer requests than parts.
  assert len(gets) >= 7, log
  assert os.listdir(tmp_path) == []


def test_a_truncated_data_object_names_the_object(bucket_url, tmp_path):
  """A large value whose data object was cut short on the bucket: an error naming the object,
  never an array padded with whatever memory held."""
  url = bucket_url + '/ckpt'
  tree = {'w': np.arange(1 << 19, dtype=np.float32)}  # 2 MiB: read straight into its array.
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(url, tree)
  sizes = {}
  for name in _data_files(url):
    path = _storage.as_path(f'{url}/ocdbt.process_0/d/{name}')
    sizes[name] = len(_storage.read_bytes(path))
  name = max(sizes, key=sizes.get)
  path = _storage.as_path(f'{url}/ocdbt.process_0/d/{name}')
  _storage.write_bytes(path, _storage.read_bytes(path)[:sizes[name] // 2])
  with pytest.raises(_errors.NotACheckpointError, match='the checkpoint is damaged') as raised:
    ocp.StandardCheckpointer().restore(url)
  assert name in str(raised.value) and url in str(raised.value), raised.value


_RESTORE_PEAK = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    import flaxckpt as ocp

    def status(field):
      return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) * 1024

    url, nbytes, part_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ocp.object_store.configure(url.rsplit('/', 1)[0], read_part_size=part_size,
                               read_ahead=32 << 20)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.metadata(url)
      open('/proc/self/clear_refs', 'w').write('5')  # Resets the peak (VmHWM) to now.
      base = status('VmRSS')
      out = jax.block_until_ready(ckptr.restore(url))
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(out)) == nbytes
    print('EXTRA', (status('VmHWM') - base) / nbytes)
''')


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc')
@pytest.mark.parametrize('arrays, part_size', [(3, 8 << 20), (12, 32 << 20)])
def test_a_restore_from_a_bucket_holds_its_arrays_and_a_bounded_read_ahead(bucket_url,
                                                                           tmp_path, arrays,
                                                                           part_size):
  """Restoring 192 MiB with a 32 MiB read-ahead peaks near the arrays' own size plus the
  read-ahead (holding every byte read until the last array was complete took 2.2-2.8x):
  64 MiB arrays read in 8 MiB parts, and 16 MiB arrays read whole (each kept as read, or
  copied out of the bytes read)."""
  url = bucket_url + '/ckpt'
  tree = {f'w{i}': np.full((192 << 18) // arrays, i, np.float32) for i in range(arrays)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(url, tree)
  nbytes = sum(value.nbytes for value in tree.values())
  del tree
  env = {**os.environ, 'MALLOC_ARENA_MAX': '2'}
  done = subprocess.run([sys.executable, '-c', _RESTORE_PEAK, url, str(nbytes), str(part_size)],
                        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  extra = float(done.stdout.split('EXTRA')[1])
  # Bytes in flight exist twice for a moment (tensorstore's buffer, the bytes copied from it),
  # and a third time while copied into their array; so 1.6x here, 2.5x or more unbounded.
  assert 0.9 < extra < 1.1 + 3 * (32 << 20) / nbytes, done.stdout


@pytest.mark.parametrize('part_size, expected_gets', [(None, 1), (1 << 20, 3)])
def test_small_values_come_with_the_large_value_beside_them(s3_server, tmp_path, monkeypatch,
                                                            part_size, expected_gets):
  """A data file holding a 2.5 MiB array and four small ones: the small ones come with the
  large one's first or last part, so the file is read once per part (moto reads a whole
  object for any range; a separate request for them doubled its work)."""
  monkeypatch.chdir(tmp_path)
  bucket = s3_server.make_bucket()
  url = bucket + '/ckpt'
  rng = np.random.default_rng(1)
  tree = {'big': rng.standard_normal(5 << 17).astype(np.float32),
          **{f's{i}': rng.standard_normal(1 << 12).astype(np.float32) for i in range(4)}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(url, tree)
  data_files = _data_files(url)
  assert len(data_files) == 1, data_files
  restored, log = _restore_logged(s3_server, monkeypatch, bucket, url,
                                  **({'read_part_size': part_size} if part_size else {}))
  for key, value in tree.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
  gets = [path for method, path, _ in log if method == 'GET' and data_files[0] in path]
  assert len(gets) == expected_gets, log
  assert os.listdir(tmp_path) == []
