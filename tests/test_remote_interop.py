"""Interoperability on buckets: the real Orbax 0.12.8 and flaxckpt on fake-gcs-server, both ways,
and checkpoints written by old Orbax releases (tests/data/old-formats) read from both servers.

Orbax reaches GCS through etils.epath and gcsfs (pointed at the server by
``STORAGE_EMULATOR_HOST``) for its small files and listings, and through tensorstore
(``TENSORSTORE_GCS_HTTP_URL``, set by the ``gcs_server`` fixture) for arrays. Orbax on S3 needs
s3fs (not a test dependency: without it a save raises ImportError) and even with it does not work
(issue 19), so only GCS is a peer here.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxckpt as ocp
from flaxckpt import _storage
import old_formats
import test_old_formats as local
import test_old_managers as local_managers

pytest_plugins = ['object_store']

_COMMIT = 'commit_success.txt'
# Orbax warns when it restores a jax.Array without a target sharding (it then reads `_sharding`);
# the old-format restores reproduce the calls of test_old_formats.py, which ignores the same.
pytestmark = pytest.mark.filterwarnings(
    'ignore:Sharding info not provided when restoring:UserWarning',
    'ignore:Couldn.t find sharding info under RestoreArgs:UserWarning')


def _no_url_folders(*directories: Any) -> None:
  for directory in directories:
    for name in ('s3:', 'gs:'):
      assert not os.path.exists(os.path.join(directory, name)), f'{directory}/{name}'


@pytest.fixture
def gs_root(gcs_server, tmp_path, monkeypatch):
  """``gs://<new bucket>/run`` on fake-gcs-server, reachable by Orbax's gcsfs too; the test runs
  in an empty cwd, checked afterwards for a local folder a URL could have become."""
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', gcs_server.endpoint)
  # gcsfs's default (experimental) class asks Google's control plane for each bucket's layout;
  # read when gcsfs is first imported.
  monkeypatch.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  monkeypatch.chdir(tmp_path)
  yield gcs_server.make_bucket() + '/run'
  _no_url_folders(tmp_path, os.getcwd())


def _tree(step: int = 7) -> dict[str, Any]:
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  sharded = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4) + step,
                           NamedSharding(mesh, PartitionSpec('x')))
  return {'params': {'w': sharded, 'b': np.arange(6, dtype=np.int16).reshape(2, 3) * step},
          'step': step, 'lr': 0.5}


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def _check(restored: Any, tree: dict[str, Any], sharded: bool = False) -> None:
  """Exactly ``tree``: values, dtypes, Python scalars, and (``sharded``) the sharding."""
  assert int(restored['step']) == tree['step'] and float(restored['lr']) == tree['lr']
  for key in ('w', 'b'):
    have, want = np.asarray(restored['params'][key]), np.asarray(tree['params'][key])
    assert have.dtype == want.dtype and have.shape == want.shape, key
    assert have.tobytes() == want.tobytes(), key
  if sharded:
    assert restored['params']['w'].sharding == tree['params']['w'].sharding


def _names(url: str) -> list[str]:
  return _storage.list_names(_storage.as_storage_path(url))


def _checkpointer(lib: Any, kind: str, use_ocdbt: bool) -> Any:
  """A Checkpointer of ``lib`` for the layout (OCDBT is each library's default)."""
  if kind == 'standard':
    return lib.Checkpointer(lib.StandardCheckpointHandler(use_ocdbt=use_ocdbt))
  return lib.Checkpointer(lib.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt))


def _save_args(lib: Any, kind: str, tree: Any) -> Any:
  return lib.args.StandardSave(tree) if kind == 'standard' else lib.args.PyTreeSave(tree)


def _restore_args(lib: Any, kind: str, tree: Any) -> Any:
  if kind == 'standard':
    return lib.args.StandardRestore(_abstract(tree))
  restore_args = jax.tree.map(
      lambda x: lib.ArrayRestoreArgs(sharding=x.sharding) if isinstance(x, jax.Array)
      else lib.RestoreArgs(restore_type=type(x) if isinstance(x, (int, float)) else None),
      tree)
  return lib.args.PyTreeRestore(_abstract(tree), restore_args=restore_args)


_LAYOUTS = pytest.mark.parametrize('kind, use_ocdbt', [
    ('standard', True), ('standard', False), ('pytree', True), ('pytree', False)])


# ==================================================================================================
# Orbax writes, flaxckpt reads
# ==================================================================================================


@_LAYOUTS
def test_orbax_writes_flaxckpt_restores(gs_root, kind, use_ocdbt):
  tree = _tree()
  with _checkpointer(orbax, kind, use_ocdbt) as ckptr:
    ckptr.save(gs_root + '/1', args=_save_args(orbax, kind, tree))
  names = _names(gs_root + '/1')
  assert _COMMIT in names and ('manifest.ocdbt' in names) == use_ocdbt
  with _checkpointer(ocp, kind, use_ocdbt) as ckptr:
    _check(ckptr.restore(gs_root + '/1'), tree)
    _check(ckptr.restore(gs_root + '/1', args=_restore_args(ocp, kind, tree)), tree,
           sharded=True)


@_LAYOUTS
def test_flaxckpt_writes_orbax_restores(gs_root, kind, use_ocdbt):
  tree = _tree()
  with _checkpointer(ocp, kind, use_ocdbt) as ckptr:
    ckptr.save(gs_root + '/1', args=_save_args(ocp, kind, tree))
  assert _COMMIT in _names(gs_root + '/1')
  with _checkpointer(orbax, kind, use_ocdbt) as ckptr:
    _check(ckptr.restore(gs_root + '/1', args=_restore_args(orbax, kind, tree)), tree,
           sharded=True)
    _check(ckptr.restore(gs_root + '/1'), tree)


def _manager_args(lib: Any, step: int) -> Any:
  return lib.args.Composite(state=lib.args.StandardSave(_tree(step)),
                            meta=lib.args.JsonSave({'epoch': step, 'tag': f'run-{step}'}))


def _loss(step: int) -> float:
  return [0.5, 0.125, 0.25, 1.0][step]


def _manager(lib: Any, root: str, **options: Any) -> Any:
  return lib.CheckpointManager(root, options=lib.CheckpointManagerOptions(
      best_fn=lambda m: m['loss'], best_mode='min', **options), item_names=('state', 'meta'))


def _check_manager_step(manager: Any, lib: Any, step: int) -> None:
  restored = manager.restore(step, args=lib.args.Composite(
      state=lib.args.StandardRestore(_abstract(_tree(step))), meta=lib.args.JsonRestore()))
  _check(restored.state, _tree(step), sharded=True)
  assert restored.meta == {'epoch': step, 'tag': f'run-{step}'}


@pytest.mark.parametrize('writer, reader', [(orbax, ocp), (ocp, orbax)],
                         ids=['orbax_to_flaxckpt', 'flaxckpt_to_orbax'])
def test_managers_read_each_others_steps_items_and_metrics(gs_root, writer, reader):
  """Several items, metrics and best-metric retention (max_to_keep=2 keeps the two lowest
  losses): the other library lists the same committed steps, the same metrics and best step,
  and restores every item exactly."""
  with _manager(writer, gs_root, max_to_keep=2) as manager:
    for step in range(4):
      manager.save(step, args=_manager_args(writer, step), metrics={'loss': _loss(step)})
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
  assert sorted(n for n in _names(gs_root) if n.isdigit()) == ['1', '2']
  with _manager(reader, gs_root, max_to_keep=2) as manager:
    assert manager.all_steps() == [1, 2]
    assert manager.latest_step() == 2 and manager.best_step() == 1
    for step in (1, 2):
      assert manager.metrics(step) == {'loss': _loss(step)}
      _check_manager_step(manager, reader, step)


def test_an_orbax_step_without_commit_success_is_not_listed(gs_root):
  """A step Orbax was writing when it died (its item committed, the step's marker not yet
  written): neither library lists it, flaxckpt refuses to restore the step by path and reclaims
  it on the next save there."""
  with orbax.CheckpointManager(gs_root) as manager:
    for step in (1, 2):
      manager.save(step, args=orbax.args.StandardSave(_tree(step)))
    manager.wait_until_finished()
  _storage.remove(_storage.as_storage_path(f'{gs_root}/2/{_COMMIT}'))
  with ocp.CheckpointManager(gs_root) as manager:
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    _check(manager.restore(1, args=ocp.args.StandardRestore(_abstract(_tree(1)))), _tree(1))
    with pytest.raises(ocp.IncompleteCheckpointError, match=f'{gs_root}/2: no {_COMMIT}'):
      ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(f'{gs_root}/2')
    manager.save(2, args=ocp.args.StandardSave(_tree(20)))
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
  assert orbax.CheckpointManager(gs_root).all_steps() == [1, 2]
  with orbax.CheckpointManager(gs_root) as manager:
    _check(manager.restore(2, args=orbax.args.StandardRestore(_abstract(_tree(20)))), _tree(20))


def test_orbax_listing_goes_stale_flaxckpt_does_not(gs_root):
  """Orbax keeps gcsfs's directory listings (the one gcsfs instance that etils.epath keeps for
  the life of the process caches them): a step another writer commits after Orbax listed the
  root stays unseen by ``reload()`` and even by a new Orbax manager, until gcsfs's cache is
  invalidated. A flaxckpt manager lists the bucket afresh on each ``reload()``."""
  from etils import epath
  with orbax.CheckpointManager(gs_root) as manager:
    manager.save(0, args=orbax.args.StandardSave(_tree(0)))
    manager.wait_until_finished()
  orbax_reader = orbax.CheckpointManager(
      gs_root, options=orbax.CheckpointManagerOptions(read_only=True))
  flaxckpt_reader = ocp.CheckpointManager(
      gs_root, options=ocp.CheckpointManagerOptions(read_only=True))
  assert orbax_reader.all_steps() == flaxckpt_reader.all_steps() == [0]
  with ocp.CheckpointManager(gs_root) as writer:
    writer.save(1, args=ocp.args.StandardSave(_tree(1)))
    writer.wait_until_finished()
  flaxckpt_reader.reload()
  assert flaxckpt_reader.all_steps() == [0, 1]
  _check(flaxckpt_reader.restore(1, args=ocp.args.StandardRestore(_abstract(_tree(1)))),
         _tree(1))
  orbax_reader.reload()
  assert orbax_reader.all_steps(read=True) == [0]  # Orbax's stale listing.
  assert orbax.CheckpointManager(
      gs_root, options=orbax.CheckpointManagerOptions(read_only=True)).all_steps() == [0]
  epath.backend.fsspec_backend.fs(gs_root).invalidate_cache()  # The gcsfs instance etils keeps.
  assert orbax.CheckpointManager(
      gs_root, options=orbax.CheckpointManagerOptions(read_only=True)).all_steps() == [0, 1]
  orbax_reader.close()
  flaxckpt_reader.close()


def test_standard_checkpointers_with_their_defaults(gs_root):
  """``StandardCheckpointer().save(path, tree)`` as users write it, each way."""
  tree = _tree()
  with orbax.StandardCheckpointer() as ckptr:
    ckptr.save(gs_root + '/orbax', tree)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(gs_root + '/flaxckpt', tree)
    _check(ckptr.restore(gs_root + '/orbax', _abstract(tree)), tree, sharded=True)
  with orbax.StandardCheckpointer() as ckptr:
    _check(ckptr.restore(gs_root + '/flaxckpt', _abstract(tree)), tree, sharded=True)


# ==================================================================================================
# Checkpoints written by old Orbax releases, read from buckets
# ==================================================================================================
#
# On a bucket a checkpoint is committed once it holds commit_success.txt (docs/object_storage.md).
# Orbax on GCS always wrote that marker (in each checkpoint directory: a Checkpointer's, a
# manager's step and each item in it); the fixtures were written to a local disk, where Orbax
# commits by rename and writes none. Uploaded as they are, they are uncommitted on a bucket;
# uploaded with the markers Orbax on GCS would have written, they restore as on disk.

_PYTREE = old_formats.cases('orbax_pytree')
_MANAGERS = old_formats.cases('orbax_manager')


def _files(directory: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in sorted(directory.rglob('*')) if p.is_file()]


def _committed_dirs(case: dict[str, Any]) -> list[str]:
  """Where Orbax on GCS wrote commit_success.txt: the checkpoint directory of a Checkpointer;
  a manager's step directories and their item directories."""
  if case['kind'] == 'orbax_pytree':
    return ['']
  source = old_formats.DATA / case['path']
  return [f'{step}/{item}'.rstrip('/') for step in case['steps']
          for item in ('', *sorted(p.name for p in (source / str(step)).iterdir() if p.is_dir()))]


def _upload(case: dict[str, Any], url: str, markers: bool) -> None:
  """Copies every file of ``case`` to ``url``, as ``gsutil cp -r`` would (a bucket keeps no
  empty directories); with ``markers``, adds commit_success.txt where Orbax on GCS wrote it."""
  source = old_formats.DATA / case['path']
  target = _storage.as_storage_path(url)
  writes = [(target / str(p.relative_to(source)), p.read_bytes()) for p in _files(source)]
  if markers:
    writes += [(target / d / _COMMIT if d else target / _COMMIT, b'')
               for d in _committed_dirs(case)]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    list(pool.map(lambda w: _storage.write_bytes(*w), writes))


# Every case on GCS, where old Orbax wrote checkpoints (with the markers); on S3, which no
# Orbax release could write to, one era of each layout family: the `checkpoint` file only
# (Orbax 0.1 to 0.3), `_METADATA` beside it (0.3 to 0.5), `_METADATA` only (0.6 on).
_S3_ERAS = ('f0610-ocp018', 'f082-ocp059', 'f0104-ocp0115')


def _server_cases(kind: str) -> list[Any]:
  cases = old_formats.cases(kind)
  return [pytest.param(server, case, id=f'{server}-{case["path"]}')
          for server in ('s3', 'gs') for case in cases
          if server == 'gs' or case['era'] in _S3_ERAS]


@pytest.fixture(scope='module')
def old_bucket(request):
  """``url(server, case)``: the case uploaded with its commit markers to one bucket per server,
  uploaded once per module (the restores only read)."""
  buckets: dict[str, str] = {}

  def url(server: str, case: dict[str, Any]) -> str:
    if server not in buckets:
      found = request.getfixturevalue('s3_server' if server == 's3' else 'gcs_server')
      buckets[server] = found.make_bucket()
      for each in _PYTREE + _MANAGERS:
        if server == 'gs' or each['era'] in _S3_ERAS:
          _upload(each, f'{buckets[server]}/{each["path"]}', markers=True)
    return f'{buckets[server]}/{case["path"]}'

  return url


@pytest.mark.parametrize('server, case', _server_cases('orbax_pytree'))
def test_old_pytree_checkpoints_restore_from_a_bucket(old_bucket, server, case):
  """As test_old_formats.py restores them from disk: without a target, and (the sharded and
  TrainState trees, where the target shapes the result) into a concrete target with restore
  args built from it."""
  url = old_bucket(server, case)
  old_formats.state.tree_eq_loose(local._expected(case), ocp.PyTreeCheckpointer().restore(url))
  if case['case'] not in ('pytree_sharded', 'ts_pytree'):
    return
  target = local._target(case, 'concrete')
  restored = ocp.PyTreeCheckpointer().restore(url, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  local._check_target_result(case, target, restored)


@pytest.mark.parametrize('server, case', _server_cases('orbax_manager'))
def test_old_manager_roots_list_and_restore_from_a_bucket(old_bucket, server, case):
  """As test_old_managers.py reads them from disk: the committed steps, every item of every
  step, and the best step from the stored metrics."""
  url = old_bucket(server, case)
  options: dict[str, Any] = {}
  if case.get('best'):
    options = {'best_fn': lambda m: m['loss'], 'best_mode': 'min'}
  manager = ocp.CheckpointManager(url, options=ocp.CheckpointManagerOptions(
      read_only=True, **options))
  assert manager.all_steps() == case['steps']
  for step in case['steps']:
    restored = manager.restore(step)
    if case['case'] == 'manager_default':
      old_formats.state.tree_eq_loose(local_managers._expected(case, 'default', step), restored)
    else:
      local_managers._check_items(case, restored, step, metrics=case.get('metrics_item', False))
  if case.get('best'):
    losses = {s: old_formats.state.expected('metrics', step=s)['loss'] for s in case['steps']}
    assert manager.best_step() == min(losses, key=lambda s: losses[s])


def test_old_checkpoints_uploaded_without_markers_are_uncommitted(bucket_url, tmp_path,
                                                                 monkeypatch):
  """A checkpoint written to a local disk (committed there by rename) and copied to a bucket
  as it is holds no commit_success.txt: on the bucket it counts as a save that never finished.
  A restore by path says which file is missing, a manager lists none of its steps; with the
  markers added (as Orbax on GCS wrote them) both read it as on disk."""
  monkeypatch.chdir(tmp_path)
  pytree = old_formats.case_at('f0104-ocp0115/pytree')
  manager = old_formats.case_at('f0104-ocp0115/manager_default')
  for case in (pytree, manager):
    _upload(case, f'{bucket_url}/{case["path"]}', markers=False)
  pytree_url, manager_url = (f'{bucket_url}/{c["path"]}' for c in (pytree, manager))
  with pytest.raises(ocp.IncompleteCheckpointError, match=f'{pytree_url}: no {_COMMIT}'):
    ocp.PyTreeCheckpointer().restore(pytree_url)
  assert ocp.CheckpointManager(manager_url).all_steps() == []
  step = manager['steps'][-1]
  with pytest.raises(ocp.IncompleteCheckpointError, match=f'{manager_url}/{step}: no {_COMMIT}'):
    ocp.CheckpointManager(manager_url).restore(step)
  for case, url in ((pytree, pytree_url), (manager, manager_url)):
    for directory in _committed_dirs(case):
      target = _storage.as_storage_path(url)
      _storage.write_bytes((target / directory if directory else target) / _COMMIT, b'')
  old_formats.state.tree_eq_loose(local._expected(pytree),
                                  ocp.PyTreeCheckpointer().restore(pytree_url))
  assert ocp.CheckpointManager(manager_url).all_steps() == manager['steps']
  old_formats.state.tree_eq_loose(local_managers._expected(manager, 'default', step),
                                  ocp.CheckpointManager(manager_url).restore(step))
  _no_url_folders(tmp_path)
