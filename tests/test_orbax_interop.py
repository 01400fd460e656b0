"""Interoperability with the real orbax-checkpoint: each library must read what the other writes.

Every test writes real checkpoints under ``tmp_path`` with one library and restores them with
the other (usually in both directions), asserting exact values, dtypes, Python types, shardings
and tree structure. The file-level tests compare what flaxckpt puts on disk with what Orbax
writes for the same tree (see FORMATS.md §1).

Orbax warns ("Sharding info not provided when restoring ...") whenever it restores a jax.Array
without a target sharding and falls back to the ``_sharding`` file; that is the behaviour under
test, so the tests that do this ignore exactly that warning (``_IGNORE_ORBAX_SHARDING_WARNING``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as orbax
import pytest
import tensorstore as ts
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flaxckpt as ocp

# Orbax warns when it restores a jax.Array from the saved `_sharding` file (no target given);
# restoring exactly that way is what these tests check, so the warning is expected there.
_IGNORE_ORBAX_SHARDING_WARNING = pytest.mark.filterwarnings(
    'ignore:Sharding info not provided when restoring:UserWarning')

FLAXCKPT, ORBAX = 'flaxckpt', 'orbax'
# (writer, reader) pairs: both directions across the two libraries.
DIRECTIONS = [(FLAXCKPT, ORBAX), (ORBAX, FLAXCKPT)]
_DIRECTION_IDS = ['flaxckpt_to_orbax', 'orbax_to_flaxckpt']
directions = pytest.mark.parametrize('writer,reader', DIRECTIONS, ids=_DIRECTION_IDS)

CHECKSUMS = 'flaxckpt_checksums'  # flaxckpt's crc32c file, which Orbax does not write.
TOP_LEVEL_FILES = {'_CHECKPOINT_METADATA', '_METADATA', 'array_metadatas', 'commit_success.txt',
                   'manifest.ocdbt', 'd', 'ocdbt.process_0', '_sharding', '_strings.json',
                   CHECKSUMS}


# --- helpers -------------------------------------------------------------------------------------


def _lib(name: str):
  return ocp if name == FLAXCKPT else orbax


def _pytree_checkpointer(lib: str, **options: Any):
  module = _lib(lib)
  return module.Checkpointer(module.PyTreeCheckpointHandler(**options))


def _standard_checkpointer(lib: str, **options: Any):
  module = _lib(lib)
  return module.Checkpointer(module.StandardCheckpointHandler(**options))


def _save(lib: str, path: pathlib.Path, tree: Any, **options: Any) -> None:
  _pytree_checkpointer(lib, **options).save(path, args=_lib(lib).args.PyTreeSave(tree))


def _restore(lib: str, path: pathlib.Path, target: Any = None) -> Any:
  """Restores with ``lib``; with a target, each library's idiomatic target-restore call."""
  ckptr = _pytree_checkpointer(lib)
  if target is None:
    return ckptr.restore(path)
  if lib == ORBAX:
    return ckptr.restore(path, args=orbax.args.PyTreeRestore(
        item=target, restore_args=orbax.checkpoint_utils.construct_restore_args(target)))
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target))


def _stored_form(tree: Any, numpy_scalars_as_arrays: bool = False) -> Any:
  """What a restore without target returns for ``tree`` (FORMATS §1.15).

  Non-empty tuples become lists, ``()`` stays ``()``, NamedTuples/dataclasses become dicts
  (empty NamedTuples become None), dict keys become str, and numpy scalars become Python
  scalars (0-d np.ndarray with StandardCheckpointHandler).
  """
  if isinstance(tree, np.generic):
    return np.asarray(tree) if numpy_scalars_as_arrays else tree.item()
  if isinstance(tree, (jax.Array, np.ndarray, str, bool, int, float, complex)) or tree is None:
    return tree
  if isinstance(tree, dict):
    return {str(k): _stored_form(v, numpy_scalars_as_arrays) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    if not tree:
      return None
    return {f: _stored_form(getattr(tree, f), numpy_scalars_as_arrays) for f in tree._fields}
  if isinstance(tree, (list, tuple)):
    if not tree:
      return tree
    return [_stored_form(v, numpy_scalars_as_arrays) for v in tree]
  raise TypeError(f'no stored form for {type(tree)}')


def _assert_same(actual: Any, expected: Any, where: str = '<root>') -> None:
  """Exact comparison: container types, keys, Python types, dtypes, shapes, bytes, shardings."""
  if isinstance(expected, dict):
    assert type(actual) is dict, f'{where}: {type(actual).__name__} instead of dict'
    assert sorted(actual) == sorted(expected), f'{where}: keys {sorted(actual)}'
    for key in expected:
      _assert_same(actual[key], expected[key], f'{where}/{key}')
  elif isinstance(expected, (list, tuple)) and not hasattr(expected, '_fields'):
    assert type(actual) is type(expected), (
        f'{where}: {type(actual).__name__} instead of {type(expected).__name__}')
    assert len(actual) == len(expected), f'{where}: length {len(actual)} != {len(expected)}'
    for i, (a, e) in enumerate(zip(actual, expected)):
      _assert_same(a, e, f'{where}/{i}')
  elif expected is None:
    assert actual is None, f'{where}: {actual!r} instead of None'
  elif isinstance(expected, jax.Array):
    assert isinstance(actual, jax.Array), f'{where}: {type(actual).__name__}, not jax.Array'
    _assert_array_data(np.asarray(actual), np.asarray(expected), where)
    assert actual.sharding == expected.sharding, (
        f'{where}: sharding {actual.sharding} != {expected.sharding}')
  elif isinstance(expected, np.ndarray):
    assert type(actual) is np.ndarray, f'{where}: {type(actual).__name__}, not np.ndarray'
    _assert_array_data(actual, expected, where)
  elif isinstance(expected, (str, bool, int, float, complex)):
    assert type(actual) is type(expected), (
        f'{where}: {type(actual).__name__} {actual!r} instead of '
        f'{type(expected).__name__} {expected!r}')
    assert actual == expected, f'{where}: {actual!r} != {expected!r}'
  else:  # A registered pytree node class (TrainState, optax states, ...).
    assert type(actual) is type(expected), f'{where}: {type(actual)} != {type(expected)}'
    is_leaf = lambda x: x is None
    assert jax.tree.structure(actual, is_leaf=is_leaf) == jax.tree.structure(
        expected, is_leaf=is_leaf), f'{where}: tree structure differs'
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual, is_leaf=is_leaf),
                            jax.tree.leaves(expected, is_leaf=is_leaf)):
      _assert_same(a, e, where + jax.tree_util.keystr(path))


def _assert_array_data(actual: np.ndarray, expected: np.ndarray, where: str) -> None:
  assert actual.dtype == expected.dtype, f'{where}: dtype {actual.dtype} != {expected.dtype}'
  assert actual.shape == expected.shape, f'{where}: shape {actual.shape} != {expected.shape}'
  assert actual.tobytes() == expected.tobytes(), f'{where}: values {actual} != {expected}'


def _json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def _tree_metadata(path: pathlib.Path) -> dict[str, Any]:
  return _json(path / '_METADATA')['tree_metadata']


def _kvstore(path: pathlib.Path, use_ocdbt: bool):
  if use_ocdbt:
    spec = {'driver': 'ocdbt', 'base': f'file://{path.resolve()}/'}
  else:
    spec = {'driver': 'file', 'path': f'{path.resolve()}/'}
  return ts.KvStore.open(spec).result()


def _array_keys(path: pathlib.Path, use_ocdbt: bool = True) -> set[str]:
  """Keys of the array data: OCDBT database keys, or files under the per-array folders."""
  if use_ocdbt:
    return {k.decode() for k in _kvstore(path, True).list().result()}
  return {str(p.relative_to(path)) for p in path.rglob('*') if p.is_file()
          and p.parts[len(path.parts)] not in TOP_LEVEL_FILES}


def _array_json(path: pathlib.Path, name: str, use_ocdbt: bool = True,
                use_zarr3: bool = False) -> dict[str, Any]:
  """The parsed ``.zarray`` (or zarr3 ``zarr.json``) of parameter ``name``."""
  key = f'{name}/{"zarr.json" if use_zarr3 else ".zarray"}'
  result = _kvstore(path, use_ocdbt).read(key).result()
  assert result.state == 'value', f'{key} missing in {path}'
  return json.loads(bytes(result.value))


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
  """Runs each test in an empty working directory and checks nothing was written there: a
  checkpoint's files must all land under the checkpoint path, never relative to the cwd."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield
  stray = sorted(str(p.relative_to(cwd)) for p in cwd.rglob('*'))
  assert not stray, f'files written relative to the working directory: {stray[:10]}'


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('x', 'y'))


# --- nested containers ---------------------------------------------------------------------------


def _nested_tree() -> dict[str, Any]:
  return {
      'dict': {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
               'b': {'c': jnp.arange(4, dtype=jnp.int32), 'd': 3}},
      'list': [np.array([1, 2], dtype=np.int64), [jnp.float32(2.5) * jnp.ones(2), 4.5], True],
      'tuple': (np.ones(3, np.float32), (7, np.zeros((), np.int32)), [8]),
      'none': None,
      'empty_dict': {},
      'empty_list': [],
      'empty_tuple': (),
      'nested_empties': {'x': [None, {}, ()], 'y': ([], None)},
      'str': 'hello',
      'int_keys': {3: np.array([3], np.int16), 12: 12.0},  # Come back as str keys.
  }


@_IGNORE_ORBAX_SHARDING_WARNING
@directions
def test_nested_containers_without_target(tmp_path, writer, reader):
  tree = _nested_tree()
  _save(writer, tmp_path / 'ckpt', tree)
  restored = _restore(reader, tmp_path / 'ckpt')
  expected = _stored_form(tree)
  # Spelled out: tuples come back as lists, () stays (), int keys become str.
  assert type(expected['tuple']) is list and type(expected['tuple'][1]) is list
  assert expected['empty_tuple'] == () and sorted(expected['int_keys']) == ['12', '3']
  _assert_same(restored, expected)


@directions
def test_nested_containers_with_target(tmp_path, writer, reader):
  tree = _nested_tree()
  _save(writer, tmp_path / 'ckpt', tree)
  restored = _restore(reader, tmp_path / 'ckpt', target=tree)
  _assert_same(restored, tree)  # Tuples stay tuples when the target has them.


@_IGNORE_ORBAX_SHARDING_WARNING
@directions
@pytest.mark.parametrize('tree', [
    [np.arange(3), {'a': 1}],
    (np.arange(3, dtype=np.int8), 2.0),
    {'only': None},
    {'a': {}, 'b': [], 'c': ()},
], ids=['top_level_list', 'top_level_tuple', 'only_none', 'only_empties'])
def test_top_level_containers(tmp_path, writer, reader, tree):
  _save(writer, tmp_path / 'ckpt', tree)
  _assert_same(_restore(reader, tmp_path / 'ckpt'), _stored_form(tree))


# --- flax TrainState with optax.adam --------------------------------------------------------------


class _Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def _train_state() -> train_state.TrainState:
  model = _Model()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-2))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
  return state.apply_gradients(grads=grads)  # step 1, non-zero mu/nu, count 1.


@_IGNORE_ORBAX_SHARDING_WARNING
@directions
def test_train_state_without_target(tmp_path, writer, reader):
  state = _train_state()
  _save(writer, tmp_path / 'ckpt', state)
  restored = _restore(reader, tmp_path / 'ckpt')
  adam, empty = state.opt_state
  assert isinstance(empty, optax.EmptyState)
  expected = {
      'step': 1,
      'params': state.params,
      'opt_state': [{'count': adam.count, 'mu': adam.mu, 'nu': adam.nu}, None],
  }
  assert _stored_form(state.opt_state) == _stored_form(expected['opt_state'])
  _assert_same(restored, expected)


@directions
@pytest.mark.parametrize('abstract', [False, True], ids=['concrete', 'abstract'])
def test_train_state_with_target(tmp_path, writer, reader, abstract):
  state = _train_state()
  _save(writer, tmp_path / 'ckpt', state)
  fresh = train_state.TrainState.create(
      apply_fn=state.apply_fn, params=jax.tree.map(jnp.zeros_like, state.params), tx=state.tx)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh) if abstract else fresh
  if abstract:
    assert isinstance(target.params['params']['Dense_0']['kernel'], jax.ShapeDtypeStruct)
  restored = _restore(reader, tmp_path / 'ckpt', target=target)
  assert isinstance(restored, train_state.TrainState)
  assert restored.apply_fn is state.apply_fn and restored.tx is state.tx
  assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
  _assert_same(restored, state)


# --- dtypes and scalars --------------------------------------------------------------------------

_DTYPE_VALUES = {
    'float32': np.array([[1.5, -2.25, 3e-5], [0.0, 7.0, -1e30]], np.float32),
    'float16': np.array([1.5, -2.25, 65504.0, 6e-5], np.float16),
    'bfloat16': np.array([1.5, -2.25, 3.0e38, 1.0e-3], jnp.bfloat16),
    'int8': np.array([[-128, 127], [0, -1]], np.int8),
    'uint32': np.array([0, 2**32 - 1, 123456789], np.uint32),
    'bool': np.array([True, False, True], np.bool_),
    'complex64': np.array([1 + 2j, -3.5j, 0.25], np.complex64),
}


@_IGNORE_ORBAX_SHARDING_WARNING
@directions
@pytest.mark.parametrize('dtype_name', list(_DTYPE_VALUES))
def test_dtypes_numpy_and_jax(tmp_path, writer, reader, dtype_name):
  values = _DTYPE_VALUES[dtype_name]
  assert values.dtype == np.dtype(dtype_name)
  zero_d = values.reshape(-1)[1:2].reshape(())
  tree = {'np': values, 'np0d': zero_d, 'jax': jnp.asarray(values), 'jax0d': jnp.asarray(zero_d)}
  assert tree['jax'].dtype == values.dtype and tree['jax0d'].shape == ()
  _save(writer, tmp_path / 'ckpt', tree)
  value_types = {k: v['value_metadata']['value_type']
                 for k, v in _tree_metadata(tmp_path / 'ckpt').items()}
  assert value_types == {"('jax',)": 'jax.Array', "('jax0d',)": 'jax.Array',
                         "('np',)": 'np.ndarray', "('np0d',)": 'np.ndarray'}
  _assert_same(_restore(reader, tmp_path / 'ckpt'), tree)
  _assert_same(_restore(reader, tmp_path / 'ckpt', target=tree), tree)


def _scalar_tree() -> dict[str, Any]:
  return {
      'py': {'int': 7, 'neg_int': -(2**40), 'float': 0.1, 'neg_float': -2.5e-300,
             'true': True, 'false': False, 'zero': 0},
      'np': {'f32': np.float32(1.5), 'f16': np.float16(-0.25), 'f64': np.float64(1 / 3),
             'i16': np.int16(-3), 'u8': np.uint8(200), 'u32': np.uint32(4_000_000_000),
             'i64': np.int64(-(2**62))},
      'in_list': [1, 2.0, False],
  }


@directions
def test_python_and_numpy_scalars(tmp_path, writer, reader):
  tree = _scalar_tree()
  _save(writer, tmp_path / 'ckpt', tree)
  meta = _tree_metadata(tmp_path / 'ckpt')
  assert {v['value_metadata']['value_type'] for v in meta.values()} == {'scalar'}
  restored = _restore(reader, tmp_path / 'ckpt')
  expected = _stored_form(tree)  # Numpy scalars come back as Python scalars (.item()).
  assert type(expected['np']['f16']) is float and type(expected['np']['u32']) is int
  _assert_same(restored, expected)
  # With a target, Python scalars stay Python scalars. (Orbax's construct_restore_args rejects
  # numpy scalars in a target, so the target holds their Python form.)
  target = dict(tree, np=expected['np'])
  _assert_same(_restore(reader, tmp_path / 'ckpt', target=target), target)


@pytest.mark.parametrize('writer', [FLAXCKPT, ORBAX])
def test_scalar_dtypes_on_disk_match(tmp_path, writer):
  """Stored dtype of scalars: int -> <i8, float -> <f8, bool -> |b1, numpy keeps its dtype."""
  tree = _scalar_tree()
  _save(writer, tmp_path / 'ckpt', tree)
  expected = {'py.int': '<i8', 'py.float': '<f8', 'py.true': '|b1', 'np.f32': '<f4',
              'np.f16': '<f2', 'np.u8': '|u1', 'np.u32': '<u4', 'np.i64': '<i8'}
  for name, dtype in expected.items():
    zarray = _array_json(tmp_path / 'ckpt', name)
    assert zarray['dtype'] == dtype, name
    assert zarray['shape'] == [] and zarray['chunks'] == [], name


@directions
def test_strings(tmp_path, writer, reader):
  tree = {'s': 'hello', 'unicode': 'héllo wörld ✓', 'empty': '', 'quote': 'it\'s "q"',
          'nested': {'deep': ['a', ('b', 'c')]}, 'with_array': [np.arange(2), 'x']}
  _save(writer, tmp_path / 'ckpt', tree)
  path = tmp_path / 'ckpt'
  assert (path / '_strings.json').is_file()
  assert _json(path / '_strings.json') == {
      's': 'hello', 'unicode': 'héllo wörld ✓', 'empty': '', 'quote': 'it\'s "q"',
      'nested.deep.0': 'a', 'nested.deep.1.0': 'b', 'nested.deep.1.1': 'c', 'with_array.1': 'x'}
  _assert_same(_restore(reader, path), _stored_form(tree))
  _assert_same(_restore(reader, path, target=tree), tree)


@directions
def test_string_under_key_with_slash(tmp_path, writer, reader):
  """A '/' in a key nests inside _strings.json (JSON pointer), in both libraries."""
  tree = {'p/q': 'slash', 'x.y': 'dot', 'arr': {'m/n': np.arange(3, dtype=np.int32)}}
  _save(writer, tmp_path / 'ckpt', tree)
  assert _json(tmp_path / 'ckpt' / '_strings.json') == {'p': {'q': 'slash'}, 'x.y': 'dot'}
  _assert_same(_restore(reader, tmp_path / 'ckpt'), tree)


@directions
def test_abstract_target_without_sharding_restores_numpy(tmp_path, writer, reader):
  """Orbax: a ShapeDtypeStruct target leaf without a sharding (e.g. made from a numpy array by
  to_shape_dtype_struct) restores as np.ndarray; with a sharding, as a jax.Array on it."""
  tree = {'np': np.arange(4, dtype=np.int16), 'jax': jnp.arange(3, dtype=jnp.float32)}
  _save(writer, tmp_path / 'ckpt', tree)
  target = {'np': jax.ShapeDtypeStruct((4,), np.int16),
            'jax': jax.ShapeDtypeStruct((3,), jnp.float32, sharding=tree['jax'].sharding)}
  _assert_same(_restore(reader, tmp_path / 'ckpt', target=target), tree)


# --- sharded arrays ------------------------------------------------------------------------------


def _sharded_tree() -> dict[str, jax.Array]:
  mesh = _mesh()

  def put(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

  return {
      'xy': put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8), P('x', 'y')),
      'replicated': put(jnp.arange(24, dtype=jnp.int32).reshape(4, 6), P()),
      'col': put(jnp.arange(16, dtype=jnp.bfloat16).reshape(8, 2), P(None, 'y')),
      'row': put(jnp.arange(12, dtype=jnp.float32).reshape(4, 3), P('x')),
      'single': jax.device_put(jnp.arange(5, dtype=jnp.uint32), jax.devices()[3]),
  }


@_IGNORE_ORBAX_SHARDING_WARNING
@directions
def test_sharded_arrays_without_target(tmp_path, writer, reader):
  """The restored arrays get the saved sharding (rebuilt from `_sharding`), equal to the
  original one (same mesh, same PartitionSpec)."""
  tree = _sharded_tree()
  assert len(tree['xy'].sharding.device_set) == 8
  _save(writer, tmp_path / 'ckpt', tree)
  restored = _restore(reader, tmp_path / 'ckpt')
  _assert_same(restored, tree)
  for name, array in restored.items():
    assert array.sharding.is_equivalent_to(tree[name].sharding, array.ndim), name
    assert ([s.device.id for s in array.addressable_shards]
            == [s.device.id for s in tree[name].addressable_shards]), name


@directions
def test_sharded_arrays_with_abstract_target(tmp_path, writer, reader):
  """A target's sharding wins, including a different sharding from the saved one."""
  tree = _sharded_tree()
  _save(writer, tmp_path / 'ckpt', tree)
  mesh = _mesh()
  resharded = dict(tree)
  resharded['xy'] = jax.device_put(tree['xy'], NamedSharding(mesh, P('y', 'x')))
  resharded['replicated'] = jax.device_put(tree['replicated'], NamedSharding(mesh, P('x')))
  resharded['single'] = jax.device_put(tree['single'], NamedSharding(mesh, P()))
  for expected in (tree, resharded):
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, expected)
    restored = _restore(reader, tmp_path / 'ckpt', target=target)
    _assert_same(restored, expected)


def test_sharding_file_matches_orbax(tmp_path):
  """`_sharding` holds the same entries whichever library wrote it (values are JSON strings)."""
  tree = _sharded_tree()
  _save(FLAXCKPT, tmp_path / 'ours', tree)
  _save(ORBAX, tmp_path / 'orbax', tree)

  def entries(path):
    return {k: json.loads(v) for k, v in _json(path / '_sharding').items()}

  ours, theirs = entries(tmp_path / 'ours'), entries(tmp_path / 'orbax')
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    assert ours[key] == theirs[key], key


def test_replicated_write_shape_is_a_valid_slice(tmp_path):
  """flaxckpt's `write_shape` for replicated arrays is the shard shape; Orbax splits replicated
  shards across replicas ("replica-parallel", FORMATS §1.5) and records the smaller slice. Both
  are valid layouts (readers take chunk shapes from the array's .zarray), and each library reads
  the other's (test_sharded_arrays_*), so only the non-replicated write shapes must agree."""
  tree = _sharded_tree()
  _save(FLAXCKPT, tmp_path / 'ours', tree)
  _save(ORBAX, tmp_path / 'orbax', tree)
  ours, theirs = _tree_metadata(tmp_path / 'ours'), _tree_metadata(tmp_path / 'orbax')
  for name, array in tree.items():
    key = str((name,))
    ws = ours[key]['value_metadata']['write_shape']
    shard = list(array.sharding.shard_shape(array.shape))
    assert ws == shard or ws == theirs[key]['value_metadata']['write_shape'], name
    if all(s.replica_id == 0 for s in array.addressable_shards):
      assert ws == theirs[key]['value_metadata']['write_shape'], name  # No replicas.


# --- write options -------------------------------------------------------------------------------


_FLAXCKPT_OPTIONS = [
    dict(use_ocdbt=False),
    dict(use_zarr3=True),
    dict(use_compression=True),
    dict(use_ocdbt=False, use_zarr3=True, use_compression=True),
]
_ORBAX_OPTIONS = [
    dict(use_ocdbt=False),
    dict(use_zarr3=True),
    dict(use_ocdbt=False, use_zarr3=True),
    dict(use_compression=False),
]


def _options_tree() -> dict[str, Any]:
  mesh = _mesh()
  return {
      'np': np.arange(120, dtype=np.float32).reshape(10, 12),
      'jax': jax.device_put(jnp.arange(32, dtype=jnp.int32).reshape(8, 4),
                            NamedSharding(mesh, P('x', 'y'))),
      'bf16': jnp.linspace(0, 1, 7, dtype=jnp.bfloat16),
      'scalar': 3.25,
      'np0d': np.array(True),
      'nested': {'list': [-5, 'text'], 'none': None},
  }


def _check_layout(path: pathlib.Path, options: dict[str, Any]) -> None:
  use_ocdbt = options.get('use_ocdbt', True)
  use_zarr3 = options.get('use_zarr3', False)
  meta = _json(path / '_METADATA')
  assert meta['use_ocdbt'] is use_ocdbt and meta['use_zarr3'] is use_zarr3
  assert (path / 'manifest.ocdbt').is_file() is use_ocdbt
  assert (path / 'ocdbt.process_0').is_dir() is use_ocdbt
  if not use_ocdbt:
    meta_file = 'zarr.json' if use_zarr3 else '.zarray'
    for name in ('np', 'jax', 'bf16', 'scalar', 'np0d', 'nested.list.0'):
      assert (path / name / meta_file).is_file(), name
  array = _array_json(path, 'np', use_ocdbt, use_zarr3)
  if use_zarr3:
    assert array['zarr_format'] == 3 and array['data_type'] == 'float32'
    assert array['shape'] == [10, 12]
    assert array['codecs'][0]['name'] == 'sharding_indexed'
  else:
    assert array['zarr_format'] == 2 and array['dtype'] == '<f4'
    assert array['shape'] == [10, 12]


def _compressed(path: pathlib.Path, options: dict[str, Any]) -> bool:
  array = _array_json(path, 'np', options.get('use_ocdbt', True), options.get('use_zarr3', False))
  if options.get('use_zarr3', False):
    inner = array['codecs'][0]['configuration']['codecs']
    return any(codec['name'] == 'zstd' for codec in inner)
  return array['compressor'] is not None


@_IGNORE_ORBAX_SHARDING_WARNING
@pytest.mark.parametrize('options', _FLAXCKPT_OPTIONS,
                         ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_flaxckpt_write_options_read_by_orbax(tmp_path, options):
  tree = _options_tree()
  path = tmp_path / 'ckpt'
  _save(FLAXCKPT, path, tree, **options)
  _check_layout(path, options)
  assert _compressed(path, options) is options.get('use_compression', False)
  _assert_same(_restore(ORBAX, path), _stored_form(tree))
  _assert_same(_restore(ORBAX, path, target=tree), tree)


@pytest.mark.parametrize('options', _ORBAX_OPTIONS,
                         ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_orbax_write_options_read_by_flaxckpt(tmp_path, options):
  tree = _options_tree()
  path = tmp_path / 'ckpt'
  _save(ORBAX, path, tree, **options)
  _check_layout(path, options)
  assert _compressed(path, options) is options.get('use_compression', True)
  _assert_same(_restore(FLAXCKPT, path), _stored_form(tree))
  _assert_same(_restore(FLAXCKPT, path, target=tree), tree)


# --- StandardCheckpointHandler -------------------------------------------------------------------


def _standard_tree() -> dict[str, Any]:
  return {
      'params': {'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
                 'b': jnp.zeros((3,), jnp.bfloat16)},
      'np': np.arange(4, dtype=np.int16),
      'step': 10,
      'lr': 0.5,
      'np_scalar': np.float32(2.5),  # Standard handler: stored and restored as 0-d ndarray.
      'layers': [np.ones(2, np.float32), (jnp.ones((), jnp.int32), 3)],
  }


@_IGNORE_ORBAX_SHARDING_WARNING
@directions
def test_standard_handler(tmp_path, writer, reader):
  tree = _standard_tree()
  path = tmp_path / 'ckpt'
  _standard_checkpointer(writer).save(path, args=_lib(writer).args.StandardSave(tree))
  meta = _json(path / '_METADATA')
  assert meta['tree_metadata']["('np_scalar',)"]['value_metadata']['value_type'] == 'np.ndarray'
  assert _json(path / '_CHECKPOINT_METADATA')['item_handlers'] == (
      'orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler')
  ckptr = _standard_checkpointer(reader)
  args = _lib(reader).args
  expected = _stored_form(tree, numpy_scalars_as_arrays=True)
  assert type(expected['np_scalar']) is np.ndarray and expected['np_scalar'].shape == ()
  _assert_same(ckptr.restore(path), expected)
  _assert_same(ckptr.restore(path, args=args.StandardRestore()), expected)
  # Abstract target: a ShapeDtypeStruct without sharding (from a numpy array) restores as
  # np.ndarray in Orbax (construct_restore_args -> RestoreArgs(restore_type=np.ndarray)); with a
  # sharding it restores as a jax.Array with that sharding.
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  assert abstract['np'].sharding is None and abstract['params']['w'].sharding is not None
  expected_abstract = dict(tree, np_scalar=np.asarray(tree['np_scalar']))
  _assert_same(ckptr.restore(path, args=args.StandardRestore(abstract)), expected_abstract)
  concrete = dict(tree, np_scalar=np.asarray(tree['np_scalar']))
  _assert_same(ckptr.restore(path, args=args.StandardRestore(concrete)), concrete)


@pytest.mark.parametrize('handler', ['standard', 'pytree'])
def test_custom_metadata_visible_to_orbax(tmp_path, handler):
  custom = {'note': 'héllo', 'epoch': 3, 'nested': {'list': [1, 2.5, None, True]}}
  tree = {'w': np.arange(3, dtype=np.float32), 'b': jnp.ones(2)}
  path = tmp_path / 'ckpt'
  if handler == 'standard':
    ckptr, args = _standard_checkpointer(FLAXCKPT), ocp.args.StandardSave(tree,
                                                                            custom_metadata=custom)
    orbax_handler = orbax.StandardCheckpointHandler()
  else:
    ckptr, args = _pytree_checkpointer(FLAXCKPT), ocp.args.PyTreeSave(tree, custom_metadata=custom)
    orbax_handler = orbax.PyTreeCheckpointHandler()
  ckptr.save(path, args=args, custom_metadata={'run': 'abc'})
  assert _json(path / '_METADATA')['custom_metadata'] == custom
  assert orbax_handler.metadata(path).custom_metadata == custom
  step = orbax.Checkpointer(orbax_handler).metadata(path)
  assert step.item_metadata.custom_metadata == custom
  assert step.custom_metadata == {'run': 'abc'}
  assert step.commit_timestamp_nsecs >= step.init_timestamp_nsecs > 0


@pytest.mark.parametrize('handler', ['standard', 'pytree'])
def test_orbax_custom_metadata_read_by_flaxckpt(tmp_path, handler):
  custom = {'note': 'x', 'values': [1, 2]}
  tree = {'w': np.arange(3, dtype=np.float32)}
  path = tmp_path / 'ckpt'
  if handler == 'standard':
    orbax.Checkpointer(orbax.StandardCheckpointHandler()).save(
        path, args=orbax.args.StandardSave(tree, custom_metadata=custom))
    ckptr = _standard_checkpointer(FLAXCKPT)
  else:
    orbax.Checkpointer(orbax.PyTreeCheckpointHandler()).save(
        path, args=orbax.args.PyTreeSave(tree, custom_metadata=custom))
    ckptr = _pytree_checkpointer(FLAXCKPT)
  assert _json(path / '_METADATA')['custom_metadata'] == custom
  _assert_same(ckptr.restore(path), tree)


@pytest.mark.parametrize('writer', [FLAXCKPT, ORBAX])
def test_metadata_shapes_and_dtypes_agree(tmp_path, writer):
  """flaxckpt's metadata() and Orbax's describe the same arrays (shape and dtype per leaf)."""
  tree = {'a': np.zeros((2, 3), np.float16), 'b': {'c': jnp.ones((4,), jnp.bfloat16)},
          'd': [jnp.zeros((), jnp.int8)]}
  path = tmp_path / 'ckpt'
  _save(writer, path, tree)
  ours = _pytree_checkpointer(FLAXCKPT).metadata(path).item_metadata.tree
  theirs = _pytree_checkpointer(ORBAX).metadata(path).item_metadata.tree
  flat_ours = jax.tree_util.tree_leaves_with_path(ours)
  flat_theirs = jax.tree_util.tree_leaves_with_path(theirs)
  assert [p for p, _ in flat_ours] == [p for p, _ in flat_theirs]
  for (path_, a), (_, b) in zip(flat_ours, flat_theirs):
    assert isinstance(a, ocp.metadata.ArrayMetadata), path_
    assert tuple(a.shape) == tuple(b.shape) and np.dtype(a.dtype) == np.dtype(b.dtype), path_


# --- file-level compatibility --------------------------------------------------------------------


_FILE_TREES = {
    'numpy_only': lambda: {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
                           'b': [np.int32(4), 5, 2.5, True], 'c': None, 'd': {}},
    'with_jax': lambda: {'a': jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
                         'b': (np.zeros(2, np.uint32), jnp.ones((), jnp.bfloat16)),
                         'e': [], 'f': ()},
    'with_strings': lambda: {'s': 'text', 'n': {'t': ['x', 'y']}, 'a': np.ones(2, np.int8)},
    'sharded': lambda: {'xy': _sharded_tree()['xy'], 'np': np.arange(4, dtype=np.float64)},
    'train_state': _train_state,
}


def _top_level(path: pathlib.Path) -> set[str]:
  return {p.name for p in path.iterdir()}


@pytest.mark.parametrize('tree_name', list(_FILE_TREES))
def test_files_match_orbax(tmp_path, tree_name):
  tree = _FILE_TREES[tree_name]()
  ours, theirs = tmp_path / 'ours', tmp_path / 'orbax'
  # flaxckpt leaves chunks uncompressed by default (a documented speed choice; Orbax reads both,
  # see test_flaxckpt_write_options_read_by_orbax); with use_compression=True it must write
  # exactly what Orbax's defaults write, down to each .zarray.
  _save(FLAXCKPT, ours, tree, use_compression=True)
  _save(ORBAX, theirs, tree)
  has_jax = any(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))
  has_str = any(isinstance(x, str) for x in jax.tree.leaves(tree))

  expected_files = {'_CHECKPOINT_METADATA', '_METADATA', 'commit_success.txt', 'manifest.ocdbt',
                    'd', 'ocdbt.process_0'}
  expected_files |= {'_sharding', 'array_metadatas'} if has_jax else set()
  expected_files |= {'_strings.json'} if has_str else set()
  assert _top_level(theirs) == expected_files  # Sanity check of the expectation itself.
  assert _top_level(ours) == expected_files | {CHECKSUMS}  # Our one addition, which Orbax ignores.
  assert {p.name for p in (ours / CHECKSUMS).iterdir()} == {'process_0'}
  assert not list(tmp_path.glob('*.orbax-checkpoint-tmp*'))
  if has_jax:
    assert {p.name for p in (ours / 'array_metadatas').iterdir()} == {'process_0'}
    assert _json(ours / 'array_metadatas' / 'process_0') == _json(
        theirs / 'array_metadatas' / 'process_0')
  assert (ours / 'ocdbt.process_0' / 'manifest.ocdbt').is_file()
  assert (ours / 'ocdbt.process_0' / 'd').is_dir()
  assert (ours / 'd').is_dir()

  # _METADATA: same parsed JSON, including tree_metadata (key reprs, key_metadata, value
  # types, skip_deserialize, write_shape) and entry order.
  our_meta, their_meta = _json(ours / '_METADATA'), _json(theirs / '_METADATA')
  assert our_meta['tree_metadata'] == their_meta['tree_metadata']
  assert list(our_meta['tree_metadata']) == list(their_meta['tree_metadata'])
  assert our_meta == their_meta
  assert list(our_meta) == list(their_meta)

  our_ckpt, their_ckpt = _json(ours / '_CHECKPOINT_METADATA'), _json(
      theirs / '_CHECKPOINT_METADATA')
  assert list(our_ckpt) == list(their_ckpt)
  assert our_ckpt['item_handlers'] == their_ckpt['item_handlers']
  assert our_ckpt['commit_timestamp_nsecs'] >= our_ckpt['init_timestamp_nsecs'] > 0
  assert (ours / 'commit_success.txt').read_text() == (
      f'Checkpoint commit was successful to {ours}')
  assert (theirs / 'commit_success.txt').read_text() == (
      f'Checkpoint commit was successful to {theirs}')

  if has_str:
    assert _json(ours / '_strings.json') == _json(theirs / '_strings.json')
  if has_jax:
    assert {k: json.loads(v) for k, v in _json(ours / '_sharding').items()} == {
        k: json.loads(v) for k, v in _json(theirs / '_sharding').items()}

  # The OCDBT database holds the same keys, and every array has the same .zarray (with
  # use_compression=True, flaxckpt's chunks are zstd-compressed like Orbax's).
  assert _array_keys(ours) == _array_keys(theirs)
  for key in sorted(_array_keys(theirs)):
    if key.endswith('.zarray'):
      name = key[:-len('/.zarray')]
      assert _array_json(ours, name) == _array_json(theirs, name), name


@pytest.mark.parametrize('options', [dict(use_ocdbt=False), dict(use_zarr3=True),
                                     dict(use_ocdbt=False, use_zarr3=True)],
                         ids=['no_ocdbt', 'zarr3', 'no_ocdbt_zarr3'])
def test_files_match_orbax_with_options(tmp_path, options):
  tree = {'a': jnp.arange(8, dtype=jnp.float32).reshape(2, 4), 'b': np.arange(3, dtype=np.int8),
          'c': 1.5, 's': 'str'}
  ours, theirs = tmp_path / 'ours', tmp_path / 'orbax'
  _save(FLAXCKPT, ours, tree, use_compression=True, **options)
  _save(ORBAX, theirs, tree, **options)
  assert _top_level(ours) == _top_level(theirs) | {CHECKSUMS}
  assert _json(ours / '_METADATA') == _json(theirs / '_METADATA')
  use_ocdbt = options.get('use_ocdbt', True)
  use_zarr3 = options.get('use_zarr3', False)
  assert _array_keys(ours, use_ocdbt) == _array_keys(theirs, use_ocdbt)
  for name in ('a', 'b', 'c'):
    assert _array_json(ours, name, use_ocdbt, use_zarr3) == _array_json(
        theirs, name, use_ocdbt, use_zarr3), name


# --- API shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['PyTreeSave', 'PyTreeRestore', 'StandardSave',
                                  'StandardRestore'])
def test_args_positional_order_matches_orbax(name):
  """Code written for Orbax passes these positionally; shared fields must be in the same slot."""
  ours = [f.name for f in dataclasses.fields(getattr(ocp.args, name))]
  theirs = list(inspect.signature(getattr(orbax.args, name)).parameters)
  shared = [f for f in theirs if f in ours]
  assert [ours.index(f) for f in shared] == [theirs.index(f) for f in shared], (ours, theirs)
