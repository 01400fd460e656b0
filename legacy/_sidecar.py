"""crc32c sidecars of flax msgpack checkpoint files.

flax's msgpack format has no checksum, so a flipped byte inside array data restores as a wrong
value. Beside each msgpack file flaxckpt writes, it keeps ``.<name>.crc32c``: JSON
``{"algorithm": "crc32c", "size": N, "crc32c": X, "inode": I, "mtime_ns": T}`` of the whole
file. The leading dot keeps it out of flax's listing (names matching ``<prefix>*``); where that
pattern would still match it (prefix ``''``) none is written.

``inode`` and ``mtime_ns`` say which file the checksum describes: those of the file as its
writer closed it, which a rename or hard link into place keeps. A sidecar whose file has another
inode or mtime now describes a file that is gone (flax's own ``save_checkpoint`` replaced it, or
a crash fell between a commit and its sidecar) and is skipped; damage to the file itself (bytes
changed or cut off with the mtime kept) still raises. Sidecars written before these two fields
existed are checked as before. A sidecar is written through a temporary name of its writer's
own (created exclusively, fsynced) and a rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import secrets
import stat
import time
from typing import IO, Any, NamedTuple

import crc32c
import numpy as np

from flaxckpt import _checksums, _errors, _safe_json, _storage
from flaxckpt._errors import ChecksumMismatchError

SUFFIX = '.crc32c'
_TMP_SUFFIX = SUFFIX + '.tmp'
MAX_SIDECAR_BYTES = 1 << 12  # A sidecar is one small JSON object; anything larger is not one.
STALE_TMP_SECONDS = 3600  # A temporary sidecar is written and renamed in well under a second.

logger = logging.getLogger('flaxckpt.legacy.checkpoints')


class Checksum(NamedTuple):
  size: int
  crc32c: int


class Identity(NamedTuple):
  """Which file a checksum describes: kept by renames and hard links, changed by a rewrite."""
  inode: int
  mtime_ns: int

  @classmethod
  def of(cls, info: os.stat_result) -> Identity:
    return cls(info.st_ino, info.st_mtime_ns)


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


def write(ckpt_path: str, checksum: Checksum, identity: Identity | None = None) -> None:
  """Writes the sidecar of ``ckpt_path``. ``identity``: of the file the checksum was taken
  from, as its writer closed it; by default that of the file now at ``ckpt_path``, for a
  caller that is sure no other writer replaced it."""
  if identity is None:
    identity = Identity.of(os.stat(ckpt_path))
  path = _path(ckpt_path)
  tmp = path.with_name(f'{path.name}.tmp-{secrets.token_hex(6)}')
  text = json.dumps({'algorithm': _checksums.ALGORITHM, 'size': checksum.size,
                     'crc32c': checksum.crc32c, 'inode': identity.inode,
                     'mtime_ns': identity.mtime_ns})
  try:
    _storage.write_bytes(tmp, text.encode('utf-8'), sync=True, exclusive=True)
    _storage.rename(tmp, path)
  except BaseException:
    _storage.remove(tmp)
    raise


def remove(ckpt_path: str) -> None:
  """Removes the sidecar of ``ckpt_path`` (a link standing there itself, never its target)."""
  _storage.remove(_path(ckpt_path))


def _checkpoint_of(name: str) -> tuple[str, bool] | None:
  """(checkpoint name, whether temporary) of a sidecar's file name, or None for other names."""
  if not name.startswith('.'):
    return None
  if name.endswith(SUFFIX):
    return name[1:-len(SUFFIX)], False
  at = name.rfind(_TMP_SUFFIX)
  if at > 0 and (name.endswith(_TMP_SUFFIX) or name[at + len(_TMP_SUFFIX)] == '-'):
    return name[1:at], True
  return None


def remove_orphans(directory: str, prefix: str) -> None:
  """Deletes sidecars whose checkpoint file is gone, and temporary sidecars whose checkpoint is
  gone or that no writer has touched for ``STALE_TMP_SECONDS`` (a writer killed mid-write)."""
  root = _storage.as_path(directory)
  names = set(_storage.list_names(root)) if _storage.is_dir(root) else set()
  for name in names:
    found = _checkpoint_of(name)
    if found is None or not found[0].startswith(prefix):
      continue
    checkpoint, temporary = found
    if checkpoint not in names:
      logger.info('Removing checksum file %s: its checkpoint is gone.', name)
      _storage.remove(root / name)
    elif temporary:
      with contextlib.suppress(FileNotFoundError):
        if time.time() - os.lstat(root / name).st_mtime > STALE_TMP_SECONDS:
          logger.info('Removing %s, left by a writer that stopped.', name)
          _storage.remove(root / name)


def _read(path: pathlib.Path, ckpt_path: str) -> dict[str, Any] | None:
  """The parsed sidecar at ``path``, or None when there is none."""
  try:
    info = os.lstat(path)
  except FileNotFoundError:
    return None  # Written by flax, or a save that stopped before its sidecar.
  if not stat.S_ISREG(info.st_mode):
    kind = 'a symbolic link' if stat.S_ISLNK(info.st_mode) else 'not a regular file'
    raise _errors.UnsafeCheckpointError(
        f'{path}: the checksum file of {ckpt_path} is {kind}; flaxckpt writes checksum files '
        'as regular files. Delete it, or restore with verify_checksums=False, to read the '
        'checkpoint unchecked.')
  try:
    data = _storage.read_bytes(path, MAX_SIDECAR_BYTES)
    recorded = _safe_json.loads(data, str(path))
    if not isinstance(recorded, dict):
      raise TypeError(f'it holds a {type(recorded).__name__}, not an object')
    return recorded
  except (_errors.LimitExceededError, ValueError, TypeError) as e:
    raise ChecksumMismatchError(
        f'{path}: the checksum file of {ckpt_path} is damaged ({type(e).__name__}: {e}). '
        'Delete it, or restore with verify_checksums=False, to read the checkpoint unchecked.'
    ) from e


def verify(ckpt_path: str, data: np.ndarray, info: os.stat_result | None = None) -> None:
  """Checks ``data`` (the whole file at ``ckpt_path``) against its sidecar, if it has one.

  ``info``: the stat of the file ``data`` was read from (by default, of ``ckpt_path`` now).
  A sidecar that records another inode or mtime describes a file that is no longer there and
  is skipped.

  Raises:
    ChecksumMismatchError: the size or crc32c differ, or the sidecar is unreadable.
    UnsafeCheckpointError: the sidecar is a link or not a regular file.
  """
  path = _path(ckpt_path)
  recorded = _read(path, ckpt_path)
  if recorded is None or recorded.get('algorithm') != _checksums.ALGORITHM:
    return  # None, or another algorithm from a later release: nothing this one can check.
  size, crc = recorded.get('size'), recorded.get('crc32c')
  inode, mtime_ns = recorded.get('inode'), recorded.get('mtime_ns')
  if (type(size) is not int or type(crc) is not int
      or any(value is not None and type(value) is not int for value in (inode, mtime_ns))):
    raise ChecksumMismatchError(
        f'{path}: the checksum file of {ckpt_path} is damaged (size {size!r}, crc32c {crc!r}, '
        f'inode {inode!r} and mtime_ns {mtime_ns!r} are not all integers). Delete it, or '
        'restore with verify_checksums=False, to read the checkpoint unchecked.')
  if inode is not None or mtime_ns is not None:
    current = Identity.of(info if info is not None else os.stat(ckpt_path))
    if current != (inode, mtime_ns):
      logger.debug('Not checking %s against %s: the checksum was taken of the file with inode '
                   '%s and mtime_ns %s, and the file there now has inode %s and mtime_ns %s '
                   '(another program, such as flax, rewrote it).', ckpt_path, path, inode,
                   mtime_ns, current.inode, current.mtime_ns)
      return
  advice = ('The checkpoint is damaged. (If another program, such as flax\'s own '
            f'save_checkpoint, rewrote it after flaxckpt saved it, delete {path}.)')
  if len(data) != size:
    raise ChecksumMismatchError(f'{ckpt_path} has {len(data)} bytes, but {size} were written '
                                f'when it was saved (recorded in {path}). {advice}')
  actual = _checksums.of_bytes(data)
  if actual != crc:
    raise ChecksumMismatchError(f'{ckpt_path} has crc32c {actual:#010x}, but {crc:#010x} was '
                                f'recorded when it was saved (in {path}). {advice}')
