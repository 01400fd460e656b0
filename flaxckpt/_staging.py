"""Array data between accelerators and host memory, within a budget of host memory.

Saves copy arrays that live on a GPU or TPU to host memory (``HostCopies``) and restores place
host arrays on them, in batches of at most half the budget: one batch is written (or placed)
while the next is copied (or read). Arrays on the CPU are host memory already and are never
batched. Copies are made from views of their own (``detached``), never from the caller's arrays:
jax keeps a host copy cached on the array it was made from, for as long as that array lives.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flaxckpt import _arrays

# Platforms whose arrays numpy reads in place.
HOST_PLATFORMS = frozenset({'cpu'})


def off_host(sharding: jax.sharding.Sharding) -> bool:
  """Whether arrays of ``sharding`` live in memory numpy cannot read in place."""
  return any(getattr(device, 'platform', None) not in HOST_PLATFORMS
             for device in sharding.device_set)


def batch_limit(budget: int) -> int:
  """The bytes of one batch under ``budget``: two batches are held at once."""
  return max(1, budget // 2)


def nbytes(array: _arrays.ArrayWrite) -> int:
  return sum(block.nbytes for _, block in array.blocks)


def detached(array: jax.Array) -> jax.Array:
  """A new jax.Array over the same device buffer as the single-device ``array``: a host copy
  made from it is cached on it, not on ``array``, and dies with it."""
  return jax.make_array_from_single_device_arrays(array.shape, array.sharding, [array])


class HostCopies:
  """The device-to-host copies of the device blocks (jax.Arrays) of some array writes, all
  started at once; ``take`` waits for them."""

  def __init__(self, arrays: list[_arrays.ArrayWrite]):
    self._arrays = arrays
    self._views: dict[int, jax.Array] = {}
    for array in arrays:
      for _, block in array.blocks:
        if isinstance(block, jax.Array):
          view = detached(block)
          view.copy_to_host_async()
          self._views[id(block)] = view

  def take(self) -> list[_arrays.ArrayWrite]:
    """The arrays with host copies in place of their device blocks. The views die here,
    leaving the host copies to the arrays returned."""
    out = []
    for array in self._arrays:
      if any(isinstance(block, jax.Array) for _, block in array.blocks):
        array = array._replace(blocks=tuple(
            (origin, host_array(self._views[id(block)], array.dtype)
             if isinstance(block, jax.Array) else block) for origin, block in array.blocks))
      out.append(array)
    self._arrays, self._views = [], {}
    return out


def host_array(value: Any, dtype: np.dtype) -> np.ndarray:
  """``value`` as a numpy array of ``dtype``: a view where numpy can read it in place and the
  dtype matches, else a copy."""
  host = np.asarray(value)
  return host if host.dtype == dtype else host.astype(dtype)


def wait_placed(values: list[Any]) -> None:
  """Waits until the jax.Arrays among ``values`` hold their data (their host sources free)."""
  jax.block_until_ready([value for value in values if isinstance(value, jax.Array)])
