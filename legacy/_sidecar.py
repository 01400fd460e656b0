"""crc32c sidecars of flax msgpack checkpoint files.

flax's msgpack format has no checksum, so a flipped byte inside array data restores as a wrong
value. Beside each msgpack file flaxckpt writes, it keeps ``.<name>.crc32c``: JSON
``{"algorithm": "crc32c", "size": N, "crc32c": X, ...}`` of the whole file. The leading dot
keeps it out of flax's listing (names matching ``<prefix>*``); where that pattern would still
match it (prefix ``''``) none is written.

``inode``, ``mtime_ns`` and (where Linux gives it) ``birth_ns`` say which file the checksum
describes: those of the file as its writer closed it, which a rename or hard link into place
keeps; ``sidecar_inode`` and ``sidecar_birth_ns`` are the sidecar's own. While the sidecar is
the one its writer made, a file with another identity is a new file (flax's own
``save_checkpoint`` writes a new file and renames it over ours): the sidecar describes a file
that is gone and is skipped. Damage to the file itself, in place, is still caught: with birth
times whatever it does to the mtime, without them when it keeps the mtime. In a copied folder
(new inodes throughout) every file is checked. Sidecars without these fields are checked as
before. A sidecar is written through a temporary name of its writer's
own (created exclusively, fsynced) and a rename.

On an object store a sidecar is one object written after its checkpoint, with the size and
crc32c only: objects have no inode or birth time, so every object with a sidecar is checked (a
program that rewrites the checkpoint object must delete the sidecar too), as in a copied folder.
"""

from __future__ import annotations

import contextlib
import io
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
  """Which file a checksum describes: kept by renames and hard links, changed by a rewrite.

  With a birth time (Linux ``statx``), the file is the same while its inode and birth time are:
  damage written into it in place, whatever it does to the mtime, is still checked. Without one,
  inode and mtime stand for it, and a rewrite in place reads as another file."""
  inode: int
  mtime_ns: int
  birth_ns: int | None = None

  @classmethod
  def of(cls, info: os.stat_result, birth_ns: int | None = None) -> Identity:
    return cls(info.st_ino, info.st_mtime_ns, birth_ns)

  @classmethod
  def of_fd(cls, fd: int) -> Identity:
    return cls.of(os.fstat(fd), _storage.birth_time_ns(fd))

  @classmethod
  def of_path(cls, path: str) -> Identity:
    return cls.of(os.stat(path), _storage.birth_time_ns(path))

  def same_file(self, other: Identity) -> bool:
    if self.birth_ns is not None and other.birth_ns is not None:
      return (self.inode, self.birth_ns) == (other.inode, other.birth_ns)
    return (self.inode, self.mtime_ns) == (other.inode, other.mtime_ns)


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


def encode(state: Any) -> tuple[bytes, Checksum]:
  """``state`` as the bytes of a flax msgpack file, with their size and crc32c: for an
  object, which is written whole."""
  from flaxckpt.legacy import _msgpack
  buffer = io.BytesIO()
  summed = ChecksummingFile(buffer)
  _msgpack.write(summed, state)
  return buffer.getvalue(), summed.checksum


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
  path = _path(ckpt_path)
  if _storage.is_remote(path):  # One object, whole once written; nothing to identify it by.
    _storage.write_bytes(path, json.dumps({'algorithm': _checksums.ALGORITHM,
                                           'size': checksum.size,
                                           'crc32c': checksum.crc32c}).encode())
    return
  if identity is None:
    identity = Identity.of_path(ckpt_path)
  tmp = path.with_name(f'{path.name}.tmp-{secrets.token_hex(6)}')
  try:
    with _storage.open_for_write(tmp, exclusive=True) as file:
      own = Identity.of_fd(file.fileno())  # A rename keeps it; a copy of the folder does not.
      file.write(json.dumps({
          'algorithm': _checksums.ALGORITHM, 'size': checksum.size, 'crc32c': checksum.crc32c,
          **_identity_fields(identity, ''), **_identity_fields(own, 'sidecar_')}).encode())
      file.flush()
      os.fsync(file.fileno())
    _storage.rename(tmp, path)
  except BaseException:
    _storage.remove(tmp)
    raise


def _identity_fields(identity: Identity, prefix: str) -> dict[str, int]:
  fields = {f'{prefix}inode': identity.inode}
  if not prefix:
    fields['mtime_ns'] = identity.mtime_ns
  if identity.birth_ns is not None:
    fields[f'{prefix}birth_ns'] = identity.birth_ns
  return fields


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
    elif temporary and not _storage.is_remote(root):  # None are written on object stores.
      with contextlib.suppress(FileNotFoundError):
        if time.time() - os.lstat(root / name).st_mtime > STALE_TMP_SECONDS:
          logger.info('Removing %s, left by a writer that stopped.', name)
          _storage.remove(root / name)


def _read(path: pathlib.Path, ckpt_path: str) -> dict[str, Any] | None:
  """The parsed sidecar at ``path``, or None when there is none (written by flax, or by a save
  that stopped before its sidecar)."""
  if not _storage.is_remote(path):  # Object stores hold neither links nor special files.
    try:
      info = os.lstat(path)
    except FileNotFoundError:
      return None
    if not stat.S_ISREG(info.st_mode):
      kind = 'a symbolic link' if stat.S_ISLNK(info.st_mode) else 'not a regular file'
      raise _errors.UnsafeCheckpointError(
          f'{path}: the checksum file of {ckpt_path} is {kind}; flaxckpt writes checksum '
          'files as regular files. Delete it, or restore with verify_checksums=False, to read '
          'the checkpoint unchecked.')
  try:
    data = _storage.read_bytes(path, MAX_SIDECAR_BYTES)
    recorded = _safe_json.loads(data, str(path))
    if not isinstance(recorded, dict):
      raise TypeError(f'it holds a {type(recorded).__name__}, not an object')
    return recorded
  except FileNotFoundError:
    return None
  except (_errors.LimitExceededError, ValueError, TypeError) as e:
    raise ChecksumMismatchError(
        f'{path}: the checksum file of {ckpt_path} is damaged ({type(e).__name__}: {e}). '
        'Delete it, or restore with verify_checksums=False, to read the checkpoint unchecked.'
    ) from e


_IDENTITY_KEYS = ('inode', 'mtime_ns', 'birth_ns', 'sidecar_inode', 'sidecar_birth_ns')


def _stayed(path: pathlib.Path, identities: dict[str, int | None]) -> bool:
  """Whether the sidecar at ``path`` is the file its writer made, not a copy: only then do the
  inodes it records describe files of this folder. A checkpoint folder copied elsewhere (cp,
  rsync, a download) has new inodes throughout; its files are then always checked."""
  inode, birth = identities['sidecar_inode'], identities['sidecar_birth_ns']
  if inode is None or _storage.is_remote(path):  # Uploaded from a disk: a copy.
    return False
  return Identity(inode, 0, birth).same_file(Identity.of_path(os.fspath(path))._replace(mtime_ns=0))


def verify(ckpt_path: str, data: np.ndarray | bytes, info: os.stat_result | None = None
           ) -> None:
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
  identities = {key: recorded.get(key) for key in _IDENTITY_KEYS}
  if (type(size) is not int or type(crc) is not int
      or any(value is not None and type(value) is not int for value in identities.values())):
    raise ChecksumMismatchError(
        f'{path}: the checksum file of {ckpt_path} is damaged (size {size!r}, crc32c {crc!r} '
        f'and the file identities {identities} must be integers). Delete it, or restore with '
        'verify_checksums=False, to read the checkpoint unchecked.')
  inode, mtime_ns = identities['inode'], identities['mtime_ns']
  if inode is not None and mtime_ns is not None and _stayed(path, identities):
    written = Identity(inode, mtime_ns, identities['birth_ns'])
    current = Identity.of(info if info is not None else os.stat(ckpt_path),
                          _storage.birth_time_ns(ckpt_path))
    if not written.same_file(current):
      logger.debug('Not checking %s against %s: the checksum was taken of another file (%s; '
                   'the file there now is %s): another program, such as flax, replaced it.',
                   ckpt_path, path, written, current)
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
