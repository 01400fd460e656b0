"""``flaxckpt convert``: flax msgpack files to Orbax PyTree checkpoints and back, streamed.

Neither direction holds the state in memory: a msgpack source is memory-mapped and saved in
batches (``save_concurrent_gb``), and an Orbax source is read one leaf at a time while the
msgpack file is written, so the peak is about one batch or the largest leaf.
"""

from __future__ import annotations

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
    CheckpointExistsError: ``destination`` exists (nothing is overwritten).
    ValueError: ``to`` is unknown, or ``source`` is already in that format.
  """
  if to not in TARGETS:
    raise ValueError(f'Unknown target format {to!r}; expected one of {", ".join(TARGETS)}.')
  target = _storage.as_path(destination)
  if _storage.exists(target):
    raise _errors.CheckpointExistsError(f'{target}: already exists; convert writes a new '
                                        'checkpoint and never overwrites one.')
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


def _write_msgpack(leaves: _leaf_source.LeafSource, target: pathlib.Path) -> None:
  """Streams the leaves into a temporary file beside ``target``, then renames it into place."""
  from flaxckpt.legacy import _msgpack, _sidecar
  state = _leaf_source.nest([(path, _msgpack.Deferred(lambda path=path: leaves.read(path)))
                             for path in leaves.paths])
  _storage.make_dirs(target.parent)
  partial = target.with_name(f'.{target.name}.partial')
  try:
    with _storage.open_for_write(partial) as file:
      summed = _sidecar.ChecksummingFile(file)
      _msgpack.write(summed, state)
    _storage.sync_tree(partial)
    _storage.rename(partial, target)
  finally:
    _storage.remove(partial)
  _sidecar.write(str(target), summed.checksum)
