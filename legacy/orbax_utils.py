"""``flax.training.orbax_utils`` returning flaxckpt's args objects.

Helpers that turn an example tree (the ``target`` of a restore) into per-leaf save args,
restore args and transforms, as seed 001 uses them with checkpointers and managers.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from flaxckpt import _tree
from flaxckpt._transforms import Transform
from flaxckpt._types import RestoreArgs, SaveArgs
from flaxckpt.checkpoint_utils import construct_restore_args


def is_multi_device_array(value: Any) -> bool:
  """Whether ``value`` is a jax.Array that is not fully replicated."""
  return isinstance(value, jax.Array) and not value.is_fully_replicated


def save_args_from_target(target: Any) -> Any:
  """Default ``SaveArgs`` for every leaf of ``target``."""
  return jax.tree_util.tree_map(lambda _: SaveArgs(), target)


def maybe_construct_transformations(target: Any, transforms: Any | None) -> Any:
  """``transforms`` if given; else transforms that keep the target's value at every None leaf,
  which a checkpoint cannot provide."""
  if transforms is not None:
    return transforms
  pairs, _ = jax.tree_util.tree_flatten_with_path(target, is_leaf=_tree.is_empty_node)
  return {_tree.path_str(leaf.path): Transform(use_fallback=True)
          for leaf in _tree.leaves_from_pairs(pairs) if leaf.value is None}


def restore_args_from_target(target: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Restore args that give each restored leaf the type and sharding of the target's leaf.

  Args:
    target: a tree shaped like the checkpoint; its jax.Arrays carry the wanted shardings.
    mesh: deprecated, as in flax: the target's own shardings are used, rebuilt on this mesh.
  """
  shardings = jax.tree_util.tree_map(lambda x: getattr(x, 'sharding', None), target)
  if not any(jax.tree_util.tree_leaves(shardings)):
    return jax.tree_util.tree_map(lambda _: RestoreArgs(restore_type=np.ndarray), target)
  if mesh is not None:
    warnings.warn('restore_args_from_target(): `mesh` is deprecated; the shardings of the '
                  "target's arrays are used.", DeprecationWarning, stacklevel=2)
    shardings = jax.tree_util.tree_map(
        lambda s: jax.sharding.NamedSharding(mesh, s.spec), shardings)
  restore_args = construct_restore_args(target, shardings, set_global_shape=False)
  # As flax's: None leaves of the target stay None.
  return jax.tree_util.tree_map(lambda leaf, args: None if leaf is None else args, target,
                                restore_args, is_leaf=lambda x: x is None)
