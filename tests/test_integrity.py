"""Checksums: every saved chunk's crc32c is recorded, and a damaged chunk fails the restore with
a ChecksumError instead of returning wrong numbers (issue 8, part 1)."""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxckpt as ocp

CHECKSUMS = 'flaxckpt_checksums'


def _flip_byte(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x40
  path.write_bytes(bytes(data))


def _largest_file(root: pathlib.Path) -> pathlib.Path:
  return max((p for p in root.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _save(path, tree, **options):
  ocp.PyTreeCheckpointer(**options).save(path, args=ocp.args.PyTreeSave(tree))


def _restore(path, **kwargs):
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(**kwargs))


def _big_tree():
  """One array large enough to live outside OCDBT's B-tree nodes (and to be read directly)."""
  return {'params': {'w': np.arange(300_000, dtype=np.float32), 'b': jnp.ones(4)}, 'step': 3}


@pytest.mark.parametrize('options', [{}, {'use_ocdbt': False}, {'use_zarr3': True},
                                     {'use_zarr3': True, 'use_ocdbt': False}],
                         ids=['ocdbt', 'files', 'zarr3', 'files_zarr3'])
def test_a_flipped_data_byte_raises_checksum_error_naming_leaf_and_values(tmp_path, options):
  path = tmp_path / 'ckpt'
  tree = _big_tree()
  _save(path, tree, **options)
  damaged = _largest_file(path)
  _flip_byte(damaged, damaged.stat().st_size // 2)
  with pytest.raises(ocp.ChecksumError) as caught:
    _restore(path)
  message = str(caught.value)
  assert "Leaf 'params/w'" in message and "array 'params.w'" in message, message
  assert message.count('0x') == 2, message  # Both checksums, found and recorded.
  if not options.get('use_zarr3'):
    assert str(damaged) in message, message  # The file that holds the bad bytes.
  # The check is what catches it: unchecked, the same read returns wrong numbers.
  unchecked = _restore(path, verify_checksums=False)
  assert not np.array_equal(unchecked['params']['w'], tree['params']['w'])


def test_every_chunk_is_checked_not_just_the_first(tmp_path):
  path = tmp_path / 'ckpt'
  w = np.arange(40_000, dtype=np.float32).reshape(200, 200)
  ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(
      {'w': w}, save_args={'w': ocp.SaveArgs(chunk_byte_size=40_000)}), force=True)
  sums = json.loads((path / CHECKSUMS / 'process_0').read_text())
  assert sums['algorithm'] == 'crc32c' and len(sums['chunks']['w']) == 4
  # Each chunk's checksum is the crc32c of its C-order little-endian bytes.
  import crc32c
  assert sums['chunks']['w']['1.1'] == crc32c.crc32c(np.ascontiguousarray(w[100:, 100:]))
  damaged = _largest_file(path / 'ocdbt.process_0' / 'd')
  _flip_byte(damaged, 3 * 40_000 + 1234)  # Chunks lie in key order: this is inside chunk 1.1.
  with pytest.raises(ocp.ChecksumError, match=r"chunk '1\.1' of array 'w'"):
    _restore(path)


def test_sharded_arrays_record_one_checksum_per_shard(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'model'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', 'model'))
  x = jax.device_put(jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64), sharding)
  path = tmp_path / 'ckpt'
  _save(path, {'x': x})
  sums = json.loads((path / CHECKSUMS / 'process_0').read_text())['chunks']['x']
  assert sorted(sums) == sorted(f'{i}.{j}' for i in range(4) for j in range(2))
  restored = _restore(path, item={'x': x})
  np.testing.assert_array_equal(restored['x'], x)


def test_checkpoints_without_checksums_restore_as_before(tmp_path):
  """Orbax and older flaxckpt write no checksum folder."""
  path = tmp_path / 'ckpt'
  tree = _big_tree()
  _save(path, tree)
  for file in (path / CHECKSUMS).iterdir():
    file.unlink()
  (path / CHECKSUMS).rmdir()
  restored = _restore(path)
  np.testing.assert_array_equal(restored['params']['w'], tree['params']['w'])


def test_a_damaged_checksum_file_is_named(tmp_path):
  path = tmp_path / 'ckpt'
  _save(path, _big_tree())
  (path / CHECKSUMS / 'process_0').write_text('{"algorithm": "crc32c", "chunks": {"params.w"')
  with pytest.raises(ocp.ChecksumError, match='process_0: the checksum file is damaged'):
    _restore(path)
  assert _restore(path, verify_checksums=False)['step'] == 3


def test_standard_restore_verifies_too(tmp_path):
  path = tmp_path / 'ckpt'
  ocp.StandardCheckpointer().save(path, _big_tree())
  damaged = _largest_file(path / 'ocdbt.process_0' / 'd')
  _flip_byte(damaged, 10)
  with pytest.raises(ocp.ChecksumError):
    ocp.StandardCheckpointer().restore(path)
  ocp.StandardCheckpointer().restore(path, args=ocp.args.StandardRestore(verify_checksums=False))


# --- damaged side files (found by tests/drill_corruption.py) ---------------------------------
#
# With checksums, damage to _METADATA, _strings.json or _sharding is a ChecksumError before
# anything is parsed (test_json_files_are_checked_whole below). Checkpoints without checksums
# (Orbax's, older flaxckpt's) still need every parse failure to name its file: these tests
# remove the checksum folder first.


def _save_unchecked(path, tree, **options):
  """A checkpoint as Orbax writes it: flaxckpt's, less the checksum folder."""
  _save(path, tree, **options)
  shutil.rmtree(path / CHECKSUMS)


def _side_file_tree():
  return {'w': jnp.arange(8.0), 'n': np.arange(3), 'name': 'run-1', 'step': 3}


def _damage_side_file(path, name, damage):
  file = path / name
  if damage == 'zero':
    file.write_bytes(bytes(file.stat().st_size))
  elif damage == 'truncate':
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
  else:
    data = bytearray(file.read_bytes())
    data[1] = 0xff  # Never valid in UTF-8.
    file.write_bytes(bytes(data))
  return file


@pytest.mark.parametrize('damage', ['zero', 'truncate', 'not-utf8'])
@pytest.mark.parametrize('name, needs_target', [
    ('_strings.json', True), ('_sharding', False), ('array_metadatas/process_0', False)])
def test_a_damaged_side_file_is_named(tmp_path, name, needs_target, damage):
  """A side file restore reads (strings; without a target, saved shardings and key types)
  fails with an error naming it, not a bare JSONDecodeError or UnicodeDecodeError."""
  path = tmp_path / 'ckpt'
  tree = _side_file_tree()
  _save_unchecked(path, tree)
  file = _damage_side_file(path, name, damage)
  targets = [None, jax.tree.map(lambda x: x, tree)] if needs_target else [None]
  for item in targets:
    with pytest.raises(ocp.NotACheckpointError, match=f'{file}: the file is damaged'):
      _restore(path, item=item)
  from flaxckpt import _verify
  assert any(problem.path == str(file) for problem in _verify.verify(path))


def test_a_damaged_sharding_entry_is_named(tmp_path):
  path = tmp_path / 'ckpt'
  _save_unchecked(path, _side_file_tree())
  shardings = json.loads((path / '_sharding').read_text())
  shardings = {key: text.replace('"sharding_type"', '"sharding_typ"')[:-3]
               for key, text in shardings.items()}
  (path / '_sharding').write_text(json.dumps(shardings))
  with pytest.raises(ocp.NotACheckpointError,
                     match=f"{path / '_sharding'}: the sharding of leaf 'w' is damaged"):
    _restore(path)


def test_verify_parses_every_sharding(tmp_path):
  """Restore rejects a damaged sharding entry (above), so verify must report it too."""
  from flaxckpt import _verify
  path = tmp_path / 'ckpt'
  _save_unchecked(path, _side_file_tree())
  shardings = json.loads((path / '_sharding').read_text())
  shardings = {key: text[:-3] for key, text in shardings.items()}
  (path / '_sharding').write_text(json.dumps(shardings))
  problems = _verify.verify(path)
  assert [p.path for p in problems] == [str(path / '_sharding')], problems
  assert 'the sharding of entry' in problems[0].message


@pytest.mark.parametrize('damage', ['zero', 'truncate', 'not-utf8', 'not-an-object'])
def test_a_damaged_zarray_is_named(tmp_path, damage):
  """Per-array folders (use_ocdbt=False) keep each array's .zarray as a file of its own."""
  path = tmp_path / 'ckpt'
  tree = _side_file_tree()
  _save(path, tree, use_ocdbt=False)
  if damage == 'not-an-object':
    (path / 'w' / '.zarray').write_text('[8]')
  else:
    _damage_side_file(path, 'w/.zarray', damage)
  for item in (None, tree):
    with pytest.raises(ocp.NotACheckpointError,
                       match=r"the \.zarray of array 'w' \(key w/\.zarray\) is damaged"):
      _restore(path, item=item)
  with pytest.raises(ocp.NotACheckpointError, match=r"the \.zarray of array 'w'"):
    ocp.PyTreeCheckpointer().metadata(path)


def _edit_metadata(path, edit):
  meta = json.loads((path / '_METADATA').read_text())
  edit(meta['tree_metadata'])
  (path / '_METADATA').write_text(json.dumps(meta))


def test_an_unknown_value_type_is_refused_not_restored_as_none(tmp_path):
  """A damaged value type ('jax.Array' -> 'jaH.Array') made the leaf vanish from a restore
  without a target; now restore refuses it, with a target too, and verify reports it."""
  from flaxckpt import _verify
  path = tmp_path / 'ckpt'
  tree = _side_file_tree()
  _save_unchecked(path, tree)

  def damage(entries):
    entries["('w',)"]['value_metadata']['value_type'] = 'jaH.Array'
    entries["('name',)"]['value_metadata']['value_type'] = 'strinf'

  _edit_metadata(path, damage)
  message = f"{path / '_METADATA'}: leaf '(w|name)' has value type '(jaH.Array|strinf)'"
  for item in (None, tree):
    with pytest.raises(ocp.NotACheckpointError, match=message):
      _restore(path, item=item)
  problems = [p for p in _verify.verify(path) if p.path == str(path / '_METADATA')]
  assert len(problems) == 1 and 'has value type' in problems[0].message, problems


@pytest.mark.parametrize('key_type', [0, 1, 3])
def test_a_damaged_key_type_is_refused(tmp_path, key_type):
  """Key type 1 on the dict key 'w' would have raised a bare int() ValueError while building
  the tree; 0 and 3 are no key type at all."""
  path = tmp_path / 'ckpt'
  _save_unchecked(path, _side_file_tree())
  _edit_metadata(path, lambda entries: entries["('w',)"]['key_metadata'][0].update(
      key_type=key_type))
  with pytest.raises(ocp.NotACheckpointError,
                     match=rf"unreadable checkpoint metadata \(ValueError: key 'w' of leaf 'w' "
                           rf'has key type {key_type}'):
    _restore(path)


def test_unreadable_metadata_names_the_error(tmp_path):
  path = tmp_path / 'ckpt'
  _save_unchecked(path, _side_file_tree())
  _edit_metadata(path, lambda entries: entries["('w',)"].pop('key_metadata'))
  with pytest.raises(ocp.NotACheckpointError,
                     match=r"_METADATA: unreadable checkpoint metadata \(KeyError: 'key_metadata'"):
    _restore(path)


def test_sequence_keys_still_restore_as_lists(tmp_path):
  path = tmp_path / 'ckpt'
  tree = {'layers': [np.arange(2), np.arange(3)], 'opt': ({}, None)}
  _save(path, tree)
  restored = _restore(path)
  assert isinstance(restored['layers'], list)
  np.testing.assert_array_equal(restored['layers'][1], np.arange(3))


@pytest.mark.parametrize('options', [{}, {'use_ocdbt': False}], ids=['ocdbt', 'files'])
def test_zarr3_scalars_restore_checked(tmp_path, options):
  """tensorstore gives no chunk shape for a 0-d zarr3 array: checking its one chunk raised a
  TypeError, so no zarr3 checkpoint with a scalar restored with checksums on."""
  path = tmp_path / 'ckpt'
  tree = {'step': 3, 'lr': np.float32(0.5), 'w': np.arange(3.0)}
  _save(path, tree, use_zarr3=True, **options)
  restored = _restore(path)
  assert restored['step'] == 3 and restored['lr'] == 0.5
  sums = json.loads((path / CHECKSUMS / 'process_0').read_text())['chunks']
  (path / CHECKSUMS / 'process_0').write_text(json.dumps({'algorithm': 'crc32c', 'chunks': {
      **sums, 'step': {key: crc ^ 1 for key, crc in sums['step'].items()}}}))
  with pytest.raises(ocp.ChecksumError, match="array 'step'"):
    _restore(path)


# --- layouts: what a checksum of the bytes cannot see ------------------------------------------


def _edit_text(file, old, new):
  text = file.read_text()
  assert old in text, text
  file.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize('options, meta_file, old, new', [
    ({'use_ocdbt': False}, 'w/.zarray', '"<f4"', '"<i4"'),  # One flipped byte: 'f' ^ 0x0f.
    ({'use_ocdbt': False}, 'w/.zarray', '"<f4"', '">f4"'),  # One flipped byte: '<' ^ 0x02.
    ({'use_ocdbt': False}, 'w/.zarray', '"shape":[1000]', '"shape":[1008]'),
    ({'use_ocdbt': False, 'use_zarr3': True}, 'w/zarr.json', '"float32"', '"int32"'),
], ids=['zarr2-dtype', 'zarr2-byte-order', 'zarr2-shape', 'zarr3-dtype'])
def test_a_damaged_layout_is_a_checksum_error_not_other_numbers(tmp_path, options, meta_file,
                                                                  old, new):
  """The chunk bytes are intact and their checksums match; only the dtype (or shape) their
  metadata gives changed, which used to restore int32 or byte-swapped values silently."""
  from flaxckpt import _verify
  path = tmp_path / 'ckpt'
  tree = {'w': np.linspace(0, 1, 1000, dtype=np.float32), 'step': 3}
  _save(path, tree, **options)
  _edit_text(path / meta_file, old, new)
  name = meta_file.split('/')[1]
  for item in (None, tree):
    with pytest.raises(ocp.ChecksumError, match=rf"the {re.escape(name)} of array 'w' \(key "
                                                rf'w/{re.escape(name)}\) describes'):
      _restore(path, item=item)
  assert len(_verify.verify(path)) == 1
  if 'shape' not in new:  # Unchecked, the same bytes come back as other numbers.
    unchecked = np.asarray(_restore(path, verify_checksums=False)['w'])
    assert unchecked.tobytes() != tree['w'].tobytes() or unchecked.dtype != tree['w'].dtype
    assert not np.array_equal(unchecked, tree['w'])


def test_layouts_are_kept_apart_from_chunk_checksums(tmp_path):
  import crc32c
  path = tmp_path / 'ckpt'
  _save(path, {'w': jnp.ones((4, 6), jnp.bfloat16), 'step': 3})
  sums = json.loads((path / CHECKSUMS / 'process_0').read_text())
  assert sorted(sums['chunks']['w']) == ['0.0'] and sorted(sums['layouts']) == ['step', 'w']
  assert sums['layouts']['w'] == crc32c.crc32c(b'bfloat16 [4, 6] [4, 6]')
  # Checkpoints saved before layouts were kept restore (checked chunk by chunk as before).
  del sums['layouts']
  (path / CHECKSUMS / 'process_0').write_text(json.dumps(sums))
  assert _restore(path)['step'] == 3


@pytest.mark.parametrize('name', ['_METADATA', '_strings.json', '_sharding'])
def test_json_files_are_checked_whole(tmp_path, name):
  """Damage that leaves valid JSON (a changed letter in a string value or a key) reads as
  another checkpoint: the whole-file checksums recorded at save catch it, on restore (with a
  target or without) and in verify; verify_checksums=False reads it as it now is."""
  from flaxckpt import _verify
  path = tmp_path / 'ckpt'
  tree = _side_file_tree()
  _save(path, tree)
  recorded = json.loads((path / CHECKSUMS / 'process_0').read_text())['files']
  assert sorted(recorded) == ['_METADATA', '_sharding', '_strings.json',
                              'array_metadatas/process_0']
  file = path / name
  text = file.read_text()
  old = {'_METADATA': '"step"', '_strings.json': 'run-1', '_sharding': 'cpu:0'}[name]
  new = {'_METADATA': '"stop"', '_strings.json': 'run-7', '_sharding': 'cpu:1'}[name]
  assert old in text
  file.write_text(text.replace(old, new))
  for item in (None, tree):
    if name == '_sharding' and item is not None:
      continue  # A target's own shardings are used; the file is not read.
    with pytest.raises(ocp.ChecksumError, match=re.escape(f'{file} has crc32c')):
      _restore(path, item=item)
  assert [p.path for p in _verify.verify(path)] == [str(path)] if name == '_METADATA' else [
      str(file)]
  if name == '_strings.json':
    assert _restore(path, verify_checksums=False)['name'] == 'run-7'
