"""Flax's msgpack checkpoint encoding, streamed to and from files.

The bytes are exactly those of ``flax.serialization.msgpack_serialize`` (FORMATS.md §3.3): arrays
are msgpack ext objects (code 1; code 3 for numpy scalars, code 2 for complex) holding
``[shape, dtype name, raw bytes]``, and arrays over 2**30 bytes become a chunked dict. Flax builds
the whole byte string in memory, copying every array several times. Here ``msgpack`` still
encodes keys and scalars, but array bytes go from the array's memory straight to the file, and
reading returns arrays as views into the one buffer the file was read into.
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import msgpack
import numpy as np

if TYPE_CHECKING:  # Typing-only names: what `write` needs of a file is a `write` method.
  from _typeshed import SupportsWrite
  from typing_extensions import Buffer

ARRAY_EXT = 1
COMPLEX_EXT = 2
SCALAR_EXT = 3
MAX_CHUNK_SIZE = 2**30  # Arrays of more bytes are split into chunks (flax's threshold).
CHUNKED_MARKER = '__msgpack_chunked_array__'
_BUFFER_BYTES = 1 << 16  # Encodings smaller than this are gathered before being written.


class MsgpackDecodeError(ValueError):
  """The bytes are not one complete msgpack checkpoint."""


# --- writing -----------------------------------------------------------------------------------


def _container_header(size: int, fix: int, code16: int) -> bytes:
  """Map (fix=0x80, code16=0xde) or array (0x90, 0xdc) header, in msgpack's smallest form."""
  if size < 16:
    return bytes((fix | size,))
  if size < 1 << 16:
    return struct.pack('>BH', code16, size)
  return struct.pack('>BI', code16 + 1, size)


def _ext_header(code: int, size: int) -> bytes:
  fixed = {1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8}.get(size)
  if fixed is not None:
    return bytes((fixed, code))
  if size < 1 << 8:
    return struct.pack('>BBb', 0xc7, size, code)
  if size < 1 << 16:
    return struct.pack('>BHb', 0xc8, size, code)
  return struct.pack('>BIb', 0xc9, size, code)


def _bin_header(size: int) -> bytes:
  if size < 1 << 8:
    return struct.pack('>BB', 0xc4, size)
  if size < 1 << 16:
    return struct.pack('>BH', 0xc5, size)
  return struct.pack('>BI', 0xc6, size)


def host_array(value: Any) -> np.ndarray:
  """The host array flax would encode for ``value`` (a numpy or fully addressable jax array)."""
  array = np.asarray(value)
  if array.dtype.hasobject or array.dtype.isalignedstruct:
    raise TypeError(f'An array of dtype {array.dtype} cannot be stored in a msgpack checkpoint: '
                    'object and structured dtypes are not supported.')
  return array


def _array_ext(array: np.ndarray, code: int) -> tuple[bytes, memoryview]:
  """The encoding of ``array`` as ext ``code``: everything up to its data, and the data."""
  if not array.flags.c_contiguous:
    array = np.ascontiguousarray(array)
  data = array.reshape(-1).view(np.uint8).data
  inner = (b'\x93' + msgpack.packb(list(array.shape)) + msgpack.packb(array.dtype.name)
           + _bin_header(data.nbytes))
  return _ext_header(code, len(inner) + data.nbytes) + inner, data


def _chunked(array: np.ndarray) -> dict[str, Any]:
  """Flax's stand-in for an array of over MAX_CHUNK_SIZE bytes: its shape and flat pieces."""
  step = max(1, MAX_CHUNK_SIZE // array.dtype.itemsize)
  flat = np.ascontiguousarray(array).reshape(-1)
  return {CHUNKED_MARKER: True,
          'shape': {str(i): n for i, n in enumerate(array.shape)},
          'chunks': {str(i): flat[start:start + step]
                     for i, start in enumerate(range(0, flat.size, step))}}


def _ext_hook(value: Any) -> Any:
  """msgpack's fallback for leaves it cannot encode (arrays inside lists, complex, ...)."""
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    code = SCALAR_EXT if isinstance(value, np.generic) else ARRAY_EXT
    head, data = _array_ext(host_array(value), code)
    return msgpack.ExtType(code, head[len(_ext_header(code, len(head) + data.nbytes)):]
                           + data.tobytes())
  if isinstance(value, complex):
    return msgpack.ExtType(COMPLEX_EXT, msgpack.packb((value.real, value.imag)))
  return value  # msgpack then raises its own TypeError, as it does for flax.


class Deferred(NamedTuple):
  """A leaf whose value ``load`` returns only when the writer reaches it, so a conversion can
  stream a state through memory one leaf at a time."""
  load: Callable[[], Any]


class _Writer:
  """Encodes one tree into a file: small encodings are buffered, array data written as is."""

  def __init__(self, file: SupportsWrite[Buffer]):
    self._file = file
    self._buffer = bytearray()
    self._packer = msgpack.Packer(default=_ext_hook, strict_types=True)

  def write(self, value: Any, chunkable: bool = True) -> None:
    """``chunkable``: flax splits big arrays only at the top and in dict values, not in lists."""
    if type(value) is Deferred:
      value = value.load()
    kind = type(value)
    if kind is dict:
      self._buffer += _container_header(len(value), 0x80, 0xde)
      for key, item in value.items():
        self._buffer += self._packer.pack(key)
        self.write(item, chunkable)
    elif kind is list:
      self._buffer += _container_header(len(value), 0x90, 0xdc)
      for item in value:
        self.write(item, chunkable=False)
    elif isinstance(value, (np.ndarray, jax.Array)):
      array = host_array(value)
      if chunkable and array.nbytes > MAX_CHUNK_SIZE:
        self.write(_chunked(array))
      else:
        self._write_array(array, ARRAY_EXT)
    elif isinstance(value, np.generic):
      self._write_array(host_array(value), SCALAR_EXT)
    else:
      self._buffer += self._packer.pack(value)
    if len(self._buffer) >= _BUFFER_BYTES:
      self.flush()

  def _write_array(self, array: np.ndarray, code: int) -> None:
    head, data = _array_ext(array, code)
    self._buffer += head
    if data.nbytes < _BUFFER_BYTES:
      self._buffer += data
    else:
      self.flush()
      self._file.write(data)

  def flush(self) -> None:
    if self._buffer:
      self._file.write(self._buffer)
      self._buffer.clear()


def write(file: SupportsWrite[Buffer], state: Any) -> None:
  """Writes ``state`` (a flax state dict) to ``file`` as ``flax.serialization.msgpack_serialize``
  would encode it."""
  writer = _Writer(file)
  writer.write(state)
  writer.flush()


def encode(state: Any) -> bytes:
  """The bytes ``write`` produces, in memory (for small trees and tests)."""
  import io
  out = io.BytesIO()
  write(out, state)
  return out.getvalue()


# --- reading -----------------------------------------------------------------------------------
#
# The reader accepts exactly what flax's writer produces and names the byte offset of anything
# else: a file cut short, a declared length past the end, a key that is not a string or appears
# twice, an ext type flax does not write, an array whose shape, dtype name or byte count do not
# agree, a chunked array with missing or misnumbered pieces. Nothing else escapes ``decode``.

MAX_NDIM = 64  # numpy's limit; also bounds the work of multiplying out a declared shape.
_MAX_DIM = 1 << 62  # No axis of an array numpy can hold is longer.
MAX_DEPTH = 400  # Deeper nesting is refused before it meets Python's recursion limit (1000
# frames, one per level here); flax.serialization.to_bytes fails at about 330 levels itself.

_FIXED_WIDTH = {  # type byte -> (struct format, byte count) of ints and floats
    0xca: ('>f', 4), 0xcb: ('>d', 8), 0xcc: ('>B', 1), 0xcd: ('>H', 2), 0xce: ('>I', 4),
    0xcf: ('>Q', 8), 0xd0: ('>b', 1), 0xd1: ('>h', 2), 0xd2: ('>i', 4), 0xd3: ('>q', 8),
}
_SIZED = {  # type byte -> (kind, struct format of the length, byte count of the length)
    0xc4: ('bin', '>B', 1), 0xc5: ('bin', '>H', 2), 0xc6: ('bin', '>I', 4),
    0xc7: ('ext', '>B', 1), 0xc8: ('ext', '>H', 2), 0xc9: ('ext', '>I', 4),
    0xd9: ('str', '>B', 1), 0xda: ('str', '>H', 2), 0xdb: ('str', '>I', 4),
    0xdc: ('array', '>H', 2), 0xdd: ('array', '>I', 4),
    0xde: ('map', '>H', 2), 0xdf: ('map', '>I', 4),
}
_FIXEXT_SIZES = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_BIN_WIDTHS = {0xc4: (1, '>B'), 0xc5: (2, '>H'), 0xc6: (4, '>I')}


def _is_shape(shape: Any) -> bool:
  return (isinstance(shape, list) and len(shape) <= MAX_NDIM
          and all(type(n) is int and 0 <= n < _MAX_DIM for n in shape))


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 200 else f'{text[:200]}... ({len(value)} entries)'


@functools.lru_cache(maxsize=256)
def _dtype(name: str) -> np.dtype | None:
  """The dtype flax wrote as ``name`` (its ``dtype.name``), or None if no such dtype has it."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # Deprecated aliases are not names flax writes.
      dtype = np.dtype(name)
  except (TypeError, ValueError, Warning):
    return None
  if dtype.name != name or dtype.hasobject or not dtype.itemsize:
    return None
  return dtype


class _Reader:
  """A msgpack decoder over one buffer whose arrays are views into that buffer."""

  def __init__(self, buffer: np.ndarray | bytearray | bytes | memoryview):
    self._buffer = buffer
    self._view = buffer.data if isinstance(buffer, np.ndarray) else memoryview(buffer)
    self._pos = 0

  def _take(self, size: int) -> int:
    start = self._pos
    if size > len(self._view) - start:
      raise MsgpackDecodeError(
          f'the data ends after {len(self._view)} bytes, inside a value that starts at byte '
          f'{start} and needs {size} bytes')
    self._pos += size
    return start

  def _unpack(self, fmt: str, size: int) -> Any:
    return struct.unpack_from(fmt, self._view, self._take(size))[0]

  def read(self, depth: int = 0) -> Any:
    """The value at the current position. Containers are read in this frame (one frame per
    level of nesting)."""
    start = self._pos
    code = self._view[self._take(1)]
    if code <= 0x7f:
      return code
    if code >= 0xe0:
      return code - 0x100
    if 0xa0 <= code <= 0xbf:
      return self._read_str(code & 0x1f)
    if code == 0xc0:
      return None
    if code in (0xc2, 0xc3):
      return code == 0xc3
    fixed = _FIXED_WIDTH.get(code)
    if fixed is not None:
      return self._unpack(*fixed)
    if code in _FIXEXT_SIZES:
      return self._read_ext(_FIXEXT_SIZES[code])
    if 0x80 <= code <= 0x9f:
      kind, size = ('map' if code <= 0x8f else 'array'), code & 0x0f
    else:
      sized = _SIZED.get(code)
      if sized is None:
        raise MsgpackDecodeError(f'byte {start} holds 0x{code:02x}, which starts no msgpack '
                                 'value')
      kind, fmt, width = sized
      size = self._unpack(fmt, width)
      if kind == 'bin':
        begin = self._take(size)
        return bytes(self._view[begin:self._pos])
      if kind == 'str':
        return self._read_str(size)
      if kind == 'ext':
        return self._read_ext(size)
    if depth >= MAX_DEPTH:
      raise MsgpackDecodeError(f'the {kind} at byte {start} is nested {depth} levels deep; '
                               f'flax checkpoints nest fewer than {MAX_DEPTH}')
    entry_bytes = 2 if kind == 'map' else 1
    if size * entry_bytes > len(self._view) - self._pos:
      raise MsgpackDecodeError(
          f'the {kind} at byte {start} declares {size} entries, more than the '
          f'{len(self._view) - self._pos} bytes left can hold')
    if kind == 'array':
      items = []
      for _ in range(size):
        items.append(self.read(depth + 1))
      return items
    out = {}
    for _ in range(size):
      key_at = self._pos
      key = self.read(depth + 1)
      if not isinstance(key, (str, bytes)):
        raise MsgpackDecodeError(f'the map at byte {start} has a key of type '
                                 f'{type(key).__name__} at byte {key_at}; keys are strings')
      if key in out:
        raise MsgpackDecodeError(f'the map at byte {start} has the key {key!r} twice')
      out[key] = self.read(depth + 1)
    return out

  def _read_str(self, size: int) -> str:
    start = self._take(size)
    try:
      return str(self._view[start:self._pos], 'utf-8')
    except UnicodeDecodeError as e:
      raise MsgpackDecodeError(f'the string at byte {start} is not UTF-8: {e}') from e

  def _read_ext(self, size: int) -> Any:
    ext_code = self._unpack('>b', 1)
    start = self._take(size)
    if ext_code in (ARRAY_EXT, SCALAR_EXT):
      end, self._pos = self._pos, start
      try:
        array = self._read_array(start, end, scalar=ext_code == SCALAR_EXT)
      finally:
        self._pos = end
      return array[()] if ext_code == SCALAR_EXT else array
    if ext_code == COMPLEX_EXT:
      try:
        parts = _Reader(self._view[start:self._pos]).read_all(depth_left=1)
        if (not isinstance(parts, list) or len(parts) != 2
            or not all(type(part) in (int, float) for part in parts)):
          raise MsgpackDecodeError(f'{parts!r} is not [real, imag]')
        return complex(*parts)
      except (MsgpackDecodeError, OverflowError) as e:
        raise MsgpackDecodeError(f'the complex number at byte {start} is malformed: {e}') from None
    raise MsgpackDecodeError(f'byte {start - 1} holds the ext type code {ext_code}, but '
                             'flax writes only 1 (array), 2 (complex) and 3 (numpy scalar)')

  def _read_array(self, start: int, end: int, scalar: bool) -> np.ndarray:
    """The array ``[shape, dtype name, raw bytes]`` in bytes ``start:end``."""
    if self._view[self._take(1)] != 0x93:
      raise MsgpackDecodeError(f'the array at byte {start} is not a 3-element list')
    shape, dtype_name = self.read(MAX_DEPTH - 1), self.read(MAX_DEPTH)
    bin_width = _BIN_WIDTHS.get(self._view[self._take(1)])
    if bin_width is None:
      raise MsgpackDecodeError(f'the array at byte {start} has no raw data')
    count = self._unpack(bin_width[1], bin_width[0])
    data = self._take(count)
    if self._pos != end:
      raise MsgpackDecodeError(f'the array at byte {start} has {end - self._pos} bytes more '
                               'than its parts')
    if not _is_shape(shape) or (scalar and shape):
      raise MsgpackDecodeError(f'the array at byte {start} has the shape {_short(shape)}, not a '
                               f'list of at most {MAX_NDIM} sizes'
                               + (' (a scalar has shape [])' if scalar else ''))
    dtype = _dtype(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
      raise MsgpackDecodeError(f'the array at byte {start} has the dtype name {dtype_name!r}, '
                               'which names no numpy dtype')
    expected = math.prod(shape) * dtype.itemsize
    if count != expected:
      raise MsgpackDecodeError(f'the array at byte {start} holds {count} bytes, not the '
                               f'{expected} of {shape} x {dtype}')
    try:
      return np.frombuffer(self._buffer, dtype, count // dtype.itemsize, data).reshape(shape)
    except ValueError as e:  # An empty array whose other axes numpy cannot hold.
      raise MsgpackDecodeError(f'the array at byte {start} has the shape {_short(shape)}: '
                               f'{e}') from None

  def read_all(self, depth_left: int = MAX_DEPTH) -> Any:
    value = self.read(MAX_DEPTH - depth_left)
    if self._pos != len(self._view):
      raise MsgpackDecodeError(f'{len(self._view) - self._pos} bytes follow the checkpoint '
                               f'data, which ends at byte {self._pos}')
    return value


def _unchunk_in_place(node: Any) -> Any:
  """Joins chunked arrays where flax looks for them: at the top and as dict values."""
  if not isinstance(node, dict):
    return node
  if CHUNKED_MARKER in node:
    return _unchunk(node)
  for key, value in node.items():
    if isinstance(value, dict):
      node[key] = _unchunk_in_place(value)
  return node


def _numbered(node: Any, what: str) -> list[Any]:
  """The values of a ``{'0': ..., '1': ...}`` dict, in order."""
  numbers = [str(i) for i in range(len(node))] if isinstance(node, dict) else []
  if not isinstance(node, dict) or set(node) != set(numbers):
    keys = list(node) if isinstance(node, dict) else type(node).__name__
    raise MsgpackDecodeError(f'a chunked array has {what} {keys!r}, not keys "0", "1", ...')
  return [node[key] for key in numbers]


def _unchunk(node: dict[str, Any]) -> np.ndarray:
  if set(node) != {CHUNKED_MARKER, 'shape', 'chunks'} or node[CHUNKED_MARKER] is not True:
    raise MsgpackDecodeError(f'a chunked array has the keys {list(node)!r}, not '
                             f'{[CHUNKED_MARKER, "shape", "chunks"]!r}')
  shape = _numbered(node['shape'], 'the shape')
  chunks = _numbered(node['chunks'], 'the chunks')
  if not _is_shape(shape):
    raise MsgpackDecodeError(f'a chunked array has the shape {_short(shape)}, not a list of at '
                             f'most {MAX_NDIM} sizes')
  if not chunks or not all(type(c) is np.ndarray and c.ndim == 1 and c.dtype == chunks[0].dtype
                           for c in chunks):
    raise MsgpackDecodeError('a chunked array has chunks that are not flat arrays of one dtype')
  step = max(1, MAX_CHUNK_SIZE // chunks[0].dtype.itemsize)
  sizes = [c.size for c in chunks]
  total = math.prod(shape)
  if sum(sizes) != total or any(n != step for n in sizes[:-1]) or not 0 < sizes[-1] <= step:
    raise MsgpackDecodeError(f'a chunked array of shape {tuple(shape)} has chunks of '
                             f'{sizes} elements; expected {total} in pieces of {step}')
  try:
    return np.concatenate(chunks).reshape(shape)
  except ValueError as e:
    raise MsgpackDecodeError(f'a chunked array has the shape {_short(shape)}: {e}') from None


def decode(buffer: np.ndarray | bytearray | bytes) -> Any:
  """The state dict encoded in ``buffer``; arrays are views into it (writable unless it is bytes).

  Raises MsgpackDecodeError if ``buffer`` is not exactly one msgpack value as flax writes it.
  """
  try:
    return _unchunk_in_place(_Reader(buffer).read_all())
  except RecursionError as e:  # Only when the caller's own stack is already deep.
    raise MsgpackDecodeError(f'the data is nested too deeply to read here ({e})') from None
