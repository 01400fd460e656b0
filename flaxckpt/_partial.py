"""Restore of part of a checkpoint: ``PLACEHOLDER`` leaves, ``partial_restore``,
``multi_value_fn`` transforms and ``legacy_transform_fn``.

All of them are decided here, before the leaf-level restore (``_restore.restore``) runs: leaves
not to be read are pruned from the target and ``restore_args`` (replaced by None, which restore
treats as an empty node and never reads), and ``PLACEHOLDER`` or the computed values are put back
into the result afterwards. Orbax's rules:

- ``PLACEHOLDER`` in the target (or in ``restore_args``) is honoured when no ``transforms`` are
  given; with transforms a target leaf's value does not matter (it only shapes the result).
- ``partial_restore=True`` keeps the target's own value for keys the checkpoint lacks (as
  ``transforms={}`` does); a target that holds only some of the checkpoint's keys restores just
  those either way (flax's guide, "when a reference object is partial").
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax

from flaxckpt import _restore, _tree
from flaxckpt._args import PyTreeRestore
from flaxckpt._transforms import RestoreTransform, Transform
from flaxckpt._types import RestoreArgs
from flaxckpt.metadata.tree import TreeMetadata, ValueMetadataEntry
from flaxckpt.transform_utils import PLACEHOLDER


def restore(directory: pathlib.Path, args: PyTreeRestore) -> Any:
  """Restores ``args`` (any of the options above) from ``directory``."""
  item, restore_args = _unwrap(args.item), _unwrap(args.restore_args)
  legacy_fn = getattr(args, 'legacy_transform_fn', None)
  transforms = _flat_transforms(args.transforms)
  placeholders_apply = transforms is None
  if legacy_fn is not None:
    if transforms is not None:
      raise ValueError('Cannot provide both `transforms` and `legacy_transform_fn`.')
    return _restore_legacy(directory, args, item, legacy_fn)
  if transforms is None and getattr(args, 'partial_restore', False) and item is not None:
    transforms = {}
  multi = {k: t for k, t in (transforms or {}).items() if t.multi_value_fn is not None}
  if multi and item is None:
    raise ValueError('If providing `transforms`, must provide `item` matching structure of '
                     'expected result.')
  shape_tree = item if item is not None else restore_args
  if shape_tree is None:
    return _restore.restore(directory, _replace(args, item, restore_args, transforms))
  leaves, treedef = _tree.flatten(shape_tree)
  args_by_path = _restore_args_by_path(restore_args)
  skipped: dict[_tree.Path, Any] = {}  # Result path -> what replaces the value there.
  if placeholders_apply:
    for leaf in leaves:
      if leaf.value is PLACEHOLDER or args_by_path.get(leaf.path) is PLACEHOLDER:
        skipped[leaf.path] = PLACEHOLDER
  for leaf in leaves:
    transform = _first_match(transforms or {}, leaf.path)
    if transform is not None and transform.multi_value_fn is not None:
      skipped[leaf.path] = transform
  if not skipped:
    return _restore.restore(directory, _replace(args, item, restore_args, transforms))
  plain = None if transforms is None else {k: t for k, t in transforms.items() if k not in multi}
  pruned_args = _prune(restore_args, set(skipped))
  pruned_item = None if item is None else jax.tree_util.tree_unflatten(
      treedef, [None if leaf.path in skipped else leaf.value for leaf in leaves])
  result = _restore.restore(directory, _replace(args, pruned_item, pruned_args, plain))
  restored, _ = _tree.flatten(result)
  if [leaf.path for leaf in restored] != [leaf.path for leaf in leaves]:
    raise RuntimeError('flaxckpt: restore changed the tree structure of a partial restore.')
  original = None
  if multi:
    original = _read_inputs(directory, [t for t in skipped.values() if t is not PLACEHOLDER],
                            args.verify_checksums)
  out = []
  for leaf, value in zip(leaves, (leaf.value for leaf in restored)):
    how = skipped.get(leaf.path)
    if how is PLACEHOLDER:
      value = PLACEHOLDER
    elif how is not None:
      value = how.multi_value_fn(_tree.path_str(leaf.path), original,
                                 args_by_path.get(leaf.path) or RestoreArgs())
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)


def _unwrap(tree: Any) -> Any:
  return tree.tree if isinstance(tree, TreeMetadata) else tree


def _replace(args: PyTreeRestore, item: Any, restore_args: Any,
             transforms: Mapping[str, Transform] | None) -> PyTreeRestore:
  return dataclasses.replace(args, item=item, restore_args=restore_args, transforms=transforms)


def _flat_transforms(transforms: Any) -> dict[str, Transform] | None:
  """Transforms keyed by '/'-joined regexes: nested dicts of them (as Orbax allows) flattened."""
  if transforms is None:
    return None
  pairs, _ = jax.tree_util.tree_flatten_with_path(
      transforms, is_leaf=lambda x: isinstance(x, Transform))
  out = {}
  for leaf in _tree.leaves_from_pairs(pairs):
    if not isinstance(leaf.value, Transform):
      raise TypeError(f'transforms[{_tree.path_str(leaf.path)!r}] is a '
                      f'{type(leaf.value).__name__}; expected a Transform.')
    out['/'.join(leaf.path)] = leaf.value
  return out


def _first_match(transforms: dict[str, Transform], path: _tree.Path) -> Transform | None:
  key = _tree.path_str(path)
  for pattern, transform in transforms.items():
    if re.fullmatch(pattern, key):
      if transform.multi_value_fn is not None:
        _check_multi(pattern, transform)
      return transform
  return None


def _check_multi(pattern: str, transform: Transform) -> None:
  if not isinstance(transform, RestoreTransform):
    raise ValueError(f'Transform for {pattern!r}: must use RestoreTransform in order to use '
                     'multi_value_fn during restore.')
  if transform.multi_value_fn_input_args is None:
    raise ValueError(f'Transform for {pattern!r}: `multi_value_fn` was specified, but '
                     '`multi_value_fn_input_args` were not; name the checkpoint keys it reads.')


def _is_args_leaf(x: Any) -> bool:
  return isinstance(x, RestoreArgs) or x is PLACEHOLDER or _tree.is_empty_node(x)


def _restore_args_by_path(restore_args: Any) -> dict[_tree.Path, Any]:
  if restore_args is None:
    return {}
  pairs, _ = jax.tree_util.tree_flatten_with_path(restore_args, is_leaf=_is_args_leaf)
  return {leaf.path: leaf.value for leaf in _tree.leaves_from_pairs(pairs)}


def _prune(restore_args: Any, paths: set[_tree.Path]) -> Any:
  """``restore_args`` with None at ``paths`` (never read)."""
  if restore_args is None:
    return None
  pairs, treedef = jax.tree_util.tree_flatten_with_path(restore_args, is_leaf=_is_args_leaf)
  leaves = _tree.leaves_from_pairs(pairs)
  return jax.tree_util.tree_unflatten(
      treedef, [None if leaf.path in paths else leaf.value for leaf in leaves])


def _read_inputs(directory: pathlib.Path, transforms: list[Any], verify_checksums: bool) -> Any:
  """The checkpoint as a tree, holding the leaves any ``multi_value_fn_input_args`` names (read
  with those args) and ``PLACEHOLDER`` everywhere else."""
  meta = _restore.read_tree_metadata(directory)
  inputs = [(re.compile(k), a) for t in transforms
            for k, a in (t.multi_value_fn_input_args or {}).items()]
  entries = []
  for leaf in meta.leaves:
    key = _tree.path_str(leaf.path)
    arg = next((a for pattern, a in inputs if pattern.fullmatch(key)), None)
    entries.append((leaf.path, leaf.key_types, arg))
  wanted = {path for path, _, arg in entries if arg is not None}
  if not wanted:
    return _tree.build([(p, k, PLACEHOLDER) for p, k, _ in entries])
  read = _restore.restore(directory, PyTreeRestore(restore_args=_tree.build(entries),
                                                   verify_checksums=verify_checksums))
  leaves, treedef = _tree.flatten(read)
  return jax.tree_util.tree_unflatten(
      treedef, [leaf.value if leaf.path in wanted else PLACEHOLDER for leaf in leaves])


@dataclasses.dataclass
class _ParamInfo:
  """Where a leaf is stored, for ``legacy_transform_fn`` (until ``type_handlers.ParamInfo``)."""
  name: str | None = None
  parent_dir: pathlib.Path | None = None
  skip_deserialize: bool = False


def _param_info_class() -> Callable[..., Any]:
  from flaxckpt import type_handlers  # noqa: PLC0415  (type_handlers imports this module's users)
  return getattr(type_handlers, 'ParamInfo', None) or _ParamInfo


def _restore_legacy(directory: pathlib.Path, args: PyTreeRestore, item: Any,
                    legacy_fn: Callable[..., Any]) -> Any:
  """Orbax's ``legacy_transform_fn(item, structure, param_infos) -> (structure, param_infos)``:
  the function maps the checkpoint's structure (``ValueMetadataEntry`` leaves) and parameter
  infos (each naming its stored leaf) to the result's; each result leaf is then read from the
  stored leaf its info names."""
  meta = _restore.read_tree_metadata(directory)
  param_info = _param_info_class()
  structure = _tree.build([(leaf.path, leaf.key_types, ValueMetadataEntry(
      leaf.value_type, leaf.skip_deserialize, leaf.write_shape)) for leaf in meta.leaves])
  infos = _tree.build([(leaf.path, leaf.key_types, param_info(
      name=leaf.name, parent_dir=directory, skip_deserialize=leaf.skip_deserialize))
      for leaf in meta.leaves])
  new_structure, new_infos = legacy_fn(item, structure, infos)
  by_name = {leaf.name: leaf.path for leaf in meta.leaves}
  pairs, _ = jax.tree_util.tree_flatten_with_path(
      new_infos, is_leaf=lambda x: hasattr(x, 'skip_deserialize'))
  transforms: dict[str, Transform] = {}
  for leaf in _tree.leaves_from_pairs(pairs):
    info = leaf.value
    key = re.escape(_tree.path_str(leaf.path))
    if info.skip_deserialize or info.name not in by_name:
      transforms[key] = Transform(use_fallback=True)
    else:
      transforms[key] = Transform(
          original_key=_tree.path_str(by_name[info.name]).replace('\\', '\\\\'))
  target = jax.tree_util.tree_map(lambda x: x, new_structure)
  return _restore.restore(directory, _replace(args, target, args.restore_args, transforms))
