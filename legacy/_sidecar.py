"""crc32c sidecars of flax msgpack checkpoint files.

flax's msgpack format has no checksum, so a flipped byte inside array data restores as a wrong
value. Beside each msgpack file flaxckpt writes, it keeps ``.<name>.crc32c``: JSON
``{"algorithm": "crc32c", "size": N, "crc32c": X}`` of the whole file. The leading dot keeps it
out of flax's listing (names matching ``<prefix>*``); where that pattern would still match it
(prefix ``''``) none is written. Commit order: remove the old sidecar, rename the file into
place, write the new sidecar (fsynced, through a temporary name). A crash leaves no sidecar (the
file restores unchecked, like one flax wrote) or the right one, never one beside another file.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import IO, Any, NamedTuple

import crc32c
import numpy as np

from flaxckpt import _checksums, _storage
from flaxckpt._errors import ChecksumMismatchError

SUFFIX = '.crc32c'
_TMP_SUFFIX = SUFFIX + '.tmp'

logger = logging.getLogger('flaxckpt.legacy.checkpoints')


class Checksum(NamedTuple):
  size: int
  crc32c: int


class ChecksummingFile:
  """Passes writes on to ``file`` and keeps the size and crc32c of everything written."""

  def __init__(self, file: IO[bytes]):
    self._file = file
    self._size = 0
    self._crc = 0

  def write(self, data: Any) -> int:
    self._crc = crc32c.crc32c(data, self._crc)
    self._size += memoryview(data).nbytes
    return self._file.write(data)

  @property
  def checksum(self) -> Checksum:
    return Checksum(self._size, self._crc)


def _path(ckpt_path: str) -> pathlib.Path:
  directory, name = os.path.split(ckpt_path)
  return _storage.as_path(os.path.join(directory, f'.{name}{SUFFIX}'))


def fits_prefix(prefix: str) -> bool:
  """Whether flax's listing (``PurePath(name).match(prefix + '*')``) passes over sidecars of
  checkpoints named ``<prefix><step>``."""
  return not pathlib.PurePath(f'.{prefix}0{SUFFIX}').match(f'{prefix}*')


def write(ckpt_path: str, checksum: Checksum) -> None:
  path = _path(ckpt_path)
  tmp = path.with_name(path.name + '.tmp')
  _storage.write_text(tmp, json.dumps({'algorithm': _checksums.ALGORITHM, 'size': checksum.size,
                                       'crc32c': checksum.crc32c}), sync=True)
  _storage.rename(tmp, path)


def remove(ckpt_path: str) -> None:
  path = _path(ckpt_path)
  _storage.remove(path.with_name(path.name + '.tmp'))
  _storage.remove(path)


def remove_orphans(directory: str, prefix: str) -> None:
  """Deletes sidecars (and their temporary names) whose checkpoint file is gone."""
  root = _storage.as_path(directory)
  names = set(_storage.list_names(root)) if _storage.is_dir(root) else set()
  for name in names:
    if name.startswith(f'.{prefix}'):
      for suffix in (SUFFIX, _TMP_SUFFIX):
        if name.endswith(suffix) and name[1:-len(suffix)] not in names:
          logger.info('Removing checksum file %s: its checkpoint is gone.', name)
          _storage.remove(root / name)


def verify(ckpt_path: str, data: np.ndarray) -> None:
  """Checks ``data`` (the whole file at ``ckpt_path``) against its sidecar, if it has one.

  Raises:
    ChecksumMismatchError: the size or crc32c differ, or the sidecar is unreadable.
  """
  path = _path(ckpt_path)
  try:
    text = _storage.read_bytes(path)
  except FileNotFoundError:
    return  # Written by flax, or a save that stopped before its sidecar: nothing to check.
  try:
    recorded = json.loads(text)  # Bytes: not UTF-8 is a ValueError like any other damage.
    if recorded.get('algorithm') != _checksums.ALGORITHM:
      return  # Another algorithm, from a later release: nothing this one can check.
    size, crc = recorded['size'], recorded['crc32c']
    if type(size) is not int or type(crc) is not int:
      raise TypeError(f'size {size!r} and crc32c {crc!r} are not integers')
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ChecksumMismatchError(
        f'{path}: the checksum file of {ckpt_path} is damaged ({type(e).__name__}: {e}). '
        'Delete it, or restore with verify_checksums=False, to read the checkpoint unchecked.'
    ) from e
  advice = ('The checkpoint is damaged. (If another program, such as flax\'s own '
            f'save_checkpoint, rewrote it after flaxckpt saved it, delete {path}.)')
  if len(data) != size:
    raise ChecksumMismatchError(f'{ckpt_path} has {len(data)} bytes, but {size} were written '
                                f'when it was saved (recorded in {path}). {advice}')
  actual = _checksums.of_bytes(data)
  if actual != crc:
    raise ChecksumMismatchError(f'{ckpt_path} has crc32c {actual:#010x}, but {crc:#010x} was '
                                f'recorded when it was saved (in {path}). {advice}')
