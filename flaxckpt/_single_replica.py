"""Restoring arrays once per replica group and broadcasting them (Orbax's
``SingleReplicaArrayHandler``).

In a mesh whose ``replica_axis_index`` axis holds identical copies of the model (data-parallel
replicas), only the processes of the primary replica read the checkpoint, each the part of the
array its own devices of that replica hold. Every other device starts from zeros, and one jitted
sum over the replica axis gives all devices the data, in the requested sharding. At scale this
turns N reads of the same bytes into one, with the broadcast on the fast interconnect.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from flaxckpt import _arrays, _errors, _multihost, _storage
from flaxckpt._type_handlers import ArrayHandler, ParamInfo, check_input_arguments
from flaxckpt._types import ArrayRestoreArgs, RestoreArgs, normalize_dtype


@dataclasses.dataclass(frozen=True)
class SingleReplicaArrayRestoreArgs(ArrayRestoreArgs):
  """``ArrayRestoreArgs`` for ``SingleReplicaArrayHandler``.

  Attributes:
    sharding: the result's ``NamedSharding`` over the global mesh (required).
    single_replica_sharding: how the primary replica holds the array while reading; built from
      ``sharding`` when not given (Orbax deprecated passing it).
    global_shape, dtype: needed by processes outside the primary replica, which read nothing.
  """
  single_replica_sharding: jax.sharding.NamedSharding | None = None


class InvalidShardingError(_errors.CheckpointError, ValueError):
  """A sharding that ``SingleReplicaArrayHandler`` cannot broadcast over."""


class SingleReplicaArrayHandler(ArrayHandler):
  """An ``ArrayHandler`` whose restores read each array once per replica group.

  Register it for ``jax.Array`` and pass ``SingleReplicaArrayRestoreArgs`` for the arrays:

    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.SingleReplicaArrayHandler(), override=True)

  Every process must hold devices of one replica only. Saving is unchanged.

  Args:
    replica_axis_index: the mesh axis along which replicas lie.
    primary_replica_id: the index along that axis of the replica that reads.
    broadcast_memory_limit_bytes: broadcast arrays in groups taking at most this much memory
      per device (None: all at once).
    broadcast_memory_scaling_factor: accepted as Orbax names it (flaxckpt does not estimate
      free device memory).
    **kwargs: ``ArrayHandler``'s options.
  """

  def __init__(self, replica_axis_index: int | None = 0, primary_replica_id: int | None = 0,
               broadcast_memory_limit_bytes: int | None = None,
               broadcast_memory_scaling_factor: float | None = 0.75, **kwargs: Any):
    super().__init__(**kwargs)
    self.replica_axis_index = replica_axis_index or 0
    self.primary_replica_id = primary_replica_id or 0
    self.broadcast_memory_limit_bytes = broadcast_memory_limit_bytes
    self.broadcast_memory_scaling_factor = broadcast_memory_scaling_factor

  async def deserialize(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None = None) -> Sequence[jax.Array]:
    """Reads on the primary replica and broadcasts; see the class docstring.

    Raises:
      ValueError: ``args`` are missing, not ``SingleReplicaArrayRestoreArgs`` or without
        ``sharding``; InvalidShardingError for a sharding it cannot broadcast over.
    """
    if args is None:
      raise ValueError('Must provide SingleReplicaArrayRestoreArgs to restore as jax.Array.')
    check_input_arguments(infos, args)
    checked: list[SingleReplicaArrayRestoreArgs] = []
    for info, arg in zip(infos, args):
      if not isinstance(arg, SingleReplicaArrayRestoreArgs):
        raise ValueError(f'Leaf {info.name!r}: SingleReplicaArrayHandler needs '
                         f'SingleReplicaArrayRestoreArgs, got {type(arg).__name__}.')
      if arg.resolved_sharding() is None:
        raise ValueError(f'Leaf {info.name!r}: give SingleReplicaArrayRestoreArgs a sharding '
                         '(or mesh and mesh_axes).')
      checked.append(arg)
    shardings = [_named(info, arg.resolved_sharding()) for info, arg in zip(infos, checked)]
    primary = self._primary_processes(_mesh(shardings[0]))
    replica_shardings = [arg.single_replica_sharding or self._replica_sharding(sharding)
                         for arg, sharding in zip(checked, shardings)]
    if _multihost.process_index() in primary:
      parts: Sequence[Any] = _read_replica(infos, checked, replica_shardings)
    else:
      parts = [_abstract(info, arg, sharding)
               for info, arg, sharding in zip(infos, checked, replica_shardings)]
    out: list[jax.Array] = []
    for group in _arrays.in_batches(range(len(parts)), lambda i: _per_device_bytes(parts[i]),
                                    self.broadcast_memory_limit_bytes):
      out.extend(_broadcast([parts[i] for i in group], [shardings[i] for i in group],
                            self.replica_axis_index))
    return out

  def _primary_processes(self, mesh: jax.sharding.Mesh) -> set[int]:
    devices = np.take(mesh.devices, self.primary_replica_id, axis=self.replica_axis_index)
    if devices.size == len(jax.devices()):
      raise InvalidShardingError(
          'All devices are in the primary replica; there are no other replicas to broadcast to '
          f'(mesh axis {self.replica_axis_index} of shape {mesh.devices.shape}).')
    return {d.process_index for d in devices.flat}

  def _replica_sharding(self, sharding: jax.sharding.NamedSharding
                        ) -> jax.sharding.NamedSharding:
    """``sharding`` restricted to the replica that holds this process's devices."""
    mesh = _mesh(sharding)
    axis = self.replica_axis_index
    me = _multihost.process_index()
    for replica in range(mesh.devices.shape[axis]):
      devices = np.take(mesh.devices, replica, axis=axis)
      if any(d.process_index == me for d in devices.flat):
        replica_mesh = jax.sharding.Mesh(np.expand_dims(devices, axis), mesh.axis_names)
        return jax.sharding.NamedSharding(replica_mesh, sharding.spec)
    raise InvalidShardingError(f'Process {me} holds no device of the mesh {mesh}.')


def _mesh(sharding: jax.sharding.NamedSharding) -> jax.sharding.Mesh:
  return cast(jax.sharding.Mesh, sharding.mesh)


def _named(info: ParamInfo, sharding: Any) -> jax.sharding.NamedSharding:
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise InvalidShardingError(f'Leaf {info.name!r}: SingleReplicaArrayHandler needs a '
                               f'NamedSharding, got {type(sharding).__name__}.')
  return sharding


def _read_replica(infos: Sequence[ParamInfo], args: Sequence[SingleReplicaArrayRestoreArgs],
                  shardings: Sequence[jax.sharding.NamedSharding]) -> list[jax.Array]:
  """Reads each array into the primary replica's devices, only the parts this process holds."""
  from flaxckpt import _restore  # _restore dispatches to handlers: import it late.
  first = infos[0]
  directory = _storage.as_path(first.parent_dir)
  regions = [None if arg.global_shape is None
             else _restore.local_region(sharding, tuple(arg.global_shape))
             for arg, sharding in zip(args, shardings)]
  data = _arrays.read_arrays(
      directory, [info.name for info in infos], use_ocdbt=first.is_ocdbt_checkpoint,
      use_zarr3=bool(first.use_zarr3),
      missing_chunks_are_errors=first.raise_array_data_missing_error, regions=regions)
  out = []
  for info, arg, sharding, value in zip(infos, args, shardings, data):
    dtype = normalize_dtype(arg.dtype)
    if isinstance(value, _arrays.Region):  # Asked for, so global_shape is known.
      out.append(_restore.array_from_region(value, _value_shape(arg), sharding, dtype))
      continue
    if arg.global_shape is not None and tuple(value.shape) != tuple(arg.global_shape):
      raise _errors.StructureMismatchError(
          f'Leaf {info.name!r}: the checkpoint holds shape {tuple(value.shape)} but the restore '
          f'args ask for {tuple(arg.global_shape)}.')
    if dtype is not None and value.dtype != dtype:
      value = value.astype(dtype)
    out.append(jax.make_array_from_callback(value.shape, sharding, _indexer(value)))
  return out


def _value_shape(arg: ArrayRestoreArgs) -> tuple[int, ...]:
  return tuple(arg.global_shape or ())


def _indexer(value: np.ndarray) -> Any:
  return lambda index: value[index]


def _abstract(info: ParamInfo, arg: SingleReplicaArrayRestoreArgs,
              sharding: jax.sharding.NamedSharding) -> jax.ShapeDtypeStruct:
  if arg.global_shape is None or arg.dtype is None:
    raise ValueError(f'Leaf {info.name!r}: processes outside the primary replica read nothing, '
                     'so SingleReplicaArrayRestoreArgs needs global_shape and dtype.')
  return jax.ShapeDtypeStruct(tuple(arg.global_shape), normalize_dtype(arg.dtype),
                              sharding=sharding)


def _per_device_bytes(part: Any) -> int:
  return math.prod(part.sharding.shard_shape(part.shape)) * np.dtype(part.dtype).itemsize


def _sum_over_replicas(stacked: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  return tuple(jnp.sum(x, axis=0) for x in stacked)


def _broadcast(parts: Sequence[Any], shardings: Sequence[jax.sharding.NamedSharding],
               replica_axis_index: int) -> list[jax.Array]:
  """Each part (an array on the primary replica, or its shape where this process holds none of
  it) stacked along a new replica dimension, zeros outside the primary replica, summed."""
  stacked = tuple(_stack(part, sharding, replica_axis_index)
                  for part, sharding in zip(parts, shardings))
  merge = jax.jit(_sum_over_replicas, out_shardings=tuple(shardings))
  return list(merge(stacked))


def _stack(part: Any, sharding: jax.sharding.NamedSharding,
           replica_axis_index: int) -> jax.Array:
  mesh = _mesh(sharding)
  replica_axis = mesh.axis_names[replica_axis_index]
  shape = (mesh.devices.shape[replica_axis_index], *part.shape)
  spec = jax.sharding.PartitionSpec(replica_axis, *part.sharding.spec)
  stacked_sharding = jax.sharding.NamedSharding(mesh, spec)
  source = {}
  if isinstance(part, jax.Array):
    for shard in part.addressable_shards:
      source[shard.device] = jnp.expand_dims(shard.data, 0)
  buffers = []
  for device, index in stacked_sharding.addressable_devices_indices_map(shape).items():
    if device in source:
      buffers.append(source[device])
    else:
      local = tuple(s.indices(n)[1] - s.indices(n)[0] for s, n in zip(index or (), shape))
      buffers.append(jnp.zeros(local, dtype=part.dtype, device=device))
  return jax.make_array_from_single_device_arrays(shape, stacked_sharding, buffers)
