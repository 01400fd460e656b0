"""``flaxckpt convert``: flax msgpack files to Orbax PyTree checkpoints and back, streamed.

Neither direction holds the state in memory: a msgpack source is memory-mapped and saved in
batches (``save_concurrent_gb``), and an Orbax source is read one leaf at a time while the
msgpack file is written, so the peak is about one batch or the largest leaf.
"""

from __future__ import annotations

import functools
import os
import pathlib

from flaxckpt import _errors, _leaf_source, _storage
from flaxckpt._args import StandardSave
from flaxckpt._checkpointer import Checkpointer
from flaxckpt._pytree_handler import StandardCheckpointHandler

TARGETS = ('orbax', 'msgpack')
BATCH_BYTES = 256 << 20  # Array bytes staged at once when writing an Orbax checkpoint.


def convert(source: _storage.PathLike, destination: _storage.PathLike, to: str,
            batch_bytes: int = BATCH_BYTES) -> pathlib.Path:
  """Writes the checkpoint at ``source`` to ``destination`` in format ``to`` (``orbax``: a
  PyTree checkpoint directory Orbax restores; ``msgpack``: a flax checkpoint file).

  Raises:
    CheckpointExistsError: ``destination`` exists, a dangling link included (nothing is
      overwritten).
    UnsafeCheckpointError: something other than a stale temporary file of an earlier convert
      stands where the msgpack file is staged.
    ValueError: ``to`` is unknown, or ``source`` is already in that format.
  """
  if to not in TARGETS:
    raise ValueError(f'Unknown target format {to!r}; expected one of {", ".join(TARGETS)}.')
  target = _storage.as_local_path(destination)
  _refuse_existing(target)
  leaves = _leaf_source.LeafSource(source)
  wanted = 'flax-msgpack' if to == 'msgpack' else 'orbax-pytree'
  if leaves.format == wanted:
    raise ValueError(f'{leaves.path} is already a {wanted} checkpoint; nothing to convert.')
  if to == 'orbax':
    state = _leaf_source.nest([(path, leaves.read(path)) for path in leaves.paths])
    # Standard: numpy scalars stay numpy (0-d arrays), Python scalars stay Python.
    handler = StandardCheckpointHandler(save_concurrent_gb=batch_bytes / 2**30)
    Checkpointer(handler).save(target, args=StandardSave(state))
  else:
    _write_msgpack(leaves, target)
  return target


def _refuse_existing(target: pathlib.Path) -> None:
  if _storage.exists(target) or target.is_symlink():
    raise _errors.CheckpointExistsError(f'{target}: already exists; convert writes a new '
                                        'checkpoint and never overwrites one.')


def _write_msgpack(leaves: _leaf_source.LeafSource, target: pathlib.Path) -> None:
  """Streams the leaves into a new temporary file beside ``target``, then moves it into place
  (only if ``target`` is still free)."""
  from flaxckpt.legacy import _msgpack, _sidecar
  state = _leaf_source.nest([(path, _msgpack.Deferred(functools.partial(leaves.read, path)))
                             for path in leaves.paths])
  _storage.make_dirs(target.parent)
  partial = target.with_name(f'.{target.name}.partial')
  _remove_stale_partial(partial)
  file = _storage.open_for_write(partial, exclusive=True)  # Never into what another put there.
  try:
    with file:
      summed = _sidecar.ChecksummingFile(file)
      _msgpack.write(summed, state)
      file.flush()
      os.fsync(file.fileno())  # (_storage.sync_tree walks directories only.)
    _move_into_place(partial, target)
  finally:
    _storage.remove_tree(partial)  # Ours (created above); gone already when moved.
  _sidecar.write(str(target), summed.checksum)


def _remove_stale_partial(partial: pathlib.Path) -> None:
  """Removes what a killed convert left at ``partial`` (a file; a link is removed itself, not
  its target); refuses anything else standing there."""
  if partial.is_symlink() or _storage.is_file(partial):
    _storage.remove_tree(partial)
  elif _storage.exists(partial):
    raise _errors.UnsafeCheckpointError(
        f'{partial}: expected nothing, or a file left by an earlier convert, where convert '
        'stages its output; found a directory or special file. Remove it and run again.')


def _move_into_place(partial: pathlib.Path, target: pathlib.Path) -> None:
  """Renames ``partial`` to ``target`` unless something appeared at ``target`` meanwhile: a hard
  link fails if ``target`` exists (a rename would replace it), where the filesystem has them."""
  try:
    os.link(partial, target, follow_symlinks=False)
  except FileExistsError:
    raise _errors.CheckpointExistsError(
        f'{target}: appeared while convert was writing; it was left as it is.') from None
  except OSError:  # No hard links here: check, then rename (a narrow window remains).
    _refuse_existing(target)
    _storage.rename(partial, target)
    return
  _storage.remove(partial)
  # Renaming a file to its own name changes nothing; _storage.rename then fsyncs the directory,
  # which makes the new name durable.
  _storage.rename(target, target)
