"""How OCDBT checkpoints are read from buckets (flaxckpt._sources.ObjectIndexSource): one ranged
request per data file instead of one per value, and the same refusals of crafted B+trees as on
a local disk (tests/test_hostile_ocdbt.py crafts them; here they are uploaded and read from
moto's S3 server and fake-gcs-server)."""

import os
import pathlib

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
