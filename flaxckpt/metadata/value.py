"""What a checkpoint says about each saved value, without reading the value: the leaves of
``PyTreeCheckpointHandler.metadata(path)``.

Equality ignores ``name`` and ``directory``: two checkpoints of the same tree describe equal
values wherever they live.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from flaxckpt.metadata._sharding import ShardingMetadata


@dataclasses.dataclass
class Metadata:
  """Describes one saved value.

  Attributes:
    name: the value's name in the checkpoint (its tree path joined with '.').
    directory: the checkpoint directory holding it.
  """
  name: str
  directory: pathlib.Path | None

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Metadata)


@dataclasses.dataclass(frozen=True)
class StorageMetadata:
  """How an array is stored: its zarr chunk shape and the shape each process wrote."""
  chunk_shape: tuple[int, ...] | None
  write_shape: tuple[int, ...] | None = None


@dataclasses.dataclass
class ArrayMetadata(Metadata):
  """Describes a saved array: enough to build a restore target (``jax.ShapeDtypeStruct``) or to
  pass as one.

  Attributes:
    shape: the global shape.
    sharding: the saved sharding (``to_jax_sharding()`` rebuilds it here), or None for arrays
      saved from numpy or without a recorded sharding.
    dtype: the element type.
    storage: the chunk layout on disk, when known.
  """
  shape: tuple[int, ...]
  sharding: ShardingMetadata | None
  dtype: np.dtype | None
  storage: StorageMetadata | None = None

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, ArrayMetadata) and self.shape == other.shape
            and self.sharding == other.sharding and self.dtype == other.dtype
            and self.storage == other.storage)

  @classmethod
  def from_shape_dtype_struct(cls, s: jax.ShapeDtypeStruct, name: str | None = None,
                              directory: pathlib.Path | None = None) -> ArrayMetadata:
    """Describes the array ``s`` stands for (its sharding kept as given)."""
    return cls(name=name, directory=directory,  # type: ignore[arg-type]
               shape=tuple(s.shape), sharding=s.sharding, dtype=s.dtype)


@dataclasses.dataclass
class ScalarMetadata(ArrayMetadata):
  """Describes a saved Python or numpy scalar: shape ``()`` and its dtype."""
  shape: tuple[int, ...] = ()
  sharding: ShardingMetadata | None = None
  dtype: np.dtype | None = None

  def __eq__(self, other: object) -> bool:
    return isinstance(other, ScalarMetadata) and self.dtype == other.dtype


@dataclasses.dataclass
class StringMetadata(Metadata):
  """Describes a saved string."""

  def __eq__(self, other: object) -> bool:
    return isinstance(other, StringMetadata)


def is_value_metadata(x: Any) -> bool:
  return isinstance(x, Metadata)
