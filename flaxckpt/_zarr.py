"""Zarr array layout: dtype names, chunk shapes and raw (uncompressed) zarr v2 chunks.

Uncompressed zarr v2 chunks are plain C-order little-endian element bytes, so flaxckpt writes and
reads them directly through a kvstore, one batched transaction for all leaves, instead of opening a
tensorstore array per leaf (which costs ~80 us a leaf). Anything else (zstd chunks, zarr v3) goes
through tensorstore's zarr drivers.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import resource
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from flaxckpt import _checksums, _errors, _safe_json

ZARRAY = '.zarray'
ZARR_JSON = 'zarr.json'

# Orbax splits any chunk larger than the OCDBT target data file size (2 GiB locally) so that a
# single value never exceeds one data file; we keep the same rule so chunk layouts match.
MAX_CHUNK_BYTES = 2**31
# The most chunks an array's metadata may declare. A reader lists every chunk key before it
# reads, so a .zarray declaring 1e12 chunks of one element would take hours and terabytes to
# list; Orbax writes one chunk per shard (split at MAX_CHUNK_BYTES), far fewer than this.
MAX_CHUNKS = 1 << 20


def memory_limit() -> int:
  """The most bytes one array read may allocate: this machine's physical memory, or the
  process's address-space limit when that is lower. A declared size above it cannot be
  restored here, so it is refused before anything is allocated."""
  limit = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  return min(limit, soft) if soft != resource.RLIM_INFINITY else limit


def check_allocation(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
  """Refuses to allocate an array of ``shape`` and ``dtype`` larger than ``memory_limit``."""
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  if nbytes > memory_limit():
    raise _errors.LimitExceededError(
        f'{what}: declares {nbytes} bytes ({np.dtype(dtype).name}, shape {tuple(shape)}), more '
        f'than the {memory_limit()} bytes of memory this process may use; the checkpoint is '
        'damaged or hostile, or too large to restore whole here (restore it sharded).')


def check_shape(shape: tuple[Any, ...]) -> tuple[int, ...]:
  """Returns ``shape`` after refusing (ValueError) one that is not whole numbers >= 0."""
  if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
    raise ValueError(f'shape {list(shape)} must be whole numbers, none negative')
  return shape


def check_grid(shape: tuple[int, ...], chunks: tuple[int, ...], what: str) -> None:
  """Refuses a shape and chunk shape that are not lists of whole numbers of the same rank
  (chunks positive), or whose grid has more than ``MAX_CHUNKS`` chunks."""
  if (len(shape) != len(chunks) or
      not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) or
      not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chunks)):
    raise ValueError(f'shape {list(shape)} and chunks {list(chunks)} must be whole numbers of '
                     'the same rank, chunks positive')
  count = math.prod(-(-s // c) for s, c in zip(shape, chunks))
  if count > MAX_CHUNKS:
    raise _errors.LimitExceededError(
        f'{what}: declares {count} chunks (shape {list(shape)} in chunks of {list(chunks)}), '
        f'more than the {MAX_CHUNKS} any checkpoint array has; the checkpoint is damaged or '
        'hostile.')


def zarr2_dtype(dtype: np.dtype) -> str:
  """The zarr v2 dtype string: numpy typestr, or the bare name for ml_dtypes (``bfloat16``)."""
  dtype = np.dtype(dtype)
  if dtype.kind == 'V':
    return dtype.name
  return dtype.newbyteorder('<').str if dtype.itemsize > 1 else dtype.str


@functools.lru_cache(maxsize=None)
def parse_dtype(name: str) -> np.dtype:
  """Parses a zarr v2 or v3 dtype string (``<f4``, ``bfloat16``, ``float32``)."""
  import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy; jax already imports it)
  return np.dtype(name)


@functools.lru_cache(maxsize=4096)
def zarray_bytes(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype) -> bytes:
  """``.zarray`` of an uncompressed array exactly as tensorstore writes it: compact JSON with
  sorted keys (compressed arrays are written by tensorstore itself)."""
  meta = {
      'chunks': list(chunks),
      'compressor': None,
      'dimension_separator': '.',
      'dtype': zarr2_dtype(dtype),
      'fill_value': None,
      'filters': None,
      'order': 'C',
      'shape': list(shape),
      'zarr_format': 2,
  }
  return json.dumps(meta, separators=(',', ':'), sort_keys=True).encode()


@functools.lru_cache(maxsize=4096)
def parse_metadata_json(data: bytes) -> dict[str, Any]:
  return _safe_json.loads(data, 'zarr metadata')


class Zarr2Layout(NamedTuple):
  """What a reader needs from one ``.zarray``."""
  raw: bool  # Chunks are plain bytes flaxckpt decodes itself.
  shape: tuple[int, ...]
  chunks: tuple[int, ...]
  dtype: np.dtype
  grid: tuple[tuple[int, ...], ...]  # Every chunk index.
  key_suffixes: tuple[str, ...]  # '/<chunk key>' for each index of ``grid``.
  chunk_nbytes: int
  checksum: int  # Of the layout (``_checksums.of_layout``).
  fill: Any  # What a missing chunk reads as (the .zarray's fill_value; 0 for null).

  @property
  def single_chunk(self) -> bool:
    return self.chunks == self.shape and len(self.grid) == 1


@functools.lru_cache(maxsize=4096)  # Trees repeat a few array layouts many times.
def zarr2_layout(zarray: bytes) -> Zarr2Layout:
  """Raises ValueError & co. for a damaged ``.zarray``, LimitExceededError for one declaring
  more chunks than ``MAX_CHUNKS``."""
  meta = _safe_json.loads(zarray, ZARRAY)
  shape, chunks = tuple(meta['shape']), tuple(meta['chunks'])
  check_grid(shape, chunks, ZARRAY)
  dtype = parse_dtype(meta['dtype'])
  fill = _fill_value(meta.get('fill_value'), dtype)
  indices = tuple(grid(shape, chunks))
  return Zarr2Layout(is_raw_zarr2(meta) and fill is not None, shape, chunks, dtype, indices,
                     tuple('/' + chunk_key(i) for i in indices), math.prod(chunks) * dtype.itemsize,
                     _checksums.of_layout(dtype, shape, chunks, dtype.byteorder == '>'),
                     fill)


_FLOAT_NAMES = {'NaN': math.nan, 'Infinity': math.inf, '-Infinity': -math.inf}


def _fill_value(value: Any, dtype: np.dtype) -> Any:
  """A .zarray ``fill_value`` as a numpy scalar of ``dtype`` (null: zero), or None when it is
  one this module does not decode (tensorstore's driver then reads the array)."""
  if value is None:
    return dtype.type(0) if dtype.kind != 'V' else np.zeros((), dtype)[()]
  if isinstance(value, str):
    value = _FLOAT_NAMES.get(value)
  if isinstance(value, list) and len(value) == 2 and dtype.kind == 'c':
    parts: list[Any] = [_FLOAT_NAMES.get(v, v) for v in value]  # JSON values, numbers or not.
    value = complex(*parts)
  if not isinstance(value, (bool, int, float, complex)):
    return None
  try:
    return np.array(value).astype(dtype)[()]
  except (TypeError, ValueError, OverflowError):
    return None


def is_raw_zarr2(meta: dict[str, Any]) -> bool:
  """True when the chunks of a ``.zarray`` are plain bytes flaxckpt can decode itself."""
  return (meta.get('zarr_format') == 2 and meta.get('compressor') is None and
          not meta.get('filters') and meta.get('order', 'C') == 'C' and
          meta.get('dimension_separator', '.') == '.' and
          parse_dtype(meta['dtype']).kind != 'O')


def zarr3_spec_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
                        compress: bool) -> dict[str, Any]:
  """zarr v3 metadata in Orbax's layout: one sharding_indexed shard per chunk."""
  inner = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  if compress:
    inner.append({'name': 'zstd', 'configuration': {'level': 3, 'checksum': False}})
  return {
      'shape': list(shape),
      'data_type': np.dtype(dtype).name,  # zarr v3 uses plain names: float32, bfloat16.
      'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': list(chunks)}},
      'chunk_key_encoding': {'name': 'default'},
      'codecs': [{
          'name': 'sharding_indexed',
          'configuration': {
              'chunk_shape': list(chunks),
              'codecs': inner,
              'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                               {'name': 'crc32c'}],
              'index_location': 'end',
          },
      }],
  }


@functools.lru_cache(maxsize=4096)  # Trees repeat the same few shapes many times.
def choose_chunk_shape(write_shape: tuple[int, ...], global_shape: tuple[int, ...],
                       itemsize: int, max_bytes: int | None) -> tuple[int, ...]:
  """Shrinks ``write_shape`` until a chunk fits in ``max_bytes``, as Orbax does.

  Each dimension only takes divisors of its write size, so chunks tile every written block.
  Dimensions that are already split (sharded) shrink first, largest first.
  """
  chunk = [max(1, d) for d in write_shape]
  if max_bytes is None or math.prod(chunk) * itemsize <= max_bytes:
    return tuple(chunk)
  limit = max(1, max_bytes // itemsize)
  split = [w != g for w, g in zip(write_shape, global_shape)]
  while math.prod(chunk) > limit:
    candidates = [i for i in range(len(chunk)) if split[i] and chunk[i] > 1]
    if not candidates:
      if all(split) or all(c == 1 for c in chunk):
        break
      split = [True] * len(chunk)
      continue
    dim = max(candidates, key=lambda i: chunk[i])
    chunk[dim] = _next_smaller_divisor(max(1, write_shape[dim]), chunk[dim])
    split[dim] = True
  return tuple(chunk)


def _next_smaller_divisor(n: int, current: int) -> int:
  for d in range(current - 1, 0, -1):
    if n % d == 0:
      return d
  return 1


def chunk_key(grid_index: tuple[int, ...]) -> str:
  return '.'.join(map(str, grid_index)) if grid_index else '0'


@functools.lru_cache(maxsize=4096)  # Most trees store each array as one chunk at the origin.
def chunk_key_at(origin: tuple[int, ...], chunks: tuple[int, ...]) -> str:
  """The key of the chunk starting at the chunk-aligned ``origin``."""
  return chunk_key(tuple(o // c for o, c in zip(origin, chunks)))


def split_into_chunks(block: np.ndarray, origin: tuple[int, ...],
                      chunks: tuple[int, ...]) -> Iterable[tuple[str, np.ndarray]]:
  """(chunk key, chunk array) for each chunk of a block whose origin is chunk-aligned.

  Edge chunks are zero-padded to the full chunk shape, as zarr stores them. A block that is
  exactly one chunk (the common case, on the save path of every leaf) comes back as it is.
  """
  if block.shape == chunks:
    return ((chunk_key_at(origin, chunks), block),)
  return _split(block, origin, chunks)


def _split(block: np.ndarray, origin: tuple[int, ...],
           chunks: tuple[int, ...]) -> Iterator[tuple[str, np.ndarray]]:
  if block.size == 0:
    return
  ranges = [range(0, size, c) for size, c in zip(block.shape, chunks)]
  for starts in itertools.product(*ranges):
    piece = block[tuple(slice(s, s + c) for s, c in zip(starts, chunks))]
    if piece.shape != chunks:
      padded = np.zeros(chunks, dtype=block.dtype)
      padded[tuple(slice(0, n) for n in piece.shape)] = piece
      piece = padded
    key = tuple((o + s) // c for o, s, c in zip(origin, starts, chunks))
    yield chunk_key(key), piece


def chunk_bytes(piece: np.ndarray) -> bytes:
  if piece.dtype.byteorder == '>':
    piece = piece.astype(piece.dtype.newbyteorder('<'))
  return piece.tobytes(order='C')


def grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
  """All chunk grid indices of an array."""
  return itertools.product(*(range(math.ceil(s / c)) for s, c in zip(shape, chunks)))


def assemble(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
             pieces: dict[tuple[int, ...], bytes | None], fill: Any = 0,
             box: tuple[tuple[int, int], ...] | None = None) -> np.ndarray:
  """Builds an array from raw chunk bytes; ``None`` pieces take ``fill``.

  With ``box`` ((start, stop) per dimension) only that region is built, from the pieces that
  overlap it.
  """
  if box is None and len(pieces) == 1 and tuple(chunks) == tuple(shape):
    (data,) = pieces.values()
    if data is not None:
      return np.frombuffer(data, dtype=dtype, count=math.prod(shape)).reshape(shape)
  box = box or tuple((0, n) for n in shape)
  check_allocation(tuple(stop - start for start, stop in box), dtype, 'an array')
  out = np.empty(tuple(stop - start for start, stop in box), dtype=dtype)
  for index, data in pieces.items():
    lows = [i * c for i, c in zip(index, chunks)]
    spans = [(max(low, start), min(low + c, n, stop))
             for low, c, n, (start, stop) in zip(lows, chunks, shape, box)]
    if any(a >= b for a, b in spans):
      continue
    target = tuple(slice(a - start, b - start) for (a, b), (start, _) in zip(spans, box))
    if data is None:
      out[target] = fill
      continue
    piece = np.frombuffer(data, dtype=dtype, count=math.prod(chunks)).reshape(chunks)
    out[target] = piece[tuple(slice(a - low, b - low) for (a, b), low in zip(spans, lows))]
  return out


def grid_in(box: tuple[tuple[int, int], ...], chunks: tuple[int, ...]
            ) -> Iterator[tuple[int, ...]]:
  """The chunk grid indices that overlap ``box``."""
  return itertools.product(*(range(start // c, -(-stop // c))
                             for (start, stop), c in zip(box, chunks)))
