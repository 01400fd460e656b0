"""Assertions on pytrees, and on the files under a directory, shared by the test modules."""

import pathlib

import jax
import numpy as np


def assert_trees_equal(a, b):
  """Same structure, and every leaf equal as a numpy array."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def files_under(root) -> dict[str, bytes]:
  """Every file under ``root``: relative path -> bytes."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}
