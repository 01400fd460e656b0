"""The JSON files of an Orbax PyTree checkpoint: ``_METADATA``, ``_CHECKPOINT_METADATA``,
``_sharding`` and ``array_metadatas/process_<i>`` (see docs/format.md).

Files Orbax writes with Python's ``json.dumps`` defaults are written the same way here, so that
the bytes match; files Orbax writes through tensorstore are compact.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from flaxckpt import _errors, _safe_json, _storage, _tree

METADATA_FILE = '_METADATA'
CHECKPOINT_METADATA_FILE = '_CHECKPOINT_METADATA'
SHARDING_FILE = '_sharding'
STRINGS_FILE = '_strings.json'
ARRAY_METADATAS_DIR = 'array_metadatas'
# The most keys a leaf path may have. Restoring builds the tree by recursion, one level a key;
# real trees are a few dozen keys deep, and this stays far below Python's recursion limit.
MAX_PATH_KEYS = 200
COMMIT_SUCCESS_FILE = 'commit_success.txt'
# A save writes into '<name>' + TMP_SUFFIX and renames it when complete; older Orbax releases
# appended '-<n>' to it. Any name containing it is an uncommitted save.
TMP_SUFFIX = '.orbax-checkpoint-tmp'
LEGACY_AGGREGATE_FILE = 'checkpoint'

JAX_ARRAY = 'jax.Array'
NP_ARRAY = 'np.ndarray'
SCALAR = 'scalar'
STRING = 'string'
EMPTY_TYPES = {'None': None, 'Dict': dict, 'List': list, 'Tuple': tuple, 'NamedTuple': tuple}
PLACEHOLDER = 'placeholder'
UNKNOWN = 'Unknown'  # Orbax's type of a leaf it could not name; restored as None.
# Every value type flaxckpt restores. Others come from custom Orbax TypeHandlers (or damage).
VALUE_TYPES = frozenset({JAX_ARRAY, NP_ARRAY, SCALAR, STRING, PLACEHOLDER, UNKNOWN,
                         *EMPTY_TYPES})


class LeafMetadata(NamedTuple):
  """What ``_METADATA`` says about one leaf."""
  path: _tree.Path
  key_types: tuple[int, ...]
  value_type: str
  skip_deserialize: bool = False
  write_shape: tuple[int, ...] | None = None

  @property
  def name(self) -> str:
    return '.'.join(self.path)


class TreeMetadata(NamedTuple):
  leaves: tuple[LeafMetadata, ...]
  use_ocdbt: bool | None
  use_zarr3: bool
  store_array_data_equal_to_fill_value: bool
  custom_metadata: Any = None


def tree_metadata_json(meta: TreeMetadata, entries_json: str | None = None) -> str:
  """``_METADATA`` exactly as Orbax's ``json.dumps`` writes it; ``entries_json`` is
  ``leaf_entries_json(meta.leaves)`` when the caller has it already."""
  entries = leaf_entries_json(meta.leaves) if entries_json is None else entries_json
  rest = json.dumps({
      'use_ocdbt': meta.use_ocdbt,
      'use_zarr3': meta.use_zarr3,
      'store_array_data_equal_to_fill_value': meta.store_array_data_equal_to_fill_value,
      'custom_metadata': meta.custom_metadata,
  })
  return f'{{"tree_metadata": {{{entries}}}, {rest[1:]}'


def leaf_entries_json(leaves: tuple[LeafMetadata, ...]) -> str:
  """The ``tree_metadata`` entries, formatted directly (same separators and ASCII escaping as
  ``json.dumps``) and cached per leaf: a training run saves the same structure over and over."""
  return ', '.join([_leaf_entry_json(leaf) for leaf in leaves])


@functools.lru_cache(maxsize=1 << 16)
def _leaf_entry_json(leaf: LeafMetadata) -> str:
  quote = json.encoder.encode_basestring_ascii
  keys = ', '.join(f'{{"key": {quote(k)}, "key_type": {t}}}'
                   for k, t in zip(leaf.path, leaf.key_types))
  value = (f'{{"value_type": {quote(leaf.value_type)}, "skip_deserialize": '
           f'{"true" if leaf.skip_deserialize else "false"}')
  if leaf.write_shape is not None:
    value += f', "write_shape": {json.dumps(list(leaf.write_shape))}'
  return f'{quote(str(leaf.path))}: {{"key_metadata": [{keys}], "value_metadata": {value}}}}}'


@functools.lru_cache(maxsize=8)  # The checkpoints of one run share their _METADATA text.
def parse_tree_metadata(text: str) -> TreeMetadata:
  """Parses ``_METADATA``; paths come from ``key_metadata``, never from the repr'd keys."""
  raw = _safe_json.loads(text, METADATA_FILE)
  leaves = []
  for entry in raw['tree_metadata'].values():
    keys = entry['key_metadata']
    value = entry['value_metadata']
    write_shape = value.get('write_shape')
    path = tuple([str(k['key']) for k in keys])
    key_types = tuple([int(k['key_type']) for k in keys])
    _check_keys(path, key_types)
    _check_name('.'.join(path))
    leaves.append(LeafMetadata(
        path, key_types, value['value_type'], bool(value.get('skip_deserialize', False)),
        tuple(write_shape) if write_shape is not None else None))
  return TreeMetadata(
      leaves=tuple(leaves),
      use_ocdbt=raw.get('use_ocdbt'),
      use_zarr3=bool(raw.get('use_zarr3') or False),
      store_array_data_equal_to_fill_value=bool(
          raw.get('store_array_data_equal_to_fill_value') or False),
      custom_metadata=raw.get('custom_metadata'))


def _check_name(name: str) -> None:
  """A leaf's name becomes a path below the checkpoint (its zarr folder, Orbax 0.3's own
  ``_strings.json``): refuse names that would leave it. The common case costs one scan."""
  if '..' in name or '\\' in name or '\x00' in name or name.startswith('/') or name[1:2] == ':':
    _storage.check_name(name, f'leaf {name!r} of {METADATA_FILE}')


def _check_keys(path: _tree.Path, key_types: tuple[int, ...]) -> None:
  """Key types are 1 (a sequence index: digits) or 2 (a dict key or attribute); a path is at
  most ``MAX_PATH_KEYS`` long."""
  if len(path) > MAX_PATH_KEYS:
    raise _errors.LimitExceededError(
        f'{METADATA_FILE}: a leaf path of {len(path)} keys, more than {MAX_PATH_KEYS}; the file '
        'is damaged or hostile.')
  for key, kind in zip(path, key_types):
    if kind != _tree.DICT_KEY and not (kind == _tree.SEQUENCE_KEY and key.isdigit()):
      raise ValueError(f'key {key!r} of leaf {_tree.path_str(path)!r} has key type {kind}; '
                       f'expected {_tree.DICT_KEY} (dict key), or {_tree.SEQUENCE_KEY} '
                       '(sequence index) for a non-negative integer')


# The latest save time a checkpoint can record, in ns since 1970: 9999-12-31, the end of the
# years datetime covers. Anything later (1e300, 10**400) is damage, not a time.
LATEST_TIMESTAMP_NSECS = 253402214400 * 10**9


def checkpoint_metadata_json(item_handlers: str | dict[str, str] | None, init_ns: int,
                             commit_ns: int | None, custom_metadata: dict | None = None) -> str:
  return json.dumps({
      'item_handlers': item_handlers,
      'metrics': {},
      'performance_metrics': {},
      'init_timestamp_nsecs': init_ns,
      'commit_timestamp_nsecs': commit_ns,
      'custom_metadata': custom_metadata or {},
  })


def now_ns() -> int:
  return time.time_ns()


def commit_message(path: Any) -> str:
  return f'Checkpoint commit was successful to {path}'


# --- _sharding -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def sharding_key(name: str) -> str:
  return base64.urlsafe_b64encode(name.encode('utf-8')).decode('ascii')


@functools.lru_cache(maxsize=1024)
def sharding_to_json(sharding: jax.sharding.Sharding) -> str | None:
  """Describes a sharding as Orbax does; None for kinds Orbax does not record."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    mesh = sharding.mesh
    spec = list(sharding.spec)  # As given: Orbax does not pad it to the array's rank.
    entry: dict[str, Any] = {'sharding_type': 'NamedSharding', 'shape': list(mesh.devices.shape),
             'axis_names': list(mesh.axis_names)}
    axis_types = getattr(mesh, 'axis_types', None)
    if axis_types:
      entry['axis_types'] = [str(t) for t in axis_types]
    entry['partition_spec'] = [list(p) if isinstance(p, tuple) else p for p in spec]
    ids = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices)
    entry['device_mesh'] = {'mesh': _nest_ids(ids)}
    return json.dumps(entry)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    (device,) = sharding.device_set
    return json.dumps({'sharding_type': 'SingleDeviceSharding', 'device_str': str(device)})
  return None


def _nest_ids(ids: np.ndarray) -> Any:
  if ids.ndim == 0:
    return {'id': int(ids)}
  return [_nest_ids(sub) for sub in ids]


def sharding_from_json(text: str) -> jax.sharding.Sharding | None:
  """Rebuilds a saved sharding; None when its devices are not all present here, or for a kind
  Orbax never rebuilt (the leaf then restores as numpy).

  A ``NamedSharding`` entry without ``device_mesh`` (older Orbax, 0.5.9 for one) names only its
  mesh shape; as those releases did, its mesh is made of ``jax.devices()`` in order, here the
  first ``prod(shape)`` of them (Orbax wanted exactly that many devices), and with fewer devices
  there is no sharding. A ``SingleDeviceSharding`` names its device as ``str(device)`` of the jax
  that wrote it (``TFRT_CPU_0``, ``gpu:0``, ...).

  Raises:
    KeyError, TypeError, ValueError: the entry is damaged (a field missing or malformed).
  """
  entry = _safe_json.loads(text, SHARDING_FILE)
  kind = entry.get('sharding_type')
  if kind == 'SingleDeviceSharding':
    wanted = _device_name(entry['device_str'])
    for device in jax.devices():
      if _device_name(str(device)) == wanted:
        return jax.sharding.SingleDeviceSharding(device)
    return None
  if kind != 'NamedSharding':
    return None
  shape = tuple(int(n) for n in entry['shape'])
  axis_names = tuple(entry['axis_names'])
  if len(axis_names) != len(shape):
    raise ValueError(f'mesh shape {list(shape)} has {len(shape)} axes but the entry names '
                     f'{len(axis_names)}')
  if entry.get('device_mesh'):
    mesh_devices = _mesh_devices(entry['device_mesh']['mesh'], shape)
  else:
    mesh_devices = _first_devices(shape)
  if mesh_devices is None:
    return None
  axis_types = None
  if entry.get('axis_types'):
    axis_types = tuple(getattr(jax.sharding.AxisType, name.rsplit('.', 1)[-1])
                       for name in entry['axis_types'])
  mesh = jax.sharding.Mesh(mesh_devices, axis_names, axis_types=axis_types)
  spec = [tuple(p) if isinstance(p, list) else p for p in entry['partition_spec']]
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _mesh_devices(nested_ids: Any, shape: tuple[int, ...]) -> np.ndarray | None:
  """The devices of a recorded ``device_mesh``; None unless all of them are present."""
  devices = {d.id: d for d in jax.devices()}
  ids = np.array(_flatten_ids(nested_ids)).reshape(shape)
  if not all(int(i) in devices for i in ids.flat):
    return None
  return np.vectorize(lambda i: devices[int(i)], otypes=[object])(ids)


def _first_devices(shape: tuple[int, ...]) -> np.ndarray | None:
  """The first ``prod(shape)`` devices in ``jax.devices()`` order, shaped like the mesh; None
  when there are fewer."""
  count = math.prod(shape)
  devices = jax.devices()
  if len(devices) < count:
    return None
  return np.array(devices[:count], dtype=object).reshape(shape)


def _device_name(name: str) -> str:
  """``str(device)`` in one spelling across jax releases: ``TFRT_CPU_0`` became ``cpu:0``,
  ``gpu:0`` became ``cuda:0`` (or ``rocm:0``), TPUs' ``host=`` became ``process=``."""
  if name.startswith('TFRT_CPU_'):
    return 'cpu:' + name[len('TFRT_CPU_'):]
  for platform in ('cuda:', 'rocm:'):
    if name.startswith(platform):
      return 'gpu:' + name[len(platform):]
  return name.replace('(host=', '(process=')


def _flatten_ids(node: Any) -> list[int]:
  if isinstance(node, dict):
    return [node['id']]
  return [i for sub in node for i in _flatten_ids(sub)]


class ArrayMetadata(NamedTuple):
  """One entry of ``array_metadatas/process_<i>``."""
  param_name: str
  write_shape: tuple[int, ...]
  chunk_shape: tuple[int, ...]
  ext_metadata: dict[str, Any] | None


def array_metadatas_json(entries: list[ArrayMetadata]) -> str:
  """The file as Orbax's ``json.dumps`` writes it (formatted directly, as for ``_METADATA``)."""
  items = ', '.join([_array_entry_json(e.param_name, e.write_shape, e.chunk_shape,
                                       'null' if e.ext_metadata is None
                                       else json.dumps(e.ext_metadata)) for e in entries])
  return f'{{"array_metadatas": [{items}]}}'


@functools.lru_cache(maxsize=1 << 16)
def _array_entry_json(name: str, write_shape: tuple[int, ...], chunk_shape: tuple[int, ...],
                      ext_json: str) -> str:
  return (f'{{"array_metadata": {{"param_name": {json.encoder.encode_basestring_ascii(name)}, '
          f'"write_shape": {list(write_shape)}, "chunk_shape": {list(chunk_shape)}, '
          f'"ext_metadata": {ext_json}}}}}')


def parse_array_metadatas(text: str) -> list[ArrayMetadata]:
  return [ArrayMetadata(e['param_name'], tuple(e['write_shape']), tuple(e['chunk_shape']),
                        e.get('ext_metadata'))
          for e in (entry['array_metadata']
                    for entry in _safe_json.loads(text, ARRAY_METADATAS_DIR)['array_metadatas'])]
