"""flaxckpt.legacy against the real flax.training.checkpoints and flax.training.orbax_utils.

Almost every test does the same thing twice, once with flax's module and once with ours (in
separate directories), and compares what comes out: directory listings after a sequence of saves,
return values, exception types, restored trees (type for type, key order, dtype, sharding and
bytes), and with the msgpack backend the checkpoint files byte for byte. Checkpoints are also
read across: flax reads what we wrote and we read what flax wrote, with both values of flax's
``flax_use_orbax_checkpointing`` flag. The last sections test what flaxckpt adds on top of flax
(errors that name the path, a failed save that changes nothing, in-flight saves that retention
leaves alone) and the ``_gda`` fixture written by a real flax 0.10.2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import serialization
from flax.training import checkpoints as flax_checkpoints
from flax.training import orbax_utils as flax_orbax_utils
from flax.training import train_state
from jax.experimental.array_serialization.serialization import GlobalAsyncCheckpointManager
from jax.sharding import NamedSharding, PartitionSpec

import flaxckpt as ocp
from flaxckpt.legacy import _msgpack
from flaxckpt.legacy import checkpoints
from flaxckpt.legacy import orbax_utils
from seed001 import CustomTrainState
import old_formats
from trees import assert_trees_equal, files_under

# orbax (inside flax's restore) warns on every restore without a target that it reads the
# shardings from the checkpoint; that is the reference library talking, not us.
pytestmark = pytest.mark.filterwarnings(
    'ignore:Sharding info not provided when restoring:UserWarning:orbax')

MODULES = {'flax': flax_checkpoints, 'ours': checkpoints}


def _old_format(relative: str) -> pathlib.Path:
  """The path of ``relative`` (e.g. 'f0102-ocp0102/flax_gda') among the old-format fixtures."""
  path = old_formats.DATA / relative
  if not path.exists():
    raise FileNotFoundError(f'old-format fixture {relative} is not in {old_formats.DATA}')
  return path


# ==================================================================================================
# Helpers
# ==================================================================================================


@pytest.fixture(params=[False, True], ids=['msgpack', 'orbax'])
def use_orbax(request, set_flag):
  """Runs a test once with each backend."""
  set_flag(request.param)
  return request.param


def _assert_same_array(actual, expected, path):
  assert actual.dtype == expected.dtype, f'{path}: dtype {actual.dtype} != {expected.dtype}'
  assert actual.shape == expected.shape, f'{path}: shape {actual.shape} != {expected.shape}'
  assert actual.tobytes() == expected.tobytes(), f'{path}: values differ'


def _assert_same(actual: Any, expected: Any, path: str = '.') -> None:
  """Same types (containers and leaves), key order, dtypes, shapes, shardings and bytes."""
  if isinstance(expected, jax.Array):
    assert isinstance(actual, jax.Array), f'{path}: {type(actual)} is not a jax.Array'
    assert actual.sharding == expected.sharding, f'{path}: {actual.sharding} != {expected.sharding}'
    _assert_same_array(np.asarray(actual), np.asarray(expected), path)
  elif isinstance(expected, np.ndarray):
    assert type(actual) is np.ndarray, f'{path}: {type(actual)} is not a numpy array'
    _assert_same_array(actual, expected, path)
  elif isinstance(expected, np.generic):
    assert type(actual) is type(expected), f'{path}: {type(actual)} != {type(expected)}'
    assert actual.tobytes() == expected.tobytes(), f'{path}: {actual!r} != {expected!r}'
  elif dataclasses.is_dataclass(expected) and not isinstance(expected, type):
    assert type(actual) is type(expected), f'{path}: {type(actual)} != {type(expected)}'
    for field in dataclasses.fields(expected):
      _assert_same(getattr(actual, field.name), getattr(expected, field.name),
                   f'{path}.{field.name}')
  elif isinstance(expected, Mapping):
    assert type(actual) is type(expected), f'{path}: {type(actual)} != {type(expected)}'
    assert list(actual) == list(expected), f'{path}: keys {list(actual)} != {list(expected)}'
    for key in expected:
      _assert_same(actual[key], expected[key], f'{path}/{key}')
  elif isinstance(expected, (list, tuple)):
    assert type(actual) is type(expected), f'{path}: {type(actual)} != {type(expected)}'
    assert len(actual) == len(expected), f'{path}: length {len(actual)} != {len(expected)}'
    for i, (a, e) in enumerate(zip(actual, expected)):
      _assert_same(a, e, f'{path}/{i}')
  elif isinstance(expected, float) and math.isnan(expected):
    assert type(actual) is float and math.isnan(actual), f'{path}: {actual!r} is not nan'
  else:
    assert type(actual) is type(expected), f'{path}: {type(actual)} != {type(expected)}'
    assert actual == expected, f'{path}: {actual!r} != {expected!r}'


def _zeros_like(tree):
  """A target with the structure and leaf types of ``tree`` but other values."""
  def zero(x):
    if isinstance(x, jax.Array):
      return jnp.zeros_like(x)
    if isinstance(x, (np.ndarray, np.generic)):
      return np.zeros_like(x)[()] if isinstance(x, np.generic) else np.zeros_like(x)
    if isinstance(x, str):
      return ''
    return type(x)(0)
  return jax.tree.map(zero, tree)


def _listing(directory) -> list[str]:
  """Directory entries, less flaxckpt's checksum sidecars (test_legacy_integrity.py)."""
  return sorted(name for name in os.listdir(directory)
                if not name.endswith('.crc32c'))


def _mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ('x', 'y'))


def _common_tree():
  """Leaves and containers both backends store."""
  return {
      'params': {'dense': {'kernel': jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
                           'bias': np.linspace(-1, 1, 3, dtype=np.float32)}},
      'dtypes': {
          'bf16': jnp.array([1.5, -2.0, 3.25], jnp.bfloat16),
          'bf16_np': np.array([0.5, 8], jnp.bfloat16),
          'c64': np.array([1 + 2j, -3j], np.complex64),
          'bool': np.array([True, False, True]),
          'u32': np.array([0, 7, 2**32 - 1], np.uint32),
          'zero_d': np.asarray(2.5, np.float64),
      },
      'list': [1, 'two', np.arange(3), [2.5, None]],
      'empty_dict': {},
      'empty_list': [],
  }


def _msgpack_tree():
  """Every kind of leaf and container the msgpack backend stores."""
  tree = _common_tree()
  tree['dtypes'].update({
      'i8': np.array([-128, 0, 127], np.int8),
      'f16': jnp.array([0.25, -1.0], jnp.float16),
      'zero_size': np.zeros((0, 3), np.float32),
      'jax_zero_d': jnp.asarray(7, jnp.int32),
  })
  tree['scalars'] = {
      'np_f32': np.float32(1), 'np_i64': np.int64(-5), 'np_bool': np.bool_(True),
      'np_u8': np.uint8(200), 'int': 7, 'big_int': 2**62, 'neg': -3, 'float': 0.25,
      'complex': 1.5 - 2j, 'bool': True, 'false': False, 'str': 'héllo', 'none': None,
  }
  tree['tuple'] = (np.float32(3), [None, {}], ())
  return tree


def _orbax_tree():
  """The leaves and containers flax's Orbax backend stores (no complex or numpy scalars)."""
  tree = _common_tree()
  tree['dtypes'].update({
      'c64_jax': jnp.array([2 - 1j], jnp.complex64),
      'i8': jnp.array([-128, 0, 127], jnp.int8),
  })
  tree['scalars'] = {'int': 7, 'neg': -3, 'float': 0.25, 'bool': True, 'str': 'héllo',
                     'none': None}
  tree['tuple'] = (jnp.ones(2), 4)
  return tree


def _adam_train_state():
  """A linen Dense model's TrainState with optax adam, after one update."""
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 5)))['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-3))
  return state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))


def _raw_expected(tree, use_orbax):
  """What ``restore_checkpoint(dir, None)`` gives in values: the state dict of ``tree``; with
  Orbax an empty NamedTuple (optax's EmptyState) comes back as None."""
  state = serialization.to_state_dict(tree)
  if use_orbax and isinstance(tree, train_state.TrainState):
    state['opt_state'] = {k: (None if v == {} else v) for k, v in state['opt_state'].items()}
  return state


# ==================================================================================================
# Names: natural_sort, safe_normpath, convert_pre_linen
# ==================================================================================================


@pytest.mark.parametrize('names', [
    ['ckpt_1', 'ckpt_10', 'ckpt_2', 'ckpt_-1.0', 'ckpt_1e5', 'ckpt_0.01'],
    ['checkpoint_3', 'checkpoint_0.5', 'checkpoint_1e-05', 'checkpoint_1.0', 'checkpoint_tmp',
     'checkpoint_20', 'checkpoint_3_gda', 'checkpoint_+2', 'model_7'],
    ['a1b10', 'a1b2', 'a10b1', 'a2', 'a', 'b-3', 'b+3', 'b.5', 'b1.5e2'],
    [],
], ids=['formats-example', 'checkpoint-names', 'mixed', 'empty'])
@pytest.mark.parametrize('signed', [True, False])
def test_natural_sort_matches_flax(names, signed):
  """natural_sort orders names exactly as flax's, signed and unsigned."""
  assert checkpoints.natural_sort(names, signed=signed) == flax_checkpoints.natural_sort(
      names, signed=signed)


def test_natural_sort_orders_numbers_as_numbers():
  """The worked example of FORMATS.md 3.2."""
  names = ['ckpt_1', 'ckpt_10', 'ckpt_2', 'ckpt_-1.0', 'ckpt_1e5', 'ckpt_0.01']
  assert checkpoints.natural_sort(names) == [
      'ckpt_-1.0', 'ckpt_0.01', 'ckpt_1', 'ckpt_2', 'ckpt_10', 'ckpt_1e5']


@pytest.mark.parametrize('path', ['gs://bucket//a/./b/../c/', '/tmp//x/./y/', 'relative/../x',
                                  's3://x/y', 'file:///a//b', '.', 'a/b/'])
def test_safe_normpath_matches_flax(path):
  """safe_normpath normalises like flax's and keeps URL schemes."""
  assert checkpoints.safe_normpath(path) == flax_checkpoints.safe_normpath(path)


def test_convert_pre_linen_matches_flax():
  """Pre-Linen numbering (across classes) becomes per-class numbering, as in flax."""
  params = {
      'Conv_0': {'kernel': np.ones(1)},
      'Dense_1': {'kernel': np.ones(2)},
      'Conv_2': {'Dense_3': {'bias': np.ones(3)}, 'Dense_5': {'bias': np.ones(4)}, 'Conv_4': {}},
      'BatchNorm_6': {'scale': np.ones(5)},
      'other': {'x': np.ones(6)},
  }
  for tree in (params, flax.core.freeze(params)):
    expected = flax_checkpoints.convert_pre_linen(tree)
    got = checkpoints.convert_pre_linen(tree)
    _assert_same(got, expected)
  assert sorted(checkpoints.convert_pre_linen(params)) == [
      'BatchNorm_0', 'Conv_0', 'Conv_1', 'Dense_0', 'other']


# ==================================================================================================
# Saving: retention, overwrite, return values, listings
# ==================================================================================================

_RETENTION = {
    'keep1-default': ([(s, {}) for s in (1, 2, 3)], ['checkpoint_3']),
    'keep2': ([(s, {'keep': 2}) for s in range(1, 6)], ['checkpoint_4', 'checkpoint_5']),
    'keep2-every3': ([(s, {'keep': 2, 'keep_every_n_steps': 3}) for s in range(1, 9)],
                     ['checkpoint_1', 'checkpoint_4', 'checkpoint_7', 'checkpoint_8']),
    'step0-never-spared': ([(s, {'keep': 1, 'keep_every_n_steps': 2}) for s in range(6)],
                           ['checkpoint_1', 'checkpoint_3', 'checkpoint_5']),
    'overwrite-deletes-newer': (
        [(1, {'keep': 5}), (5, {'keep': 5}), (9, {'keep': 5}), (3, {'keep': 5, 'overwrite': True})],
        ['checkpoint_1', 'checkpoint_3']),
    'overwrite-same-step': (
        [(1, {'keep': 3}), (2, {'keep': 3}), (3, {'keep': 3}), (2, {'keep': 3, 'overwrite': True})],
        ['checkpoint_1', 'checkpoint_2']),
    'float-steps': ([(s, {'keep': 3}) for s in (1e-05, 0.001, 0.5, 1.0, 2, 10.5)],
                    ['checkpoint_1.0', 'checkpoint_10.5', 'checkpoint_2']),
    'float-steps-keep-all': ([(s, {'keep': 10}) for s in (1e-05, 0.5, 1.0, 2)],
                             ['checkpoint_0.5', 'checkpoint_1.0', 'checkpoint_1e-05',
                              'checkpoint_2']),
    'negative-steps': ([(s, {'keep': 2}) for s in (-3, -1, 0.5)],
                       ['checkpoint_-1', 'checkpoint_0.5']),
    'prefix': ([(s, {'keep': 2, 'prefix': 'model_'}) for s in (1, 2, 3)],
               ['model_2', 'model_3']),
    'keep0': ([(s, {'keep': 0}) for s in (1, 2, 3)],
              ['checkpoint_1', 'checkpoint_2', 'checkpoint_3']),
}


@pytest.mark.parametrize('scenario', list(_RETENTION))
def test_retention_matches_flax(tmp_path, use_orbax, scenario):
  """After every save the directory holds the same entries as with flax, and the save returns
  the same path; the final listing is the one FORMATS.md 3.2 documents."""
  saves, expected = _RETENTION[scenario]
  prefix = saves[0][1].get('prefix', 'checkpoint_')
  # Entries of other prefixes, newer than every save, must be left alone.
  decoys = ['other_100'] + (['checkpoint_100'] if prefix != 'checkpoint_' else [])
  tree = {'x': np.arange(3, dtype=np.int32)}
  dirs = {name: tmp_path / name for name in MODULES}
  for directory in dirs.values():
    directory.mkdir()
    for decoy in decoys:
      (directory / decoy).write_bytes(b'other prefix')
  for step, kwargs in saves:
    paths = {name: module.save_checkpoint(dirs[name], tree, step, **kwargs)
             for name, module in MODULES.items()}
    assert type(paths['ours']) is str
    assert paths['ours'] == str(dirs['ours'] / f'{prefix}{step}')
    assert os.path.relpath(paths['ours'], dirs['ours']) == os.path.relpath(
        paths['flax'], dirs['flax'])
    assert _listing(dirs['ours']) == _listing(dirs['flax']), (step, kwargs)
  assert _listing(dirs['ours']) == sorted(expected + decoys)
  for decoy in decoys:
    assert (dirs['ours'] / decoy).read_bytes() == b'other prefix'
  assert os.path.basename(checkpoints.latest_checkpoint(dirs['ours'], prefix)) == (
      os.path.basename(flax_checkpoints.latest_checkpoint(dirs['flax'], prefix)))
  assert checkpoints.available_steps(dirs['ours'], prefix, step_type=float) == (
      flax_checkpoints.available_steps(dirs['flax'], prefix, step_type=float))


def test_multiprocess_save_retention_matches_flax(tmp_path, use_orbax):
  """save_checkpoint_multiprocess in one process: with Orbax flax cleans up before saving
  (so keep=1 leaves two), with msgpack after; ours does the same."""
  tree = {'b': np.arange(2), 'a': {'z': 1, 'y': np.ones(1)}}
  for name, module in MODULES.items():
    for step in (1, 2, 3):
      path = module.save_checkpoint_multiprocess(tmp_path / name, tree, step, keep=1)
      assert path == str(tmp_path / name / f'checkpoint_{step}')
  assert _listing(tmp_path / 'ours') == _listing(tmp_path / 'flax')
  assert _listing(tmp_path / 'ours') == (
      ['checkpoint_2', 'checkpoint_3'] if use_orbax else ['checkpoint_3'])


def test_save_returns_normalized_str_for_pathlike_and_messy_dirs(tmp_path, use_orbax):
  """The returned path is a str built from the normalised directory, as flax returns it."""
  tree = {'x': np.arange(2)}
  for name, module in MODULES.items():
    (tmp_path / name).mkdir()
    messy = f'{tmp_path}/{name}/../{name}//sub/'
    path = module.save_checkpoint(messy, tree, 4)
    assert type(path) is str
    assert path == os.path.join(os.path.normpath(f'{tmp_path}/{name}/sub'), 'checkpoint_4')
    assert os.path.exists(path)
  assert _listing(tmp_path / 'ours' / 'sub') == _listing(tmp_path / 'flax' / 'sub')


def test_listing_functions_match_flax(tmp_path):
  """latest_checkpoint and available_steps skip tmp, _gda and in-flight Orbax entries and
  other prefixes, like flax, on a hand-made directory."""
  directory = tmp_path / 'd'
  directory.mkdir()
  for name in ('checkpoint_1', 'checkpoint_10', 'checkpoint_2', 'checkpoint_tmp', 'other_50',
               'other_7'):
    (directory / name).write_bytes(b'x')
  for name in ('checkpoint_5', 'checkpoint_3_gda', 'checkpoint_20.orbax-checkpoint-tmp',
               'checkpoint_30.orbax-checkpoint-tmp-1234'):
    (directory / name).mkdir()
  for prefix in ('checkpoint_', 'other_', 'missing_'):
    for d in (directory, str(directory)):
      assert checkpoints.latest_checkpoint(d, prefix) == flax_checkpoints.latest_checkpoint(
          d, prefix)
      assert checkpoints.available_steps(d, prefix) == flax_checkpoints.available_steps(
          d, prefix)
  assert checkpoints.latest_checkpoint(directory) == str(directory / 'checkpoint_10')
  assert checkpoints.available_steps(directory) == [1, 2, 5, 10]
  assert checkpoints.available_steps(directory, 'other_') == [7, 50]
  assert checkpoints.latest_checkpoint(tmp_path / 'nope') is None
  assert checkpoints.available_steps(tmp_path / 'nope') == []


def test_available_steps_float_names(tmp_path):
  """Float step names parse with step_type=float and fail with int, in both modules."""
  for name in ('checkpoint_0.5', 'checkpoint_1e-05', 'checkpoint_2'):
    (tmp_path / name).write_bytes(b'x')
  assert checkpoints.available_steps(tmp_path, step_type=float) == [1e-05, 0.5, 2.0]
  assert flax_checkpoints.available_steps(tmp_path, step_type=float) == [1e-05, 0.5, 2.0]
  with pytest.raises(ValueError):
    flax_checkpoints.available_steps(tmp_path)
  with pytest.raises(ValueError):
    checkpoints.available_steps(tmp_path)


# ==================================================================================================
# Errors flax raises: same exception types, nothing written
# ==================================================================================================


def _err_same_step(module, d):
  module.save_checkpoint(d, {'x': 1}, 2)


def _err_older_step(module, d):
  module.save_checkpoint(d, {'x': 1}, 1)


def _err_bare_leaf(module, d):
  module.save_checkpoint(d, np.arange(3), 7)


def _err_unsupported_leaf(module, d):
  module.save_checkpoint(d, {'x': object()}, 7)


def _err_missing_step(module, d):
  module.restore_checkpoint(d, None, step=7)


def _err_float_step_for_int_name(module, d):
  module.restore_checkpoint(d, None, step=2.0)


def _err_target_lacks_key(module, d):
  module.restore_checkpoint(d, {'y': 0})


_ERRORS = {
    # name: (function, backends it applies to, exception flax raises)
    'same-step': (_err_same_step, (False,), flax.errors.InvalidCheckpointError),
    'older-step': (_err_older_step, (False,), flax.errors.InvalidCheckpointError),
    'orbax-same-step': (_err_same_step, (True,), ValueError),
    'orbax-bare-leaf': (_err_bare_leaf, (True,), ValueError),
    'unsupported-leaf': (_err_unsupported_leaf, (False,), TypeError),
    'orbax-unsupported-leaf': (_err_unsupported_leaf, (True,), ValueError),
    'missing-step': (_err_missing_step, (False, True), ValueError),
    'float-step-for-int-name': (_err_float_step_for_int_name, (False, True), ValueError),
    'target-lacks-key': (_err_target_lacks_key, (False,), ValueError),
}


@pytest.mark.parametrize('case', list(_ERRORS))
def test_errors_match_flax(tmp_path, set_flag, case):
  """Ours raises an instance of the exception class flax raises, and neither changes the
  checkpoints already in the directory."""
  function, backends, flax_error = _ERRORS[case]
  for use_orbax in backends:
    set_flag(use_orbax)
    raised = {}
    for name, module in MODULES.items():
      directory = tmp_path / f'{name}-{use_orbax}'
      module.save_checkpoint(directory, {'x': 1}, 2)
      before = files_under(directory)
      with pytest.raises(Exception) as info:
        function(module, directory)
      raised[name] = info.value
      after = files_under(directory)
      assert {k: v for k, v in after.items() if k in before} == before
      assert checkpoints.latest_checkpoint(directory) == str(directory / 'checkpoint_2')
    assert isinstance(raised['flax'], flax_error), repr(raised['flax'])
    assert isinstance(raised['ours'], type(raised['flax'])), (
        f'flax raised {type(raised["flax"])}, ours {type(raised["ours"])}: {raised["ours"]}')


def test_missing_step_error_names_the_path(tmp_path, use_orbax):
  """An explicit step that does not exist raises ValueError naming the path looked for."""
  checkpoints.save_checkpoint(tmp_path, {'x': 1}, 2)
  with pytest.raises(ValueError, match='Matching checkpoint not found') as info:
    checkpoints.restore_checkpoint(tmp_path, None, step=3)
  assert str(tmp_path / 'checkpoint_3') in str(info.value)


def test_bare_leaf_saves_with_msgpack_like_flax(tmp_path, set_flag):
  """With msgpack a bare array or number is a valid target, byte-identical to flax's file."""
  set_flag(False)
  for i, target in enumerate((np.arange(5, dtype=np.int16), 3.5, 'text', None)):
    for name, module in MODULES.items():
      module.save_checkpoint(tmp_path / name, target, i)
    ours = (tmp_path / 'ours' / f'checkpoint_{i}').read_bytes()
    assert ours == (tmp_path / 'flax' / f'checkpoint_{i}').read_bytes()
    assert ours == serialization.to_bytes(target)
    _assert_same(checkpoints.restore_checkpoint(tmp_path / 'ours', None),
                 flax_checkpoints.restore_checkpoint(tmp_path / 'flax', None))


# ==================================================================================================
# Interop: each module reads what either wrote, with and without a target
# ==================================================================================================


@pytest.mark.parametrize('kind', ['mixed', 'train_state'])
def test_restores_match_flax_both_ways(tmp_path, use_orbax, kind):
  """flax and ours each save the same tree; each reads both checkpoints without and with a
  target; every result equals flax-reads-flax type for type, and that one holds the values
  saved (lists as {'0': ...} dicts without a target)."""
  if kind == 'mixed':
    tree = _orbax_tree() if use_orbax else _msgpack_tree()
  else:
    tree = _adam_train_state()
  target = _zeros_like(tree)
  for name, module in MODULES.items():
    assert module.save_checkpoint(tmp_path / name, tree, 3) == str(tmp_path / name / 'checkpoint_3')
  assert (tmp_path / 'ours' / 'checkpoint_3').is_dir() == use_orbax
  if not use_orbax:
    assert (tmp_path / 'ours' / 'checkpoint_3').read_bytes() == (
        tmp_path / 'flax' / 'checkpoint_3').read_bytes()

  reference_raw = flax_checkpoints.restore_checkpoint(tmp_path / 'flax', None)
  assert_trees_equal(reference_raw, _raw_expected(tree, use_orbax))
  reference = flax_checkpoints.restore_checkpoint(tmp_path / 'flax', target)
  assert_trees_equal(reference, tree)
  for writer in MODULES:
    for reader, module in MODULES.items():
      if (writer, reader) == ('flax', 'flax'):
        continue
      raw = module.restore_checkpoint(tmp_path / writer, None)
      _assert_same(raw, reference_raw, f'{writer}->{reader} raw')
      restored = module.restore_checkpoint(tmp_path / writer, target, parallel=False)
      _assert_same(restored, reference, f'{writer}->{reader} target')


def test_raw_restore_turns_sequences_into_dicts(tmp_path, use_orbax):
  """Without a target, lists and tuples come back as {'0': ...} dicts and empty ones as {}."""
  checkpoints.save_checkpoint(tmp_path, {'l': [np.arange(2), 'a'], 't': (1, [2.5]), 'e': []}, 1)
  raw = checkpoints.restore_checkpoint(tmp_path, None)
  assert list(raw['l']) == ['0', '1'] and raw['l']['1'] == 'a'
  np.testing.assert_array_equal(raw['l']['0'], np.arange(2))
  assert raw['t'] == {'0': 1, '1': {'0': 2.5}}
  assert raw['e'] == {}


def test_train_state_raw_opt_state(tmp_path, use_orbax):
  """A TrainState restored without a target is a dict; optax's EmptyState is {} in msgpack
  and None with Orbax; with the TrainState as target it is rebuilt."""
  state = _adam_train_state()
  checkpoints.save_checkpoint(tmp_path, state, 1)
  raw = checkpoints.restore_checkpoint(tmp_path, None)
  assert list(raw) == (['opt_state', 'params', 'step'] if use_orbax
                       else ['step', 'params', 'opt_state'])
  assert raw['step'] == 1 and type(raw['step']) is int
  assert raw['opt_state']['1'] == (None if use_orbax else {})
  assert sorted(raw['opt_state']['0']) == ['count', 'mu', 'nu']
  restored = checkpoints.restore_checkpoint(tmp_path, _zeros_like(state))
  assert type(restored) is train_state.TrainState
  assert restored.tx is state.tx
  assert_trees_equal(restored, state)


def test_restore_auto_detects_checkpoint_paths(tmp_path, set_flag):
  """ckpt_dir may itself be an Orbax checkpoint directory or a msgpack file, as in flax."""
  tree = {'a': np.arange(4), 'b': {'c': 2.5}}
  for use_orbax in (True, False):
    set_flag(use_orbax)
    directory = tmp_path / str(use_orbax)
    path = checkpoints.save_checkpoint(directory, tree, 1)
    for restore_from in (path, pathlib.Path(path)):
      for target in (None, _zeros_like(tree)):
        _assert_same(checkpoints.restore_checkpoint(restore_from, target),
                     flax_checkpoints.restore_checkpoint(restore_from, target))
    assert_trees_equal(checkpoints.restore_checkpoint(path, None), tree)


def test_empty_or_missing_directory_returns_target(tmp_path, use_orbax):
  """No directory, or no checkpoint with the prefix, returns the target itself."""
  target = {'a': np.arange(2)}
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'ckpt_1').write_bytes(serialization.to_bytes({'a': 1}))
  for directory in ('missing', 'empty', 'other'):
    assert checkpoints.restore_checkpoint(tmp_path / directory, target) is target
    assert flax_checkpoints.restore_checkpoint(tmp_path / directory, target) is target
  assert checkpoints.restore_checkpoint(tmp_path / 'missing', None) is None


def test_old_flax_fixtures_restore_like_flax(tmp_path):
  """Checkpoints written by flax 0.10.2 (msgpack, prefix and float steps, Orbax, TrainState)
  restore like flax restores them, with the values they were written from."""
  state = old_formats.state
  cases = {
      'flax_msgpack': (state.expected('make_state', with_str=True, with_empty=True,
                                      with_py_scalars=True), {}),
      'flax_msgpack_prefix': (state.expected('make_array_state'), {'prefix': 'ckpt_'}),
      'flax_orbax': (state.expected('make_state', with_str=True, with_empty=True,
                                    with_py_scalars=True), {}),
      'ts_flax_msgpack': (state.make_train_state(as_jax=False), {}),
      'ts_flax_orbax': (state.make_train_state(as_jax=False), {}),
  }
  for case, (expected, kwargs) in cases.items():
    directory = tmp_path / case
    shutil.copytree(_old_format(f'f0102-ocp0102/{case}'), directory)
    raw = checkpoints.restore_checkpoint(directory, None, **kwargs)
    _assert_same(raw, flax_checkpoints.restore_checkpoint(directory, None, **kwargs), case)
    state.tree_eq_loose(expected, raw, case)
    if case.startswith('ts_'):
      restored = checkpoints.restore_checkpoint(directory, state.make_train_state(), **kwargs)
      assert type(restored) is train_state.TrainState
      state.tree_eq_loose(expected, restored, case)
  early = checkpoints.restore_checkpoint(tmp_path / 'flax_msgpack_prefix', None, step=0.5,
                                         prefix='ckpt_')
  _assert_same(early, flax_checkpoints.restore_checkpoint(
      tmp_path / 'flax_msgpack_prefix', None, step=0.5, prefix='ckpt_'))
  assert checkpoints.available_steps(tmp_path / 'flax_msgpack_prefix', 'ckpt_', float) == [
      0.5, 10.0]


# ==================================================================================================
# Mixed-backend directory (seed 001: step 4 with Orbax, step 5 with msgpack)
# ==================================================================================================


@pytest.mark.parametrize('writer', list(MODULES))
def test_mixed_backend_directory(tmp_path, set_flag, writer):
  """A directory holding an Orbax step 4 and a msgpack step 5 is read by both modules, with
  either flag value, latest and explicit steps, the same way."""
  module = MODULES[writer]
  tree = {'model': {'w': jnp.arange(6.0).reshape(2, 3), 'step': 4}, 'data': [jnp.ones(2)]}
  set_flag(True)
  module.save_checkpoint(tmp_path, tree, 4, overwrite=True, keep=2)
  tree5 = jax.tree.map(lambda x: x + 1, tree)
  set_flag(False)
  module.save_checkpoint(tmp_path, tree5, 5, overwrite=True, keep=2)
  assert _listing(tmp_path) == ['checkpoint_4', 'checkpoint_5']
  assert (tmp_path / 'checkpoint_4').is_dir() and (tmp_path / 'checkpoint_5').is_file()
  target = _zeros_like(tree)
  for flag in (True, False):
    set_flag(flag)
    for step, expected in ((None, tree5), (5, tree5), (4, tree)):
      for t in (None, target):
        reference = flax_checkpoints.restore_checkpoint(tmp_path, t, step=step)
        got = checkpoints.restore_checkpoint(tmp_path, t, step=step)
        _assert_same(got, reference, f'flag={flag} step={step} target={t is not None}')
        if t is not None:
          assert_trees_equal(got, expected)
    raw4 = checkpoints.restore_checkpoint(tmp_path, None, step=4)
    assert list(raw4['data']) == ['0'] and raw4['model']['step'] == 4


# ==================================================================================================
# msgpack bytes: identical to flax.serialization.to_bytes and to flax's file
# ==================================================================================================


def _boundary_tree():
  """Arrays, strings, ints, maps and floats at every msgpack header-size boundary."""
  sizes = [*range(0, 300), *range(65500, 65560), 70000]
  mesh = _mesh()
  tree = {
      'u8': {str(n): np.arange(n, dtype=np.uint8) for n in sizes},
      'dtypes': {},
      'scalars': {},
      'strings': {str(n): 'é' * (n // 2) + 'a' * (n % 2)
                  for n in (0, 1, 31, 32, 33, 255, 256, 65535, 65536, 70001)},
      'bytes': {str(n): b'\x01' * n for n in (0, 1, 255, 256, 65535, 65536)},
      'ints': [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
               -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63],
      'floats': [0.0, -0.0, 1e300, -1e-300, math.inf, -math.inf, math.nan],
      'complex': [0j, 1.5 - 2j, complex(math.inf, -1)],
      'map16': {f'k{i}': i for i in range(16)},
      'map32': {f'k{i}': i for i in range(65536)},
      'list16': list(range(16)),
      'deep': {'a': {'b': {'c': {'d': {'e': [np.ones((1, 1, 1), np.float16)]}}}}},
      'non_contiguous': {
          'transposed': np.arange(12, dtype=np.int32).reshape(3, 4).T,
          'strided': np.arange(20, dtype=np.float64)[::3],
          'fortran': np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
          'sharded_jax': jax.device_put(np.arange(16.0, dtype=np.float32).reshape(8, 2),
                                        NamedSharding(mesh, PartitionSpec('x', 'y'))),
      },
  }
  dtypes = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
            np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128,
            jnp.bfloat16]
  for dtype in dtypes:
    name = np.dtype(dtype).name
    tree['scalars'][name] = np.ones((), dtype)[()]
    tree['dtypes'][name] = {str(n): np.ones((n,), dtype) for n in range(0, 20)}
    tree['dtypes'][name]['0d'] = np.zeros((), dtype)
    tree['dtypes'][name]['empty2d'] = np.zeros((3, 0), dtype)
    if np.dtype(dtype).itemsize < 8:  # jax without x64 has no 64-bit arrays
      tree['dtypes'][name]['jax'] = jnp.ones((2, 3), dtype)
  return tree


def test_msgpack_bytes_identical_at_every_header_boundary(tmp_path, set_flag):
  """Ours writes exactly flax.serialization.to_bytes and flax's save_checkpoint file for
  payloads of every size class (fixext, ext8/16/32, bin8/16/32, str, int, map and array
  headers), all dtypes, 0-d, zero-size and non-contiguous arrays; both read it back alike."""
  set_flag(False)
  tree = _boundary_tree()
  expected = serialization.to_bytes(tree)
  for name, module in MODULES.items():
    module.save_checkpoint(tmp_path / name, tree, 1)
  ours = (tmp_path / 'ours' / 'checkpoint_1').read_bytes()
  assert ours == (tmp_path / 'flax' / 'checkpoint_1').read_bytes()
  assert ours == expected
  _assert_same(checkpoints.restore_checkpoint(tmp_path / 'flax', None),
               flax_checkpoints.restore_checkpoint(tmp_path / 'flax', None))


def test_msgpack_fixext_header_of_numpy_scalar(tmp_path, set_flag):
  """The FORMATS.md 3.3 worked example, byte for byte (np.float32 uses fixext16 d8 03)."""
  set_flag(False)
  tree = {'a': np.array([1, 2], np.int32), 'b': 3, 'c': [1.5, None], 's': np.float32(1)}
  checkpoints.save_checkpoint(tmp_path, tree, 1)
  data = (tmp_path / 'checkpoint_1').read_bytes()
  assert len(data) == 65
  assert data == serialization.to_bytes(tree)
  assert data.endswith(b'\xa1s\xd8\x03\x93\x90\xa7float32\xc4\x04\x00\x00\x80\x3f')
  assert data.startswith(b'\x84\xa1a\xc7\x13\x01\x93\x91\x02\xa5int32\xc4\x08')


def test_msgpack_train_state_bytes_identical(tmp_path, set_flag):
  """A TrainState with adam state is written exactly as flax writes it."""
  set_flag(False)
  state = _adam_train_state()
  for name, module in MODULES.items():
    module.save_checkpoint(tmp_path / name, state, 1)
  ours = (tmp_path / 'ours' / 'checkpoint_1').read_bytes()
  assert ours == (tmp_path / 'flax' / 'checkpoint_1').read_bytes()
  assert ours == serialization.to_bytes(state)


def test_multiprocess_save_sorts_keys_like_flax(tmp_path, set_flag):
  """save_checkpoint_multiprocess in one process writes dict keys sorted, byte-identical to
  flax's file; save_checkpoint keeps insertion order."""
  set_flag(False)
  tree = {'z': {'b': np.arange(2), 'a': 1}, 'm': [3, {'y': 'y', 'x': None}], 'a': np.float32(2),
          'e': {}}
  for name, module in MODULES.items():
    module.save_checkpoint_multiprocess(tmp_path / name, tree, 1)
  ours = (tmp_path / 'ours' / 'checkpoint_1').read_bytes()
  assert ours == (tmp_path / 'flax' / 'checkpoint_1').read_bytes()
  assert ours != serialization.to_bytes(tree)
  restored = serialization.msgpack_restore(ours)
  assert list(restored) == ['a', 'e', 'm', 'z'] and list(restored['z']) == ['a', 'b']
  checkpoints.save_checkpoint(tmp_path / 'single', tree, 1)
  assert (tmp_path / 'single' / 'checkpoint_1').read_bytes() == serialization.to_bytes(tree)


def test_chunked_arrays_bytes_identical(tmp_path, set_flag, monkeypatch):
  """Arrays over the chunk limit are split into __msgpack_chunked_array__ dicts exactly as
  flax splits them (limit lowered to 100 bytes in both libraries), strictly above the limit,
  in nested dicts and at the top level; both read them back whole."""
  assert _msgpack.MAX_CHUNK_SIZE == serialization.MAX_CHUNK_SIZE == 2**30
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 100)
  monkeypatch.setattr(_msgpack, 'MAX_CHUNK_SIZE', 100)
  set_flag(False)
  tree = {
      'exactly': np.arange(100, dtype=np.uint8),
      'above': np.arange(101, dtype=np.uint8),
      'f64': np.arange(13, dtype=np.float64),
      'nested': {'f32': np.arange(28, dtype=np.float32).reshape(4, 7),
                 'jax': jnp.arange(60, dtype=jnp.int16).reshape(3, 4, 5),
                 'bf16': jnp.ones(51, jnp.bfloat16)},
      'in_list': [np.arange(30, dtype=np.int32)],
      'big_itemsize': np.ones(7, np.complex128),
      'small': np.arange(3),
  }
  for name, module in MODULES.items():
    module.save_checkpoint(tmp_path / name, tree, 1)
    module.save_checkpoint(tmp_path / f'{name}-top', np.arange(40, dtype=np.float32), 1)
  for suffix, target in (('', tree), ('-top', np.arange(40, dtype=np.float32))):
    ours = (tmp_path / f'ours{suffix}' / 'checkpoint_1').read_bytes()
    assert b'__msgpack_chunked_array__' in ours
    assert ours == (tmp_path / f'flax{suffix}' / 'checkpoint_1').read_bytes()
    assert ours == serialization.to_bytes(target)
    for module in MODULES.values():
      assert_trees_equal(module.restore_checkpoint(tmp_path / f'ours{suffix}', None),
                         serialization.to_state_dict(target))
  plain = msgpack.unpackb((tmp_path / 'ours' / 'checkpoint_1').read_bytes(),
                          ext_hook=lambda code, data: code)
  assert plain['exactly'] == 1 and plain['small'] == 1
  assert plain['above']['__msgpack_chunked_array__'] is True
  assert list(plain['above']) == ['__msgpack_chunked_array__', 'shape', 'chunks']
  assert plain['above']['shape'] == {'0': 101}
  assert list(plain['above']['chunks']) == ['0', '1']
  assert list(plain['f64']['chunks']) == ['0', '1']  # 12 + 1 elements of 8 bytes.


# ==================================================================================================
# AsyncManager and orbax_checkpointer=
# ==================================================================================================


def test_async_manager_writes_what_flax_writes(tmp_path, set_flag):
  """Saves through AsyncManager commit, apply keep, and write the tree as it was when
  save_checkpoint returned, byte-identical to flax's synchronous files."""
  set_flag(False)
  manager = checkpoints.AsyncManager()
  array = np.arange(1000, dtype=np.float32)
  expected = {}
  for step in (1, 2, 3):
    tree = {'w': array, 'step': step, 'j': jnp.full((3,), step)}
    expected[step] = serialization.to_bytes(tree)
    flax_checkpoints.save_checkpoint(tmp_path / 'flax', tree, step, keep=2)
    path = checkpoints.save_checkpoint(tmp_path / 'ours', tree, step, keep=2,
                                       async_manager=manager)
    assert path == str(tmp_path / 'ours' / f'checkpoint_{step}')
    array *= 2  # Changing the array after save_checkpoint returned must not reach the file.
    expected_array = array.copy()
  manager.wait_previous_save()
  assert _listing(tmp_path / 'ours') == ['checkpoint_2', 'checkpoint_3']
  for step in (2, 3):
    ours = (tmp_path / 'ours' / f'checkpoint_{step}').read_bytes()
    assert ours == expected[step]
    assert ours == (tmp_path / 'flax' / f'checkpoint_{step}').read_bytes()
  np.testing.assert_array_equal(array, expected_array)


def test_flaxckpt_checkpointer_forces_orbax(tmp_path, set_flag):
  """orbax_checkpointer= (a flaxckpt Checkpointer) writes an Orbax checkpoint even with the
  flag off; flax (with its own orbax) and ours restore it alike."""
  set_flag(False)
  tree = _orbax_tree()
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  path = checkpoints.save_checkpoint(tmp_path, tree, 1, orbax_checkpointer=ckptr)
  assert os.path.isfile(os.path.join(path, '_METADATA'))
  target = _zeros_like(tree)
  for t in (None, target):
    reference = flax_checkpoints.restore_checkpoint(tmp_path, t)
    _assert_same(checkpoints.restore_checkpoint(tmp_path, t), reference)
    _assert_same(checkpoints.restore_checkpoint(tmp_path, t, orbax_checkpointer=ckptr),
                 reference)
  assert_trees_equal(checkpoints.restore_checkpoint(tmp_path, target, orbax_checkpointer=ckptr),
                     tree)


def test_async_checkpointer_saves_and_keeps_like_flax(tmp_path, set_flag):
  """orbax_checkpointer= an AsyncCheckpointer (flaxckpt's for ours, orbax's for flax): every
  save commits, restore waits for the last one, and keep=1 has removed step 1 while the newest
  step is there in both modules.

  Whether step 2 is still there is a race in flax itself (orbax creates the temporary directory
  of step 3 in the background, and flax counts it only once it exists); ours never counts an
  in-flight save, so it always keeps step 2 until the next save.
  """
  import orbax.checkpoint as orbax
  set_flag(False)
  tree = {'w': jnp.arange(2.0**20), 'n': np.arange(3)}
  checkpointers = {'flax': orbax.AsyncCheckpointer(orbax.PyTreeCheckpointHandler()),
                   'ours': ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())}
  try:
    for step in (1, 2, 3):
      for name, module in MODULES.items():
        path = module.save_checkpoint(tmp_path / name,
                                      jax.tree.map(lambda x, step=step: x + step, tree),
                                      step, keep=1, orbax_checkpointer=checkpointers[name])
        assert path == str(tmp_path / name / f'checkpoint_{step}')
    restored = checkpoints.restore_checkpoint(tmp_path / 'ours', _zeros_like(tree),
                                              orbax_checkpointer=checkpointers['ours'])
    assert_trees_equal(restored, jax.tree.map(lambda x: x + 3, tree))
    checkpointers['flax'].wait_until_finished()
    assert _listing(tmp_path / 'flax') in (['checkpoint_3'], ['checkpoint_2', 'checkpoint_3'])
    # Ours is deterministic: step 3 was in flight at its retention, so keep=1 spared step 2.
    assert _listing(tmp_path / 'ours') == ['checkpoint_2', 'checkpoint_3']
    assert os.path.isfile(tmp_path / 'ours' / 'checkpoint_3' / '_METADATA')
    _assert_same(checkpoints.restore_checkpoint(tmp_path / 'flax', None),
                 flax_checkpoints.restore_checkpoint(tmp_path / 'flax', None))
  finally:
    for ckptr in checkpointers.values():
      ckptr.close()


# ==================================================================================================
# orbax_transforms and orbax_utils
# ==================================================================================================


@pytest.mark.parametrize('writer', list(MODULES))
def test_orbax_transforms_fill_missing_field_from_target(tmp_path, set_flag, writer):
  """A TrainState checkpoint restored into a CustomTrainState with orbax_transforms={} takes
  batch_stats from the target (seed 001), like flax; without orbax_transforms too."""
  set_flag(True)
  state = _adam_train_state()
  ckpt = {'model': state, 'config': {'dimensions': np.array([5, 3])}, 'data': [jnp.ones(5)]}
  MODULES[writer].save_checkpoint(tmp_path, ckpt, 4)
  custom_state = CustomTrainState.create(apply_fn=state.apply_fn, params=state.params,
                                         tx=state.tx, batch_stats=np.arange(10))
  custom_target = {'model': custom_state, 'config': None, 'data': [jnp.zeros(5)]}
  reference = flax_checkpoints.restore_checkpoint(tmp_path, custom_target, step=4,
                                                  orbax_transforms={})
  restored = checkpoints.restore_checkpoint(tmp_path, custom_target, step=4, orbax_transforms={})
  _assert_same(restored, reference)
  assert type(restored['model']) is CustomTrainState
  np.testing.assert_array_equal(restored['model'].batch_stats, np.arange(10))
  assert_trees_equal(restored['model'].params, state.params)
  # Without orbax_transforms flax builds fallbacks for the target's None leaves, and Orbax then
  # fills batch_stats from the target as well.
  _assert_same(checkpoints.restore_checkpoint(tmp_path, custom_target, step=4),
               flax_checkpoints.restore_checkpoint(tmp_path, custom_target, step=4))


def _assert_same_args(actual, expected):
  """Orbax args objects and flaxckpt ones agree class for class and field for field."""
  classes = {'SaveArgs': ocp.SaveArgs, 'RestoreArgs': ocp.RestoreArgs,
             'ArrayRestoreArgs': ocp.ArrayRestoreArgs, 'Transform': ocp.Transform}
  is_args = lambda x: type(x).__name__ in classes
  assert jax.tree.structure(actual, is_leaf=is_args) == jax.tree.structure(
      expected, is_leaf=is_args)
  for a, e in zip(jax.tree.leaves(actual, is_leaf=is_args),
                  jax.tree.leaves(expected, is_leaf=is_args)):
    assert type(a) is classes[type(e).__name__], (a, e)
    for field in dataclasses.fields(a):
      if hasattr(e, field.name):
        assert getattr(a, field.name) == getattr(e, field.name), (field.name, a, e)


def _utils_targets():
  mesh = _mesh()
  sharded = jax.device_put(np.arange(16.0).reshape(8, 2),
                           NamedSharding(mesh, PartitionSpec('x', 'y')))
  return {
      'numpy-only': {'n': np.arange(3), 'i': 3, 'f': 1.5, 'none': None, 'l': [np.ones(2)]},
      'sharded': {'a': sharded, 'n': np.arange(3, dtype=np.int16), 'i': 3, 'f': 1.5, 's': 'x',
                  'l': [jnp.ones(2)], 'e': {}, 'none': None},
      'train_state': _adam_train_state(),
  }


@pytest.mark.parametrize('name', ['numpy-only', 'sharded', 'train_state'])
def test_orbax_utils_match_flax(name):
  """save_args_from_target, restore_args_from_target and maybe_construct_transformations give
  flaxckpt objects equal to the orbax ones flax builds, in the same tree."""
  target = _utils_targets()[name]
  _assert_same_args(orbax_utils.save_args_from_target(target),
                    flax_orbax_utils.save_args_from_target(target))
  _assert_same_args(orbax_utils.restore_args_from_target(target),
                    flax_orbax_utils.restore_args_from_target(target))
  ours = orbax_utils.maybe_construct_transformations(target, None)
  reference = flax_orbax_utils.maybe_construct_transformations(target, None)
  assert sorted(ours) == sorted(reference)
  _assert_same_args(ours, reference)
  given = {'a': ocp.Transform(original_key='b')}
  assert orbax_utils.maybe_construct_transformations(target, given) is given


def test_orbax_utils_restore_args_kinds():
  """Numpy-only targets get RestoreArgs(restore_type=np.ndarray) everywhere; jax.Arrays get
  ArrayRestoreArgs with their sharding and no global shape."""
  targets = _utils_targets()
  args = orbax_utils.restore_args_from_target(targets['numpy-only'])
  assert args['n'] == ocp.RestoreArgs(restore_type=np.ndarray)
  assert args['i'] == ocp.RestoreArgs(restore_type=np.ndarray)
  args = orbax_utils.restore_args_from_target(targets['sharded'])
  assert type(args['a']) is ocp.ArrayRestoreArgs
  assert args['a'].sharding == targets['sharded']['a'].sharding
  assert args['a'].global_shape is None
  assert all(isinstance(x, ocp.SaveArgs)
             for x in jax.tree.leaves(orbax_utils.save_args_from_target(targets['sharded'])))


def test_orbax_utils_restore_args_mesh_is_deprecated():
  """mesh= warns DeprecationWarning and puts the target's specs on the given mesh."""
  target = _utils_targets()['sharded']
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ('x', 'y'))
  with pytest.warns(DeprecationWarning, match='mesh'):
    args = orbax_utils.restore_args_from_target({'a': target['a']}, mesh=mesh)
  assert args['a'].sharding == NamedSharding(mesh, PartitionSpec('x', 'y'))


# ==================================================================================================
# Multi-process (_gda) arrays from a real flax 0.10.2 checkpoint
# ==================================================================================================


@pytest.fixture
def gda_dir(tmp_path):
  directory = tmp_path / 'flax_gda'
  shutil.copytree(_old_format('f0102-ocp0102/flax_gda'), directory)
  return directory


def test_gda_fixture_restores_into_target_shardings(gda_dir):
  """The placeholders of flax's save_checkpoint_multiprocess are filled from checkpoint_4_gda
  with the values written and the shardings of the target's arrays."""
  state = old_formats.state
  target = state.make_sharded()
  restored = checkpoints.restore_checkpoint(gda_dir, target)
  values = state.sharded_values()
  assert list(restored) == list(target)
  assert restored['step'] == 5
  for key in ('w', 'b'):
    assert isinstance(restored[key], jax.Array)
    assert restored[key].sharding == target[key].sharding
    np.testing.assert_array_equal(np.asarray(restored[key]), values[key])
    assert restored[key].dtype == np.float32
  again = checkpoints.restore_checkpoint(gda_dir, target, step=4, gda_manager=None)
  assert_trees_equal(again, restored)


def test_gda_fixture_without_target_restores_numpy(gda_dir):
  """target=None restores the multi-process arrays as numpy, exactly as written, where flax
  raises MPARestoreTargetRequiredError."""
  restored = checkpoints.restore_checkpoint(gda_dir, None)
  values = old_formats.state.sharded_values()
  assert restored['step'] == 5
  for key in ('w', 'b'):
    assert type(restored[key]) is np.ndarray
    assert restored[key].dtype == values[key].dtype and restored[key].shape == values[key].shape
    assert restored[key].tobytes() == values[key].tobytes()
  with pytest.raises(flax.errors.MPARestoreTargetRequiredError):
    flax_checkpoints.restore_checkpoint(gda_dir, None, gda_manager=GlobalAsyncCheckpointManager())


def test_gda_fixture_partial_restore_keeps_placeholders_like_flax(gda_dir):
  """With allow_partial_mpa_restoration and no target the placeholders stay strings, as flax
  returns them."""
  ours = checkpoints.restore_checkpoint(gda_dir, None, allow_partial_mpa_restoration=True)
  reference = flax_checkpoints.restore_checkpoint(gda_dir, None, allow_partial_mpa_restoration=True,
                                                  gda_manager=GlobalAsyncCheckpointManager())
  _assert_same(ours, reference)
  assert ours == {'b': '//GDAPlaceholder:b', 'step': 5, 'w': '//GDAPlaceholder:w'}


# ==================================================================================================
# Beyond flax: errors that name the path, failed saves, in-flight entries
# ==================================================================================================


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'invalid-byte', 'trailing-bytes'])
def test_corrupt_msgpack_raises_value_error_naming_file(tmp_path, set_flag, damage):
  """A damaged msgpack checkpoint raises a ValueError whose message names the file."""
  set_flag(False)
  path = checkpoints.save_checkpoint(tmp_path, {'w': np.arange(100.0), 's': 'text'}, 3)
  data = pathlib.Path(path).read_bytes()
  damaged = {'truncated': data[:len(data) // 2], 'empty': b'', 'invalid-byte': b'\xc1' + data,
             'trailing-bytes': data + b'\x00'}[damage]
  pathlib.Path(path).write_bytes(damaged)
  for kwargs in ({}, {'step': 3}):
    with pytest.raises(ValueError) as info:
      checkpoints.restore_checkpoint(tmp_path, None, **kwargs)
    assert path in str(info.value)
  assert pathlib.Path(path).read_bytes() == damaged


_KILLED_LEGACY_REPLACE = """
import os, signal, sys
import numpy as np
import flax
from flaxckpt.legacy import checkpoints
flax.config.update('flax_use_orbax_checkpointing', True)
root = sys.argv[1]
checkpoints.save_checkpoint(root, {'x': np.arange(4)}, 3, keep=5)
rename = os.rename
def rename_then_die(source, target, *args, **kwargs):
  if '.orbax-checkpoint-tmp-' in str(source) and str(target).endswith('checkpoint_3'):
    os.kill(os.getpid(), signal.SIGKILL)  # The old step is aside; the new one not yet in place.
  return rename(source, target, *args, **kwargs)
os.rename = rename_then_die
checkpoints.save_checkpoint(root, {'x': np.arange(4) * 9}, 3, keep=5, overwrite=True)
"""


def test_an_overwrite_killed_between_its_renames_is_put_back_by_the_next_save(tmp_path, set_flag):
  """With the Orbax backend, overwrite=True moves the old checkpoint aside before the new one
  takes its name; the next save_checkpoint puts back one left aside by a killed writer."""
  result = subprocess.run([sys.executable, '-c', _KILLED_LEGACY_REPLACE, str(tmp_path)],
                          timeout=120, capture_output=True, text=True)
  assert result.returncode == -9, result.stderr[-2000:]
  assert checkpoints.available_steps(tmp_path) == []  # The step is aside, under a tmp name.
  set_flag(True)
  checkpoints.save_checkpoint(tmp_path, {'x': np.ones(2)}, 4, keep=5)
  assert checkpoints.available_steps(tmp_path) == [3, 4]
  np.testing.assert_array_equal(
      checkpoints.restore_checkpoint(tmp_path, None, step=3)['x'], np.arange(4))


def test_directory_that_is_not_orbax_raises_naming_it(tmp_path):
  """A checkpoint_<n> directory without Orbax files raises a ValueError naming it."""
  (tmp_path / 'checkpoint_3').mkdir()
  (tmp_path / 'checkpoint_3' / 'notes.txt').write_text('not a checkpoint')
  for kwargs in ({}, {'step': 3}):
    with pytest.raises(ValueError) as info:
      checkpoints.restore_checkpoint(tmp_path, None, **kwargs)
    assert str(tmp_path / 'checkpoint_3') in str(info.value)


@pytest.mark.parametrize('function', ['save_checkpoint', 'save_checkpoint_multiprocess'])
def test_saving_into_a_regular_file_raises_and_changes_nothing(tmp_path, use_orbax, function):
  """ckpt_dir that is an existing file: an error naming it; nothing on disk changes."""
  path = tmp_path / 'not_a_dir'
  path.write_bytes(b'precious')
  before = files_under(tmp_path)
  with pytest.raises((OSError, ValueError)) as info:
    getattr(checkpoints, function)(path, {'x': np.arange(2)}, 1)
  assert str(path) in str(info.value)
  assert files_under(tmp_path) == before
  assert _listing(tmp_path) == ['not_a_dir']


def test_missing_directory_logs_warning(tmp_path, caplog):
  """Restoring from a directory that does not exist returns the target and warns, naming it."""
  target = {'a': 1}
  missing = tmp_path / 'missing'
  with caplog.at_level(logging.WARNING):
    assert checkpoints.restore_checkpoint(missing, target) is target
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings, 'no WARNING was logged'
  assert any(str(missing) in r.getMessage() for r in warnings)
  assert not missing.exists()


def test_failed_save_leaves_earlier_checkpoints_intact(tmp_path, use_orbax):
  """A save that fails half-way leaves every earlier checkpoint byte for byte as it was, adds
  no checkpoint, and the next save works."""
  tree = {'w': np.arange(10.0), 'n': {'s': 'x'}}
  checkpoints.save_checkpoint(tmp_path, tree, 1, keep=2)
  checkpoints.save_checkpoint(tmp_path, jax.tree.map(lambda x: x, tree), 2, keep=2)
  before = files_under(tmp_path)
  names_before = checkpoints.available_steps(tmp_path)
  with pytest.raises((TypeError, ValueError)):
    checkpoints.save_checkpoint(tmp_path, {'w': np.arange(3.0), 'bad': object()}, 3, keep=1)
  after = files_under(tmp_path)
  assert {k: after.get(k) for k in before} == before
  assert checkpoints.available_steps(tmp_path) == names_before == [1, 2]
  assert not os.path.exists(tmp_path / 'checkpoint_3')
  assert_trees_equal(checkpoints.restore_checkpoint(tmp_path, None), tree)
  checkpoints.save_checkpoint(tmp_path, tree, 3, keep=1)
  assert checkpoints.available_steps(tmp_path) == [3]


def test_retention_never_deletes_in_flight_entries(tmp_path, use_orbax):
  """Deliberate deviation from flax: <prefix>tmp and *.orbax-checkpoint-tmp* entries survive
  keep/overwrite cleanup and are never the latest checkpoint."""
  for prefix in ('checkpoint_', 'model_'):
    directory = tmp_path / prefix
    directory.mkdir()
    in_flight = [f'{prefix}7.orbax-checkpoint-tmp', f'{prefix}8.orbax-checkpoint-tmp-123']
    for name in in_flight:
      (directory / name).mkdir()
      (directory / name / 'data').write_bytes(b'in flight')
    if use_orbax:  # With msgpack, <prefix>tmp is the name our own save writes through.
      (directory / f'{prefix}tmp').write_bytes(b'in flight')
      in_flight.append(f'{prefix}tmp')
    for step in (1, 2, 3):
      checkpoints.save_checkpoint(directory, {'x': step}, step, keep=1, prefix=prefix)
    checkpoints.save_checkpoint(directory, {'x': 0}, 2, keep=1, prefix=prefix, overwrite=True)
    assert _listing(directory) == sorted([f'{prefix}2', *in_flight])
    for name in in_flight:
      assert (directory / name).exists()
    assert checkpoints.latest_checkpoint(directory, prefix) == str(directory / f'{prefix}2')
    assert checkpoints.restore_checkpoint(directory, None, prefix=prefix) == {'x': 0}
