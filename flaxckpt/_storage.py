"""The one place that touches storage.

Handlers and checkpointers call these functions instead of ``os``/``shutil``, so that a new
backend (``gs://`` and ``s3://`` through tensorstore kvstores) only has to be added here. Today
only local paths are supported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pathlib
import shutil
import threading
from typing import Any, BinaryIO

import numpy as np

PathLike = str | os.PathLike

_READ_SLICE_BYTES = 64 << 20
_READ_THREADS = 4
_SYNC_THREADS = 8
_SCHEMES = ('gs://', 's3://', 'http://', 'https://')


def as_path(path: PathLike) -> pathlib.Path:
  """Returns an absolute local path; refuses remote URLs with a clear message."""
  text = os.fspath(path)
  if text.startswith(_SCHEMES):
    raise NotImplementedError(
        f'{text}: remote storage is not supported yet; only local paths are.')
  return pathlib.Path(os.path.abspath(text))


def renames_atomically(path: pathlib.Path) -> bool:
  """Whether a directory renamed to ``path`` appears whole or not at all.

  True for local filesystems. Object stores (``gs://``, ``s3://``, once supported) answer
  False: there a checkpoint is written in place and counts as committed only once its
  ``commit_success.txt`` exists, which the primary process writes last.
  """
  del path  # Every path supported today is local.
  return True


def exists(path: pathlib.Path) -> bool:
  return path.exists()


def is_dir(path: pathlib.Path) -> bool:
  return path.is_dir()


def is_file(path: pathlib.Path) -> bool:
  return path.is_file()


def list_names(path: pathlib.Path) -> list[str]:
  return sorted(os.listdir(path))


def make_dirs(path: pathlib.Path) -> None:
  path.mkdir(parents=True, exist_ok=True)


def remove_tree(path: pathlib.Path) -> None:
  """Deletes a directory tree; missing paths are fine."""
  shutil.rmtree(path, ignore_errors=True)


def remove(path: pathlib.Path) -> None:
  """Deletes a file or a directory tree; missing paths are fine."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def rename(source: pathlib.Path, target: pathlib.Path) -> None:
  """Atomically renames ``source`` to ``target`` and makes the rename durable."""
  os.rename(source, target)
  _sync_path(target.parent)


def read_bytes(path: pathlib.Path) -> bytes:
  return path.read_bytes()


def read_head(path: pathlib.Path, size: int) -> bytes:
  """The first ``size`` bytes of a file (fewer if it is shorter)."""
  with open(path, 'rb') as f:
    return f.read(size)


def read_into_buffer(path: pathlib.Path) -> np.ndarray:
  """The whole file in a new writable uint8 array, read without intermediate copies (and
  without zero-filling the memory first, which costs as much as the read). Large files are
  read in parallel slices: faulting in fresh memory is a good part of the cost."""
  fd = os.open(path, os.O_RDONLY)
  try:
    buffer = np.empty(os.fstat(fd).st_size, np.uint8)
    slices = range(0, len(buffer), _READ_SLICE_BYTES)

    def read_slice(start: int) -> None:
      view = memoryview(buffer[start:start + _READ_SLICE_BYTES])
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


def open_for_write(path: pathlib.Path) -> BinaryIO:
  """A new (or truncated) file to stream bytes into; the caller closes it."""
  return open(path, 'wb')


def read_text(path: pathlib.Path) -> str:
  return path.read_text(encoding='utf-8')


def write_bytes(path: pathlib.Path, data: bytes, sync: bool = False) -> None:
  with open(path, 'wb') as f:
    f.write(data)
    if sync:
      f.flush()
      os.fsync(f.fileno())


def write_text(path: pathlib.Path, text: str, sync: bool = False) -> None:
  write_bytes(path, text.encode('utf-8'), sync=sync)


def sync_tree(path: pathlib.Path) -> None:
  """fsyncs every file and directory below ``path`` (used before a commit rename).

  The fsyncs run on several threads: the filesystem then flushes them in fewer journal
  commits. Plain threads, not an executor: a save that finishes at interpreter exit must still
  be able to start them.
  """
  paths = []
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


def kvstore_spec(path: pathlib.Path, sync_each_write: bool = True) -> dict[str, Any]:
  """A tensorstore kvstore spec for a directory (always ends with '/').

  Writes into a save's temporary directory pass ``sync_each_write=False``: the checkpointer
  fsyncs the whole tree once before the commit rename, which is as durable and saves
  tensorstore's per-write fsyncs (a fifth of a small checkpoint's save time).
  """
  spec: dict[str, Any] = {'driver': 'file', 'path': str(path).rstrip('/') + '/'}
  if not sync_each_write:
    spec['file_io_sync'] = False
  return spec
