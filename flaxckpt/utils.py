"""Small helpers users call around checkpointing (``orbax.checkpoint.utils``'s names).

Most are defined where they belong and named here too, as Orbax does: the step helpers in
``flaxckpt.path.step`` (imported on first use, so ``import flaxckpt`` stays light), the tree
helpers in ``flaxckpt.tree``, the multi-host ones in ``flaxckpt.multihost``.
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from flaxckpt import _metadata
from flaxckpt.multihost import is_primary_host, sync_global_processes
from flaxckpt.tree import (deserialize_tree, from_flat_dict, from_flattened_with_keypath,
                           get_key_name, is_dict_key, is_empty_node, is_empty_or_leaf,
                           is_sequence_key, serialize_tree, to_flat_dict, to_shape_dtype_struct,
                           tuple_path_from_keypath)

if TYPE_CHECKING:
  from flaxckpt.path.step import (any_checkpoint_step, checkpoint_steps, checkpoint_steps_paths,
                                  get_save_directory, is_checkpoint_finalized,
                                  is_tmp_checkpoint, step_from_checkpoint_name)
  from flaxckpt.path.step import all_temporary_paths as tmp_checkpoints

__all__ = [
    'TMP_DIR_SUFFIX', 'all_leaves_are_placeholders', 'any_checkpoint_step', 'checkpoint_steps',
    'checkpoint_steps_paths', 'deserialize_tree', 'from_flat_dict',
    'from_flattened_with_keypath', 'fully_replicated_host_local_array_to_global_array',
    'get_key_name', 'get_save_directory', 'is_checkpoint_finalized', 'is_dict_key',
    'is_empty_node', 'is_empty_or_leaf', 'is_primary_host', 'is_scalar', 'is_sequence_key',
    'is_tmp_checkpoint', 'leaf_is_placeholder', 'leaf_placeholder',
    'name_from_leaf_placeholder', 'record_saved_duration', 'serialize_tree',
    'step_from_checkpoint_name', 'sync_global_devices', 'sync_global_processes',
    'tmp_checkpoints', 'to_flat_dict', 'to_shape_dtype_struct', 'tuple_path_from_keypath',
]

TMP_DIR_SUFFIX = _metadata.TMP_SUFFIX
sync_global_devices = sync_global_processes

# Names from flaxckpt.path.step, imported on first use. As in Orbax, ``utils.tmp_checkpoints``
# gives TemporaryPath objects (``.get()``: the directory), ``step.tmp_checkpoints`` names.
_STEP_NAMES = {'any_checkpoint_step': 'any_checkpoint_step',
               'checkpoint_steps': 'checkpoint_steps',
               'checkpoint_steps_paths': 'checkpoint_steps_paths',
               'get_save_directory': 'get_save_directory',
               'is_checkpoint_finalized': 'is_checkpoint_finalized',
               'is_tmp_checkpoint': 'is_tmp_checkpoint',
               'step_from_checkpoint_name': 'step_from_checkpoint_name',
               'tmp_checkpoints': 'all_temporary_paths'}


def __getattr__(name: str) -> Any:
  if name in _STEP_NAMES:
    return getattr(importlib.import_module('flaxckpt.path.step'), _STEP_NAMES[name])
  raise AttributeError(f'module "flaxckpt.utils" has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_STEP_NAMES))


# --- placeholders of the aggregate (msgpack) format -----------------------------------------
# In a checkpoint's aggregate file a leaf saved in its own directory stands as
# 'PLACEHOLDER://<name>' (older releases: 'AGGREGATED://<name>').
_PLACEHOLDER_PREFIX = 'PLACEHOLDER://'
_AGGREGATED_PREFIX = 'AGGREGATED://'


def leaf_is_placeholder(leaf: Any) -> bool:
  """Whether ``leaf`` is the aggregate file's stand-in for a value stored elsewhere."""
  return isinstance(leaf, str) and leaf.startswith((_PLACEHOLDER_PREFIX, _AGGREGATED_PREFIX))


def leaf_placeholder(name: str) -> str:
  """The stand-in for the value stored under ``name``: ``'PLACEHOLDER://<name>'``."""
  return _PLACEHOLDER_PREFIX + name


def name_from_leaf_placeholder(placeholder: str) -> str:
  """The name a placeholder stands for.

  Raises:
    ValueError: ``placeholder`` is not one.
  """
  for prefix in (_PLACEHOLDER_PREFIX, _AGGREGATED_PREFIX):
    if isinstance(placeholder, str) and placeholder.startswith(prefix):
      return placeholder[len(prefix):]
  raise ValueError(f'Requested name from placeholder, but {placeholder!r} does not start with '
                   f'{_PLACEHOLDER_PREFIX!r} or {_AGGREGATED_PREFIX!r}.')


def all_leaves_are_placeholders(tree: Any) -> bool:
  """Whether every leaf of ``tree`` is a placeholder."""
  return all(leaf_is_placeholder(leaf) for leaf in jax.tree.leaves(tree))


def is_scalar(x: Any) -> bool:
  return isinstance(x, (int, float, np.number))


# --- arrays ---------------------------------------------------------------------------------


def fully_replicated_host_local_array_to_global_array(arr: jax.Array) -> jax.Array:
  """A global array, replicated over every device, from a fully replicated host-local one.

  The usual input is ``pmap`` output (a state replicated with ``flax.jax_utils.replicate``):
  its leading axis has one entry per local device, all equal; the result drops that axis.
  An array that is already replicated keeps its shape. Checkpoint the result, not the pmap
  array::

    state = jax.tree.map(ocp.utils.fully_replicated_host_local_array_to_global_array, state)

  Raises:
    TypeError: ``arr`` is not a ``jax.Array``.
  """
  if not isinstance(arr, jax.Array):
    raise TypeError('fully_replicated_host_local_array_to_global_array takes a jax.Array, got '
                    f'{type(arr).__name__}.')
  shards = sorted(arr.addressable_shards, key=lambda shard: shard.device.id)
  data = [shard.data for shard in shards]
  global_shape = data[0].shape
  # Orbax picks the spec from the shard's shape before dropping a pmap axis (a pmap scalar gets
  # P(None)); the same spec gives the same sharding file.
  spec = jax.sharding.PartitionSpec(None) if global_shape else jax.sharding.PartitionSpec()
  if global_shape != arr.shape:  # pmap output: each device holds (1, *shape).
    data = [d[0] for d in data]
    global_shape = global_shape[1:]
  mesh = jax.sharding.Mesh(np.array(jax.devices()), axis_names=('x',))
  return jax.make_array_from_single_device_arrays(
      global_shape, jax.sharding.NamedSharding(mesh, spec), data)


# --- monitoring -----------------------------------------------------------------------------

_last_checkpoint_start = time.time()  # For the first checkpoint: the program's start.


def record_saved_duration(checkpoint_start_time: float) -> None:
  """Records (as the jax.monitoring event Orbax uses) how much program time the checkpoint
  started at ``checkpoint_start_time`` (``time.time()``) saves: the time since the previous
  checkpoint started, or since the program started for the first."""
  global _last_checkpoint_start
  jax.monitoring.record_event_duration_secs(
      '/jax/checkpoint/write/duration_since_last_checkpoint_secs',
      checkpoint_start_time - _last_checkpoint_start)
  _last_checkpoint_start = checkpoint_start_time
