"""Damaged legacy msgpack checkpoints: every failure is a ``CorruptCheckpointError`` naming the
file (never a raw msgpack/numpy exception, a RecursionError or a partial tree), and the crc32c
sidecar that ``save_checkpoint`` writes turns damage inside array bytes, which the format alone
cannot see, into an error too. flax must neither list nor mind the sidecars."""

import json
import os
import pathlib
import random
import shutil

import crc32c
import msgpack
import numpy as np
import pytest
from flax import serialization
from flax.training import checkpoints as flax_checkpoints

import flaxckpt as ocp
from flaxckpt import _storage
from flaxckpt.legacy import _msgpack, _sidecar
from flaxckpt.legacy import checkpoints
from trees import assert_trees_equal



def _damage(path, data) -> None:
  """Changes a file's bytes as a failing disk or a stray write through the same file does: the
  inode and mtime stay (a rewrite with a new mtime is another file, see _sidecar)."""
  info = path.stat()
  with open(path, 'r+b') as f:
    f.write(bytes(data))
    f.truncate(len(data))
  os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))

def _tree():
  return {'params': {'w': np.arange(24, dtype=np.float32).reshape(4, 6),
                     'b': np.ones(3, np.int8), 'scale': np.float32(0.5)},
          'step': 7, 'name': 'run-1', 'opt': {'mu': np.full((2, 2), -1.5, np.float64)},
          'c': 1 + 2j, 'empty': {}}


@pytest.fixture
def msgpack_ckpt(tmp_path, set_flag):
  """A msgpack checkpoint of ``_tree()`` saved by our save_checkpoint: (dir, file path)."""
  set_flag(False)
  path = checkpoints.save_checkpoint(tmp_path / 'ckpts', _tree(), 7)
  return tmp_path / 'ckpts', pathlib.Path(path)


def _sidecar_of(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f'.{path.name}.crc32c')


def _restore_raises_naming(path: pathlib.Path, error=checkpoints.CorruptCheckpointError,
                           **kwargs) -> str:
  with pytest.raises(error) as info:
    checkpoints.restore_checkpoint(path, None, **kwargs)
  assert str(path) in str(info.value)
  return str(info.value)


# ==================================================================================================
# The decoder: truncation at every offset, random mutations, hand-made malformed files
# ==================================================================================================


def test_every_truncation_is_a_decode_error():
  """Every proper prefix of a checkpoint fails to decode with MsgpackDecodeError, never with
  another exception and never with a partial tree."""
  data = serialization.to_bytes(_tree())
  for end in range(len(data)):
    with pytest.raises(_msgpack.MsgpackDecodeError):
      _msgpack.decode(data[:end])
  assert_trees_equal(_msgpack.decode(data), serialization.msgpack_restore(data))


def test_truncated_file_restores_to_an_error_naming_it_with_or_without_sidecar(msgpack_ckpt):
  _, path = msgpack_ckpt
  data = path.read_bytes()
  for end in sorted({0, 1, len(data) // 3, len(data) - 1}):
    _damage(path, data[:end])
    message = _restore_raises_naming(path, verify_checksums=False)
    assert 'is not a complete flax msgpack checkpoint' in message
    # With the sidecar, the size is checked first.
    message = _restore_raises_naming(path, checkpoints.ChecksumMismatchError)
    assert f'has {end} bytes, but {len(data)} were written' in message


def test_random_mutations_never_escape_as_other_exceptions():
  """Thousands of seeded byte flips: decode either raises MsgpackDecodeError or returns a tree
  that msgpack itself agrees is a well-formed map."""
  data = serialization.to_bytes(_tree())
  rng = random.Random(0)
  outcomes = {'error': 0, 'decoded': 0}
  for _ in range(3000):
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 4)):
      mutated[rng.randrange(len(mutated))] ^= rng.randrange(1, 256)
    try:
      tree = _msgpack.decode(bytes(mutated))
    except _msgpack.MsgpackDecodeError:
      outcomes['error'] += 1
      continue
    outcomes['decoded'] += 1
    assert isinstance(tree, (dict, list, np.ndarray, int, float, str, bytes, complex, type(None)))
  # Both happen: flips in array bytes decode (only the sidecar sees them), flips in headers fail.
  assert outcomes['error'] > 300 and outcomes['decoded'] > 300, outcomes


def _ext(shape, dtype_name, raw: bytes, code=_msgpack.ARRAY_EXT) -> msgpack.ExtType:
  return msgpack.ExtType(code, msgpack.packb([shape, dtype_name, raw]))


def _chunked(shape, chunks) -> dict:
  return {_msgpack.CHUNKED_MARKER: True, 'shape': {str(i): n for i, n in enumerate(shape)},
          'chunks': {str(i): chunk for i, chunk in enumerate(chunks)}}


def _nested(depth: int) -> bytes:
  return b'\x81\xa1k' * depth + b'\x01'


MALFORMED = {
    'int key': (msgpack.packb({1: 2}), 'has a key of type int'),
    'repeated key': (b'\x82\xa1a\x01\xa1a\x02', "has the key 'a' twice"),
    'unknown ext code': (msgpack.packb({'a': msgpack.ExtType(9, b'xyz')}), 'ext type code 9'),
    'unknown type byte': (b'\x81\xa1a\xc1', '0xc1, which starts no msgpack value'),
    'bad dtype name': (msgpack.packb({'a': _ext([2], 'float33', b'\0' * 8)}),
                       "dtype name 'float33'"),
    'object dtype': (msgpack.packb({'a': _ext([1], 'object', b'\0' * 8)}), "dtype name 'object'"),
    'negative shape': (msgpack.packb({'a': _ext([-2], 'int32', b'')}), 'the shape [-2]'),
    'float shape': (msgpack.packb({'a': _ext([2.0], 'int32', b'\0' * 8)}), 'the shape [2.0]'),
    'too few bytes': (msgpack.packb({'a': _ext([3], 'int32', b'\0' * 8)}),
                      'holds 8 bytes, not the 12'),
    'array not a list': (msgpack.packb({'a': msgpack.ExtType(1, msgpack.packb({'x': 1}))}),
                         'not a 3-element list'),
    'scalar with a shape': (msgpack.packb({'a': _ext([1], 'int32', b'\0' * 4,
                                                     _msgpack.SCALAR_EXT)}),
                            'a scalar has shape []'),
    'complex malformed': (msgpack.packb({'a': msgpack.ExtType(2, msgpack.packb(['x', 1]))}),
                          'complex number'),
    'length past the end': (b'\x81\xa1a\xc6\x7f\xff\xff\xff', 'the data ends after'),
    'map larger than the file': (b'\xdf\xff\xff\xff\xff', 'declares 4294967295 entries'),
    'trailing bytes': (msgpack.packb({'a': 1}) + b'\x00', '1 bytes follow the checkpoint'),
    'invalid utf-8 key': (b'\x81\xa2\xff\xfe\x01', 'not UTF-8'),
    'chunk missing': (msgpack.packb(
        {'a': _chunked([4], [_ext([2], 'int32', b'\0' * 8)])}),
        'has chunks of [2] elements; expected 4'),
    'chunk keys misnumbered': (msgpack.packb({'a': {
        _msgpack.CHUNKED_MARKER: True, 'shape': {'0': 2},
        'chunks': {'1': _ext([2], 'int32', b'\0' * 8)}}}), 'not keys "0", "1"'),
    'chunked extra key': (msgpack.packb({'a': {**_chunked([2], [_ext([2], 'int32', b'\0' * 8)]),
                                               'x': 1}}), 'a chunked array has the keys'),
    'chunks of two dtypes': (msgpack.packb({'a': _chunked(
        [3], [_ext([2], 'int32', b'\0' * 8), _ext([1], 'int8', b'\0')])}),
        'not flat arrays of one dtype'),
    'nested 401 deep': (_nested(401), 'nested 400 levels deep'),
    'nested 100000 deep': (_nested(100_000), 'nested 400 levels deep'),
}


@pytest.mark.parametrize('case', list(MALFORMED))
def test_malformed_file_raises_corrupt_checkpoint_error_naming_file_and_byte(tmp_path, case):
  data, expected = MALFORMED[case]
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(data)
  message = _restore_raises_naming(path)
  assert expected in message, message
  assert 'RecursionError' not in message


def test_deepest_nesting_flax_can_write_still_reads(tmp_path):
  """The depth limit sits above what flax.serialization.to_bytes can produce."""
  tree = value = {}
  for _ in range(300):
    value['k'] = {}
    value = value['k']
  value['leaf'] = np.arange(3)
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(serialization.to_bytes(tree))
  assert_trees_equal(checkpoints.restore_checkpoint(path, None), tree)


def test_structure_that_does_not_fit_the_target_names_the_file(msgpack_ckpt):
  _, path = msgpack_ckpt
  target = {'params': {'w': np.zeros((4, 6), np.float32)}, 'other': 1}
  with pytest.raises(ocp.StructureMismatchError) as info:
    checkpoints.restore_checkpoint(path, target)
  assert str(path) in str(info.value) and 'target=None' in str(info.value)


# ==================================================================================================
# The crc32c sidecar
# ==================================================================================================


def test_sidecar_records_size_and_crc32c_and_flax_ignores_it(msgpack_ckpt):
  ckpt_dir, path = msgpack_ckpt
  data = path.read_bytes()
  assert data == serialization.to_bytes(_tree())  # The checkpoint itself is flax's bytes.
  recorded = json.loads(_sidecar_of(path).read_text())
  info = path.stat()
  birth = _storage.birth_time_ns(path)
  sidecar = _sidecar_of(path)
  sidecar_birth = _storage.birth_time_ns(sidecar)
  assert recorded == {'algorithm': 'crc32c', 'size': len(data), 'crc32c': crc32c.crc32c(data),
                      'inode': info.st_ino, 'mtime_ns': info.st_mtime_ns,
                      'sidecar_inode': sidecar.stat().st_ino,
                      **({'birth_ns': birth} if birth is not None else {}),
                      **({'sidecar_birth_ns': sidecar_birth} if sidecar_birth else {})}
  assert sorted(os.listdir(ckpt_dir)) == ['.checkpoint_7.crc32c', 'checkpoint_7']
  assert flax_checkpoints.latest_checkpoint(ckpt_dir) == str(path)
  assert flax_checkpoints.available_steps(ckpt_dir) == [7]
  assert_trees_equal(flax_checkpoints.restore_checkpoint(ckpt_dir, None),
                     serialization.msgpack_restore(data))
  assert checkpoints.available_steps(ckpt_dir) == [7]


@pytest.mark.skipif(_storage.birth_time_ns(__file__) is None,
                    reason='no file birth times here: a rewrite in place reads as a new file')
def test_damage_written_in_place_with_a_new_mtime_still_raises(msgpack_ckpt):
  """A program writing into the file (new mtime, same file) is damage, not flax replacing it:
  the file's birth time tells the two apart even when flax's new file reuses the inode."""
  _, path = msgpack_ckpt
  data = bytearray(path.read_bytes())
  data[-3] ^= 1
  with open(path, 'r+b') as f:
    f.write(bytes(data))
  os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
  _restore_raises_naming(path, checkpoints.ChecksumMismatchError)


def test_a_copied_folder_is_checked_whatever_the_copy_did_to_inodes_and_mtimes(msgpack_ckpt,
                                                                              tmp_path):
  """cp -r / rsync / a download give every file a new inode; damage after the copy (here with
  a new mtime too) still raises, and an undamaged copy restores."""
  ckpt_dir, path = msgpack_ckpt
  for preserve in (True, False):
    copy = tmp_path / f'copy-{preserve}'
    shutil.copytree(ckpt_dir, copy, copy_function=shutil.copy2 if preserve else shutil.copy)
    checkpoints.restore_checkpoint(copy, None)
    data = bytearray((copy / path.name).read_bytes())
    data[-3] ^= 1
    (copy / path.name).write_bytes(bytes(data))
    _restore_raises_naming(copy / path.name, checkpoints.ChecksumMismatchError)


def test_flipped_array_byte_raises_checksum_error_with_both_values(msgpack_ckpt):
  """A flip inside array data decodes fine; only the sidecar catches it."""
  ckpt_dir, path = msgpack_ckpt
  data = bytearray(path.read_bytes())
  w_bytes = np.arange(24, dtype=np.float32).tobytes()
  data[data.index(w_bytes) + 5] ^= 0x10
  _damage(path, data)
  for target in (ckpt_dir, path):
    with pytest.raises(checkpoints.ChecksumMismatchError) as info:
      checkpoints.restore_checkpoint(target, None)
    message = str(info.value)
    assert str(path) in message and str(_sidecar_of(path)) in message
    assert message.count('0x') == 2  # The crc32c found and the one recorded.
  assert isinstance(info.value, ocp.ChecksumError)
  assert isinstance(info.value, checkpoints.CorruptCheckpointError)
  # Opting out reads the damaged values, as flax would.
  wrong = checkpoints.restore_checkpoint(path, None, verify_checksums=False)
  assert not np.array_equal(wrong['params']['w'], _tree()['params']['w'])


def test_damaged_sidecar_is_named_and_can_be_bypassed(msgpack_ckpt):
  _, path = msgpack_ckpt
  for damaged in ('', '{"algorithm": "crc32c"}', '{"algorithm": "crc32c", "size": "x", '
                  '"crc32c": 1}', 'not json', '[1, 2]'):
    _sidecar_of(path).write_text(damaged)
    message = _restore_raises_naming(path, checkpoints.ChecksumMismatchError)
    assert str(_sidecar_of(path)) in message and 'verify_checksums=False' in message
    assert_trees_equal(checkpoints.restore_checkpoint(path, None, verify_checksums=False),
                       serialization.msgpack_restore(path.read_bytes()))


def test_without_a_sidecar_the_file_restores_unchecked(msgpack_ckpt):
  """Files flax wrote, or a save that died between the rename and the sidecar."""
  _, path = msgpack_ckpt
  _sidecar_of(path).unlink()
  assert_trees_equal(checkpoints.restore_checkpoint(path, None),
                     serialization.msgpack_restore(path.read_bytes()))


def test_sidecar_of_an_unknown_algorithm_is_skipped(msgpack_ckpt):
  _, path = msgpack_ckpt
  _sidecar_of(path).write_text('{"algorithm": "xxh3", "size": 1, "digest": "ab"}')
  assert checkpoints.restore_checkpoint(path, None)['step'] == 7


def test_retention_and_overwrite_keep_sidecars_in_step_with_files(tmp_path, set_flag):
  set_flag(False)
  for step in range(4):
    checkpoints.save_checkpoint(tmp_path, {'x': np.full(3, step)}, step, keep=2)
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_2.crc32c', '.checkpoint_3.crc32c',
                                          'checkpoint_2', 'checkpoint_3']
  # Overwriting step 3 with other values: the sidecar follows the new file.
  checkpoints.save_checkpoint(tmp_path, {'x': np.full(5, 9)}, 3, keep=2, overwrite=True)
  assert checkpoints.restore_checkpoint(tmp_path, None)['x'].tolist() == [9] * 5
  # Going back with overwrite deletes newer steps and their sidecars.
  checkpoints.save_checkpoint(tmp_path, {'x': np.full(2, 1)}, 1, keep=2, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_1.crc32c', 'checkpoint_1']


def test_sidecars_flax_left_behind_are_removed_by_our_next_save(tmp_path, set_flag):
  """flax's retention deletes checkpoint files but not our sidecars; our next save tidies."""
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path, {'x': np.zeros(2)}, 1)
  flax_checkpoints.save_checkpoint(tmp_path, {'x': np.ones(2)}, 2, keep=1)
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_1.crc32c', 'checkpoint_2']
  checkpoints.save_checkpoint(tmp_path, {'x': np.ones(2)}, 3, keep=5)
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_3.crc32c', 'checkpoint_2', 'checkpoint_3']


def test_sidecar_only_where_flax_would_not_list_it(tmp_path, set_flag):
  """With prefix '' flax's pattern ('*') would take a sidecar for a checkpoint: none is written."""
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path / 'bare', {'x': np.zeros(2)}, 1, prefix='')
  assert os.listdir(tmp_path / 'bare') == ['1']
  for prefix in ('ckpt_', '.ck_'):
    directory = tmp_path / prefix
    checkpoints.save_checkpoint(directory, {'x': np.zeros(2)}, 1, prefix=prefix)
    assert sorted(os.listdir(directory)) == sorted([f'.{prefix}1.crc32c', f'{prefix}1'])
    assert flax_checkpoints.available_steps(directory, prefix=prefix) == [1]
    assert flax_checkpoints.latest_checkpoint(directory, prefix=prefix) == str(
        directory / f'{prefix}1')


def test_async_save_writes_the_sidecar(tmp_path, set_flag):
  set_flag(False)
  manager = checkpoints.AsyncManager()
  checkpoints.save_checkpoint(tmp_path, {'x': np.arange(5)}, 2, async_manager=manager)
  manager.wait_previous_save()
  assert sorted(os.listdir(tmp_path)) == ['.checkpoint_2.crc32c', 'checkpoint_2']
  assert checkpoints.restore_checkpoint(tmp_path, None)['x'].tolist() == list(range(5))


def test_a_save_that_dies_before_its_sidecar_leaves_a_restorable_file(tmp_path, set_flag,
                                                                      monkeypatch):
  """The sidecar is written after the rename: a crash in between leaves a file that restores
  unchecked, never a sidecar beside a file it does not describe."""
  set_flag(False)
  checkpoints.save_checkpoint(tmp_path, {'x': np.zeros(4)}, 1, keep=5)

  def die(*args):
    raise KeyboardInterrupt('killed')

  monkeypatch.setattr(_sidecar, 'write', die)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save_checkpoint(tmp_path, {'x': np.ones(4)}, 1, keep=5, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_1']
  assert checkpoints.restore_checkpoint(tmp_path, None)['x'].tolist() == [1.0] * 4


def test_verify_command_checks_the_sidecar(msgpack_ckpt):
  from flaxckpt._verify import verify
  ckpt_dir, path = msgpack_ckpt
  assert verify(path) == []
  data = bytearray(path.read_bytes())
  data[-3] ^= 1  # Inside the last array's bytes: decodes, wrong value.
  _damage(path, data)
  problems = verify(path)
  assert len(problems) == 1 and 'crc32c' in problems[0].message


def test_converted_msgpack_gets_a_sidecar_too(tmp_path):
  """``flaxckpt convert --to msgpack`` writes the sidecar, so its output is checked as well."""
  from flaxckpt._convert import convert
  orbax_dir = tmp_path / 'orbax'
  ocp.StandardCheckpointer().save(orbax_dir, {'w': np.arange(10.0), 'n': np.int32(3)})
  back = convert(orbax_dir, tmp_path / 'out' / 'checkpoint_1', 'msgpack', 1 << 20)
  assert sorted(os.listdir(back.parent)) == ['.checkpoint_1.crc32c', 'checkpoint_1']
  assert json.loads(_sidecar_of(back).read_text())['size'] == back.stat().st_size
  data = bytearray(back.read_bytes())
  data[-2] ^= 4
  _damage(back, data)
  _restore_raises_naming(back, checkpoints.ChecksumMismatchError)
