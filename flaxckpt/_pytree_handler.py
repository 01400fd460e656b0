"""PyTree checkpoints in Orbax's layout: the handlers users configure.

The work is in ``_save`` (tree -> files) and ``_restore`` (files -> tree); a handler holds the
storage options and picks the args classes.
"""

from __future__ import annotations

import pathlib
from typing import Any

from flaxckpt import _arrays, _multihost, _partial, _restore, _save, _storage
from flaxckpt._args import PyTreeRestore, PyTreeSave, StandardRestore, StandardSave
from flaxckpt._handler import AsyncCheckpointHandler, Writer, register_with_handler
from flaxckpt.metadata._read import read_tree_metadata
from flaxckpt.metadata.tree import TreeMetadata


class PyTreeCheckpointHandler(AsyncCheckpointHandler):
  """Saves and restores pytrees in Orbax's PyTree checkpoint format.

  Args:
    use_ocdbt: store arrays in one OCDBT database (Orbax's default) instead of a folder each.
    use_zarr3: write zarr v3 arrays instead of zarr v2.
    use_compression: zstd-compress chunks as Orbax does by default. Off by default: zstd halves
      the write speed of large states and float weights barely compress; OCDBT still compresses
      its index, where small leaves live.
    save_concurrent_gb: as Orbax, the most array data (GiB) a save stages at once: arrays are
      then written in successive batches, each committed before the next is staged (an array
      larger than the limit is a batch of its own). Unlimited by default (one batch is fastest).
    restore_concurrent_gb: the most data (GiB) a restore holds in host memory on its way to
      accelerators: leaves whose target sharding puts them on a GPU or TPU are read and placed
      in batches of half of it, each batch read while the one before is placed. 1 GiB by
      default; None reads everything first. Leaves restored to the CPU or as numpy are not
      batched (they are host memory once restored).
    save_device_host_concurrent_gb: the most data (GiB) of arrays on accelerators (GPU, TPU) a
      synchronous save holds in host memory: their device-to-host copies go in batches of half
      of it, each batch copied while the one before is written, so host memory stays near this
      budget whatever the size of the state. 1 GiB by default; None copies everything first
      (Orbax's default). Async saves copy every device array to host before ``save`` returns,
      whatever this says: the caller may donate or delete its arrays as soon as it has control
      back. Arrays on the CPU are written from their own memory and count for nothing.

  Example:
    >>> ckptr = flaxckpt.Checkpointer(flaxckpt.PyTreeCheckpointHandler())
    >>> ckptr.save(path, args=flaxckpt.args.PyTreeSave({'w': np.ones(3)}))
  """

  typestr = 'orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler'
  _numpy_scalars_as_arrays = False

  def __init__(self, *, use_ocdbt: bool = True, use_zarr3: bool = False,
               use_compression: bool = False, save_concurrent_gb: float | None = None,
               restore_concurrent_gb: float | None = 1.0,
               save_device_host_concurrent_gb: float | str | None = 1.0):
    self._restore_budget = _device_host_budget(restore_concurrent_gb, 'restore_concurrent_gb')
    self._options = _arrays.StorageOptions(
        use_ocdbt=use_ocdbt, use_zarr3=use_zarr3, use_compression=use_compression,
        max_bytes_in_flight=None if save_concurrent_gb is None
        else max(1, int(save_concurrent_gb * 2**30)),
        device_host_budget=_device_host_budget(save_device_host_concurrent_gb,
                                               'save_device_host_concurrent_gb'))

  def save(self, directory: pathlib.Path, args: PyTreeSave) -> None:
    self._prepare(directory, args, copy=False).write()

  def async_save(self, directory: pathlib.Path, args: PyTreeSave) -> Writer:
    return self._prepare(directory, args, copy=True).write

  def _prepare(self, directory: pathlib.Path, args: PyTreeSave | StandardSave,
               copy: bool) -> _save.Prepared:
    # In a multi-process save each process writes its own shards into its own database; the
    # primary alone writes metadata and host (non-jax) values, and merges at finalize.
    primary, single = _multihost.is_primary(), _multihost.process_count() == 1
    options = self._options._replace(process_index=_multihost.process_index(),
                                     writes_metadata=primary, merge_into_root=single)
    return _save.prepare(_storage.as_path(directory), args, options, copy,
                         self._numpy_scalars_as_arrays)

  def finalize(self, directory: pathlib.Path) -> None:
    """Merges every process's OCDBT database into the root one (multi-process saves only: a
    single process merges its own while writing)."""
    if self._options.use_ocdbt and _multihost.process_count() > 1:
      _arrays.merge_all_process_databases(_storage.as_path(directory),
                                          self._options.use_compression)

  def restore(self, directory: pathlib.Path, args: PyTreeRestore | None = None) -> Any:
    """Restores the tree at ``directory`` as ``args`` asks: the whole tree, the part a target
    holds (``PLACEHOLDER`` leaves left unread, ``partial_restore=True`` keeping target values
    for keys the checkpoint lacks), or a transformed tree (``transforms``,
    ``legacy_transform_fn``)."""
    with _restore.device_host_budget(self._restore_budget):
      return _partial.restore(_storage.as_path(directory), args or PyTreeRestore())

  def metadata(self, directory: pathlib.Path) -> TreeMetadata:
    """The saved tree's metadata, read without any array data: a ``TreeMetadata`` shaped like
    the saved tree whose leaves are ``ArrayMetadata`` (shape, dtype, saved sharding),
    ``ScalarMetadata`` and ``StringMetadata``, with the save's ``custom_metadata``.

    Example:
      >>> meta = handler.metadata(path)
      >>> target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta.tree)
    """
    return read_tree_metadata(_storage.as_path(directory))


class StandardCheckpointHandler(PyTreeCheckpointHandler):
  """The handler for ``StandardSave``/``StandardRestore``: arrays, scalars and strings.

  Same files as ``PyTreeCheckpointHandler``; numpy scalars are stored as 0-d arrays, and a target
  given to ``StandardRestore`` fixes each array's shape (``strict=False`` pads or truncates).
  """

  typestr = ('orbax.checkpoint._src.handlers.standard_checkpoint_handler.'
             'StandardCheckpointHandler')
  _numpy_scalars_as_arrays = True

  def restore(self, directory: pathlib.Path, args: Any = None) -> Any:
    """Restores with ``StandardRestore`` args (None: the tree as stored)."""
    args = args or StandardRestore()
    return super().restore(directory, PyTreeRestore(item=args.item, strict=args.strict,
                                                    verify_checksums=args.verify_checksums))


def _device_host_budget(gigabytes: float | str | None, keyword: str) -> int | None:
  """Bytes from a budget in GiB (Orbax's 'auto': our default)."""
  if gigabytes == 'auto':
    return _arrays.DEFAULT_DEVICE_HOST_BUDGET
  if gigabytes is None:
    return None
  if isinstance(gigabytes, bool) or not isinstance(gigabytes, (int, float)) or gigabytes <= 0:
    raise ValueError(f'{keyword} must be a number of GiB > 0, None (no limit) or "auto", got '
                     f'{gigabytes!r}.')
  return max(1, int(gigabytes * 2**30))


register_with_handler(PyTreeCheckpointHandler, for_save=True)(PyTreeSave)
register_with_handler(PyTreeCheckpointHandler, for_restore=True)(PyTreeRestore)
register_with_handler(StandardCheckpointHandler, for_save=True)(StandardSave)
register_with_handler(StandardCheckpointHandler, for_restore=True)(StandardRestore)
