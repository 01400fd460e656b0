"""``flaxckpt diff``: which leaves two checkpoints do not share, and how shared ones differ.

Either side can be any format ``convert`` reads; leaves are compared one pair at a time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from flaxckpt import _leaf_source, _storage


class Change(NamedTuple):
  """A leaf present on both sides with different values."""
  path: str
  what: str  # 'values', 'shape', 'dtype' or 'type'
  before: str
  after: str
  max_abs_diff: float | None  # For arrays of one shape: the largest |a - b| (nan: nan vs number).


class Differences(NamedTuple):
  added: list[str]  # Leaves only in the second checkpoint.
  removed: list[str]  # Leaves only in the first.
  changed: list[Change]
  same: int  # Leaves equal on both sides.

  @property
  def identical(self) -> bool:
    return not (self.added or self.removed or self.changed)


def diff(first: _storage.PathLike, second: _storage.PathLike) -> Differences:
  a, b = _leaf_source.LeafSource(first), _leaf_source.LeafSource(second)
  in_b = set(b.paths)
  common = [path for path in a.paths if path in in_b]
  in_a = set(a.paths)
  changed, same = [], 0
  for path in common:
    change = _compare(_name(path), a.read(path), b.read(path))
    if change is None:
      same += 1
    else:
      changed.append(change)
  return Differences(added=[_name(p) for p in b.paths if p not in in_a],
                     removed=[_name(p) for p in a.paths if p not in in_b],
                     changed=changed, same=same)


def _name(path: tuple[str, ...]) -> str:
  return '/'.join(path) if path else '<root>'


def _describe(value: Any) -> str:
  if isinstance(value, (np.ndarray, np.generic)):
    return f'{value.dtype}{list(np.shape(value))}'
  return type(value).__name__


def _shown(value: Any, limit: int = 60) -> str:
  """``repr(value)``, cut to ``limit`` characters (a stored string can be any length)."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _equal(a: Any, b: Any) -> bool:
  """Scalars, strings and empty nodes; nan equals nan, as for arrays."""
  if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
    return True
  return bool(a == b)


def _compare(name: str, a: Any, b: Any) -> Change | None:
  arrays = isinstance(a, (np.ndarray, np.generic)), isinstance(b, (np.ndarray, np.generic))
  if not all(arrays):
    if any(arrays) or type(a) is not type(b):
      return Change(name, 'type', _describe(a), _describe(b), None)
    return None if _equal(a, b) else Change(name, 'values', _shown(a), _shown(b), None)
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    return Change(name, 'shape', _describe(a), _describe(b), None)
  if a.dtype != b.dtype:
    return Change(name, 'dtype', _describe(a), _describe(b), _max_abs_diff(a, b))
  if np.array_equal(a, b, equal_nan=a.dtype.kind in 'fc'):
    return None
  return Change(name, 'values', _describe(a), _describe(b), _max_abs_diff(a, b))


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float | None:
  """The largest |a - b| (in float64, or complex128); None for non-numeric dtypes."""
  if a.size == 0:
    return 0.0
  wide = np.complex128 if 'c' in (a.dtype.kind, b.dtype.kind) else np.float64
  try:
    return float(np.max(np.abs(a.astype(wide) - b.astype(wide))))
  except (TypeError, ValueError):
    return None
