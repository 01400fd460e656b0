"""``BasePyTreeCheckpointHandler``: Orbax's lower-level PyTree handler, with its own args.

It writes the files ``PyTreeCheckpointHandler`` writes; only the args classes
(``BasePyTreeSaveArgs``/``BasePyTreeRestoreArgs``) and the Orbax constructor keywords differ.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from flaxckpt import _arrays
from flaxckpt._args import PyTreeRestore, PyTreeSave
from flaxckpt._handler import CheckpointArgs, Writer, register_with_handler
from flaxckpt._pytree_handler import PyTreeCheckpointHandler


class BasePyTreeCheckpointHandler(PyTreeCheckpointHandler):
  """Saves and restores pytrees with ``BasePyTreeSaveArgs`` / ``BasePyTreeRestoreArgs``.

  Args:
    save_concurrent_bytes: the most array data a save stages at once (see
      ``PyTreeCheckpointHandler(save_concurrent_gb=)``).
    save_device_host_concurrent_bytes: the most data of arrays on accelerators a synchronous
      save holds in host memory (see ``PyTreeCheckpointHandler(save_device_host_concurrent_gb=)``;
      1 GiB by default, None for no limit).
    restore_concurrent_bytes: the most data a restore holds in host memory on its way to
      accelerators (see ``PyTreeCheckpointHandler(restore_concurrent_gb=)``; 1 GiB by default).
    use_ocdbt, use_zarr3, use_compression: as for ``PyTreeCheckpointHandler``.
    **orbax_options: Orbax's other tuning keywords (``memory_limit_options``,
      ``multiprocessing_options``, ``type_handler_registry``, ...), accepted and unused.
  """

  typestr = ('orbax.checkpoint._src.handlers.base_pytree_checkpoint_handler.'
             'BasePyTreeCheckpointHandler')

  def __init__(self, *, save_concurrent_bytes: int | None = None, use_ocdbt: bool = True,
               use_zarr3: bool = False, use_compression: bool = False,
               save_device_host_concurrent_bytes: int | str | None = (
                   _arrays.DEFAULT_DEVICE_HOST_BUDGET),
               restore_concurrent_bytes: int | None = _arrays.DEFAULT_DEVICE_HOST_BUDGET,
               **orbax_options: Any):
    unknown = set(orbax_options) - _ACCEPTED_ORBAX_OPTIONS
    if unknown:
      raise TypeError(f'BasePyTreeCheckpointHandler got unexpected keywords {sorted(unknown)}.')
    super().__init__(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3, use_compression=use_compression,
                     save_concurrent_gb=None if save_concurrent_bytes is None
                     else save_concurrent_bytes / 2**30,
                     save_device_host_concurrent_gb=_gigabytes(save_device_host_concurrent_bytes),
                     restore_concurrent_gb=_gigabytes(restore_concurrent_bytes))

  def save(self, directory: pathlib.Path, args: BasePyTreeSaveArgs) -> None:  # type: ignore[override]
    super().save(directory, _pytree_save(args))

  def async_save(self, directory: pathlib.Path,  # type: ignore[override]
                 args: BasePyTreeSaveArgs) -> Writer:
    return super().async_save(directory, _pytree_save(args))

  def restore(self, directory: pathlib.Path,  # type: ignore[override]
              args: BasePyTreeRestoreArgs | None = None) -> Any:
    args = args or BasePyTreeRestoreArgs()
    extra: dict[str, Any] = {'partial_restore': True} if args.partial_restore else {}
    return super().restore(directory, PyTreeRestore(item=args.item,
                                                    restore_args=args.restore_args, **extra))


_ACCEPTED_ORBAX_OPTIONS = frozenset({
    'memory_limit_options',
    'multiprocessing_options', 'type_handler_registry', 'enable_post_merge_validation',
    'pytree_metadata_options', 'array_metadata_validator', 'enable_pinned_host_transfer',
    'is_prioritized_key_fn'})


def _gigabytes(size: Any) -> Any:
  """A size in bytes as GiB; None and 'auto' as they are."""
  return size if size is None or isinstance(size, str) else size / 2**30


def _pytree_save(args: BasePyTreeSaveArgs) -> PyTreeSave:
  if args.partial_save_mode:
    raise NotImplementedError('BasePyTreeSaveArgs(partial_save_mode=True) (merging into an '
                              'existing checkpoint) is not supported.')
  return PyTreeSave(args.item, save_args=args.save_args,
                    ocdbt_target_data_file_size=args.ocdbt_target_data_file_size,
                    custom_metadata=args.custom_metadata)


@register_with_handler(BasePyTreeCheckpointHandler, for_save=True)
@dataclasses.dataclass(frozen=True)
class BasePyTreeSaveArgs(CheckpointArgs):
  """Save a pytree with ``BasePyTreeCheckpointHandler`` (fields as ``args.PyTreeSave``)."""
  item: Any
  save_args: Any = None
  ocdbt_target_data_file_size: int | None = None
  custom_metadata: Any = None
  partial_save_mode: bool = False


@register_with_handler(BasePyTreeCheckpointHandler, for_restore=True)
@dataclasses.dataclass(frozen=True)
class BasePyTreeRestoreArgs(CheckpointArgs):
  """Restore a pytree with ``BasePyTreeCheckpointHandler``.

  Attributes:
    item: target tree (concrete or abstract leaves), or None for the tree as stored.
    restore_args: a tree of ``RestoreArgs`` relative to the result tree.
    partial_restore: restore only the entries of ``item``.
  """
  item: Any = None
  restore_args: Any = None
  partial_restore: bool = False
