"""Helpers for tests and examples, as ``orbax.checkpoint.test_utils`` has them (imported on
demand, never by ``import flaxckpt``). They need neither Orbax nor absl.

The ``assert_*`` functions take a ``unittest.TestCase`` first, as Orbax's do; pass None from
pytest and plain assertions are used.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from flaxckpt import _metadata, _multihost, _storage
from flaxckpt.path import step as step_lib
from flaxckpt.tree import to_flat_dict

__all__ = ['apply_function', 'assert_array_equal', 'assert_tree_equal',
           'assert_tree_same_structure', 'create_sharded_array', 'create_tmp_directory',
           'empty_directory', 'erase_and_create_empty', 'ocdbt_checkpoint_context',
           'print_directory', 'replicate_sharded_array', 'setup_pytree', 'setup_sharded_pytree']

_logger = logging.getLogger('flaxckpt')


def erase_and_create_empty(directory: _storage.PathLike) -> pathlib.Path:
  """Deletes ``directory`` if present, creates it empty and returns it as a ``pathlib.Path``."""
  path = _storage.as_path(directory)
  _storage.remove_tree(path)
  _storage.make_dirs(path)
  return path


def empty_directory(directory: _storage.PathLike) -> bool:
  """Removes everything inside ``directory``; False if it does not exist."""
  path = _storage.as_path(directory)
  if not _storage.exists(path):
    return False
  for name in _storage.list_names(path):
    _storage.remove_tree(path / name)
  return True


def create_tmp_directory(tmp_dir: _storage.PathLike, final_dir: _storage.PathLike, *,
                         primary_host: int | None = 0, active_processes: set[int] | None = None,
                         barrier_sync_key_prefix: str | None = None,
                         path_permission_mode: int | None = None,
                         metadata_store: Any = None) -> pathlib.Path:
  """Creates ``tmp_dir``, the directory a save to ``final_dir`` writes into, on the primary
  host, between barriers of all processes. A leftover uncommitted ``tmp_dir`` is replaced;
  with ``metadata_store`` given, a ``_CHECKPOINT_METADATA`` with the start time is written.

  Raises:
    FileExistsError: ``tmp_dir`` exists and is a committed checkpoint.
  """
  del active_processes  # Every process of the job takes part in flaxckpt's barriers.
  tmp, final = _storage.as_path(tmp_dir), _storage.as_path(final_dir)
  prefix = f'{barrier_sync_key_prefix}.' if barrier_sync_key_prefix else ''
  _multihost.barrier(f'{prefix}create_tmp_directory:pre:{final.name}')
  if primary_host is None or _multihost.process_index() == primary_host:
    if _storage.exists(tmp):
      if not step_lib.is_path_temporary(tmp):
        raise FileExistsError(f'Attempted to create temporary directory {tmp}, which already '
                              'exists and appears to be a finalized checkpoint.')
      _logger.warning('Removing the unfinished temporary directory %s.', tmp)
      _storage.remove_tree(tmp)
    _storage.make_new_dir(tmp)
    if path_permission_mode is not None:
      tmp.chmod(path_permission_mode)
    if metadata_store is not None:
      _storage.write_text(tmp / _metadata.CHECKPOINT_METADATA_FILE,
                          _metadata.checkpoint_metadata_json(None, _metadata.now_ns(), None))
  _multihost.barrier(f'{prefix}create_tmp_directory:post:{final.name}')
  return tmp


def print_directory(directory: _storage.PathLike, level: int = 0) -> None:
  """Logs (to the ``flaxckpt`` logger, at INFO) the files under ``directory`` as a tree.

  Raises:
    ValueError: ``directory`` does not exist or is not a directory.
  """
  path = _storage.as_path(directory)
  if not _storage.exists(path):
    raise ValueError(f'Directory {path} does not exist.')
  if not _storage.is_dir(path):
    raise ValueError(f'Directory {path} is not a directory.')
  if level == 0:
    _logger.info('Printing directory tree: %s/', path)
  else:
    _logger.info('%s%s/', '..' * level, path.name)
  for name in _storage.list_names(path):
    if _storage.is_dir(path / name) and not _storage.is_link(path / name):
      print_directory(path / name, level=level + 1)
    else:
      _logger.info('%s%s', '..' * (level + 1), name)


def apply_function(tree: Any, function: Callable[[jax.Array], jax.Array]) -> Any:
  """``function`` applied, jit-compiled, to every (sharded) array of ``tree``."""
  compiled = jax.jit(function)
  return jax.tree.map(compiled, tree)


def _is_leaf(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.sharding.Mesh, jax.sharding.PartitionSpec))


def setup_pytree(add: int = 0) -> dict[str, Any]:
  """The small numpy tree Orbax's tests use: ``a`` (8), ``b`` (16), ``c.a`` (2x4), ``c.e``
  (4x4), each ``arange`` times a factor, plus ``add``."""
  tree = {'a': np.arange(8) * 1, 'b': np.arange(16) * 2,
          'c': {'a': np.arange(8).reshape((2, 4)) * 3, 'e': np.arange(16).reshape((4, 4)) * 4}}
  return jax.tree.map(lambda x: x + add, tree, is_leaf=_is_leaf)


def create_sharded_array(arr: Any, mesh: jax.sharding.Mesh,
                         mesh_axes: jax.sharding.PartitionSpec) -> jax.Array:
  """``arr`` (an array or a Python number) as a ``jax.Array`` sharded over ``mesh``."""
  value = np.asarray(arr) if isinstance(arr, (int, float)) else arr
  return jax.make_array_from_callback(
      value.shape, jax.sharding.NamedSharding(mesh, mesh_axes),
      lambda index: np.asarray(value[index], dtype=value.dtype))


def setup_sharded_pytree(pytree: Any = None, reverse_devices: bool = False,
                         devices: list[jax.Device] | None = None
                         ) -> tuple[Any, Any, Any]:
  """``setup_pytree()`` (or ``pytree``, of the same structure) sharded over ``devices`` (an
  even count): ``a`` replicated, ``b`` over a 1-d mesh, ``c.*`` over a 2-d one. Returns the
  tree, its meshes and its partition specs."""
  chosen = list(jax.devices() if devices is None else devices)
  if reverse_devices:
    chosen.reverse()
  grid = np.asarray(chosen)
  mesh_2d = jax.sharding.Mesh(grid.reshape((2, len(chosen) // 2)), ('x', 'y'))
  mesh_1d = jax.sharding.Mesh(grid, ('x',))
  spec_2d = jax.sharding.PartitionSpec('x', 'y')
  meshes = {'a': mesh_1d, 'b': mesh_1d, 'c': {'a': mesh_2d, 'e': mesh_2d}}
  specs = {'a': jax.sharding.PartitionSpec(None), 'b': jax.sharding.PartitionSpec('x'),
           'c': {'a': spec_2d, 'e': spec_2d}}
  tree = setup_pytree() if pytree is None else pytree
  sharded = jax.tree.map(create_sharded_array, tree, meshes, specs, is_leaf=_is_leaf)
  return sharded, meshes, specs


def replicate_sharded_array(arr: jax.Array) -> jax.Array:
  """``arr`` replicated over every device."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('x',))
  return jax.device_put(arr, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _check(testclass: Any, ok: bool, message: str) -> None:
  if testclass is not None:
    testclass.assertTrue(ok, message)
  elif not ok:
    raise AssertionError(message)


def assert_array_equal(testclass: Any, v_expected: Any, v_actual: Any) -> None:
  """``v_actual`` has the type, dtype, shards (for a ``jax.Array``) and values of
  ``v_expected``; PRNG keys compare by key data and implementation."""
  _check(testclass, isinstance(v_actual, type(v_expected)),
         f'expected a {type(v_expected).__name__}, got {type(v_actual).__name__}')
  if hasattr(v_expected, 'dtype'):
    _check(testclass, v_expected.dtype == v_actual.dtype,
           f'dtype {v_actual.dtype} != expected {v_expected.dtype}')
  if isinstance(v_expected, jax.Array):
    if jax.dtypes.issubdtype(v_expected.dtype, jax.dtypes.prng_key):
      assert_array_equal(testclass, jax.random.key_data(v_expected),
                         jax.random.key_data(v_actual))
      _check(testclass,
             str(jax.random.key_impl(v_expected)) == str(jax.random.key_impl(v_actual)),
             'PRNG key implementations differ')
      return
    expected_shards, actual_shards = v_expected.addressable_shards, v_actual.addressable_shards
    _check(testclass, len(expected_shards) == len(actual_shards),
           f'{len(actual_shards)} addressable shards != expected {len(expected_shards)}')
    for expected, actual in zip(expected_shards, actual_shards):
      np.testing.assert_array_equal(actual.data, expected.data)
  elif isinstance(v_expected, np.ndarray):
    np.testing.assert_array_equal(v_actual, v_expected)
  else:
    _check(testclass, v_expected == v_actual, f'{v_actual!r} != expected {v_expected!r}')


def assert_tree_equal(testclass: Any, expected: Any, actual: Any) -> None:
  """``actual`` has the paths of ``expected`` and equal leaves (``assert_array_equal``); a
  None in ``expected`` matches anything."""
  expected_keys, actual_keys = set(to_flat_dict(expected)), set(to_flat_dict(actual))
  _check(testclass, expected_keys == actual_keys,
         f'paths differ: missing {sorted(expected_keys - actual_keys)}, '
         f'unexpected {sorted(actual_keys - expected_keys)}')

  def compare(x: Any, y: Any) -> None:
    if x is not None:
      assert_array_equal(testclass, x, y)

  jax.tree.map(compare, expected, actual, is_leaf=lambda x: x is None)


def assert_tree_same_structure(testclass: Any, expected: Any, actual: Any) -> None:
  same = jax.tree.structure(expected) == jax.tree.structure(actual)  # type: ignore[operator]
  _check(testclass, same,
         f'{jax.tree.structure(actual)} != expected {jax.tree.structure(expected)}')


@contextlib.contextmanager
def ocdbt_checkpoint_context(use_ocdbt: bool, ts_context: Any) -> Iterator[None]:
  """Within the block the standard type handlers are built with ``use_ocdbt`` and
  ``ts_context``; afterwards the handlers registered before are back."""
  from flaxckpt import type_handlers  # pylint: disable=g-import-not-at-top
  standard = (int, float, bytes, np.number, np.ndarray, jax.Array)
  before = [(ty, type_handlers.get_type_handler(ty)) for ty in standard
            if type_handlers.has_type_handler(ty)]
  if use_ocdbt:
    type_handlers.register_standard_handlers_with_options(use_ocdbt=use_ocdbt,
                                                          ts_context=ts_context)
  try:
    yield
  finally:
    for ty, handler in before:
      type_handlers.register_type_handler(ty, handler, override=True)
