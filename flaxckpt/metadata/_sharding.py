"""Device-free descriptions of an array's sharding, as recorded in a checkpoint's ``_sharding``.

Each describes a ``jax.sharding.Sharding`` by value (mesh shape, axis names, partition spec, device
ids) so that metadata can be read on any machine; ``to_jax_sharding()`` builds the real sharding
on this one's devices.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from typing import Any

import jax
import numpy as np

_NAMED, _SINGLE = 'NamedSharding', 'SingleDeviceSharding'
_AXIS_TYPES = {str(t): t for t in getattr(jax.sharding, 'AxisType', ())}


@dataclasses.dataclass
class DeviceMetadata:
  """One device of a saved mesh, by id."""
  id: int


@dataclasses.dataclass
class DeviceMetadataMesh:
  """The saved mesh's devices: nested lists of ``DeviceMetadata``, one level per mesh axis."""
  mesh: Any

  def to_jax_device_mesh(self) -> np.ndarray:
    """The same devices of this machine, by id.

    Raises:
      ValueError: a saved device id is not among ``jax.devices()``.
    """
    by_id = {device.id: device for device in jax.devices()}
    ids = np.asarray(jax.tree.map(lambda d: d.id, self.mesh,
                                  is_leaf=lambda x: isinstance(x, DeviceMetadata)))
    missing = sorted({int(i) for i in ids.ravel()} - set(by_id))
    if missing:
      raise ValueError(f'The checkpoint was saved on devices {missing}, which this machine does '
                       f'not have ({len(by_id)} devices); restore with shardings of your own.')
    return np.vectorize(by_id.__getitem__, otypes=[object])(ids)


class ShardingMetadata(abc.ABC):
  """A saved sharding, independent of this machine's devices."""

  @classmethod
  @abc.abstractmethod
  def from_jax_sharding(cls, jax_sharding: Any) -> ShardingMetadata:
    """Describes ``jax_sharding``."""

  @abc.abstractmethod
  def to_jax_sharding(self) -> jax.sharding.Sharding:
    """The sharding on this machine's devices."""

  @classmethod
  @abc.abstractmethod
  def from_deserialized_dict(cls, deserialized_dict: dict[str, Any]) -> ShardingMetadata:
    """From the parsed JSON object of one ``_sharding`` entry."""

  @abc.abstractmethod
  def to_serialized_string(self) -> str:
    """The JSON text of one ``_sharding`` entry."""


@dataclasses.dataclass(eq=False)
class NamedShardingMetadata(ShardingMetadata):
  """A ``jax.sharding.NamedSharding``: mesh shape and axes, partition spec, optional devices."""
  shape: np.ndarray
  axis_names: list[str]
  partition_spec: tuple[Any, ...]
  axis_types: tuple[Any, ...] | None = None
  device_mesh: DeviceMetadataMesh | None = None

  @classmethod
  def from_jax_sharding(cls, jax_sharding: Any) -> NamedShardingMetadata:
    mesh = jax_sharding.mesh
    devices = jax.tree.map(lambda d: DeviceMetadata(d.id), mesh.devices.tolist(),
                           is_leaf=lambda x: isinstance(x, jax.Device))
    return cls(shape=np.array(list(mesh.shape.values())), axis_names=list(mesh.axis_names),
               partition_spec=tuple(jax_sharding.spec),
               axis_types=tuple(getattr(mesh, 'axis_types', ())) or None,
               device_mesh=DeviceMetadataMesh(devices))

  def to_jax_sharding(self) -> jax.sharding.NamedSharding:
    devices = (self.device_mesh.to_jax_device_mesh() if self.device_mesh is not None
               else np.asarray(jax.devices()[:int(np.prod(self.shape))], dtype=object))
    kwargs = {'axis_types': self.axis_types} if self.axis_types else {}
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(tuple(self.shape)),
                             tuple(self.axis_names), **kwargs)
    spec = [tuple(p) if isinstance(p, list) else p for p in self.partition_spec]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

  @classmethod
  def from_deserialized_dict(cls, deserialized_dict: dict[str, Any]) -> NamedShardingMetadata:
    d = deserialized_dict
    if not all(k in d for k in ('shape', 'axis_names', 'partition_spec')):
      raise ValueError(f'A NamedSharding entry needs shape, axis_names and partition_spec; '
                       f'found keys {sorted(d)}.')
    axis_types = None
    if d.get('axis_types'):
      unknown = [t for t in d['axis_types'] if t not in _AXIS_TYPES]
      if unknown:
        raise ValueError(f'Unknown mesh axis types {unknown}.')
      axis_types = tuple(_AXIS_TYPES[t] for t in d['axis_types'])
    device_mesh = None
    if isinstance(d.get('device_mesh'), dict) and 'mesh' in d['device_mesh']:
      device_mesh = DeviceMetadataMesh(jax.tree.map(
          lambda x: DeviceMetadata(int(x['id'])), d['device_mesh']['mesh'],
          is_leaf=lambda x: isinstance(x, dict) and 'id' in x))
    return cls(shape=np.array(d['shape'], dtype=np.int64), axis_names=list(d['axis_names']),
               partition_spec=tuple(d['partition_spec']), axis_types=axis_types,
               device_mesh=device_mesh)

  def to_serialized_string(self) -> str:
    data: dict[str, Any] = {'sharding_type': _NAMED, 'shape': np.asarray(self.shape).tolist(),
                            'axis_names': list(self.axis_names)}
    if self.axis_types is not None:
      data['axis_types'] = [str(t) for t in self.axis_types]
    data['partition_spec'] = list(self.partition_spec)
    if self.device_mesh is not None:
      data['device_mesh'] = dataclasses.asdict(self.device_mesh)
    return json.dumps(data)

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, NamedShardingMetadata)
            and np.array_equal(self.shape, other.shape)
            and list(self.axis_names) == list(other.axis_names)
            and self.axis_types == other.axis_types
            and _spec(self.partition_spec) == _spec(other.partition_spec)
            and self.device_mesh == other.device_mesh)

  __hash__ = None  # type: ignore[assignment]


def _spec(spec: tuple[Any, ...]) -> tuple[Any, ...]:
  return tuple(tuple(p) if isinstance(p, list) else p for p in spec)


def _cpu_name(name: str) -> str:
  return name.replace('TFRT_CPU_', 'cpu:')  # jax's CPU devices were renamed in 0.4.


@dataclasses.dataclass(eq=False)
class SingleDeviceShardingMetadata(ShardingMetadata):
  """A ``jax.sharding.SingleDeviceSharding``, naming its device as ``str(device)`` does."""
  device_str: str

  @classmethod
  def from_jax_sharding(cls, jax_sharding: Any) -> SingleDeviceShardingMetadata:
    return cls(str(next(iter(jax_sharding.device_set))))

  def to_jax_sharding(self) -> jax.sharding.SingleDeviceSharding:
    """Raises ValueError when this process has no device of that name."""
    for device in jax.local_devices():
      if _cpu_name(str(device)) == _cpu_name(self.device_str):
        return jax.sharding.SingleDeviceSharding(device)
    raise ValueError(f'Device {self.device_str!r} is not among jax.local_devices(); restore '
                     'with a sharding of your own.')

  @classmethod
  def from_deserialized_dict(cls, deserialized_dict: dict[str, Any]
                             ) -> SingleDeviceShardingMetadata:
    device = deserialized_dict.get('device_str')
    if not isinstance(device, str):
      raise ValueError(f'A SingleDeviceSharding entry needs a device_str; found '
                       f'{deserialized_dict!r:.200}.')
    return cls(device)

  def to_serialized_string(self) -> str:
    return json.dumps({'sharding_type': _SINGLE, 'device_str': self.device_str})

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, SingleDeviceShardingMetadata)
            and _cpu_name(self.device_str) == _cpu_name(other.device_str))

  __hash__ = None  # type: ignore[assignment]


def from_jax_sharding(jax_sharding: Any) -> ShardingMetadata | None:
  """The description of a Named or SingleDevice sharding; None for any other kind."""
  if isinstance(jax_sharding, jax.sharding.NamedSharding):
    return NamedShardingMetadata.from_jax_sharding(jax_sharding)
  if isinstance(jax_sharding, jax.sharding.SingleDeviceSharding):
    return SingleDeviceShardingMetadata.from_jax_sharding(jax_sharding)
  return None


def from_deserialized_dict(data: Any) -> ShardingMetadata:
  """Parses one ``_sharding`` entry (its JSON object).

  Raises:
    ValueError: it is not a Named or SingleDevice sharding entry.
  """
  kind = data.get('sharding_type') if isinstance(data, dict) else None
  if kind == _NAMED:
    return NamedShardingMetadata.from_deserialized_dict(data)
  if kind == _SINGLE:
    return SingleDeviceShardingMetadata.from_deserialized_dict(data)
  raise ValueError(f'Unsupported sharding type {kind!r}; expected {_NAMED!r} or {_SINGLE!r}.')
