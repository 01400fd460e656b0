"""``flaxckpt convert``: flax msgpack files to Orbax PyTree checkpoints and back, streamed.

Locally neither direction holds the state in memory: a msgpack source is memory-mapped and saved
in batches (``save_concurrent_gb``), and an Orbax source is read one leaf at a time while the
msgpack file is written, so the peak is about one batch or the largest leaf. Either side may be
a ``gs://``/``s3://`` URL: an Orbax checkpoint is then written in place and committed by its
``commit_success.txt`` (as Checkpointer does there); a msgpack object is read, and written, whole
(an object store takes an object in one request).
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable

from flaxckpt import _errors, _leaf_source, _metadata, _storage
from flaxckpt._args import StandardSave
from flaxckpt._checkpointer import Checkpointer
from flaxckpt._pytree_handler import StandardCheckpointHandler

TARGETS = ('orbax', 'msgpack')
BATCH_BYTES = 256 << 20  # Array bytes staged at once when writing an Orbax checkpoint.

# (array bytes converted so far, array bytes in all); None done while an Orbax checkpoint is
# being written, which reports no progress of its own.
Progress = Callable[[int | None, int], None]


def convert(source: _storage.PathLike, destination: _storage.PathLike, to: str,
            batch_bytes: int = BATCH_BYTES, progress: Progress | None = None) -> pathlib.Path:
  """Writes the checkpoint at ``source`` to ``destination`` in format ``to`` (``orbax``: a
  PyTree checkpoint directory Orbax restores; ``msgpack``: a flax checkpoint file).

  Raises:
    CheckpointExistsError: ``destination`` exists, a dangling link or, on an object store, an
      uncommitted save included (nothing is overwritten).
    UnsafeCheckpointError: something other than a stale temporary file of an earlier convert
      stands where the msgpack file is staged.
    ValueError: ``to`` is unknown, or ``source`` is already in that format.
  """
  if to not in TARGETS:
    raise ValueError(f'Unknown target format {to!r}; expected one of {", ".join(TARGETS)}.')
  target = _storage.as_path(destination)
  _refuse_existing(target)
  leaves = _leaf_source.LeafSource(source)
  wanted = 'flax-msgpack' if to == 'msgpack' else 'orbax-pytree'
  if leaves.format == wanted:
    raise ValueError(f'{leaves.path} is already a {wanted} checkpoint; nothing to convert.')
  if to == 'orbax':
    state = _leaf_source.nest([(path, leaves.read(path)) for path in leaves.paths])
    # Standard: numpy scalars stay numpy (0-d arrays), Python scalars stay Python.
    handler = StandardCheckpointHandler(save_concurrent_gb=batch_bytes / 2**30)
    total = sum(leaves.nbytes().values()) if progress else 0
    if progress:
      progress(None, total)
    Checkpointer(handler).save(target, args=StandardSave(state))
    if progress:
      progress(total, total)
  else:
    _write_msgpack(leaves, target, progress)
  return target


def _refuse_existing(target: pathlib.Path) -> None:
  if _storage.exists(target) or _storage.is_link(target):
    uncommitted = (_storage.is_dir(target) and not _storage.renames_atomically(target)
                   and not _storage.exists(target / _metadata.COMMIT_SUCCESS_FILE))
    what = (f'holds a save that never committed (no {_metadata.COMMIT_SUCCESS_FILE}); remove '
            'it, or pick another destination' if uncommitted else 'already exists')
    raise _errors.CheckpointExistsError(f'{target}: {what}; convert writes a new checkpoint '
                                        'and never overwrites one.')


def _write_msgpack(leaves: _leaf_source.LeafSource, target: pathlib.Path,
                   progress: Progress | None) -> None:
  """Streams the leaves into a new temporary file beside ``target``, then moves it into place
  (only if ``target`` is still free); on an object store, into memory, then one exclusive
  write of the object."""
  from flaxckpt.legacy import _msgpack, _sidecar
  read: Callable[[_leaf_source.KeyPath], object] = leaves.read
  if progress is not None:
    sizes = leaves.nbytes()
    total, done = sum(sizes.values()), [0]
    progress(0, total)

    def read(path: _leaf_source.KeyPath) -> object:
      value = leaves.read(path)
      done[0] += sizes[path]
      progress(done[0], total)
      return value

  state = _leaf_source.nest([(path, _msgpack.Deferred(functools.partial(read, path)))
                             for path in leaves.paths])
  if _storage.is_remote(target):
    _write_msgpack_object(state, target)
    return
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


def _write_msgpack_object(state: object, target: pathlib.Path) -> None:
  """Writes the msgpack object ``target`` (refused if an object appeared there meanwhile), then
  its checksum sidecar, as legacy ``save_checkpoint`` does on a bucket."""
  from flaxckpt.legacy import _sidecar
  data, checksum = _sidecar.encode(state)
  try:
    _storage.write_bytes(target, data, exclusive=True)
  except _errors.UnsafeCheckpointError:
    raise _errors.CheckpointExistsError(
        f'{target}: appeared while convert was writing; it was left as it is.') from None
  _sidecar.write(str(target), checksum)


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
