"""Per-leaf save and restore options (Orbax's ``SaveArgs``/``RestoreArgs`` family)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class SaveArgs:
  """How to save one leaf.

  Attributes:
    dtype: cast the array to this dtype on disk (restores return it).
    chunk_byte_size: upper bound for one stored chunk; chunks tile the written shard.
    aggregate: accepted for old call sites and ignored (Orbax no longer aggregates either).
  """
  dtype: Any = None
  chunk_byte_size: int | None = None
  aggregate: bool = False


@dataclasses.dataclass(frozen=True)
class RestoreArgs:
  """How to restore one leaf.

  Attributes:
    restore_type: ``np.ndarray``, ``jax.Array``, a Python scalar type, ``str``, or None for
      the type it was saved as.
    dtype: cast to this dtype after reading.
  """
  restore_type: Any = None
  dtype: Any = None


@dataclasses.dataclass(frozen=True)
class ArrayRestoreArgs(RestoreArgs):
  """Restore one leaf as a ``jax.Array``.

  Attributes:
    sharding: the sharding of the result; or give ``mesh`` and ``mesh_axes``.
    global_shape: the shape wanted; None keeps the stored shape.
    strict: with False, a ``global_shape`` that differs pads (with zeros) or truncates.
  """
  restore_type: Any = jax.Array
  sharding: jax.sharding.Sharding | None = None
  mesh: jax.sharding.Mesh | None = None
  mesh_axes: Any = None
  global_shape: tuple[int, ...] | None = None
  shape: tuple[int, ...] | None = None
  strict: bool = True

  def __post_init__(self) -> None:
    # As Orbax: ``shape`` and ``global_shape`` are two names for one thing.
    if self.shape is not None and self.global_shape is not None:
      if tuple(self.shape) != tuple(self.global_shape):
        raise ValueError(f'ArrayRestoreArgs: shape={self.shape} and global_shape='
                         f'{self.global_shape} must match when both are given.')
    elif self.shape is None:
      object.__setattr__(self, 'shape', self.global_shape)
    else:
      object.__setattr__(self, 'global_shape', self.shape)

  def resolved_sharding(self) -> jax.sharding.Sharding | None:
    if self.sharding is not None:
      return as_jax_sharding(self.sharding)
    if self.mesh is not None and self.mesh_axes is not None:
      return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*self.mesh_axes))
    return None


def as_jax_sharding(sharding: Any) -> jax.sharding.Sharding | None:
  """A ``jax.sharding.Sharding`` from one, or from a sharding description that can build one
  (Orbax's ``ShardingMetadata``: ``to_jax_sharding()``)."""
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return sharding
  to_jax = getattr(sharding, 'to_jax_sharding', None)
  if to_jax is None:
    raise TypeError(f'Expected a jax.sharding.Sharding (or ShardingMetadata), got '
                    f'{type(sharding).__module__}.{type(sharding).__qualname__}.')
  return to_jax()


def is_restore_args(x: Any) -> bool:
  return isinstance(x, RestoreArgs)


def is_save_args(x: Any) -> bool:
  return isinstance(x, SaveArgs)


def normalize_dtype(dtype: Any) -> np.dtype | None:
  """Accepts scalar types like ``jnp.bfloat16`` as well as dtypes (Orbax crashes on those)."""
  return None if dtype is None else np.dtype(dtype)


def is_key_array(value: jax.Array) -> bool:
  # Typed PRNG key dtypes are jax extended dtypes, never numpy dtypes.
  return not isinstance(value.dtype, np.dtype) and jax.dtypes.issubdtype(
      value.dtype, jax.dtypes.prng_key)


def key_impl_name(key_dtype: Any) -> str:
  """The registered name of a typed key dtype's PRNG implementation (``threefry2x32``)."""
  return key_dtype._impl.name  # jax exposes no public accessor that also takes abstract keys.
