"""Small helpers users call around checkpointing (``flaxckpt.utils``)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_shape_dtype_struct(x: Any, dtype: Any = None, scalar_dtype: Any = None) -> Any:
  """An abstract stand-in for ``x``: ``jax.ShapeDtypeStruct`` with its shape, dtype, sharding.

  Use it to build restore targets without allocating arrays:
  ``jax.tree.map(flaxckpt.utils.to_shape_dtype_struct, state)``. Python scalars are returned
  unchanged unless ``scalar_dtype`` is given.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    return x if dtype is None else jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
  if isinstance(x, (int, float, complex, bool)) and scalar_dtype is not None:
    return jax.ShapeDtypeStruct((), scalar_dtype)
  return x
