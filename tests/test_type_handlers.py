"""Custom leaf types through ``ocp.type_handlers``, checked against the real Orbax.

The handler under test is written once, the way a project writes one for Orbax, and subclassed
from either library's ``TypeHandler``: a ``Point`` leaf (a small array and a label) stored as a
JSON file of its own beside the checkpoint's arrays. Each library must save and restore it in a
PyTree, and read the other's files; the ``_METADATA`` both write must be the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
import tensorstore as ts
from etils import epath

import flaxckpt as ocp
from flaxckpt import _type_handlers

POINT_TYPESTR = 'tests.Point'


@dataclasses.dataclass
class Point:
  coords: np.ndarray
  label: str


def _point_handler(base: type) -> Any:
  """A TypeHandler for Point written against ``base`` (either library's TypeHandler)."""

  class PointHandler(base):
    calls: list[tuple[str, Any]] = []

    def typestr(self) -> str:
      return POINT_TYPESTR

    def _file(self, info: Any) -> pathlib.Path:
      return pathlib.Path(info.parent_dir) / f'{info.name}.point.json'

    async def serialize(self, values, infos, args=None):
      futures = []
      kv = ts.KvStore.open({'driver': 'file', 'path': str(infos[0].parent_dir) + '/'}).result()
      for value, info in zip(values, infos):
        await info.await_path_creation()
        self.calls.append(('serialize', info))
        data = json.dumps({'coords': value.coords.tolist(), 'dtype': str(value.coords.dtype),
                           'label': value.label}).encode()
        futures.append(kv.write(self._file(info).name, data))  # A tensorstore future.
      return futures

    async def deserialize(self, infos, args=None):
      out = []
      for info in infos:
        self.calls.append(('deserialize', info))
        raw = json.loads(self._file(info).read_text())
        out.append(Point(np.array(raw['coords'], dtype=raw['dtype']), raw['label']))
      return out

    async def metadata(self, infos):
      return [json.loads(self._file(info).read_text())['label'] for info in infos]

  return PointHandler


FlaxckptPointHandler = _point_handler(ocp.type_handlers.TypeHandler)
OrbaxPointHandler = _point_handler(orbax.type_handlers.TypeHandler)


@pytest.fixture
def registries():
  """Restores both libraries' global registries after the test."""
  ours = _type_handlers.REGISTRY
  saved = (list(ours._by_type), dict(ours._by_typestr), ours.customized)
  theirs = orbax.type_handlers.get_type_handler.__globals__['GLOBAL_TYPE_HANDLER_REGISTRY']
  saved_theirs = (list(theirs._type_registry), dict(theirs._typestr_registry))
  FlaxckptPointHandler.calls.clear()
  yield
  ours._by_type[:], ours._by_typestr, ours.customized = saved[0], saved[1], saved[2]
  ours.version += 1
  theirs._type_registry[:] = saved_theirs[0]
  theirs._typestr_registry.clear()
  theirs._typestr_registry.update(saved_theirs[1])


def _tree() -> dict[str, Any]:
  return {'params': {'w': jnp.arange(6.0).reshape(2, 3), 'b': np.ones(3, np.int32)},
          'anchor': Point(np.array([1.5, -2.0], np.float32), 'origin'),
          'points': [Point(np.arange(3), 'a'), Point(np.zeros((2, 2), np.float64), 'b')],
          'step': 7}


def _assert_points_equal(got: Point, want: Point) -> None:
  assert isinstance(got, Point)
  assert got.label == want.label
  assert got.coords.dtype == want.coords.dtype
  np.testing.assert_array_equal(got.coords, want.coords)


def _assert_restored(restored: Any, tree: dict[str, Any]) -> None:
  _assert_points_equal(restored['anchor'], tree['anchor'])
  for got, want in zip(restored['points'], tree['points']):
    _assert_points_equal(got, want)
  np.testing.assert_array_equal(restored['params']['w'], tree['params']['w'])
  np.testing.assert_array_equal(restored['params']['b'], tree['params']['b'])
  assert restored['step'] == 7


# --- the registry -------------------------------------------------------------------------------


def test_registry_refuses_to_replace_without_override(registries):
  handler = FlaxckptPointHandler()
  ocp.type_handlers.register_type_handler(Point, handler)
  assert ocp.type_handlers.has_type_handler(Point)
  assert ocp.type_handlers.get_type_handler(Point) is handler
  assert ocp.type_handlers.get_type_handler(POINT_TYPESTR) is handler
  with pytest.raises(ValueError, match='already registered'):
    ocp.type_handlers.register_type_handler(Point, FlaxckptPointHandler())
  replacement = FlaxckptPointHandler()
  ocp.type_handlers.register_type_handler(Point, replacement, override=True)
  assert ocp.type_handlers.get_type_handler(Point) is replacement
  with pytest.raises(ValueError, match='Unknown type'):
    ocp.type_handlers.get_type_handler(complex)
  with pytest.raises(TypeError, match='needs a TypeHandler instance'):
    ocp.type_handlers.register_type_handler(complex, object())


@pytest.mark.parametrize('lib', [ocp, orbax], ids=['flaxckpt', 'orbax'])
def test_built_in_handlers_as_orbax_registers_them(lib):
  th = lib.type_handlers
  assert th.get_type_handler(jax.Array).typestr() == 'jax.Array'
  assert isinstance(th.get_type_handler(jax.Array), th.ArrayHandler)
  assert isinstance(th.get_type_handler(np.ndarray), th.NumpyHandler)
  assert th.get_type_handler(np.ndarray).typestr() == 'np.ndarray'
  assert isinstance(th.get_type_handler(np.float32), th.ScalarHandler)
  assert th.get_type_handler(int).typestr() == 'scalar'
  assert isinstance(th.get_type_handler(str), th.StringHandler)
  assert th.get_type_handler('string').typestr() == 'string'
  assert isinstance(th.get_type_handler(np.ndarray), th.TypeHandler)
  assert not th.has_type_handler(Point)
  for value, supported in [(1, True), ('s', True), (np.ones(2), True), (None, True),
                           ({}, True), (Point(np.ones(1), 'x'), False), (object(), False)]:
    assert th.is_supported_type(value) is supported, value
  assert th.is_supported_empty_value([]) and not th.is_supported_empty_value([1])


def test_param_info_fields_as_orbax_names_them(tmp_path):
  context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
  assert isinstance(context, ts.Context)
  kwargs = dict(name='a.b', parent_dir=tmp_path, skip_deserialize=True, is_ocdbt_checkpoint=True,
                ts_context=context, value_typestr='x')
  for lib in (ocp, orbax):
    info = lib.type_handlers.ParamInfo(**kwargs)
    assert info.path == tmp_path / 'a.b' and info.parent_dir == tmp_path
    assert (info.name, info.skip_deserialize, info.is_ocdbt_checkpoint, info.value_typestr) == (
        'a.b', True, True, 'x')
    assert info.replace(name='c').name == 'c' and info.name == 'a.b'


# --- saving and restoring a user's leaf class ---------------------------------------------------


def test_custom_leaf_round_trips_and_handler_sees_orbax_param_infos(registries, tmp_path):
  ocp.type_handlers.register_type_handler(Point, FlaxckptPointHandler())
  tree = _tree()
  ocp.StandardCheckpointer().save(tmp_path / 'ckpt', tree)
  saves = [info for kind, info in FlaxckptPointHandler.calls if kind == 'serialize']
  assert sorted(info.name for info in saves) == ['anchor', 'points.0', 'points.1']
  for info in saves:  # Written into the save's temporary directory, renamed at commit.
    assert info.parent_dir.name.startswith('ckpt.orbax-checkpoint-tmp')
    assert info.path == info.parent_dir / info.name
    assert info.is_ocdbt_checkpoint is True and info.value_typestr == POINT_TYPESTR
    assert isinstance(info.ts_context, ts.Context)
  assert (tmp_path / 'ckpt' / 'points.1.point.json').is_file()
  assert ocp.type_handlers.is_ocdbt_checkpoint(tmp_path / 'ckpt')
  assert orbax.type_handlers.is_ocdbt_checkpoint(tmp_path / 'ckpt')
  meta = json.loads((tmp_path / 'ckpt' / '_METADATA').read_text())['tree_metadata']
  assert meta["('anchor',)"]['value_metadata'] == {'value_type': POINT_TYPESTR,
                                                   'skip_deserialize': False}

  restored = ocp.StandardCheckpointer().restore(tmp_path / 'ckpt')  # As saved: no target.
  _assert_restored(restored, tree)
  loads = [info for kind, info in FlaxckptPointHandler.calls if kind == 'deserialize']
  assert sorted(info.name for info in loads) == ['anchor', 'points.0', 'points.1']
  assert all(info.parent_dir == tmp_path / 'ckpt' and info.is_ocdbt_checkpoint for info in loads)

  target = jax.tree.map(lambda x: x, tree)
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / 'ckpt', item=target)
  _assert_restored(restored, tree)

  # metadata() describes a custom leaf by its handler's own metadata, as Orbax's does.
  described = ocp.PyTreeCheckpointer().metadata(tmp_path / 'ckpt').item_metadata
  assert described['anchor'] == tree['anchor'].label
  assert [described['points'][i] for i in range(2)] == [p.label for p in tree['points']]


def test_unregistered_leaf_class_is_rejected_with_its_path(registries, tmp_path):
  with pytest.raises(ocp.UnsupportedLeafError, match="'anchor'.*Point"):
    ocp.StandardCheckpointer().save(tmp_path / 'ckpt', {'anchor': Point(np.ones(1), 'x')})


def test_custom_leaf_with_async_checkpointer_and_manager(registries, tmp_path):
  ocp.type_handlers.register_type_handler(Point, FlaxckptPointHandler())
  tree = _tree()
  with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / 'async', args=ocp.args.StandardSave(tree))
    ckptr.wait_until_finished()
  _assert_restored(ocp.StandardCheckpointer().restore(tmp_path / 'async'), tree)

  with ocp.CheckpointManager(tmp_path / 'run') as manager:
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    _assert_restored(manager.restore(1, args=ocp.args.StandardRestore()), tree)


def test_handler_runs_inside_a_running_event_loop(registries, tmp_path):
  """Jupyter runs user code inside an event loop: flaxckpt must not need (or block) it."""
  ocp.type_handlers.register_type_handler(Point, FlaxckptPointHandler())
  tree = _tree()

  async def in_loop():
    ocp.StandardCheckpointer().save(tmp_path / 'ckpt', tree)
    return ocp.StandardCheckpointer().restore(tmp_path / 'ckpt')

  _assert_restored(asyncio.run(in_loop()), tree)


def test_handler_delegating_to_numpy_handler(registries, tmp_path):
  """A common pattern: a handler for a wrapper class that stores it with NumpyHandler."""

  @dataclasses.dataclass
  class Wrapped:
    array: np.ndarray

  class WrappedHandler(ocp.type_handlers.NumpyHandler):
    def typestr(self):
      return 'tests.Wrapped'

    async def serialize(self, values, infos, args=None):
      return await super().serialize([v.array for v in values], infos, args)

    async def deserialize(self, infos, args=None):
      return [Wrapped(a) for a in await super().deserialize(infos, args)]

  ocp.type_handlers.register_type_handler(Wrapped, WrappedHandler())
  tree = {'w': Wrapped(np.arange(12.0).reshape(3, 4)), 'x': np.ones(5), 'y': jnp.zeros(2)}
  ocp.StandardCheckpointer().save(tmp_path / 'ckpt', tree)
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'ckpt')
  np.testing.assert_array_equal(restored['w'].array, tree['w'].array)
  np.testing.assert_array_equal(restored['x'], tree['x'])


# --- against Orbax ------------------------------------------------------------------------------


def _register_in_both() -> None:
  ocp.type_handlers.register_type_handler(Point, FlaxckptPointHandler())
  orbax.type_handlers.register_type_handler(Point, OrbaxPointHandler(), override=True)


def _orbax_save(path: pathlib.Path, tree: Any) -> None:
  with orbax.PyTreeCheckpointer() as ckptr:
    ckptr.save(path, args=orbax.args.PyTreeSave(tree))


@pytest.mark.filterwarnings('ignore:Sharding info not provided when restoring:UserWarning')
def test_orbax_restores_our_custom_leaves_and_we_restore_theirs(registries, tmp_path):
  _register_in_both()
  tree = _tree()
  ocp.PyTreeCheckpointer().save(tmp_path / 'ours', tree)
  _orbax_save(tmp_path / 'theirs', tree)
  for path in (tmp_path / 'ours', tmp_path / 'theirs'):
    with orbax.PyTreeCheckpointer() as ckptr:
      _assert_restored(ckptr.restore(path), tree)
    _assert_restored(ocp.PyTreeCheckpointer().restore(path), tree)
  ours = json.loads((tmp_path / 'ours' / '_METADATA').read_text())
  theirs = json.loads((tmp_path / 'theirs' / '_METADATA').read_text())
  assert ours['tree_metadata'] == theirs['tree_metadata']
  assert sorted(p.name for p in (tmp_path / 'ours').glob('*.point.json')) == sorted(
      p.name for p in (tmp_path / 'theirs').glob('*.point.json'))


def test_register_standard_handlers_with_options_as_t5x_calls_it(registries, tmp_path):
  ocp.type_handlers.register_standard_handlers_with_options(
      use_ocdbt=False, ts_context=ocp.type_handlers.get_ts_context(use_ocdbt=False))
  assert isinstance(ocp.type_handlers.get_type_handler(jax.Array), ocp.type_handlers.ArrayHandler)
  assert isinstance(ocp.type_handlers.get_type_handler(float), ocp.type_handlers.ScalarHandler)
  tree = {'w': jnp.arange(4.0), 'n': np.ones(2), 's': 1.5}
  ocp.StandardCheckpointer().save(tmp_path / 'ckpt', tree)  # Still written natively.
  with orbax.StandardCheckpointer() as theirs:
    restored = theirs.restore(tmp_path / 'ckpt', jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0])), tree))
  np.testing.assert_array_equal(restored['w'], tree['w'])


# --- abstract target leaves ---------------------------------------------------------------------


def test_restore_accepts_array_metadata_leaves_as_targets(tmp_path):
  """Any leaf with shape and dtype (and a sharding, maybe ShardingMetadata) is a target, as
  Orbax's ArrayMetadata is when code restores into ``checkpointer.metadata(path)``."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('x', 'y'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('y'))
  tree = {'w': jax.device_put(jnp.arange(8.0), sharding), 'n': np.arange(3)}
  ocp.StandardCheckpointer().save(tmp_path / 'ckpt', tree)
  orbax_meta = orbax.metadata
  target = {
      'w': orbax_meta.ArrayMetadata(
          name='w', directory=None, shape=(8,), dtype=np.dtype(np.float32),
          sharding=orbax_meta.NamedShardingMetadata.from_jax_sharding(sharding)),
      'n': orbax_meta.ArrayMetadata(name='n', directory=None, shape=(3,), sharding=None,
                                    dtype=np.dtype(np.int64)),
  }
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'ckpt', target)
  assert isinstance(restored['w'], jax.Array) and restored['w'].sharding == sharding
  np.testing.assert_array_equal(restored['w'], tree['w'])
  assert isinstance(restored['n'], np.ndarray)  # No sharding: host memory, as Orbax does.
  np.testing.assert_array_equal(restored['n'], tree['n'])


@pytest.mark.parametrize('use_ocdbt', [True, False])
@pytest.mark.parametrize('use_zarr3', [False, True])
def test_get_json_tspec_read_opens_the_stored_arrays(tmp_path, use_ocdbt, use_zarr3):
  """The debug guide's pattern: a ParamInfo, get_json_tspec_read and ts.open read one array of
  a checkpoint as stored; Orbax's own spec reads the same files."""
  tree = {'a': np.arange(12, dtype=np.int32).reshape(3, 4), 'b': {'c': np.ones(5, np.float32)}}
  path = tmp_path / 'ckpt'
  ocp.PyTreeCheckpointer(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3).save(path, tree)
  for lib in (ocp, orbax):
    info = lib.type_handlers.ParamInfo(name='b.c', parent_dir=epath.Path(path),
                                       use_zarr3=use_zarr3, is_ocdbt_checkpoint=use_ocdbt)
    spec = lib.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    context = lib.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    array = ts.open(spec, context=context).result().read().result()
    np.testing.assert_array_equal(array, tree['b']['c'])
  with pytest.raises(ValueError, match='needs a ParamInfo with parent_dir and name'):
    ocp.type_handlers.get_json_tspec_read(ocp.type_handlers.ParamInfo(name='', parent_dir=path),
                                          use_ocdbt=True)
