"""Restore-time tree transformations, as ``orbax.checkpoint.transform_utils``.

``PLACEHOLDER`` marks a leaf of a restore target (or of ``restore_args``) that is not to be read:
the restored tree holds ``PLACEHOLDER`` there. ``Transform``/``RestoreTransform`` describe how a
result key is obtained; ``apply_transformations`` applies them to trees in memory, and
``merge_trees``/``intersect_trees`` combine trees by their flattened keys.

Example:
  >>> abstract = jax.tree.map(lambda x: x, ckptr.metadata(path).tree)
  >>> target = {'params': abstract['params'], 'opt_state': ocp.PLACEHOLDER}
"""

from __future__ import annotations

import functools
import operator
import re
from typing import Any

import jax

from flaxckpt import tree as _tree_api
from flaxckpt._transforms import RestoreTransform, Transform

PLACEHOLDER = ...  # Orbax's PLACEHOLDER is this same object, so trees built for it work here.
Placeholder = type(PLACEHOLDER)
PyTree = Any

__all__ = ['PLACEHOLDER', 'RestoreTransform', 'Transform', 'apply_transformations',
           'intersect_trees', 'is_placeholder', 'merge_trees']


def is_placeholder(x: Any) -> bool:
  """Whether ``x`` is ``PLACEHOLDER``."""
  return x is PLACEHOLDER


def apply_transformations(original_tree: PyTree, transformations: PyTree, new_tree: PyTree,
                          default_to_original: bool | None = True) -> PyTree:
  r"""A tree shaped like ``new_tree`` whose values come from ``original_tree`` as
  ``transformations`` say.

  Keys are '/'-joined paths; each key of ``transformations`` is a regex matched against the
  whole key of every ``new_tree`` leaf (the last matching transformation wins). A leaf no
  transformation matches takes the value of the same key in ``original_tree`` when
  ``default_to_original`` (else keeps its ``new_tree`` value); a leaf found in neither keeps its
  ``new_tree`` value. ``use_fallback`` takes the other tree's value instead.

  Example:
    >>> apply_transformations({'a': 1, 'b': {'c': 2}},
    ...                       {'x': Transform(original_key='a'),
    ...                        r'y/(.*)': Transform(original_key=r'b/\1', value_fn=str)},
    ...                       {'x': 0, 'y': {'c': 0}, 'z': 5})
    {'x': 1, 'y': {'c': '2'}, 'z': 5}

  Raises:
    ValueError: a transformation names a key ``original_tree`` does not hold.
  """
  if not jax.tree_util.tree_leaves(new_tree) and not new_tree:
    return {}
  original = _tree_api.to_flat_dict(original_tree, sep='/')
  new = _tree_api.to_flat_dict(new_tree, sep='/')
  transforms = _tree_api.to_flat_dict(
      transformations, sep='/', is_leaf=lambda x: isinstance(x, Transform))
  for key in new:
    matched = False
    for pattern, transform in transforms.items():
      match = re.fullmatch(pattern, key)
      if match is None:
        continue
      matched = True
      if transform.use_fallback:
        if not default_to_original:
          if key not in original:
            raise ValueError(f'Key {key!r} has a use_fallback transformation but the original '
                             'tree does not hold it.')
          new[key] = original[key]
      elif transform.multi_value_fn is not None:
        new[key] = transform.multi_value_fn(key, original_tree)
      else:
        source = match.expand(transform.original_key) if transform.original_key else key
        if source not in original:
          raise ValueError(f'Transformation of key {key!r} names original key {source!r}, which '
                           f'the original tree does not hold.')
        value = original[source]
        new[key] = transform.value_fn(value) if transform.value_fn is not None else value
    if not matched and key in original and default_to_original:
      new[key] = original[key]
  return _tree_api.from_flat_dict(new, target=new_tree, sep='/')


def merge_trees(*trees: PyTree, target: PyTree | None = None) -> PyTree:
  """One tree holding every key of ``trees`` (a later tree's value wins on shared keys), shaped
  like ``target`` (nested dicts without one)."""
  flats = [_tree_api.to_flat_dict(t) for t in trees]
  return _tree_api.from_flat_dict(functools.reduce(operator.ior, flats, {}), target=target)


def intersect_trees(*trees: PyTree, target: PyTree | None = None) -> PyTree:
  """One tree holding only the keys every tree of ``trees`` holds (values from the last),
  shaped like ``target`` (nested dicts without one)."""
  flats = [_tree_api.to_flat_dict(t) for t in trees]
  common = set.intersection(*(set(flat) for flat in flats))
  return _tree_api.from_flat_dict({k: v for k, v in flats[-1].items() if k in common},
                                  target=target)
