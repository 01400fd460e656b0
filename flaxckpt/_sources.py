"""Where a reader gets stored values from: tensorstore kvstore reads, or an OCDBT index.

For OCDBT databases (the default layout) one ``tensorstore.ocdbt.dump`` of the B+tree gives every
key with its small values inline and the (file, offset, length) of the others: thousands of small
leaves then cost one call instead of thousands of reads, and large values are read straight into
aligned buffers. Any database the index cannot describe falls back to ordinary kvstore reads.

Every byte of the tree is untrusted. The walk visits each node once, requires each child to sit
exactly one level below its parent and to hold keys only in the range its parent gives it (as
tensorstore's own lookups do), and stops after a bounded number of nodes and keys, so a crafted
cycle or shared subtree can neither make it run forever nor make it find other values than
tensorstore would. Every file a node names is a relative path that must stay inside the
checkpoint, and is opened only if it is a regular file; every (offset, length) must lie inside
its file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import mmap
import os
import pathlib
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np

from flaxckpt import _errors, _storage

Location = tuple[pathlib.Path, int, int]  # data file, offset, length
_ALIGNMENT = 64
_MANIFEST = 'manifest.ocdbt'

# Bounds on one walk of a B+tree. tensorstore fills nodes up to ``max_decoded_node_bytes``
# (100 MB in Orbax's and flaxckpt's config), so even a tree of millions of keys has a few thousand
# nodes; a million nodes means a crafted tree of tiny ones. The index keeps every key in memory
# (some 200 bytes each): past 2**25 keys it would cost gigabytes to save lookups. Past either
# bound the walk stops and the reader falls back to tensorstore, which looks up only the keys a
# restore needs, each through at most one node per level.
MAX_TREE_NODES = 1 << 20
MAX_TREE_KEYS = 1 << 25

# A manifest tensorstore cannot dump, or a dump of a shape this reader does not know: the
# database is left to tensorstore's own reads. (A node that the manifest names but that cannot be
# read is damage, reported as such: tensorstore's reads would meet the same node.)
_UNKNOWN_LAYOUT = (KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError)




def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array whose data is 64-byte aligned, so jax can adopt it without a copy."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, dtype=np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def populated_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Like ``aligned_empty``, with its memory mapped in at once (page aligned). Filling fresh
  memory page by page while other threads receive data costs a page fault each, several
  times slower than the kernel mapping it all in one call."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  populate = getattr(mmap, 'MAP_POPULATE', None)
  if not nbytes or populate is None:
    return aligned_empty(shape, dtype)
  memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
  return np.frombuffer(memory, dtype).reshape(shape)


def read_into(out: np.ndarray, where: Location) -> None:
  """Fills ``out`` with the ``length`` bytes at ``where`` (as many as ``out`` holds); refuses a
  file that is not a regular file (a FIFO would block) or that ends before them."""
  path, offset, length = where
  view = out.reshape(-1).view(np.uint8).data
  _check_fills(where, len(view))
  with os.fdopen(_storage.open_regular(path), 'rb', buffering=0) as f:
    _check_range(path, offset, length, os.fstat(f.fileno()).st_size)
    f.seek(offset)
    done = 0
    while done < length:
      n = f.readinto(view[done:])
      if not n:
        raise _ends_early(path, offset, length)
      done += n


def _check_fills(where: Location, nbytes: int) -> None:
  """Refuses a stored value whose length is not the ``nbytes`` of the array it is to fill."""
  path, offset, length = where
  if length != nbytes:
    raise _errors.NotACheckpointError(
        f'{path}: the value of {length} bytes at offset {offset} was to fill an array of '
        f'{nbytes} bytes; the checkpoint is damaged.')


def _check_range(path: pathlib.Path, offset: int, length: int, size: int, key: str = '') -> None:
  if offset < 0 or length < 0 or offset + length > size:
    raise _ends_early(path, offset, length, key, size)


def _ends_early(path: pathlib.Path, offset: int, length: int, key: str = '',
                size: int | None = None) -> _errors.NotACheckpointError:
  for_key = f' for key {key!r}' if key else ''
  found = f' (it holds {size} bytes)' if size is not None else ''
  return _errors.NotACheckpointError(
      f'{path}: expected {length} bytes at offset {offset}{for_key}, but the file ends '
      f'early{found}; the checkpoint is damaged.')


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
    if not path.is_file():
      return None
    _storage.check_inside(path, self._file_root, 'array data')
    return path, 0, path.stat().st_size

  def close(self) -> None:
    pass


class OcdbtIndexSource:
  """Values of an OCDBT database found by walking its B+tree once."""

  speculative = False  # Every value is already known; guessing gains nothing.

  def __init__(self, entries: dict[str, bytes | Location], files: _DataFiles):
    self._entries = entries
    self._files = files

  @classmethod
  def load(cls, ts: Any, directory: pathlib.Path, file_spec: dict[str, Any]
           ) -> OcdbtIndexSource | None:
    """Walks the database at ``directory``; None if its layout is not one this reader knows,
    or its tree is larger than ``MAX_TREE_NODES`` / ``MAX_TREE_KEYS``.

    Raises:
      UnsafeCheckpointError: a node names a file outside ``directory``, or one that is not a
        regular file.
      NotACheckpointError: a node is damaged, or the tree reaches a node twice or at the wrong
        height, or a value's range lies outside its file.
    """
    files = _DataFiles(directory)
    try:
      if os.path.lexists(directory / _MANIFEST):  # Else tensorstore finds no database.
        files.check(directory / _MANIFEST, 'the OCDBT manifest')
      base = ts.KvStore.open(file_spec).result()
      root = _latest_root(ts, base)
      if root is None:
        return None
      entries = _walk(ts, base, files, *root)
    except _errors.CheckpointError:
      files.close()
      raise
    except _UNKNOWN_LAYOUT:
      entries = None
    if entries is None:
      files.close()
      # tensorstore refuses names that leave its base and checks each node's height, but reads
      # through links and waits forever on a FIFO: refuse those before handing it the tree.
      _storage.check_tree(directory)
      return None
    return cls(entries, files)

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
      fd = self._files.open(path, offset, length, key)
      data = os.pread(fd, length, offset)
      if len(data) != length:
        raise _ends_early(path, offset, length, key)
      out.append(data)
    return out

  def location(self, key: str) -> Location | None:
    entry = self._entries.get(key)
    if entry is None or isinstance(entry, bytes):
      return None
    self._files.open(*entry, key)
    return entry

  def close(self) -> None:
    self._files.close()


class ObjectIndexSource:
  """Values of an OCDBT database on an object store, found by walking its B+tree once.

  tensorstore would send one ranged request per value. Here the values requested before the
  next ``collect`` are fetched together: one ranged read per data file, spanning neighbouring
  values (gaps up to ``COALESCE_GAP_BYTES`` are read and dropped), so a file holding several
  arrays' chunks costs one request, as the object itself would.

  Reads start in the order requested, with at most ``read_ahead`` bytes of them in flight
  (``_storage.read_part_sizes``); a value handed out by ``collect`` is forgotten here, so the
  bytes of a read live only as long as the values sliced from it.
  """

  speculative = False  # Every value is already known; guessing gains nothing.

  def __init__(self, entries: dict[str, bytes | Location], read_ahead: int):
    self._entries = entries
    self._read_ahead = read_ahead
    self._pending: list[str] = []  # Requested, not yet fetched.
    # key -> what brings it (a span read, or the read of a large value), offset in it, length
    self._fetched: dict[str, tuple[_Span | _Carried, int, int]] = {}
    self._queue: collections.deque[_Span] = collections.deque()  # Not started, in order.
    self._in_flight = 0  # Bytes of the spans started and not yet arrived.

  @classmethod
  def load(cls, ts: Any, directory: Any, spec: dict[str, Any], context: Any
           ) -> ObjectIndexSource | None:
    """Walks the database under ``directory`` (a bucket path); None where tensorstore's own
    reads must do (a layout this reader does not know, a tree past the bounds).

    Raises:
      UnsafeCheckpointError: a node names an object outside ``directory``.
      NotACheckpointError: a node is damaged, or the tree reaches a node twice or at the wrong
        height.
      OSError: the bucket did not answer (naming its URL).
    """
    files = _ObjectFiles(directory)
    try:
      base = ts.KvStore.open(spec, context=context).result()
      root = _latest_root(ts, base)
      if root is None:
        return None
      entries = _walk(ts, base, files, *root)
    except (_errors.CheckpointError, OSError):
      raise
    except _UNKNOWN_LAYOUT:
      return None
    return None if entries is None else cls(entries, _storage.read_part_sizes(directory)[1])

  def request(self, keys: list[str]) -> list[str]:
    self._pending.extend(key for key in keys if key not in self._fetched)
    return keys

  def collect(self, keys: list[str]) -> list[Any]:
    if any(key not in self._fetched for key in keys):
      self._fetch_pending()
    out: list[Any] = []
    given: dict[str, Any] = {}
    for key in keys:
      entry = self._entries.get(key)
      if entry is None or isinstance(entry, bytes) or key in given:
        out.append(given.get(key, entry))
        continue
      span, offset, length = self._fetched.pop(key)
      while not span.started:  # Needed now: start it, and any queued before it.
        self._start_next()
      if not span.arrived:
        span.data()
        self._in_flight -= span.nbytes
        self._start_queued()
      given[key] = _slice(span.data(), offset, length)
      out.append(given[key])
    return out

  def _start_next(self) -> None:
    span = self._queue.popleft()
    span.start()
    self._in_flight += span.nbytes

  def _start_queued(self) -> None:
    while self._queue and (not self._in_flight or
                           self._in_flight + self._queue[0].nbytes <= self._read_ahead):
      self._start_next()

  def _pending_by_file(self) -> dict[Any, list[tuple[int, int, str]]]:
    """The requested values not fetched yet that are stored in data files, by file."""
    by_file: dict[Any, list[tuple[int, int, str]]] = {}
    for key in dict.fromkeys(self._pending):
      entry = self._entries.get(key)
      if isinstance(entry, tuple) and key not in self._fetched:
        path, offset, length = entry
        by_file.setdefault(path, []).append((offset, length, key))
    return by_file

  def _fetch_pending(self) -> None:
    by_file = self._pending_by_file()
    self._pending = []
    for path, values in by_file.items():
      values.sort()
      run = [values[0]]
      for value in values[1:]:
        if value[0] <= run[-1][0] + run[-1][1] + COALESCE_GAP_BYTES:
          run.append(value)
        else:
          self._queue_span(path, run)
          run = [value]
      self._queue_span(path, run)
    self._start_queued()

  def _queue_span(self, path: Any, run: list[tuple[int, int, str]]) -> None:
    """Queues the read of one span of ``path`` covering the values of ``run``."""
    span = _Span(path, run[0][0], max(offset + length for offset, length, _ in run), run[0][2])
    self._queue.append(span)
    for offset, length, key in run:
      self._fetched[key] = (span, offset - span.offset, length)

  def start_reads(self, jobs: list[tuple[tuple[int, ...], np.dtype, Location]],
                  filled: Callable[[int, np.ndarray], None]) -> ObjectReads:
    """Starts reading large values straight into arrays (``ObjectReads``). Requested small
    values of the same objects within ``COALESCE_GAP_BYTES`` before or after one come with its
    read: a server that reads a whole object for any range (moto does) then reads it once."""
    wanted = self._pending_by_file()
    taken: set[str] = set()
    neighbours = []
    for _, _, (path, offset, length) in jobs:
      end = offset + length
      near = [(key, at, size) for at, size, key in wanted.get(path, ())
              if key not in taken and (offset - COALESCE_GAP_BYTES <= at and at + size <= offset
                                       or end <= at and at + size <= end + COALESCE_GAP_BYTES)]
      taken.update(key for key, _, _ in near)
      neighbours.append(near)
    self._pending = [key for key in self._pending if key not in taken]
    reads = ObjectReads(jobs, neighbours, filled)
    self._fetched.update(reads.carried())
    return reads

  def location(self, key: str) -> Location | None:
    """The object, offset and length of a value stored outside the tree (read it with
    ``start_reads``)."""
    entry = self._entries.get(key)
    return entry if isinstance(entry, tuple) else None

  def close(self) -> None:
    self._fetched.clear()
    self._queue.clear()


class _Span:
  """One ranged read of a data file, started on demand; its bytes are kept once they arrive
  (for the values still to be sliced from them)."""

  def __init__(self, path: Any, start: int, stop: int, first_key: str):
    self.path, self.offset, self.nbytes, self._first_key = path, start, stop - start, first_key
    self._wait: Callable[[], bytes] | None = None
    self._data: bytes | None = None
    self.started = False

  @property
  def arrived(self) -> bool:
    return self._data is not None

  def start(self) -> None:
    self._wait = _checked_range(self.path, self.offset, self.offset + self.nbytes,
                                self._first_key)
    self.started = True

  def data(self) -> bytes:
    if self._data is None:
      assert self._wait is not None
      self._data, self._wait = self._wait(), None
    return self._data


# Neighbouring values of one data file closer than this are fetched by one request.
COALESCE_GAP_BYTES = 1 << 20
# Values smaller than this are handed out as bytes, larger ones as views of the span read.
_VIEW_MIN_BYTES = 1 << 16


class ObjectReads:
  """Arrays of the given shapes and dtypes filled with the bytes at their locations on a
  bucket (see ``ObjectIndexSource.start_reads``). The reads start at construction; ``finish``
  waits for them, calling ``filled(index, array)`` as each array is complete.

  Each value is read in ranged requests of up to ``read_part_size`` bytes, at most
  ``read_ahead`` of them in flight (counted until copied), and each part is copied into its
  array on a second thread as it arrives, while the next one is received (a third thread
  maps the arrays' memory in). Small values of the same object next to a
  large one (``neighbours``) come with its first or last part, as one request would bring them.
  Use as a context manager: leaving it stops mapping memory no one will fill.
  """

  def __init__(self, jobs: list[tuple[tuple[int, ...], np.dtype, Location]],
               neighbours: list[list[tuple[str, int, int]]],
               filled: Callable[[int, np.ndarray], None]):
    self._jobs, self._filled = jobs, filled
    self._carried: dict[str, tuple[_Carried, int, int]] = {}
    self._missing: list[int] = []
    self._parts: collections.deque[_Part] = collections.deque()
    part_bytes, self._read_ahead = (_storage.read_part_sizes(jobs[0][2][0]) if jobs else (1, 1))
    for index, ((shape, dtype, where), near) in enumerate(zip(jobs, neighbours)):
      _check_fills(where, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
      path, offset, length = where
      parts = [_Part(index, path, offset + at, offset + min(at + part_bytes, length))
               for at in range(0, length, part_bytes)]
      self._missing.append(len(parts))
      for end, keys in (('head', [n for n in near if n[1] < offset]),
                        ('tail', [n for n in near if n[1] >= offset + length])):
        if keys and parts:
          part = parts[0] if end == 'head' else parts[-1]
          low = min(key_offset for _, key_offset, _ in keys)
          high = max(key_offset + key_length for _, key_offset, key_length in keys)
          carried = _Carried(self, part, low)
          part.extras.append((carried, low, high))
          part.start, part.stop = min(part.start, low), max(part.stop, high)
          for key, key_offset, key_length in keys:
            self._carried[key] = (carried, key_offset - low, key_length)
      self._parts.extend(parts)
    self._in_flight: collections.deque[_Part] = collections.deque()
    self._copying: collections.deque[tuple[_Part, concurrent.futures.Future]] = \
        collections.deque()
    self._flying = 0  # Bytes of parts requested and not yet copied into their arrays.
    self._start_parts()
    self._mapper = concurrent.futures.ThreadPoolExecutor(1)
    self._copier = concurrent.futures.ThreadPoolExecutor(1)
    self._arrays = [self._mapper.submit(populated_empty, shape, dtype)
                    for shape, dtype, _ in jobs]

  def carried(self) -> dict[str, tuple[_Carried, int, int]]:
    """The small values these reads bring: key -> (carrier, offset in it, length)."""
    return self._carried

  def __enter__(self) -> ObjectReads:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._mapper.shutdown(cancel_futures=True)
    self._copier.shutdown(cancel_futures=True)

  def _start_parts(self) -> None:
    while self._parts and (not self._in_flight and not self._copying or
                           self._flying + self._parts[0].nbytes <= self._read_ahead):
      part = self._parts.popleft()
      part.wait = _checked_range(part.path, part.start, part.stop, None)
      self._in_flight.append(part)
      self._flying += part.nbytes

  def advance_until(self, part: _Part) -> None:
    """Takes in arrived parts, in order, until ``part`` is in."""
    while not part.done:
      self._take_next()

  def finish(self) -> None:
    for index in range(len(self._jobs)):
      if not self._missing[index]:
        self._filled(index, self._arrays[index].result())
    while self._in_flight:
      self._take_next()
    while self._copying:
      self._reap_copy()

  def _take_next(self) -> None:
    """Receives the next part and hands it to the copier thread (the copy of one part then
    overlaps the wait for the next)."""
    part = self._in_flight.popleft()
    assert part.wait is not None
    data, part.wait = part.wait(), None
    for carried, low, high in part.extras:
      carried.data_ = data[low - part.start:high - part.start]
    part.done = True
    self._copying.append((part, self._copier.submit(self._copy, part, data)))
    del data
    while self._copying and self._copying[0][1].done():
      self._reap_copy()
    while (self._copying and self._parts and
           self._flying + self._parts[0].nbytes > self._read_ahead):
      self._reap_copy()  # Over the budget: wait for copies before asking for more.
    self._start_parts()

  def _copy(self, part: _Part, data: bytes) -> None:
    _, _, (_, offset, length) = self._jobs[part.index]
    low, high = max(part.start, offset), min(part.stop, offset + length)
    out = self._arrays[part.index].result().reshape(-1).view(np.uint8)
    # numpy copies without holding the GIL, so the main thread keeps receiving meanwhile.
    out[low - offset:high - offset] = np.frombuffer(data, np.uint8, high - low,
                                                    low - part.start)

  def _reap_copy(self) -> None:
    part, copy = self._copying.popleft()
    copy.result()
    self._flying -= part.nbytes
    self._missing[part.index] -= 1
    if not self._missing[part.index]:
      self._filled(part.index, self._arrays[part.index].result())


class _Part:
  """One ranged read of an ``ObjectReads``: part of one large value, and for the first or last
  part, the small values next to it."""

  def __init__(self, index: int, path: Any, start: int, stop: int):
    self.index, self.path, self.start, self.stop = index, path, start, stop
    self.extras: list[tuple[_Carried, int, int]] = []
    self.wait: Callable[[], bytes] | None = None
    self.done = False

  @property
  def nbytes(self) -> int:
    return self.stop - self.start


class _Carried:
  """The bytes of small values that come with a part of a large value (a ``_Span`` for
  ``ObjectIndexSource.collect``)."""

  started = True
  nbytes = 0  # Counted by the reads that carry it.

  def __init__(self, reads: ObjectReads, part: _Part, offset: int):
    self._reads, self._part, self.offset = reads, part, offset
    self.data_: bytes | None = None

  @property
  def arrived(self) -> bool:
    return self._part.done

  def data(self) -> bytes:
    self._reads.advance_until(self._part)
    assert self.data_ is not None
    return self.data_


def _checked_range(path: Any, start: int, stop: int, key: str | None) -> Callable[[], bytes]:
  wait = _storage.start_read_range(path, start, stop)
  for_key = f' (for key {key!r} and its neighbours)' if key else ''

  def checked() -> bytes:
    try:
      return wait()  # Raises EOFError for fewer bytes than asked for.
    except (EOFError, FileNotFoundError) as e:
      raise _errors.NotACheckpointError(
          f'{path}: expected bytes {start} to {stop} of this OCDBT data file{for_key}, but '
          f'{e}; the checkpoint is damaged.') from None

  return checked


def _slice(data: bytes, offset: int, length: int) -> Any:
  if offset == 0 and length == len(data):
    return data
  if length < _VIEW_MIN_BYTES:
    return data[offset:offset + length]
  return memoryview(data)[offset:offset + length]


class _DataFiles:
  """The files an OCDBT tree names, each resolved, checked and opened once."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self._paths: dict[str, pathlib.Path] = {}  # Encoded 'base:relative' -> checked path.
    self._open: dict[pathlib.Path, tuple[int, int]] = {}  # Path -> (descriptor, size).
    self._sizes: dict[pathlib.Path, int] = {}  # Checked node files.

  def resolve(self, reference: str) -> Location:
    """``kind:<base path>:<relative path>:<offset>:<length>`` as ``tensorstore.ocdbt.dump``
    writes it (paths percent-encoded) -> (path, offset, length), the path checked to be a
    relative name below the checkpoint."""
    _, sep, rest = reference.partition(':')
    names, _, length = rest.rpartition(':')
    names, _, offset = names.rpartition(':')
    path = self._paths.get(names)
    if path is None:
      base, _, relative = names.partition(':')
      base, relative = (urllib.parse.unquote(part, errors='surrogateescape')
                        for part in (base, relative))
      what = f'{self.directory}: the OCDBT reference {reference!r}'
      if base:
        _storage.check_name(base, what)
      # The file is ``base + relative`` (a string, not a path join), as tensorstore reads it.
      path = self._paths[names] = _storage.join_inside(self.directory, base + relative, what)
    if not (sep and offset.isdigit() and length.isdigit()):
      raise _errors.NotACheckpointError(
          f'{self.directory}: unreadable OCDBT reference {reference!r}; expected '
          'kind:<base path>:<relative path>:<offset>:<length>.')
    return path, int(offset), int(length)

  def check(self, path: pathlib.Path, what: str) -> int:
    """The size of the file ``path`` (``what`` says which it is), once it is known to be a
    regular file inside the checkpoint."""
    size = self._sizes.get(path)
    if size is None:
      fd = self._open_inside(path, what)
      try:
        size = self._sizes[path] = os.fstat(fd).st_size
      finally:
        os.close(fd)
    return size

  def open(self, path: pathlib.Path, offset: int, length: int, key: str) -> int:
    """A descriptor of the data file ``path``, once ``offset`` and ``length`` are known to lie
    inside it."""
    opened = self._open.get(path)
    if opened is None:
      fd = self._open_inside(path, f'the OCDBT data file of key {key!r}')
      opened = self._open[path] = (fd, os.fstat(fd).st_size)
    _check_range(path, offset, length, opened[1], key)
    return opened[0]

  def _open_inside(self, path: pathlib.Path, what: str) -> int:
    """Refuses a link leading outside the checkpoint, then opens the regular file it leads to
    (a FIFO or device is refused without blocking)."""
    real = os.path.realpath(_storage.check_inside(path, self.directory, what))
    try:
      return _storage.open_regular(real)
    except FileNotFoundError as e:
      raise _errors.NotACheckpointError(
          f'{path}: {what} is missing (the checkpoint directory was copied or pruned '
          'incompletely).') from e

  def close(self) -> None:
    for fd, _ in self._open.values():
      os.close(fd)
    self._open.clear()


class _ObjectFiles(_DataFiles):
  """The objects an OCDBT tree on a bucket names: names are checked as for files; sizes are
  not known before a read (one past an object's end fails when it is read)."""

  def check(self, path: Any, what: str) -> int:
    return sys.maxsize


def _latest_root(ts: Any, base: Any) -> tuple[str | None, int] | None:
  """The root node's location (None for an empty tree) and height in the database's latest
  version; None if it has no version."""
  versions = ts.ocdbt.dump(base).result()['versions']
  if not versions:
    return None
  latest = versions[-1]
  return latest['root'].get('location'), latest['root_height']


def _walk(ts: Any, base: Any, files: _DataFiles, root: str | None, root_height: int
          ) -> dict[str, bytes | Location] | None:
  """Every key of the tree below ``root`` (None: an empty tree) with its inline value or its
  location; None past the bounds. Each node is visited once, one level below its parent, and
  its keys must lie in the range its parent gives it (from its own key up to the next child's),
  so that no key is found twice and every key is the one tensorstore's lookups would find."""
  directory = files.directory
  entries: dict[str, bytes | Location] = {}
  if root is None:
    return entries
  seen: set[tuple[pathlib.Path, int, int]] = set()
  # (node, its height, prefix of its keys, its keys' inclusive minimum and exclusive maximum)
  pending: list[tuple[str, int, bytes, bytes, bytes | None]] = [
      (root, root_height, b'', b'', None)]
  while pending:
    location, height, prefix, low, high = pending.pop()
    path, offset, length = files.resolve(location)
    if (path, offset, length) in seen:
      raise _errors.NotACheckpointError(
          f'{directory}: the OCDBT B+tree reaches node {location!r} a second time (a cycle or '
          'a shared subtree); the checkpoint is damaged or crafted.')
    seen.add((path, offset, length))
    if len(seen) > MAX_TREE_NODES:
      return None
    _check_range(path, offset, length, files.check(path, f'the B+tree node {location!r}'))
    try:
      node = ts.ocdbt.dump(base, location).result()
    except ValueError as e:  # tensorstore could not read or decode it: no read will.
      what = f'reading the OCDBT B+tree node {location!r}'
      raise _storage.request_failure(directory, what, e) or \
          _errors.NotACheckpointError(
          f'{directory}: the OCDBT B+tree node {location!r} is damaged ({e}); the checkpoint '
          'cannot be restored as saved.') from e
    if node['height'] != height:
      raise _errors.NotACheckpointError(
          f'{directory}: the OCDBT B+tree node {location!r} has height {node["height"]}, but '
          f'its parent expects {height} (each child sits one level below its parent); the '
          'checkpoint is damaged or crafted.')
    children = node['entries']
    keys = [prefix + entry['key'] for entry in children]
    if keys[0] < low or (high is not None and keys[-1] >= high):
      raise _errors.NotACheckpointError(
          f'{directory}: the OCDBT B+tree node {location!r} holds keys from {keys[0]!r} to '
          f'{keys[-1]!r}, outside the range [{low!r}, {high!r}) its parent gives it; the '
          'checkpoint is damaged or crafted.')
    if height:
      pending.extend((entry['location'], height - 1, prefix + entry['subtree_common_prefix'],
                      key, next_key)
                     for entry, key, next_key in zip(children, keys, [*keys[1:], high]))
      continue
    for entry, key in zip(children, keys):
      value = entry.get('inline_value')
      if value is None:
        value = files.resolve(entry['indirect_value'])
      entries[key.decode()] = value
    if len(entries) > MAX_TREE_KEYS:
      return None
  return entries
