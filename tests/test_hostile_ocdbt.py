"""Hostile OCDBT checkpoints: B+tree nodes that name files outside the checkpoint, FIFOs, links,
ranges past a file's end, cycles and shared subtrees, crafted on disk with valid checksums so
that they get past tensorstore's own decoding and reach flaxckpt's direct reader.

The helpers below decode and re-encode the OCDBT manifest and B+tree nodes (uncompressed, as
flaxckpt writes them) following tensorstore's format description
(tensorstore/kvstore/ocdbt/index.rst): a header (magic, total length, version, compression), a
body of varints and byte columns, and a trailing crc32c of everything before it.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import shutil
import struct

import crc32c
import numpy as np
import tensorstore

import flaxckpt as ocp
import hostile
from flaxckpt import _arrays, _sources

_BTREE_MAGIC = 0x0CDB20DE
_MANIFEST_MAGIC = 0x0CDB3A2A


# --- the OCDBT codec ------------------------------------------------------------------------

def _varint(n: int) -> bytes:
  out = bytearray()
  while n >= 0x80:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  return bytes(out + bytes([n]))


class _Reader:
  def __init__(self, data: bytes, pos: int):
    self.data, self.pos = data, pos

  def varint(self) -> int:
    n = shift = 0
    while True:
      byte = self.byte()
      n |= (byte & 0x7F) << shift
      shift += 7
      if byte < 0x80:
        return n

  def byte(self) -> int:
    self.pos += 1
    return self.data[self.pos - 1]

  def take(self, n: int) -> bytes:
    self.pos += n
    return self.data[self.pos - n:self.pos]

  def column(self, n: int) -> list[int]:
    return [self.varint() for _ in range(n)]


def _seal(magic: int, body: bytes) -> bytes:
  """Header, format version 0, no compression, ``body``, crc32c of all of it."""
  length = 12 + 2 + len(body) + 4
  data = struct.pack('>I', magic) + struct.pack('<Q', length) + b'\0\0' + body
  return data + struct.pack('<I', crc32c.crc32c(data))


def _unseal(data: bytes, magic: int) -> _Reader:
  assert struct.unpack('>I', data[:4])[0] == magic
  assert struct.unpack('<Q', data[4:12])[0] == len(data)
  assert struct.unpack('<I', data[-4:])[0] == crc32c.crc32c(data[:-4])
  reader = _Reader(data[:-4], 12)
  assert (reader.varint(), reader.varint()) == (0, 0), 'only version 0, uncompressed'
  return reader


def _read_files(reader: _Reader) -> list[tuple[str, str]]:
  """A data file table: (base path, relative path) pairs, prefix-compressed."""
  n = reader.varint()
  prefixes = [0] + reader.column(n - 1) if n else []
  suffixes, base_lengths = reader.column(n), reader.column(n)
  files, previous = [], b''
  for prefix, suffix, base_length in zip(prefixes, suffixes, base_lengths):
    previous = previous[:prefix] + reader.take(suffix)
    files.append((previous[:base_length].decode(), previous[base_length:].decode()))
  return files


def _files_bytes(files: list[tuple[str, str]]) -> bytes:
  """A data file table without prefix compression (every prefix length 0)."""
  paths = [(base.encode(), relative.encode()) for base, relative in files]
  return (_varint(len(paths)) + b''.join(_varint(0) for _ in paths[1:])
          + b''.join(_varint(len(base) + len(rel)) for base, rel in paths)
          + b''.join(_varint(len(base)) for base, _ in paths)
          + b''.join(base + rel for base, rel in paths))


@dataclasses.dataclass
class Ref:
  """Where a value or a node lies: an index into the data file table, offset, length."""
  file: int
  offset: int
  length: int


@dataclasses.dataclass
class Child:
  key: bytes
  ref: Ref
  common_prefix: int = 0  # Length of the key prefix shared by the whole subtree.
  stats: tuple[int, int, int] = (0, 0, 0)  # Keys, tree bytes, indirect value bytes.


@dataclasses.dataclass
class Node:
  height: int
  files: list[tuple[str, str]]
  entries: list  # Leaf: (key, bytes | Ref); interior: Child.


def decode_node(data: bytes) -> Node:
  reader = _unseal(data, _BTREE_MAGIC)
  height, files = reader.byte(), _read_files(reader)
  n = reader.varint()
  prefixes, suffixes = [0] + reader.column(n - 1), reader.column(n)
  common = reader.column(n) if height else None
  keys, previous = [], b''
  for prefix, suffix in zip(prefixes, suffixes):
    previous = previous[:prefix] + reader.take(suffix)
    keys.append(previous)
  if height:
    ids, offsets, lengths = reader.column(n), reader.column(n), reader.column(n)
    stats = list(zip(reader.column(n), reader.column(n), reader.column(n)))
    entries = [Child(*args) for args in zip(keys, map(Ref, ids, offsets, lengths), common, stats)]
  else:
    lengths = reader.column(n)
    kinds = [reader.byte() for _ in range(n)]
    indirect = [i for i in range(n) if kinds[i]]
    ids = dict(zip(indirect, reader.column(len(indirect))))
    offsets = dict(zip(indirect, reader.column(len(indirect))))
    entries = [(key, Ref(ids[i], offsets[i], lengths[i]) if kinds[i] else reader.take(lengths[i]))
               for i, key in enumerate(keys)]
  assert reader.pos == len(reader.data), 'trailing bytes in the node'
  return Node(height, files, entries)


def encode_node(node: Node) -> bytes:
  entries = node.entries
  keys = [entry.key for entry in entries] if node.height else [key for key, _ in entries]
  body = (bytes([node.height]) + _files_bytes(node.files) + _varint(len(keys))
          + b''.join(_varint(0) for _ in keys[1:]) + b''.join(_varint(len(k)) for k in keys))
  if node.height:
    body += b''.join(_varint(entry.common_prefix) for entry in entries) + b''.join(keys)
    for field in ('file', 'offset', 'length'):
      body += b''.join(_varint(getattr(entry.ref, field)) for entry in entries)
    for i in range(3):
      body += b''.join(_varint(entry.stats[i]) for entry in entries)
  else:
    values = [value for _, value in entries]
    refs = [value for value in values if isinstance(value, Ref)]
    body += b''.join(keys)
    body += b''.join(_varint(v.length if isinstance(v, Ref) else len(v)) for v in values)
    body += bytes(isinstance(value, Ref) for value in values)
    body += b''.join(_varint(ref.file) for ref in refs)
    body += b''.join(_varint(ref.offset) for ref in refs)
    body += b''.join(value for value in values if not isinstance(value, Ref))
  return _seal(_BTREE_MAGIC, body)


class Database:
  """The root OCDBT database of a checkpoint: its manifest, whose newest version's root node
  can be replaced by crafted nodes written into new files below ``d/``."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    data = (path / 'manifest.ocdbt').read_bytes()
    reader = _unseal(data, _MANIFEST_MAGIC)
    start = reader.pos
    reader.take(16)  # uuid
    reader.column(3)  # manifest kind, max inline value bytes, max decoded node bytes
    reader.byte()  # version tree arity
    assert reader.varint() == 0, 'only uncompressed nodes'
    self._config = data[start:reader.pos]
    self._files = _read_files(reader)
    n = reader.varint()
    generations = reader.column(n)
    self._heights = [reader.byte() for _ in range(n)]
    self._refs = list(map(Ref, reader.column(n), reader.column(n), reader.column(n)))
    self._stats = [reader.column(n) for _ in range(3)]
    self._times = reader.take(8 * n)  # Commit times, uint64le each.
    self._generations = generations
    self._tail = reader.data[reader.pos:]  # Older versions in version tree nodes: kept.
    assert self._tail == b'\0'

  @property
  def root(self) -> tuple[str, Ref]:
    """The newest version's root node: its file (relative to the database) and range."""
    ref = self._refs[-1]
    return ''.join(self._files[ref.file]), ref

  def root_node(self) -> Node:
    file, ref = self.root
    data = (self.path / file).read_bytes()
    return decode_node(data[ref.offset:ref.offset + ref.length])

  def set_root(self, file: str, offset: int, length: int, height: int) -> None:
    """Points the newest version at the node in ``file`` (relative to the database)."""
    self._files.append(('', file))
    self._refs[-1] = Ref(len(self._files) - 1, offset, length)
    self._heights[-1] = height
    n = len(self._refs)
    body = (self._config + _files_bytes(self._files) + _varint(n)
            + b''.join(map(_varint, self._generations)) + bytes(self._heights))
    for field in ('file', 'offset', 'length'):
      body += b''.join(_varint(getattr(ref, field)) for ref in self._refs)
    body += b''.join(_varint(value) for column in self._stats for value in column)
    (self.path / 'manifest.ocdbt').write_bytes(
        _seal(_MANIFEST_MAGIC, body + self._times + self._tail))

  def write_root(self, node: Node, file: str = 'd/crafted') -> None:
    data = encode_node(node)
    (self.path / file).write_bytes(data)
    self.set_root(file, 0, len(data), node.height)


# --- crafted checkpoints --------------------------------------------------------------------

BIG = 1 << 18  # float32 elements: a 1 MiB chunk, read directly into the array's buffer.
TREE = {'x': np.arange(120, dtype=np.uint8), 'big': np.zeros(BIG, np.float32)}
TARGET = 'target = {"x": np.zeros(120, np.uint8), "big": np.zeros(%d, np.float32)}' % BIG
DATA_DIR = 'ocdbt.process_0/d'


def save(path: pathlib.Path) -> Database:
  """A checkpoint of TREE without the checksum folder (as Orbax writes it): nothing but the
  reader's own checks stands between a crafted reference and the bytes it names."""
  ocp.StandardCheckpointer().save(path, TREE)
  shutil.rmtree(path / 'flaxckpt_checksums')
  return Database(path)


def point_value(path: pathlib.Path, key: bytes, base: str, relative: str, offset: int = 0,
                length: int = len(hostile.SECRET)) -> None:
  """Makes the value of ``key`` an out-of-line value at ``base + relative``."""
  db = Database(path)
  node = db.root_node()
  node.files.append((base, relative))
  ref = Ref(len(node.files) - 1, offset, length)
  node.entries = [(k, ref if k == key else value) for k, value in node.entries]
  db.write_root(node)


def data_file(path: pathlib.Path) -> pathlib.Path:
  (found,) = (path / DATA_DIR).iterdir()
  return found


def self_referencing_root(path: pathlib.Path) -> None:
  """An interior node whose only child is itself."""
  db = save(path)
  length = 0
  while True:
    node = Node(1, [('', 'd/cycle')], [Child(b'', Ref(0, 0, length))])
    data = encode_node(node)
    if len(data) == length:
      break
    length = len(data)
  (path / 'd' / 'cycle').write_bytes(data)
  db.set_root('d/cycle', 0, length, 1)


def doubly_shared_chain(path: pathlib.Path, levels: int = 40) -> None:
  """``levels`` interior nodes, each with two children that are both the node below: no cycle,
  heights all correct, but 2**levels paths down to the one real leaf."""
  db = save(path)
  leaf_file, leaf = db.root
  data, below = b'', Ref(1, leaf.offset, leaf.length)
  for height in range(1, levels + 1):
    node = encode_node(Node(height, [('', 'd/chain'), ('', leaf_file)],
                            [Child(b'', below), Child(b'x', below)]))
    below = Ref(0, len(data), len(node))
    data += node
  (path / 'd' / 'chain').write_bytes(data)
  db.set_root('d/chain', below.offset, below.length, levels)


def overlapping_leaves(path: pathlib.Path) -> None:
  """Two leaves under one root, both holding 'x/0': the first child's range ends at 'x', so
  tensorstore's lookups find only the second leaf's value."""
  db = save(path)
  leaf_file, leaf = db.root
  second = encode_node(Node(0, [], [(b'x/0', bytes(120))]))
  (path / 'd' / 'second').write_bytes(second)
  db.write_root(Node(1, [('', leaf_file), ('', 'd/second')],
                     [Child(b'', Ref(0, leaf.offset, leaf.length)),
                      Child(b'x', Ref(1, 0, len(second)))]))


def root_claiming_height(path: pathlib.Path, height: int) -> None:
  """An interior node of ``height`` whose child is the real leaf (height 0)."""
  db = save(path)
  leaf_file, leaf = db.root
  node = Node(height, [('', leaf_file)],
              [Child(b'', Ref(0, leaf.offset, leaf.length))])
  db.write_root(node)


_ATTEMPTS = '''
import pathlib, flaxckpt as ocp, numpy as np, tensorstore
from flaxckpt import _sources
%s
def read_directly(path):  # The reader alone, whatever its callers check first.
  spec = {'driver': 'file', 'path': path + '/'}
  source = _sources.OcdbtIndexSource.load(tensorstore, pathlib.Path(path).absolute(), spec)
  return [source.location('big/0')] + source.collect(['x/0', 'big/0'])

def attempt(restore):
  try:
    value = restore()
  except Exception as e:
    return ('raised', [c.__name__ for c in type(e).__mro__], str(e))
  return ('returned', repr(value))
result = {}
for name in CASES:
  path = 'box/' + name
  result[name] = [attempt(lambda: ocp.StandardCheckpointer().restore(path)),
                  attempt(lambda: ocp.StandardCheckpointer().restore(path, target)),
                  attempt(lambda: read_directly(path))]
''' % TARGET


def restore_each(sandbox: hostile.Sandbox, cases: list[str]) -> dict[str, list[tuple]]:
  """Restores each crafted checkpoint below box/, without and with a target, and reads it with
  the OCDBT reader alone, in one sandboxed process: how each attempt ended, by case."""
  outcome = sandbox.run(f'CASES = {cases!r}\n' + _ATTEMPTS)
  assert outcome.ok, outcome.describe()
  sandbox.assert_canary_untouched(outcome)
  return ast.literal_eval(outcome.result)


def assert_refused(attempts: list[tuple], error: str, *fragments: str) -> None:
  for attempt in attempts:
    assert attempt[0] == 'raised' and error in attempt[1], attempt
    for fragment in fragments:
      assert fragment in attempt[2], attempt


# --- tests ----------------------------------------------------------------------------------

def test_re_encoded_checkpoint_restores_unchanged(tmp_path):
  """The codec is faithful: a root node decoded and written back to a new file reads as saved,
  and a data file reached through a link that stays inside the checkpoint is fine."""
  path = tmp_path / 'ck'
  db = save(path)
  node = db.root_node()
  assert node.height == 0 and [key for key, _ in node.entries] == [
      b'big/.zarray', b'big/0', b'x/.zarray', b'x/0']
  db.write_root(node)
  (path / DATA_DIR / 'alias').symlink_to(data_file(path).name)
  big = dict(node.entries)[b'big/0']
  point_value(path, b'big/0', 'ocdbt.process_0/', 'd/alias', big.offset, big.length)
  restored = ocp.StandardCheckpointer().restore(path)
  np.testing.assert_array_equal(restored['x'], TREE['x'])
  np.testing.assert_array_equal(restored['big'], TREE['big'])


def test_references_leading_outside_the_checkpoint_are_refused(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  box = sandbox.box
  (box / 'outside.bin').write_bytes(hostile.SECRET)
  cases = {
      'dotdot-base': ('../../canary/', 'secret.bin'),
      'dotdot-relative': ('ocdbt.process_0/', '../../../canary/secret.bin'),
      'absolute': ('', str(sandbox.secret)),
      'absolute-base': (str(sandbox.canary) + '/', 'secret.bin'),
      # Neither part has a '..' component, but tensorstore joins them as strings: '../'.
      'dots-joined': ('.', './outside.bin'),
  }
  for name, (base, relative) in cases.items():
    save(box / name)
    point_value(box / name, b'x/0', base, relative)
  save(box / 'link-out')
  (box / 'link-out' / DATA_DIR / 'leak').symlink_to(sandbox.secret)
  point_value(box / 'link-out', b'x/0', 'ocdbt.process_0/', 'd/leak')
  # A large chunk is read straight into the array: through a link as well.
  save(box / 'link-out-big')
  (box / 'big-outside.bin').write_bytes(hostile.SECRET * (4 * BIG // len(hostile.SECRET) + 1))
  (box / 'link-out-big' / DATA_DIR / 'leak').symlink_to(box / 'big-outside.bin')
  point_value(box / 'link-out-big', b'big/0', 'ocdbt.process_0/', 'd/leak', 0, 4 * BIG)

  results = restore_each(sandbox, [*cases, 'link-out', 'link-out-big'])
  for name in cases:
    assert_refused(results[name], 'UnsafeCheckpointError', f'box/{name}: the OCDBT reference',
                   'could lead outside the checkpoint')
  for name in ('link-out', 'link-out-big'):
    assert_refused(results[name], 'UnsafeCheckpointError', 'd/leak', 'link to', 'outside')


def test_fifos_are_refused_without_blocking(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  box = sandbox.box
  save(box / 'value')
  os.mkfifo(box / 'value' / DATA_DIR / 'pipe')
  point_value(box / 'value', b'x/0', 'ocdbt.process_0/', 'd/pipe')
  save(box / 'big-value')  # Read directly into the array's buffer.
  os.mkfifo(box / 'big-value' / DATA_DIR / 'pipe')
  point_value(box / 'big-value', b'big/0', 'ocdbt.process_0/', 'd/pipe', 0, 4 * BIG)
  db = save(box / 'node')
  os.mkfifo(box / 'node' / 'd' / 'pipe')
  db.set_root('d/pipe', 0, 100, 0)
  results = restore_each(sandbox, ['value', 'big-value', 'node'])
  for name in results:
    assert_refused(results[name], 'UnsafeCheckpointError', 'pipe', 'a FIFO')


def test_ranges_outside_the_data_file_are_refused(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  box = sandbox.box
  cases = {'past-end': (None, 120), 'huge-length': (0, 1 << 62),
           'huge-offset': (1 << 62, 120), 'big-past-end': (None, 4 * BIG)}
  for name, (offset, length) in cases.items():
    save(box / name)
    offset = data_file(box / name).stat().st_size - 10 if offset is None else offset
    key = b'big/0' if name.startswith('big') else b'x/0'
    point_value(box / name, key, 'ocdbt.process_0/', 'd/' + data_file(box / name).name,
                offset, length)
  results = restore_each(sandbox, list(cases))
  for name in cases:
    assert_refused(results[name], 'NotACheckpointError', 'but the file ends early')


def test_cycles_shared_or_overlapping_subtrees_and_damaged_nodes_are_refused(tmp_path):
  sandbox = hostile.Sandbox(tmp_path)
  box = sandbox.box
  self_referencing_root(box / 'cycle')
  doubly_shared_chain(box / 'shared')
  root_claiming_height(box / 'skips-a-level', 2)
  overlapping_leaves(box / 'overlapping')
  save(box / 'torn')
  root = Database(box / 'torn').root_node()
  root.entries[-1] = (b'x/0', b'\xff' * 120)  # Valid, then one byte of it flipped.
  Database(box / 'torn').write_root(root)
  with open(box / 'torn' / 'd' / 'crafted', 'r+b') as f:
    f.seek(-10, os.SEEK_END)
    f.write(b'\0')
  results = restore_each(sandbox, ['cycle', 'shared', 'skips-a-level', 'overlapping', 'torn'])
  assert_refused(results['cycle'], 'NotACheckpointError',
                 'box/cycle: the OCDBT B+tree reaches node', 'a second time')
  # Two paths to one node give it two disjoint key ranges: its keys cannot lie in both.
  assert_refused(results['shared'], 'NotACheckpointError', 'box/shared: the OCDBT B+tree node',
                 "outside the range [b'x', None) its parent gives it")
  assert_refused(results['overlapping'], 'NotACheckpointError',
                 "holds keys from b'big/.zarray' to b'x/0', outside the range [b'', b'x')")
  assert_refused(results['skips-a-level'], 'NotACheckpointError',
                 'has height 0, but its parent expects 1')
  assert_refused(results['torn'], 'NotACheckpointError', "box/torn: the OCDBT B+tree node 'btree",
                 'is damaged', 'CRC-32C checksum verification failed')


def test_the_cli_ends_on_hostile_trees(tmp_path):
  """verify and inspect run the same reader: they end, fail, and print no canary bytes."""
  sandbox = hostile.Sandbox(tmp_path)
  box = sandbox.box
  save(box / 'dotdot')
  point_value(box / 'dotdot', b'x/0', '../../canary/', 'secret.bin')
  self_referencing_root(box / 'cycle')
  save(box / 'pipe')
  os.mkfifo(box / 'pipe' / DATA_DIR / 'pipe')
  point_value(box / 'pipe', b'big/0', 'ocdbt.process_0/', 'd/pipe', 0, 4 * BIG)
  for name in ('dotdot', 'cycle', 'pipe'):
    for command in ('verify', 'inspect'):
      result = hostile.run_cli([command, f'box/{name}'], sandbox.root)
      assert result is not None, f'{command} box/{name} did not end'
      assert result.returncode != 0, result.stdout
      assert hostile.SECRET.decode()[:30] not in result.stdout + result.stderr
  sandbox.assert_canary_untouched()


def test_a_tree_past_the_bounds_is_left_to_tensorstore(tmp_path, monkeypatch):
  """Past MAX_TREE_NODES the index is not built; tensorstore reads the needed keys itself."""
  monkeypatch.setitem(_arrays._OCDBT_CONFIG, 'max_decoded_node_bytes', 2000)
  tree = {f'leaf{i:03d}': np.full(3, i) for i in range(300)}
  path = tmp_path / 'ck'
  ocp.StandardCheckpointer().save(path, tree)
  spec = {'driver': 'file', 'path': f'{path}/'}
  assert _sources.OcdbtIndexSource.load(tensorstore, path, spec) is not None
  monkeypatch.setattr(_sources, 'MAX_TREE_NODES', 1)
  assert _sources.OcdbtIndexSource.load(tensorstore, path, spec) is None
  restored = ocp.StandardCheckpointer().restore(path)
  np.testing.assert_array_equal(restored['leaf123'], tree['leaf123'])


def test_a_fallback_still_refuses_fifos(tmp_path):
  """When the walk stops early the rest of the tree is unvisited: the directory is checked
  before tensorstore, which waits forever on a FIFO, reads it."""
  sandbox = hostile.Sandbox(tmp_path)
  save(sandbox.box / 'ck')
  os.mkfifo(sandbox.box / 'ck' / 'd' / 'pipe')
  outcome = sandbox.run('''
      import pathlib, tensorstore
      from flaxckpt import _sources
      _sources.MAX_TREE_NODES = 0
      path = pathlib.Path('box/ck').absolute()
      result = _sources.OcdbtIndexSource.load(tensorstore, path, {'driver': 'file',
                                                                  'path': f'{path}/'})
  ''')
  assert outcome.raised('UnsafeCheckpointError') and 'found a FIFO' in outcome.message, (
      outcome.describe())
  sandbox.assert_canary_untouched(outcome)
