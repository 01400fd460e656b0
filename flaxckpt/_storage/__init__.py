"""The one place that touches storage.

Handlers and checkpointers call these functions instead of ``os``/``shutil``, so that a
backend only has to be added here. Two stand behind the same functions: local paths
(``pathlib.Path``), and ``gs://``/``s3://`` objects through tensorstore's kvstores
(``_remote.RemotePath``, made by ``as_storage_path``). ``exists``, ``is_dir``, ``is_file``,
``is_link``, ``list_names``, ``read_bytes``, ``read_text``, ``write_bytes``, ``write_text``,
``make_dirs``, ``remove``, ``remove_tree``, ``kvstore_spec``, ``context_resources``,
``ocdbt_data_file_size``, ``read_part_sizes``, ``read_into_buffer``, ``map_readonly``,
``copy_tree`` (from a bucket) and ``renames_atomically`` accept either; the rest are local
only. ``as_path`` takes URLs; ``as_local_path`` refuses them, for what is local
by nature (locks, snapshots). Settings a program gives for buckets (``flaxckpt.object_store``)
live in ``_settings``.

Everything a checkpoint holds is untrusted (docs/security.md), so this module is also where
that is enforced: names read from files become paths only through ``check_name``; reads open
regular files only, of bounded size (``open_regular``); ``check_tree`` refuses what tensorstore
must never be handed; writes never follow a link, and temporaries are created exclusively and
locked while their writer lives (``make_new_locked_dir``, ``remove_if_abandoned``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import pathlib
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from flaxckpt import _errors
from flaxckpt._storage import _remote
from flaxckpt._storage._remote import RemotePath

PathLike = str | os.PathLike
StoragePath = pathlib.Path | RemotePath

# The largest file read whole into memory as metadata (JSON side files, checksum files, msgpack
# sidecars). _METADATA of a million leaves is about 300 MB; anything larger is not metadata, and a
# sparse file declaring terabytes must not be allocated.
MAX_METADATA_FILE_BYTES = 1 << 30

_READ_SLICE_BYTES = 64 << 20
_READ_THREADS = 4
_SYNC_THREADS = 8
_SCHEMES = ('gs://', 's3://', 'http://', 'https://')


def as_path(path: PathLike) -> pathlib.Path:
  """An absolute local path, or a ``RemotePath`` for a ``gs://``/``s3://`` URL (typed as a
  ``pathlib.Path``: a ``RemotePath`` answers the part of its interface the storage functions
  and the checkpointers use).

  Raises:
    NotImplementedError: an ``http(s)://`` URL.
  """
  if isinstance(path, RemotePath):
    return path  # type: ignore[return-value]
  text = os.fspath(path)
  if text.startswith(('gs://', 's3://')):
    return RemotePath.parse(text)  # type: ignore[return-value]
  return as_local_path(text)


def as_local_path(path: PathLike) -> pathlib.Path:
  """An absolute local path, for what only a local disk can hold (locks, a local snapshot
  folder); refuses URLs with a clear message."""
  text = os.fspath(path)
  if text.startswith(('http://', 'https://')):
    raise NotImplementedError(
        f'{text}: http(s) URLs are not supported; checkpoints live on a local disk, gs:// or '
        's3://.')
  if text.startswith(_SCHEMES):
    raise NotImplementedError(
        f'{text}: this needs a local path (it holds local files or locks); gs:// and s3:// '
        'URLs are not supported here.')
  return pathlib.Path(os.path.abspath(text))


def as_storage_path(path: PathLike | RemotePath) -> StoragePath:
  """A ``RemotePath`` for ``gs://`` and ``s3://`` URLs, else an absolute local path.

  Raises:
    NotImplementedError: an ``http(s)://`` URL.
    ValueError: a malformed ``gs://``/``s3://`` URL (see ``RemotePath``).
  """
  if isinstance(path, RemotePath):
    return path
  text = os.fspath(path)
  if text.startswith(('gs://', 's3://')):
    return RemotePath.parse(text)
  return as_path(text)


def is_remote(path: StoragePath) -> bool:
  """Whether ``path`` is on an object store: no directories, locks, links, fsyncs or
  permission bits there, and nothing to open by descriptor."""
  return isinstance(path, RemotePath)


def renames_atomically(path: StoragePath) -> bool:
  """Whether a directory renamed to ``path`` appears whole or not at all.

  True for local filesystems. Object stores (``gs://``, ``s3://``) answer False: there a
  checkpoint is written in place and counts as committed only once its ``commit_success.txt``
  exists, which the primary process writes last.
  """
  return not isinstance(path, RemotePath)


def check_name(name: str, what: str) -> str:
  """Returns ``name``, a relative name read from a checkpoint file or given by a caller, after
  refusing any that could lead outside the directory it is joined to: empty, absolute,
  with a '..' component, a NUL, a backslash or a drive letter.

  Raises:
    UnsafeCheckpointError: naming ``what`` (where the name came from) and the name.
  """
  problem = None
  if not isinstance(name, str) or not name:
    problem = 'it is empty' if name == '' else f'it is a {type(name).__name__}, not a string'
  elif '\x00' in name:
    problem = 'it contains a NUL character'
  elif '\\' in name:
    problem = 'it contains a backslash'
  elif name.startswith('/') or (len(name) > 1 and name[1] == ':' and name[0].isalpha()):
    problem = 'it is an absolute path'
  elif any(part == '..' for part in name.split('/')):
    problem = "it has a '..' component"
  if problem is not None:
    raise _errors.UnsafeCheckpointError(
        f'{what}: refusing the name {name!r}: {problem}, so it could lead outside the '
        'checkpoint. Names stored in a checkpoint are relative paths below it.')
  return name


def check_entry_name(name: Any, argument: str) -> str:
  """Returns ``name``, given by a caller as the name of one directory entry (an item, a step
  prefix), after refusing any that is not exactly one entry of its directory: empty, '.', '..',
  or holding '/', a backslash or a NUL.

  Raises:
    ValueError: naming ``argument`` and the name.
  """
  if (not isinstance(name, str) or name in ('', '.', '..')
      or any(c in name for c in ('/', '\\', '\x00'))):
    raise ValueError(
        f'{argument} {name!r} is not a plain name: it must be one non-empty directory entry, '
        "not '.' or '..', without '/', '\\' or NUL, so that it stays inside the checkpoint "
        'directory.')
  return name


def join_inside(root: pathlib.Path, name: str, what: str) -> pathlib.Path:
  """``root / name`` for a name from untrusted input (see ``check_name``)."""
  return root / check_name(name, what)


def check_tree(directory: pathlib.Path, root: pathlib.Path | None = None) -> None:
  """Refuses a checkpoint directory that holds anything a reader must not follow: a FIFO,
  device or socket (reading one blocks forever or never ends), or a symbolic link that leads
  outside ``root`` (``directory`` itself by default). ``directory`` must lie inside ``root``.

  Links that stay inside are allowed and not descended into (their target is scanned anyway).
  An object store holds only objects (no links, FIFOs or devices): nothing to check there.
  """
  if isinstance(directory, RemotePath):
    return
  real_root = os.path.realpath(root if root is not None else directory)
  if root is not None:
    check_inside(directory, root)
  pending = [os.fspath(directory)]
  while pending:
    try:
      entries = list(os.scandir(pending.pop()))
    except (NotADirectoryError, FileNotFoundError):
      continue
    for entry in entries:
      if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if not _is_within(target, real_root):
          raise _errors.UnsafeCheckpointError(
              f'{entry.path}: a symbolic link to {target}, outside the checkpoint '
              f'{real_root}; refusing to read through it.')
        if os.path.exists(target) and not _is_plain(os.stat(target).st_mode):
          raise _not_regular(entry.path, os.stat(target).st_mode)
      elif entry.is_dir(follow_symlinks=False):
        pending.append(entry.path)
      elif not entry.is_file(follow_symlinks=False):
        raise _not_regular(entry.path, entry.stat(follow_symlinks=False).st_mode)


def check_inside(path: pathlib.Path, root: pathlib.Path, what: str = 'this entry'
                 ) -> pathlib.Path:
  """Returns ``path``, an entry below ``root`` (a step of a manager, an item of a step, a file
  a checkpoint names), after refusing it when links make it lead outside ``root``; ``what``
  says which entry it is. Keys on an object store cannot lead outside their prefix (names
  read from files still pass ``check_name``)."""
  if isinstance(path, RemotePath):
    return path
  target = os.path.realpath(path)
  if not _is_within(target, os.path.realpath(root)):
    raise _errors.UnsafeCheckpointError(
        f'{path}: {what} of {root} is a link to {target}, outside it; refusing to read a '
        'checkpoint through it.')
  return path


def _is_within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip('/') + '/')


def _is_plain(mode: int) -> bool:
  return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _not_regular(path: Any, mode: int) -> _errors.UnsafeCheckpointError:
  kind = ('a FIFO' if stat.S_ISFIFO(mode) else 'a socket' if stat.S_ISSOCK(mode)
          else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 'not a regular file')
  return _errors.UnsafeCheckpointError(
      f'{path}: expected a regular file, found {kind}; a checkpoint holds only regular files '
      'and directories, and reading this one could block forever or never end.')


def open_regular(path: PathLike, max_bytes: int | None = None) -> int:
  """A read-only descriptor of the regular file at ``path``, refused without blocking when it
  is a FIFO, device or socket (O_NONBLOCK: opening a FIFO would wait for a writer), or larger
  than ``max_bytes``. The caller closes it."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise _not_regular(path, info.st_mode)
    if max_bytes is not None and info.st_size > max_bytes:
      raise _errors.LimitExceededError(
          f'{path}: {info.st_size} bytes, more than the {max_bytes} bytes this file may hold '
          'when read as metadata; the checkpoint is damaged or hostile.')
    os.set_blocking(fd, True)
  except BaseException:
    os.close(fd)
    raise
  return fd


def birth_time_ns(path: PathLike | int) -> int | None:
  """When the file at ``path`` (or open as descriptor ``path``) was created, in ns, from Linux's
  ``statx``; None where the system or file system does not say. Unlike the mtime, it tells a
  file rewritten in place (same birth) from a new file renamed over it, even one that reuses the
  old file's inode number. Python's ``os.stat`` gives it on other systems only."""
  statx = _statx()
  if statx is None:
    return None
  buffer = ctypes.create_string_buffer(_STATX_SIZE)
  if isinstance(path, int):
    found = statx(path, b'', _AT_EMPTY_PATH, _STATX_BTIME, buffer)
  else:
    found = statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, buffer)
  if found != 0 or not struct.unpack_from('I', buffer, 0)[0] & _STATX_BTIME:
    return None
  seconds, nanoseconds = struct.unpack_from('qI', buffer, _STATX_BTIME_OFFSET)
  return seconds * 1_000_000_000 + nanoseconds


_AT_FDCWD, _AT_EMPTY_PATH, _STATX_BTIME = -100, 0x1000, 0x800
_STATX_SIZE, _STATX_BTIME_OFFSET = 256, 80  # struct statx (linux/stat.h): stx_btime at 80.


@functools.lru_cache(maxsize=1)
def _statx() -> Any:
  try:
    function = ctypes.CDLL(None, use_errno=True).statx
  except (OSError, AttributeError):
    return None
  function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_char_p]
  return function


def exists(path: StoragePath) -> bool:
  if isinstance(path, RemotePath):
    return _remote.exists(path)
  return path.exists()


def is_dir(path: StoragePath) -> bool:
  """A directory; on an object store, a prefix with objects under it (or a bucket)."""
  if isinstance(path, RemotePath):
    return _remote.is_dir(path)
  return path.is_dir()


def is_link(path: StoragePath) -> bool:
  if isinstance(path, RemotePath):
    return False  # Object stores have no links.
  return path.is_symlink()


def set_directory_modes(root: pathlib.Path, mode: int) -> None:
  """Sets the permission bits of ``root`` and every directory under it, never following a
  link (a link planted in the tree does not carry the change outside it)."""
  for dirpath, _, _ in os.walk(root, followlinks=False):
    if stat.S_ISDIR(os.lstat(dirpath).st_mode):
      os.chmod(dirpath, mode)


def copy_tree(source: StoragePath, target: pathlib.Path) -> None:
  """Copies the directories and regular files under ``source`` (or the objects under a bucket
  prefix, one in memory at a time) into the new local directory ``target``.

  Raises:
    UnsafeCheckpointError: ``source`` holds a link (never followed out of a checkpoint), a
      FIFO, device or socket; or an object name that could lead out of ``target``.
  """
  make_new_dir(target)
  remote = isinstance(source, RemotePath)
  for name in list_names(source):
    entry = source / name
    # Local names are single entries; names listed from a bucket are checked.
    copy = join_inside(target, name, f'an object under {source}') if remote else target / name
    if is_link(entry):
      raise _errors.UnsafeCheckpointError(
          f'{entry}: a symbolic link inside a checkpoint; refusing to follow it while copying.')
    if is_dir(entry):
      copy_tree(entry, copy)
    elif remote:
      if is_file(entry):
        write_bytes(copy, read_bytes(entry, max_bytes=None), exclusive=True)
    else:
      with os.fdopen(open_regular(entry), 'rb') as src, \
          open_for_write(copy, exclusive=True) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def is_file(path: StoragePath) -> bool:
  if isinstance(path, RemotePath):
    return _remote.is_file(path)
  return path.is_file()


def list_names(path: StoragePath) -> list[str]:
  """The sorted names of the entries of a directory (on an object store: the objects and
  prefixes right under it)."""
  if isinstance(path, RemotePath):
    return _remote.list_names(path)
  return sorted(os.listdir(path))


def make_dirs(path: StoragePath) -> None:
  """Creates a directory and its parents; nothing to do on an object store, where a prefix
  exists once an object lies under it."""
  if isinstance(path, RemotePath):
    return
  path.mkdir(parents=True, exist_ok=True)


def make_new_dir(path: pathlib.Path) -> None:
  """Creates the directory ``path`` (and missing parents), failing if anything already stands
  at ``path``, a link included: a save never writes into a directory it did not create."""
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.mkdir(path)
  except FileExistsError as e:
    raise _errors.UnsafeCheckpointError(
        f'{path}: something already exists there ({_describe(path)}), where this save was '
        'about to create its own new directory; another writer may be saving to the same '
        'path. Nothing was written.') from e


def _describe(path: pathlib.Path) -> str:
  try:
    if path.is_symlink():
      return f'a symbolic link to {os.readlink(path)}'
    return 'a directory' if path.is_dir() else 'a file'
  except OSError:
    return 'an entry'


def remove_tree(path: StoragePath) -> None:
  """Deletes a directory tree; missing paths are fine. A symbolic link (or a file) at ``path``
  is itself removed, never what it points to. On an object store: the object ``path`` and every
  object under its prefix."""
  remove(path)


def remove(path: StoragePath) -> None:
  """Deletes a file or a directory tree; missing paths are fine."""
  if isinstance(path, RemotePath):
    _remote.remove_tree(path)
  elif path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def rename(source: pathlib.Path, target: pathlib.Path) -> None:
  """Atomically renames ``source`` to ``target`` and makes the rename durable."""
  os.rename(source, target)
  _sync_path(target.parent)


def link_new(source: pathlib.Path, target: pathlib.Path) -> None:
  """Moves the file ``source`` to the name ``target``, which must be free: a hard link, which
  fails rather than replace anything (a rename where the file system has no hard links), then
  ``source`` is removed and the new name made durable.

  Raises:
    FileExistsError: something stands at ``target``.
  """
  try:
    os.link(source, target, follow_symlinks=False)
  except FileExistsError:
    raise
  except OSError as e:
    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
      raise
    if target.exists() or target.is_symlink():
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(target)) from None
    rename(source, target)
    return
  with contextlib.suppress(FileNotFoundError):
    os.unlink(source)
  _sync_path(target.parent)


def try_lock(fd: int) -> bool | None:
  """Takes an exclusive ``flock`` on an open file or directory without waiting: True when taken
  (the kernel drops it when the holder dies or closes ``fd``), False when another holds it, None
  where the file system has no such locks."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError:
    return None


# Where nothing can be locked, a temporary untouched this long is taken for abandoned.
STALE_SECS = 3600.0
# How long to wait for another process's lock on a directory (held for a few file operations).
DIRECTORY_LOCK_SECS = 300.0


def make_new_locked_dir(path: pathlib.Path) -> int | None:
  """``make_new_dir``, then a lock on the new directory that says its writer is alive (see
  ``remove_if_abandoned``); returns the descriptor for ``release``. Both happen under the
  parent's lock, so no cleanup ever sees the directory unlocked while its writer lives."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with directory_lock(path.parent):
    make_new_dir(path)
    return _hold_lock(path)


def open_new_locked(path: pathlib.Path) -> BinaryIO:
  """``open_for_write(path, exclusive=True)``, locked the same way (closing the file releases
  the lock)."""
  with directory_lock(path.parent):
    file = open_for_write(path, exclusive=True)
    try_lock(file.fileno())
    return file


def _hold_lock(path: pathlib.Path) -> int | None:
  fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  if try_lock(fd) is not True:
    os.close(fd)
    return None
  return fd


def release(fd: int | None) -> None:
  if fd is not None:
    os.close(fd)


def remove_if_abandoned(path: pathlib.Path, stale_secs: float = STALE_SECS) -> bool:
  """Removes the temporary file or directory at ``path`` if it belongs to no live writer: one
  made by ``make_new_locked_dir``/``open_new_locked`` whose lock went with its writer (where
  nothing can be locked: untouched for ``stale_secs``), or anything there such a writer would
  not have made (a link, a special file), itself. Returns whether it did."""
  with directory_lock(path.parent):
    try:
      mode = os.lstat(path).st_mode
      fd = (os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else None)
    except FileNotFoundError:
      return False
    if fd is not None:
      try:
        locked = try_lock(fd)
        if locked is False or (locked is None and
                               time.time() - os.fstat(fd).st_mtime < stale_secs):
          return False
      finally:
        os.close(fd)
    remove_tree(path)
    return True


_held_directories: dict[str, list] = {}  # realpath -> [thread lock, fd or None, depth]
_held_directories_lock = threading.Lock()


@contextlib.contextmanager
def directory_lock(directory: PathLike, timeout_secs: float = DIRECTORY_LOCK_SECS
                   ) -> Iterator[None]:
  """Holds an exclusive lock on ``directory`` itself against other processes and threads
  (reentrant within a thread; no entry is added to the directory; the kernel drops it when its
  holder dies). Where there are no such locks, only threads of this process are kept apart.

  Raises:
    TimeoutError: another holder kept the lock for ``timeout_secs``.
  """
  key = os.path.realpath(directory)
  with _held_directories_lock:
    held = _held_directories.setdefault(key, [threading.RLock(), None, 0])
  if not held[0].acquire(timeout=timeout_secs):
    raise TimeoutError(f'{directory}: another thread has held the lock of this directory for '
                       f'{timeout_secs:g} s; nothing was changed.')
  try:
    if held[2] == 0:
      held[1] = _lock_directory(directory, timeout_secs)
    held[2] += 1
    try:
      yield
    finally:
      held[2] -= 1
      if held[2] == 0:
        release(held[1])
        held[1] = None
  finally:
    held[0].release()


def _lock_directory(directory: PathLike, timeout_secs: float) -> int | None:
  try:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError:
    return None
  deadline = time.monotonic() + timeout_secs
  while try_lock(fd) is False:
    if time.monotonic() > deadline:
      os.close(fd)
      raise TimeoutError(
          f'{directory}: another process has held the lock of this directory for '
          f'{timeout_secs:g} s; nothing was changed.')
    time.sleep(0.005)
  return fd


def read_bytes(path: PathLike | RemotePath, max_bytes: int | None = MAX_METADATA_FILE_BYTES
               ) -> bytes:
  """A regular file's (or object's) bytes (see ``open_regular``); metadata-sized unless
  ``max_bytes`` says otherwise (None: any size)."""
  if isinstance(path, RemotePath):
    return _remote.read_bytes(path, max_bytes)
  with os.fdopen(open_regular(path, max_bytes), 'rb') as f:
    return f.read()


def map_readonly(path: StoragePath) -> np.ndarray | bytes:
  """A regular file's bytes as a read-only memory map (b'' for an empty file): pages are read
  when used. Refused like ``open_regular`` refuses. An object cannot be mapped: its bytes are
  read whole (its size is its real size, not a number a file declares)."""
  if isinstance(path, RemotePath):
    return _remote.read_bytes(path, None)
  with os.fdopen(open_regular(path), 'rb') as file:  # The map outlives the descriptor.
    return np.memmap(file, dtype=np.uint8, mode='r') if os.fstat(file.fileno()).st_size else b''


def start_read_range(path: RemotePath, start: int, stop: int) -> Callable[[], bytes]:
  """Starts reading bytes ``start`` to ``stop`` of an object on a bucket; the function it
  returns waits for them (see ``_remote.start_read_range``)."""
  return _remote.start_read_range(path, start, stop)


def read_head(path: StoragePath, size: int) -> bytes:
  """The first ``size`` bytes of a regular file or object (fewer if it is shorter)."""
  if isinstance(path, RemotePath):
    return _remote.read_head(path, size)
  with os.fdopen(open_regular(path), 'rb') as f:
    return f.read(size)


def read_into_buffer(path: pathlib.Path) -> np.ndarray:
  """The whole file in a new writable uint8 array, read without intermediate copies (and
  without zero-filling the memory first, which costs as much as the read). Large files are
  read in parallel slices: faulting in fresh memory is a good part of the cost."""
  if isinstance(path, RemotePath):
    return np.frombuffer(bytearray(_remote.read_bytes(path, None)), np.uint8)
  fd = open_regular(path)
  try:
    buffer = np.empty(os.fstat(fd).st_size, np.uint8)
    slices = range(0, len(buffer), _READ_SLICE_BYTES)

    def read_slice(start: int) -> None:
      view = buffer[start:start + _READ_SLICE_BYTES].data
      done = 0
      while done < len(view):
        count = os.preadv(fd, [view[done:]], start + done)
        if not count:
          raise EOFError(f'{path} shrank to {start + done} bytes while it was being read.')
        done += count

    if len(slices) > 1:
      with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        list(pool.map(read_slice, slices))
    elif slices:
      read_slice(0)
  finally:
    os.close(fd)
  return buffer


def open_for_write(path: pathlib.Path, exclusive: bool = False) -> BinaryIO:
  """A new (or truncated) file to stream bytes into; the caller closes it. Never opened
  through a symbolic link; with ``exclusive``, nothing may stand at ``path`` yet."""
  return os.fdopen(_open_writable(path, exclusive), 'wb')


def _open_writable(path: pathlib.Path, exclusive: bool) -> int:
  flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
  flags |= os.O_EXCL if exclusive else os.O_TRUNC
  try:
    return os.open(path, flags, 0o666)
  except FileExistsError as e:
    raise _errors.UnsafeCheckpointError(
        f'{path}: something already exists there ({_describe(path)}), where this save was '
        'about to create a new file; another writer may be saving to the same path.') from e
  except OSError as e:
    if path.is_symlink():  # O_NOFOLLOW's ELOOP.
      raise _errors.UnsafeCheckpointError(
          f'{path}: a symbolic link to {os.readlink(path)} stands where a file is written; '
          'refusing to write through a link this save did not create.') from e
    raise


def read_text(path: StoragePath, max_bytes: int | None = MAX_METADATA_FILE_BYTES) -> str:
  return read_bytes(path, max_bytes).decode('utf-8')


def write_bytes(path: StoragePath, data: bytes, sync: bool = False,
                exclusive: bool = False) -> None:
  """Writes a file, never through a symbolic link (see ``open_for_write``). An object is
  durable once written (``sync`` changes nothing there)."""
  if isinstance(path, RemotePath):
    _remote.write_bytes(path, data, exclusive)
    return
  with open_for_write(path, exclusive) as f:
    f.write(data)
    if sync:
      f.flush()
      os.fsync(f.fileno())


def write_text(path: StoragePath, text: str, sync: bool = False) -> None:
  write_bytes(path, text.encode('utf-8'), sync=sync)


def sync_tree(path: pathlib.Path) -> None:
  """fsyncs every file and directory below ``path`` (used before a commit rename).

  The fsyncs run on several threads: the filesystem then flushes them in fewer journal
  commits. Plain threads, not an executor: a save that finishes at interpreter exit must still
  be able to start them.
  """
  if not os.path.isdir(path):  # One file: it, then the directory entry that names it.
    _sync_path(path)
    _sync_path(os.path.dirname(os.path.abspath(path)))
    return
  paths: list[str] = []
  for root, _, files in os.walk(path):
    paths.extend(os.path.join(root, name) for name in files)
    paths.append(root)
  errors = []

  def sync_every(share: list[str]) -> None:
    try:
      for item in share:
        _sync_path(item)
    except OSError as e:
      errors.append(e)

  threads = [threading.Thread(target=sync_every, args=(paths[i::_SYNC_THREADS],))
             for i in range(1, min(_SYNC_THREADS, len(paths)))]
  for thread in threads:
    thread.start()
  sync_every(paths[::_SYNC_THREADS])
  for thread in threads:
    thread.join()
  if errors:
    raise errors[0]


def _sync_path(path: str | pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def request_failure(path: Any, what: str, error: BaseException) -> OSError | None:
  """For a bucket ``path``: an ``OSError`` naming its URL when tensorstore's ``error`` says a
  request failed for good (retries spent, the server gone or silent). None for local paths and
  for any other error (damage is reported as damage by the caller)."""
  return _remote.request_failure(path, what, error) if isinstance(path, RemotePath) else None


@contextlib.contextmanager
def naming_url(path: Any, what: str) -> Iterator[None]:
  """Turns a request on a bucket that failed for good inside the block into
  ``request_failure``'s error."""
  try:
    yield
  except ValueError as e:
    error = request_failure(path, what, e)
    if error is None:
      raise
    raise error from e


def context_resources(path: StoragePath) -> dict[str, Any]:
  """The tensorstore context resources to open stores under ``path`` with: none locally, the
  object store's settings (request concurrency, retries, billing...) on a bucket."""
  return _remote.context_resources(path) if isinstance(path, RemotePath) else {}


def read_part_sizes(path: StoragePath) -> tuple[int, int]:
  """The size of one ranged read of a large value on a bucket, and how many bytes of them a
  restore keeps in flight (``_remote.read_part_sizes``; its defaults for a local path)."""
  if isinstance(path, RemotePath):
    return _remote.read_part_sizes(path)
  return _remote.READ_PART_BYTES, _remote.READ_AHEAD_BYTES


def ocdbt_data_file_size(path: StoragePath) -> int | None:
  """The size OCDBT should aim its data files at when saving under ``path``: None (tensorstore's
  default) locally, the object store's setting (``_remote.data_file_size``) on a bucket."""
  return _remote.data_file_size(path) if isinstance(path, RemotePath) else None


def kvstore_spec(path: StoragePath, sync_each_write: bool = True) -> dict[str, Any]:
  """A tensorstore kvstore spec for a directory (always ends with '/'); for an object store,
  a ``gcs`` or ``s3`` spec (see ``_remote.kvstore_spec``).

  Writes into a save's temporary directory pass ``sync_each_write=False``: the checkpointer
  fsyncs the whole tree once before the commit rename, which is as durable and saves
  tensorstore's per-write fsyncs (a fifth of a small checkpoint's save time). Objects are
  durable once written, so it changes nothing there.
  """
  if isinstance(path, RemotePath):
    return _remote.kvstore_spec(path)
  spec: dict[str, Any] = {'driver': 'file', 'path': str(path).rstrip('/') + '/'}
  if not sync_each_write:
    spec['file_io_sync'] = False
  return spec
