"""flaxckpt.legacy.checkpoints on gs:// and s3:// URLs, against real servers on loopback
(tests/object_store.py: moto's S3 server and fake-gcs-server), every test on both.

The local file system is the reference: what a save writes to a bucket is compared byte for byte
with what flax's own ``save_checkpoint`` (msgpack) or ours writes to a local directory for the
same tree and the same calls, retention included; what a restore reads from a bucket is compared
with the local restore of the same files (old flax checkpoints among them).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors
from flax.training import checkpoints as flax_checkpoints
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxckpt as ocp
import multiprocess
import old_formats
from flaxckpt import _checksums, _errors, _storage
from flaxckpt.legacy import _gda, checkpoints
from trees import files_under

pytest_plugins = ['object_store']

pytestmark = pytest.mark.filterwarnings(
    'ignore:Sharding info not provided when restoring:UserWarning')


@pytest.fixture
def root(bucket_url, tmp_path, monkeypatch):
  """``bucket_url/run``; the test runs in a cwd of its own, where afterwards no folder named
  after a URL scheme may exist (nor in tmp_path)."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield bucket_url + '/run'
  assert os.listdir(cwd) == [], 'a URL became a local path'
  for base in (cwd, tmp_path, pathlib.Path('/tmp')):
    for name in ('s3:', 'gs:'):
      assert not (base / name).exists(), f'{base / name} was created'


def _path(url):
  return _storage.as_path(url)


def _names(url):
  return _storage.list_names(_path(url)) if _storage.is_dir(_path(url)) else []


def _objects(url):
  """Every object under ``url``: relative key -> bytes (as ``files_under`` for a folder)."""
  found = {}
  for name in _names(url):
    if _storage.is_file(_path(f'{url}/{name}')):
      found[name] = _storage.read_bytes(_path(f'{url}/{name}'), None)
    found.update({f'{name}/{key}': data for key, data in _objects(f'{url}/{name}').items()})
  return found


def _same_files(objects, files):
  """``objects`` from a bucket are ``files`` from a disk, sidecars compared by size and crc32c
  (a local one also records the file's inode and times, which objects do not have)."""
  def plain(found):
    return {name: {k: v for k, v in json.loads(data).items()
                   if k in ('algorithm', 'size', 'crc32c')} if name.endswith('.crc32c') else data
            for name, data in found.items()}
  assert plain(objects) == plain(files)


def _upload(directory, url):
  for relative, data in files_under(directory).items():
    _storage.write_bytes(_path(f'{url}/{relative}'), data)


def assert_trees_equal(actual, expected):
  """Same structure, leaf types, dtypes, shapes, bytes and shardings."""
  structures: list[Any] = [jax.tree.structure(actual), jax.tree.structure(expected)]
  assert structures[0] == structures[1]
  for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert type(x) is type(y), (x, y)
    if isinstance(y, (np.ndarray, np.generic, jax.Array)):
      assert (x.dtype, x.shape) == (y.dtype, y.shape)
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
      assert getattr(x, 'sharding', None) == getattr(y, 'sharding', None)
    else:
      assert x == y


def _tree():
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  return {'params': {'w': jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4),
                                         NamedSharding(mesh, PartitionSpec('x'))),
                     'b': np.arange(6, dtype=np.int16).reshape(2, 3)},
          'big': np.linspace(0, 1, 70000, dtype=np.float64),  # Chunked by flax's msgpack.
          'opt': [np.float32(0.5), {'mu': np.ones(3, jnp.bfloat16)}],
          'step': 7, 'lr': 0.5, 'name': 'run-a', 'empty': {}}


# ==================================================================================================
# msgpack: files byte-identical to flax's, retention, overwrite, prefix
# ==================================================================================================


def test_msgpack_objects_are_flax_files_and_restore(root, tmp_path, set_flag):
  set_flag(False)
  tree = _tree()
  assert checkpoints.save_checkpoint(root, tree, 3) == f'{root}/checkpoint_3'
  flax_checkpoints.save_checkpoint(tmp_path / 'flax', tree, 3)
  flax_bytes = (tmp_path / 'flax' / 'checkpoint_3').read_bytes()
  assert _objects(root) == {'checkpoint_3': flax_bytes, '.checkpoint_3.crc32c': json.dumps(
      {'algorithm': 'crc32c', 'size': len(flax_bytes),
       'crc32c': _checksums.of_bytes(flax_bytes)}).encode()}
  assert checkpoints.latest_checkpoint(root) == f'{root}/checkpoint_3'
  assert checkpoints.available_steps(root) == [3]
  local = checkpoints.restore_checkpoint(tmp_path / 'flax', tree)
  for kwargs in ({}, {'step': 3}):
    assert_trees_equal(checkpoints.restore_checkpoint(root, tree, **kwargs), local)
    assert_trees_equal(checkpoints.restore_checkpoint(root + '/', None, **kwargs),
                       checkpoints.restore_checkpoint(tmp_path / 'flax', None))
  assert_trees_equal(checkpoints.restore_checkpoint(f'{root}/checkpoint_3', tree), local)
  # Saved asynchronously: the same object.
  manager = checkpoints.AsyncManager()
  checkpoints.save_checkpoint(root, tree, 4, async_manager=manager)
  manager.wait_previous_save()
  assert _objects(root)['checkpoint_4'] == flax_bytes
  assert checkpoints.available_steps(root) == [4]


def test_a_damaged_object_is_caught_by_its_checksum(root, set_flag):
  set_flag(False)
  checkpoints.save_checkpoint(root, {'w': np.arange(100.0)}, 1)
  data = bytearray(_storage.read_bytes(_path(f'{root}/checkpoint_1')))
  data[-5] ^= 1
  _storage.write_bytes(_path(f'{root}/checkpoint_1'), bytes(data))
  with pytest.raises(_errors.ChecksumMismatchError, match=f'{root}/checkpoint_1 has crc32c'):
    checkpoints.restore_checkpoint(root, None)
  assert checkpoints.restore_checkpoint(root, None, verify_checksums=False)['w'][-1] != 99.0


def _run_sequence(module, url_or_dir):
  """The same saves with keep, keep_every_n_steps, overwrite and a float-step prefix; returns
  what each call raised."""
  raised: list[str | None] = []
  every_2: dict[str, Any] = {'keep_every_n_steps': 2}
  steps = [(1, {}), (2, {}), (3, {}), (4, every_2), (5, every_2), (6, every_2), (3, {}),
           (5, {'overwrite': True})]
  for step, kwargs in steps:
    try:
      module.save_checkpoint(url_or_dir, {'x': np.full(3, step)}, step, keep=2, **kwargs)
      raised.append(None)
    except flax_errors.InvalidCheckpointError:
      raised.append('InvalidCheckpointError')
  for float_step in (0.5, 10.0):
    module.save_checkpoint(url_or_dir, {'x': np.full(2, float_step)}, float_step,
                           prefix='ckpt_', keep=5)
  return raised


def test_retention_overwrite_and_prefix_as_flax_does_locally(root, tmp_path, set_flag):
  """flax's rules, applied to a bucket: the objects left are the files flax leaves on disk
  (plus our sidecars), deleted ones gone from the listing."""
  set_flag(False)
  flax_dir = tmp_path / 'flax'
  assert _run_sequence(checkpoints, root) == _run_sequence(flax_checkpoints, flax_dir)
  local = files_under(flax_dir)
  objects = _objects(root)
  assert {k: v for k, v in objects.items() if not k.endswith('.crc32c')} == local
  assert sorted(k for k in objects if k.endswith('.crc32c')) == sorted(
      f'.{name}.crc32c' for name in local)
  assert sorted(local) == ['checkpoint_4', 'checkpoint_5', 'ckpt_0.5', 'ckpt_10.0']
  assert checkpoints.available_steps(root) == [4, 5]
  assert checkpoints.available_steps(root, 'ckpt_', float) == [0.5, 10.0]
  assert checkpoints.latest_checkpoint(root, 'ckpt_') == f'{root}/ckpt_10.0'
  restored = checkpoints.restore_checkpoint(root, None, prefix='ckpt_', step=0.5)
  np.testing.assert_array_equal(restored['x'], np.full(2, 0.5))
  np.testing.assert_array_equal(checkpoints.restore_checkpoint(root, None)['x'], np.full(3, 5))


def test_a_failed_save_leaves_nothing_listed(root, set_flag):
  set_flag(False)
  with pytest.raises(TypeError):  # msgpack cannot encode it: nothing is written.
    checkpoints.save_checkpoint(root, {'w': np.ones(2), 'bad': object()}, 1)
  assert _names(root) == []
  checkpoints.save_checkpoint(root, {'w': np.ones(2)}, 1)
  with pytest.raises(TypeError):
    checkpoints.save_checkpoint(root, {'w': np.ones(2), 'bad': object()}, 2)
  assert checkpoints.available_steps(root) == [1]
  assert _names(root) == ['.checkpoint_1.crc32c', 'checkpoint_1']


# ==================================================================================================
# The Orbax backend
# ==================================================================================================


def test_orbax_backend_lists_and_restores_committed_steps_only(root, set_flag):
  set_flag(True)
  tree = _tree()
  for step in (1, 2, 3):
    checkpoints.save_checkpoint(root, {**tree, 'step': step}, step, keep=2)
  assert _names(root) == ['checkpoint_2', 'checkpoint_3']
  assert 'commit_success.txt' in _names(f'{root}/checkpoint_3')
  # Step 4 as a save killed before its commit leaves it: written in place, no marker.
  checkpoints.save_checkpoint(root, {**tree, 'step': 4}, 4, keep=5)
  _storage.remove(_path(f'{root}/checkpoint_4/commit_success.txt'))
  assert checkpoints.available_steps(root) == [2, 3]
  assert checkpoints.latest_checkpoint(root) == f'{root}/checkpoint_3'
  set_flag(False)  # Whatever the flag says, the format in the bucket decides.
  restored = checkpoints.restore_checkpoint(root, tree)
  assert restored['step'] == 3
  assert restored['params']['w'].sharding == tree['params']['w'].sharding
  np.testing.assert_array_equal(np.asarray(restored['params']['w']),
                                np.asarray(tree['params']['w']))
  assert checkpoints.restore_checkpoint(root, None, step=2)['step'] == 2
  with pytest.raises(_errors.IncompleteCheckpointError, match=f'{root}/checkpoint_4 has no'):
    checkpoints.restore_checkpoint(root, None, step=4)
  with pytest.raises(_errors.IncompleteCheckpointError):
    checkpoints.restore_checkpoint(f'{root}/checkpoint_4', None)
  # The next save reclaims the uncommitted step; retention counts committed steps only (an
  # async save's own step is not committed yet when it runs, as in flax).
  checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
  checkpoints.save_checkpoint(root, {**tree, 'step': 5}, 5, keep=2,
                              orbax_checkpointer=checkpointer)
  checkpointer.wait_until_finished()
  assert _names(root) == ['checkpoint_2', 'checkpoint_3', 'checkpoint_5']
  assert checkpoints.restore_checkpoint(root, None, orbax_checkpointer=checkpointer)['step'] == 5
  checkpoints.save_checkpoint(root, {**tree, 'step': 6}, 6, keep=2,
                              orbax_checkpointer=ocp.PyTreeCheckpointer())
  assert _names(root) == ['checkpoint_5', 'checkpoint_6']


def test_an_async_save_committed_at_once_does_not_count_for_its_own_retention(root, set_flag,
                                                                              monkeypatch):
  """Retention right after an async Orbax save leaves that step out even when its commit has
  already landed (it raced: under load the new step counted and one more older step went)."""
  set_flag(True)
  tree = _tree()
  for step in (1, 2):
    checkpoints.save_checkpoint(root, {**tree, 'step': step}, step, keep=5)
  checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
  start_save = checkpointer.save

  def save_and_commit(*args, **kwargs):
    start_save(*args, **kwargs)
    checkpointer.wait_until_finished()

  monkeypatch.setattr(checkpointer, 'save', save_and_commit)
  checkpoints.save_checkpoint(root, {**tree, 'step': 3}, 3, keep=2,
                              orbax_checkpointer=checkpointer)
  assert _names(root) == ['checkpoint_1', 'checkpoint_2', 'checkpoint_3']
  checkpoints.save_checkpoint(root, {**tree, 'step': 4}, 4, keep=2)
  assert _names(root) == ['checkpoint_3', 'checkpoint_4']


# ==================================================================================================
# save_checkpoint_multiprocess and _gda folders
# ==================================================================================================


@pytest.fixture
def sharded_to_gda(monkeypatch):
  """In one process every array is fully addressable, so none would go to ``_gda``: route the
  arrays spread over several devices there, as a multi-process save routes arrays no process
  holds whole (flax's fixture writer did the same to flax)."""
  monkeypatch.setattr(_gda, 'is_multiprocess_array',
                      lambda v: isinstance(v, jax.Array) and len(v.sharding.device_set) > 1)


def test_multiprocess_save_writes_gda_in_one_process(root, tmp_path, set_flag, sharded_to_gda):
  set_flag(False)
  tree = _tree()
  local = tmp_path / 'local'
  for step in (1, 2):
    checkpoints.save_checkpoint_multiprocess(local, tree, step)
    checkpoints.save_checkpoint_multiprocess(root, tree, step)
  objects = _objects(root)
  commit = f'checkpoint_2_gda/{_gda.COMMIT_FILE}'
  assert objects.pop(commit) == f'Checkpoint commit was successful to {root}/checkpoint_2_gda' \
      .encode()
  _same_files(objects, files_under(local))  # The msgpack file, its sidecar, every zarr file.
  assert 'checkpoint_2_gda/params/w/.zarray' in objects
  restored = checkpoints.restore_checkpoint(root, tree)
  assert restored['params']['w'].sharding == tree['params']['w'].sharding
  assert_trees_equal(restored, checkpoints.restore_checkpoint(local, tree))
  assert_trees_equal(checkpoints.restore_checkpoint(root, None),
                     checkpoints.restore_checkpoint(local, None))
  # Without its commit file the folder is not trusted (flax's rule on GCS).
  _storage.remove(_path(f'{root}/{commit}'))
  with pytest.raises(flax_errors.MPARestoreDataCorruptedError):
    checkpoints.restore_checkpoint(root, tree)
  # A save of step 3 that died after its arrays, before its msgpack object: never listed, and
  # reclaimed by the next save; overwriting step 2 replaces its arrays whole.
  _storage.write_bytes(_path(f'{root}/checkpoint_3_gda/params/w/.zarray'), b'{}')
  assert checkpoints.available_steps(root) == [2]
  checkpoints.save_checkpoint_multiprocess(root, tree, 2, overwrite=True)
  checkpoints.save_checkpoint_multiprocess(root, tree, 4)
  assert _names(root) == ['.checkpoint_4.crc32c', 'checkpoint_4', 'checkpoint_4_gda']
  assert_trees_equal(checkpoints.restore_checkpoint(root, tree),
                     checkpoints.restore_checkpoint(local, tree))


def test_a_failed_gda_save_leaves_nothing_listed(root, set_flag, sharded_to_gda, monkeypatch):
  """The msgpack object's write fails (the server refuses it): the arrays already written are
  removed, nothing is listed. Overwriting a step removes the old one first (its arrays are
  rewritten in place), so a failed overwrite leaves that step unlisted, never listed with its
  arrays half replaced."""
  set_flag(False)
  checkpoints.save_checkpoint_multiprocess(root, _tree(), 1)
  write_bytes = _storage.write_bytes

  def refuse_checkpoints(path, data, **kwargs):
    if path.name.startswith('checkpoint_'):
      raise PermissionError(f'{path}: access denied')
    return write_bytes(path, data, **kwargs)

  monkeypatch.setattr(_storage, 'write_bytes', refuse_checkpoints)
  with pytest.raises(PermissionError):
    checkpoints.save_checkpoint_multiprocess(root, _tree(), 2)
  assert _names(root) == ['.checkpoint_1.crc32c', 'checkpoint_1', 'checkpoint_1_gda']
  with pytest.raises(PermissionError):
    checkpoints.save_checkpoint_multiprocess(root, _tree(), 1, overwrite=True)
  assert _names(root) == []


_MULTIPROCESS_SCRIPT = r'''
url, local = ARGS
import warnings
warnings.simplefilter('ignore', DeprecationWarning)
import flax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flaxckpt.legacy import checkpoints

''' + multiprocess.SHARDED_ACROSS_PROCESSES + r'''
assert not w.is_fully_addressable
tree = {'params': {'w': w, 'b': b}, 'step': 7}
for directory in (url, local):
  for step in (6, 7):
    checkpoints.save_checkpoint_multiprocess(directory, tree, step)
  multihost_utils.sync_global_devices(f'saved {directory}')
restored = checkpoints.restore_checkpoint(url, tree)
report(bool(restored['step'] == 7 and all(
    restored['params'][k].sharding == tree['params'][k].sharding
    and all(np.array_equal(shard.data, values[k][shard.index])
            for shard in restored['params'][k].addressable_shards) for k in values)))
'''


def test_two_processes_save_to_one_bucket_and_a_fresh_one_restores(root, tmp_path):
  local = tmp_path / 'local'
  assert multiprocess.run(_MULTIPROCESS_SCRIPT, 2, 2, root, str(local)) == [True, True]
  objects = _objects(root)
  assert objects.pop(f'checkpoint_7_gda/{_gda.COMMIT_FILE}')
  _same_files(objects, files_under(local))
  assert sorted(_names(root)) == ['.checkpoint_7.crc32c', 'checkpoint_7', 'checkpoint_7_gda']
  script = textwrap.dedent(f'''
      import json, numpy as np
      from flaxckpt.legacy import checkpoints
      raw = checkpoints.restore_checkpoint({root!r}, None)
      print(json.dumps({{k: np.asarray(v).tolist() for k, v in raw['params'].items()}}),
            raw['step'])
      ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  params, step = result.stdout.rsplit(' ', 1)
  assert step.strip() == '7'
  assert json.loads(params) == {'w': np.arange(32.0).reshape(8, 4).tolist(),
                                'b': np.linspace(0, 1, 4, dtype=np.float32).tolist()}


# ==================================================================================================
# Old formats uploaded to a bucket
# ==================================================================================================

_OLD_FLAX = [pytest.param(case, id=case['path']) for case in old_formats.cases('flax')]


@pytest.mark.parametrize('case', _OLD_FLAX)
def test_old_flax_checkpoints_restore_from_a_bucket(root, case, tmp_path):
  """Each flax checkpoint of the fixtures, uploaded as it is on disk, restores as the local copy
  does. Its ``_gda`` folder needs the commit file flax writes on GCS, and an old Orbax directory
  the one Orbax writes there."""
  directory = old_formats.copy_case(case, tmp_path)
  _upload(directory, root)
  prefix = case.get('prefix', 'checkpoint_')
  step_type = float if any(isinstance(s, float) for s in case['steps']) else int
  if case['backend'] == 'orbax':
    assert checkpoints.available_steps(root, prefix, step_type) == []
    for step in case['steps']:
      _storage.write_bytes(_path(f'{root}/{prefix}{step}/commit_success.txt'), b'ok')
  target = old_formats.state.make_sharded() if case.get('sharded') else None
  if case.get('gda'):
    with pytest.raises(flax_errors.MPARestoreDataCorruptedError):
      checkpoints.restore_checkpoint(root, target, prefix=prefix)
    _storage.write_bytes(_path(f'{root}/{prefix}{case["steps"][-1]}_gda/commit_success.txt'),
                         b'Checkpoint commit was successful')
  assert checkpoints.available_steps(root, prefix, step_type) == case['steps']
  for step in (None, *case['steps']):
    assert_trees_equal(
        checkpoints.restore_checkpoint(root, target, step=step, prefix=prefix),
        checkpoints.restore_checkpoint(directory, target, step=step, prefix=prefix))
