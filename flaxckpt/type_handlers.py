"""Per-leaf handlers and arguments under Orbax's names (``ocp.type_handlers``).

Register a ``TypeHandler`` for a class of your own and its instances can be leaves of any saved
PyTree; register one for ``jax.Array`` (``override=True``) to change how arrays are handled, as
``SingleReplicaArrayHandler`` does for restores.

Example:
  >>> ocp.type_handlers.register_type_handler(Point, PointHandler())
  >>> ocp.StandardCheckpointer().save(path, {'p': Point(1, 2), 'w': np.ones(3)})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flaxckpt import _arrays, _storage
from flaxckpt._single_replica import SingleReplicaArrayHandler, SingleReplicaArrayRestoreArgs
from flaxckpt._type_handlers import (REGISTRY, ArrayHandler, NumpyHandler, ParamInfo,
                                     ScalarHandler, StringHandler, TypeHandler,
                                     check_input_arguments, get_ts_context)
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs, SaveArgs

__all__ = [
    'ArrayHandler', 'ArrayRestoreArgs', 'NumpyHandler', 'ParamInfo', 'RestoreArgs', 'SaveArgs',
    'ScalarHandler', 'SingleReplicaArrayHandler', 'SingleReplicaArrayRestoreArgs',
    'StringHandler', 'TypeHandler', 'check_input_arguments', 'get_json_tspec_read',
    'get_ts_context',
    'get_type_handler', 'has_type_handler', 'is_ocdbt_checkpoint', 'is_supported_empty_value',
    'is_supported_type', 'register_standard_handlers_with_options', 'register_type_handler',
    'supported_types',
]


def get_json_tspec_read(info: ParamInfo, use_ocdbt: bool, metadata_key: str | None = None,
                        raise_array_data_missing_error: bool = True) -> dict[str, Any]:
  """The tensorstore spec that reads the array ``info`` names (``info.parent_dir`` is the
  checkpoint directory, ``info.name`` the array's name), for ``ts.open``; as Orbax's.

  Args:
    info: the array's ``ParamInfo``; ``use_zarr3`` picks the zarr version.
    use_ocdbt: whether the checkpoint keeps its arrays in OCDBT.
    metadata_key: the name of the zarr metadata file, where it is not the standard one.
    raise_array_data_missing_error: False reads missing chunks as the fill value.
  """
  if info.parent_dir is None or not info.name:
    raise ValueError(f'get_json_tspec_read needs a ParamInfo with parent_dir and name, got '
                     f'{info!r}.')
  spec = _arrays.read_spec(_storage.as_path(info.parent_dir), info.name, use_ocdbt=use_ocdbt,
                           use_zarr3=bool(info.use_zarr3))
  spec.update({'recheck_cached_data': False, 'recheck_cached_metadata': False,
               'fill_missing_data_reads': not raise_array_data_missing_error})
  if metadata_key is not None:
    spec['metadata_key'] = metadata_key
  return spec


def register_type_handler(ty: Any, handler: TypeHandler,
                          func: Callable[[Any], bool] | None = None,
                          override: bool = False) -> None:
  """Makes ``handler`` save and restore the leaves of type ``ty`` (and its subclasses).

  Args:
    ty: the leaf type.
    handler: a ``TypeHandler`` instance; its ``typestr()`` is recorded for each leaf.
    func: decides which types the handler takes (default: subclasses of ``ty``).
    override: replace an existing registration for ``ty`` (or for the same typestr).

  Raises:
    ValueError: ``ty`` (or the handler's typestr) is registered already and ``override`` is
      False.
  """
  REGISTRY.add(ty, handler, func, override)


def get_type_handler(ty: Any) -> TypeHandler:
  """The handler registered for a type, or for a typestr such as ``'jax.Array'``.

  Raises:
    ValueError: no handler is registered for it.
  """
  return REGISTRY.get(ty)


def has_type_handler(ty: Any) -> bool:
  """Whether a handler is registered for a type (or typestr)."""
  return REGISTRY.has(ty)


def supported_types() -> list[Any]:
  """The types handled out of the box."""
  return [int, float, bytes, np.number, np.ndarray, jax.Array, str]


def register_standard_handlers_with_options(**kwargs: Any) -> None:
  """Re-registers the scalar, numpy and ``jax.Array`` handlers built with ``kwargs``.

  As in Orbax, ``use_ocdbt`` and ``ts_context`` are dropped (the checkpoint handler's own
  ``use_ocdbt`` decides the layout); the rest (``metadata_key``, ``ocdbt_process_id``) go to
  each handler's constructor and are kept on it. flaxckpt writes the standard zarr metadata
  name whatever ``metadata_key`` says, so such checkpoints are read back by flaxckpt, and by
  Orbax without that option.
  """
  kwargs.pop('use_ocdbt', None)
  kwargs.pop('ts_context', None)
  for ty in (int, float, bytes, np.number):
    REGISTRY.add(ty, ScalarHandler(**kwargs), override=True)
  REGISTRY.add(np.ndarray, NumpyHandler(**kwargs), override=True)
  REGISTRY.add(jax.Array, ArrayHandler(**kwargs), override=True)


def is_ocdbt_checkpoint(path: _storage.PathLike) -> bool:
  """Whether the checkpoint at ``path`` keeps its arrays in an OCDBT database."""
  return _storage.exists(_storage.as_path(path) / _arrays.OCDBT_MANIFEST)


def is_supported_empty_value(value: Any, pytree_metadata_options: Any = None) -> bool:
  """Whether ``value`` is an empty node a checkpoint records without a handler: None, or an
  empty dict, list or tuple (an empty NamedTuple only with rich-type metadata)."""
  if isinstance(value, tuple) and hasattr(value, '_fields'):
    return bool(getattr(pytree_metadata_options, 'support_rich_types', False)) and not value
  if value is None:
    return True
  return isinstance(value, (dict, list, tuple)) and not value


def is_supported_type(value: Any, pytree_metadata_options: Any = None) -> bool:
  """Whether ``value`` can be a leaf without a custom ``TypeHandler``."""
  return isinstance(value, (str, int, float, np.number, np.ndarray, bytes, jax.Array)) or (
      is_supported_empty_value(value, pytree_metadata_options))
