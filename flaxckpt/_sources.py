"""Where a reader gets stored values from: tensorstore kvstore reads, or an OCDBT index.

For OCDBT databases (the default layout) one ``tensorstore.ocdbt.dump`` of the B+tree gives every
key with its small values inline and the (file, offset, length) of the others: thousands of small
leaves then cost one call instead of thousands of reads, and large values are read straight into
aligned buffers. Any database the index cannot describe falls back to ordinary kvstore reads.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from flaxckpt import _errors

Location = tuple[pathlib.Path, int, int]  # data file, offset, length
_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array whose data is 64-byte aligned, so jax can adopt it without a copy."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, dtype=np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_into(out: np.ndarray, where: Location) -> None:
  """Fills ``out`` with the bytes at ``where``."""
  path, offset, length = where
  view = memoryview(out.reshape(-1).view(np.uint8))
  with open(path, 'rb', buffering=0) as f:
    f.seek(offset)
    done = 0
    while done < length:
      n = f.readinto(view[done:])
      if not n:
        raise _errors.NotACheckpointError(
            f'{path}: expected {length} bytes at offset {offset}, but the file ends early; the '
            'checkpoint is damaged.')
      done += n


class KvSource:
  """Values read through a tensorstore kvstore, all requests in flight at once."""

  speculative = True  # Reading a guessed key costs a request; worth it to save a round trip.

  def __init__(self, kvstore: Any, file_root: pathlib.Path | None):
    self._kv = kvstore
    self._file_root = file_root  # Set when keys are plain files below this directory.

  def request(self, keys: list[str]) -> list[Any]:
    return [self._kv.read(key) for key in keys]

  def collect(self, handles: list[Any]) -> list[bytes | None]:
    out = []
    for handle in handles:
      read = handle.result()
      out.append(read.value if read.state == 'value' else None)
    return out

  def location(self, key: str) -> Location | None:
    if self._file_root is None:
      return None
    path = self._file_root / key
    return (path, 0, path.stat().st_size) if path.is_file() else None

  def close(self) -> None:
    pass


class OcdbtIndexSource:
  """Values of an OCDBT database found by walking its B+tree once."""

  speculative = False  # Every value is already known; guessing gains nothing.

  def __init__(self, entries: dict[str, bytes | Location]):
    self._entries = entries
    self._files: dict[pathlib.Path, int] = {}

  @classmethod
  def load(cls, ts: Any, directory: pathlib.Path, file_spec: dict[str, Any]
           ) -> OcdbtIndexSource | None:
    """Walks the database at ``directory``; None if its layout is not one this reader knows."""
    try:
      base = ts.KvStore.open(file_spec).result()
      versions = ts.ocdbt.dump(base).result()['versions']
      root = versions[-1]['root'].get('location') if versions else None
      entries: dict[str, bytes | Location] = {}
      pending = [(root, b'')] if root else []
      while pending:
        location, prefix = pending.pop()
        for entry in ts.ocdbt.dump(base, location).result()['entries']:
          if 'location' in entry:
            pending.append((entry['location'], prefix + entry.get('subtree_common_prefix', b'')))
          elif 'inline_value' in entry:
            entries[(prefix + entry['key']).decode()] = entry['inline_value']
          else:
            entries[(prefix + entry['key']).decode()] = _parse_reference(
                directory, entry['indirect_value'])
    except (KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError):
      return None
    if not versions:
      return None
    return cls(entries)

  def request(self, keys: list[str]) -> list[str]:
    return keys

  def collect(self, keys: list[str]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for key in keys:
      entry = self._entries.get(key)
      if entry is None or isinstance(entry, bytes):
        out.append(entry)
        continue
      path, offset, length = entry
      data = os.pread(self._fd(path), length, offset)
      if len(data) != length:
        raise _errors.NotACheckpointError(
            f'{path}: expected {length} bytes at offset {offset} for key {key!r}, but the file '
            'ends early; the checkpoint is damaged.')
      out.append(data)
    return out

  def location(self, key: str) -> Location | None:
    entry = self._entries.get(key)
    return None if entry is None or isinstance(entry, bytes) else entry

  def _fd(self, path: pathlib.Path) -> int:
    fd = self._files.get(path)
    if fd is None:
      try:
        fd = self._files[path] = os.open(path, os.O_RDONLY)
      except FileNotFoundError as e:
        raise _errors.NotACheckpointError(
            f'{path}: an OCDBT data file of this checkpoint is missing (the checkpoint directory '
            'was copied or pruned incompletely).') from e
    return fd

  def close(self) -> None:
    for fd in self._files.values():
      os.close(fd)
    self._files.clear()


def _parse_reference(directory: pathlib.Path, ref: str) -> Location:
  """``value:<base path>:<relative file>:<offset>:<length>`` -> (path, offset, length)."""
  head, offset, length = ref.rsplit(':', 2)
  _, base_path, relative = head.split(':', 2)
  return directory / base_path / relative, int(offset), int(length)
