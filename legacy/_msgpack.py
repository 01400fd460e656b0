"""Flax's msgpack checkpoint encoding, streamed to and from files.

The bytes are exactly those of ``flax.serialization.msgpack_serialize`` (FORMATS.md §3.3): arrays
are msgpack ext objects (code 1; code 3 for numpy scalars, code 2 for complex) holding
``[shape, dtype name, raw bytes]``, and arrays over 2**30 bytes become a chunked dict. Flax builds
the whole byte string in memory, copying every array several times. Here ``msgpack`` still
encodes keys and scalars, but array bytes go from the array's memory straight to the file, and
reading returns arrays as views into the one buffer the file was read into.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import IO, Any, NamedTuple

import jax
import msgpack
import numpy as np

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
  data = memoryview(array.reshape(-1).view(np.uint8))
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

  def __init__(self, file: IO[bytes]):
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


def write(file: IO[bytes], state: Any) -> None:
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


class _Reader:
  """A msgpack decoder over one buffer whose arrays are views into that buffer."""

  def __init__(self, buffer: np.ndarray | bytearray | bytes):
    self._buffer = buffer
    self._view = memoryview(buffer)
    self._pos = 0

  def _take(self, size: int) -> int:
    start = self._pos
    self._pos += size
    if self._pos > len(self._view):
      raise MsgpackDecodeError(
          f'the data ends after {len(self._view)} bytes, inside a value that starts at byte '
          f'{start} and needs {size} bytes')
    return start

  def _unpack(self, fmt: str, size: int) -> Any:
    return struct.unpack_from(fmt, self._view, self._take(size))[0]

  def read(self) -> Any:
    code = self._view[self._take(1)]
    if code <= 0x7f:
      return code
    if code >= 0xe0:
      return code - 0x100
    if 0x80 <= code <= 0x8f:
      return self._read_map(code & 0x0f)
    if 0x90 <= code <= 0x9f:
      return [self.read() for _ in range(code & 0x0f)]
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
    sized = _SIZED.get(code)
    if sized is None:
      raise MsgpackDecodeError(f'byte {self._pos - 1} holds 0x{code:02x}, which starts no '
                               'msgpack value')
    kind, fmt, width = sized
    size = self._unpack(fmt, width)
    if kind == 'bin':
      start = self._take(size)
      return bytes(self._view[start:self._pos])
    if kind == 'str':
      return self._read_str(size)
    if kind == 'ext':
      return self._read_ext(size)
    if kind == 'array':
      return [self.read() for _ in range(size)]
    return self._read_map(size)

  def _read_str(self, size: int) -> str:
    start = self._take(size)
    try:
      return str(self._view[start:self._pos], 'utf-8')
    except UnicodeDecodeError as e:
      raise MsgpackDecodeError(f'the string at byte {start} is not UTF-8: {e}') from e

  def _read_map(self, size: int) -> dict[Any, Any]:
    out = {}
    for _ in range(size):
      key = self.read()
      out[tuple(key) if isinstance(key, list) else key] = self.read()
    return out

  def _read_ext(self, size: int) -> Any:
    ext_code = self._unpack('>b', 1)
    start = self._take(size)
    if ext_code in (ARRAY_EXT, SCALAR_EXT):
      array = self._read_array(start, size)
      return array[()] if ext_code == SCALAR_EXT else array
    payload = bytes(self._view[start:self._pos])
    if ext_code == COMPLEX_EXT:
      real, imag = msgpack.unpackb(payload)
      return complex(real, imag)
    return msgpack.ExtType(ext_code, payload)

  def _read_array(self, start: int, size: int) -> np.ndarray:
    end, self._pos = self._pos, start
    try:
      if self._view[self._take(1)] != 0x93:  # [shape, dtype name, data]
        raise MsgpackDecodeError(f'the array at byte {start} is not a 3-element list')
      shape, dtype_name = self.read(), self.read()
      header = self._view[self._take(1)]
      width = {0xc4: 1, 0xc5: 2, 0xc6: 4}.get(header)
      if width is None:
        raise MsgpackDecodeError(f'the array at byte {start} has no raw data')
      count = self._unpack({1: '>B', 2: '>H', 4: '>I'}[width], width)
      data = self._take(count)
      if self._pos != end or not isinstance(shape, list) or not isinstance(dtype_name, str):
        raise MsgpackDecodeError(f'the array at byte {start} is malformed')
      dtype = np.dtype(dtype_name)
      if count != int(np.prod(shape)) * dtype.itemsize:
        raise MsgpackDecodeError(f'the array at byte {start} holds {count} bytes, not the '
                                 f'{int(np.prod(shape)) * dtype.itemsize} of {shape} x {dtype}')
    except TypeError as e:
      raise MsgpackDecodeError(f'the array at byte {start} is malformed: {e}') from e
    finally:
      self._pos = max(self._pos, end)
    return np.frombuffer(self._buffer, dtype, count // dtype.itemsize if dtype.itemsize else 0,
                         data).reshape(shape)

  def read_all(self) -> Any:
    value = self.read()
    if self._pos != len(self._view):
      raise MsgpackDecodeError(f'{len(self._view) - self._pos} bytes follow the checkpoint '
                               'data')
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


def _unchunk(node: dict[str, Any]) -> np.ndarray:
  shape = tuple(node['shape'][str(i)] for i in range(len(node['shape'])))
  chunks = [node['chunks'][str(i)] for i in range(len(node['chunks']))]
  return np.concatenate(chunks).reshape(shape)


def decode(buffer: np.ndarray | bytearray | bytes) -> Any:
  """The state dict encoded in ``buffer``; arrays are views into it (writable unless it is bytes).

  Raises MsgpackDecodeError if ``buffer`` is not exactly one msgpack value.
  """
  return _unchunk_in_place(_Reader(buffer).read_all())
