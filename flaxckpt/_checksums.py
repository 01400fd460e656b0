"""crc32c checksums of stored array chunks, kept in ``flaxckpt_checksums/process_<i>`` beside
the Orbax layout (Orbax ignores the folder; see docs/format.md).

A chunk's checksum covers its bytes as uncompressed zarr v2 stores them: C order, little-endian,
edge chunks zero-padded. Compressed and zarr v3 chunks use the same definition (their decoded
bytes), so any read that holds a whole chunk can verify it.

An array's *layout* checksum covers what its ``.zarray`` / ``zarr.json`` says about decoding
the chunks (dtype, shape, chunk shape), which nothing else records: one flipped byte there
(``<f4`` to ``<i4``) would turn the same, checked bytes into other numbers. The file keeps
layouts in ``"layouts"``; read back, they sit beside the array's chunk keys under ``LAYOUT``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Callable, NamedTuple

import crc32c
import numpy as np

from flaxckpt import _errors, _safe_json, _storage

DIR = 'flaxckpt_checksums'
ALGORITHM = 'crc32c'

LAYOUT = '.layout'  # Never a chunk key.

Location = tuple[pathlib.Path, int, int]  # (file, offset, length)
# Array name -> chunk key ('0.1', as zarr v2 names it) or LAYOUT -> crc.
Sums = dict[str, dict[str, int]]


def of_bytes(data: Any) -> int:
  return crc32c.crc32c(data)


def of_array(array: np.ndarray) -> int:
  array = np.ascontiguousarray(array)
  if array.dtype.byteorder == '>':
    array = array.astype(array.dtype.newbyteorder('<'))
  return crc32c.crc32c(array.reshape(-1).view(np.uint8).data)


@functools.lru_cache(maxsize=4096)  # Trees repeat a few layouts many times.
def of_layout(dtype: np.dtype, shape: tuple[int, ...], chunks: tuple[int, ...],
              big_endian: bool = False) -> int:
  """The checksum of an array's layout: its dtype's name (and byte order, when big-endian),
  shape and chunk shape. Saved arrays are little-endian, whatever ``dtype`` says."""
  order = ' big-endian' if big_endian else ''
  text = f'{np.dtype(dtype).name}{order} {list(shape)} {list(chunks)}'
  return crc32c.crc32c(text.encode())


def file_name(process_index: int) -> str:
  return f'{DIR}/process_{process_index}'


class Written(NamedTuple):
  """The checksums of the arrays one save wrote: layouts by array name, chunks by array name
  and chunk key."""
  layouts: dict[str, int]
  chunks: dict[str, dict[str, int]]

  def update(self, other: Written) -> None:
    self.layouts.update(other.layouts)
    self.chunks.update(other.chunks)


def to_json(written: Written, files: dict[str, int] | None = None) -> str:
  """The checksum file: chunks and layouts by array, and ``files`` (the crc32c of whole JSON
  files of the checkpoint, by name) when given."""
  content: dict[str, Any] = {'algorithm': ALGORITHM, 'chunks': written.chunks,
                             'layouts': written.layouts}
  if files:
    content['files'] = files
  return json.dumps(content, separators=(',', ':'))


class Recorded:
  """The checksums recorded in a checkpoint, read on first use: those of array chunks and
  layouts (``chunks``), and those of whole files such as ``_METADATA`` (``check_file``).
  Checkpoints without them (Orbax, older flaxckpt) have none, and nothing is checked."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory

  @functools.cached_property
  def _loaded(self) -> tuple[Sums, dict[str, int]]:
    folder = self.directory / DIR
    sums: Sums = {}
    files: dict[str, int] = {}
    if not _storage.is_dir(folder):
      return sums, files
    for name in sorted(_storage.list_names(folder)):
      path = folder / name
      try:
        raw = _safe_json.read(path)
        if raw.get('algorithm') != ALGORITHM:
          continue  # Written by a later release with another algorithm: nothing to check here.
        for array, chunks in raw['chunks'].items():
          sums.setdefault(array, {}).update({key: int(value) for key, value in chunks.items()})
        for array, value in raw.get('layouts', {}).items():  # Absent before layouts were kept.
          sums.setdefault(array, {})[LAYOUT] = int(value)
        files.update({file: int(value) for file, value in raw.get('files', {}).items()})
      except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise _errors.ChecksumError(
            f'{path}: the checksum file is damaged ({type(e).__name__}: {e}); expected JSON '
            f'{{"algorithm": "{ALGORITHM}", "chunks": {{...}}}}. Restore with '
            'verify_checksums=False to read the checkpoint unchecked.') from e
    return sums, files

  @property
  def chunks(self) -> Sums:
    return self._loaded[0]

  @property
  def files(self) -> dict[str, int]:
    return self._loaded[1]

  def check_file(self, name: str, data: bytes) -> None:
    """Checks the bytes of the checkpoint's file ``name`` (e.g. '_METADATA'), if recorded."""
    expected = self.files.get(name)
    if expected is not None and of_bytes(data) != expected:
      raise _errors.ChecksumError(
          f'{self.directory / name} has crc32c {of_bytes(data):#010x}, but {expected:#010x} '
          'was recorded when it was saved; the checkpoint is damaged.')


class Verifier:
  """Compares chunks read from ``directory`` with the checksums recorded at save."""

  def __init__(self, directory: pathlib.Path, sums: Sums):
    self.directory = directory
    self._sums = sums

  def __bool__(self) -> bool:
    return bool(self._sums)

  def expected(self, name: str, key: str) -> int | None:
    chunks = self._sums.get(name)
    return None if chunks is None else chunks.get(key)

  def check_bytes(self, name: str, key: str, data: Any,
                  where: Callable[[], Location | None] | None = None) -> None:
    """Checks a chunk's stored bytes. ``where`` finds its (file, offset, length), asked only to
    word an error."""
    expected = self.expected(name, key)
    if expected is not None:
      self._compare(name, key, expected, of_bytes(data), where)

  def check_array(self, name: str, key: str, array: np.ndarray,
                  where: Callable[[], Location | None] | None = None) -> None:
    """Checks a chunk read as an array (see ``check_bytes``)."""
    expected = self.expected(name, key)
    if expected is not None:
      self._compare(name, key, expected, of_array(array), where)

  def check_layout(self, name: str, dtype: np.dtype, shape: tuple[int, ...],
                   chunks: tuple[int, ...], meta_file: str, checksum: int | None = None) -> None:
    """Checks the layout an array's ``meta_file`` gives (``checksum`` is its ``of_layout``,
    when known) against the one recorded at save."""
    expected = self.expected(name, LAYOUT)
    if expected is None:
      return
    dtype = np.dtype(dtype)
    big_endian = dtype.byteorder == '>'
    if checksum is None:
      checksum = of_layout(dtype, tuple(shape), tuple(chunks), big_endian)
    if checksum != expected:
      kind = f'{dtype.name}{" big-endian" if big_endian else ""}'
      raise _errors.ChecksumError(
          f'{self.directory}: the {meta_file} of array {name!r} (key {name}/{meta_file}) '
          f'describes {kind} elements, shape {tuple(shape)} in chunks of {tuple(chunks)}, '
          f'whose crc32c {checksum:#010x} differs from the {expected:#010x} recorded when it '
          'was saved; the checkpoint is damaged.', name=name)

  def _compare(self, name: str, key: str, expected: int, actual: int,
               where: Callable[[], Location | None] | None) -> None:
    if expected == actual:
      return
    location = where() if where is not None else None
    place = ''
    if location is not None:
      path, offset, length = location
      place = f' (stored in {path}, bytes {offset} to {offset + length})'
    raise _errors.ChecksumError(
        f'{self.directory}: chunk {key!r} of array {name!r}{place} has crc32c {actual:#010x}, '
        f'but {expected:#010x} was recorded when it was saved; the checkpoint is damaged.',
        name=name)


NO_VERIFIER = Verifier(pathlib.Path(), {})
