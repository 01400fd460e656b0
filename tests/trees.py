"""Assertions on pytrees shared by the test modules."""

import jax
import numpy as np


def assert_trees_equal(a, b):
  """Same structure, and every leaf equal as a numpy array."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
