"""``flaxckpt inspect``: what a checkpoint holds, from its metadata alone.

``describe`` returns plain JSON-able dicts (the ``--json`` output); ``_cli`` renders them as
text. No array data is read for Orbax layouts; msgpack files are mapped, not read.
"""

from __future__ import annotations

import datetime
import math
import pathlib
from typing import Any

import numpy as np

from flaxckpt import (_aggregate, _arrays, _checksums, _errors, _formats, _leaf_source,
                      _metadata, _restore, _safe_json, _storage, _tree)

Description = dict[str, Any]
_EMPTY_SHOWN_AS = {'None': 'None', 'Dict': '{}', 'List': '[]', 'Tuple': '()', 'NamedTuple': '()'}


def describe(path: _storage.PathLike, best_metric: str | None = None,
             best_mode: str = 'max') -> Description:
  """The format, tree (key path, shape, dtype, bytes, saved sharding) and totals of the
  checkpoint at ``path``; for a CheckpointManager root or flax directory, its steps too.

  ``best_metric`` names the metric that ranks a manager's steps (default: the only numeric
  one); ``best_mode`` is ``max`` or ``min``, as ``CheckpointManagerOptions.best_mode``.

  Raises:
    UnsafeCheckpointError: the checkpoint holds a FIFO, device or socket, or a link leading
      outside it (nothing is read through it).
  """
  found = _formats.detect(path)
  check_surroundings(found.path)
  return _describe(found, best_metric, best_mode)


def check_surroundings(path: pathlib.Path) -> None:
  """Refuses a checkpoint (directory, or msgpack file and its ``_gda`` folder) holding entries
  a reader must not open: FIFOs, devices, sockets, links that lead outside it."""
  if _storage.is_dir(path):
    _storage.check_tree(path)
    return
  gda_dir = _leaf_source.gda_dir_of(path)
  if _storage.is_dir(gda_dir):
    _storage.check_tree(gda_dir)


def _describe(found: _formats.Found, best_metric: str | None, best_mode: str) -> Description:
  kind, path = found
  if kind is _formats.Kind.PYTREE:
    return pytree(path)
  if kind is _formats.Kind.COMPOSITE:
    return composite(path)
  if kind is _formats.Kind.MANAGER:
    return manager(path, best_metric, best_mode)
  if kind is _formats.Kind.MSGPACK:
    return msgpack_file(path)
  if kind is _formats.Kind.FLAX_DIR:
    return flax_dir(path)
  if kind is _formats.Kind.GDA:
    return gda(path)
  return json_item(path)


def json_item(path: pathlib.Path) -> Description:
  """A JSON item (metrics, a JsonSave): its value, or what made it unreadable."""
  try:
    return {'format': 'json', 'path': str(path), 'value': _json_file(path)}
  except ValueError as e:  # Shown as such, beside the other items of its checkpoint.
    if isinstance(e, _errors.UnsafeCheckpointError):
      raise
    return {'format': 'json', 'path': str(path), 'value': None, 'error': _unreadable(e)}


def _with_totals(description: Description) -> Description:
  leaves = description['leaves']
  description['totals'] = {
      'leaves': len(leaves),
      'arrays': sum(1 for leaf in leaves if leaf['shape'] is not None),
      'bytes': sum(leaf['bytes'] for leaf in leaves)}
  return description


def _leaf(path: str, shape: tuple[int, ...] | None, dtype: Any, sharding: str | None = None,
          value: Any = None, empty: bool = False) -> dict[str, Any]:
  if shape is not None and any(size < 0 for size in shape):
    raise _errors.NotACheckpointError(
        f'leaf {path!r}: the stored shape {tuple(shape)} has a negative dimension; the '
        'checkpoint is damaged.')
  # A product of Python ints: a declared shape of any size is counted, never allocated.
  nbytes = 0 if shape is None else math.prod(shape) * np.dtype(dtype).itemsize
  kind = ('array' if shape is not None else 'string' if isinstance(value, str)
          and not empty else 'empty' if empty else 'scalar')
  return {'path': path, 'kind': kind, 'shape': None if shape is None else list(shape),
          'dtype': None if dtype is None else str(np.dtype(dtype)), 'bytes': nbytes,
          'sharding': sharding, 'value': value}


def storage_of(directory: pathlib.Path, meta: _metadata.TreeMetadata) -> str:
  use_ocdbt = meta.use_ocdbt
  if use_ocdbt is None:
    use_ocdbt = _storage.exists(directory / _arrays.OCDBT_MANIFEST)
  zarr = 'zarr3' if meta.use_zarr3 else 'zarr2'
  return f'ocdbt+{zarr}' if use_ocdbt else f'{zarr} per-array folders'


def pytree(directory: pathlib.Path) -> Description:
  reader = _restore.open_reader(directory, verify_checksums=False)
  meta = reader.meta
  arrays = [leaf for leaf in meta.leaves if _restore._is_stored_array(leaf)]
  infos = dict(zip([leaf.path for leaf in arrays], _arrays.read_array_infos(
      directory, [leaf.name for leaf in arrays], use_ocdbt=meta.use_ocdbt,
      use_zarr3=meta.use_zarr3)))
  shardings = _json_file(directory / _metadata.SHARDING_FILE)
  if not isinstance(shardings, dict):
    shardings = {}  # Not a sharding of any leaf; verify reports the damage.
  leaves = []
  for leaf in meta.leaves:
    name = _tree.path_str(leaf.path)
    if leaf.path in infos:
      shape, dtype, _ = infos[leaf.path]
      sharding = shardings.get(_metadata.sharding_key(leaf.name))
      leaves.append(_leaf(name, shape, dtype, sharding_summary(sharding, directory)))
    elif leaf.value_type == _metadata.STRING:
      leaves.append(_leaf(name, None, None, value=reader.string(leaf)))
    elif _aggregate.is_aggregated(leaf):  # Stored in the 'checkpoint' file of older Orbax.
      value = reader.aggregated(leaf)
      if isinstance(value, np.ndarray):
        leaves.append(_leaf(name, value.shape, value.dtype, f'in {_aggregate.FILE} file'))
      else:
        leaves.append(_leaf(name, None, None, value=value))
    else:
      leaves.append(_leaf(name, None, None, value=_EMPTY_SHOWN_AS.get(leaf.value_type),
                          empty=True))
  return _with_totals({
      'format': 'orbax-pytree', 'path': str(directory), 'storage': storage_of(directory, meta),
      'layout': layout_of(directory), 'checksums': _storage.is_dir(directory / _checksums.DIR),
      'leaves': leaves})


def layout_of(directory: pathlib.Path) -> str:
  """Which family of Orbax releases wrote a PyTree checkpoint, from the files it has."""
  has_tree_file = _storage.is_file(directory / _aggregate.FILE)
  if not _storage.is_file(directory / _metadata.METADATA_FILE):
    return f'{_aggregate.FILE} file, no {_metadata.METADATA_FILE} (Orbax 0.1 to 0.3)'
  if has_tree_file:
    return f'{_metadata.METADATA_FILE} and {_aggregate.FILE} file (Orbax 0.3 to 0.5)'
  return f'{_metadata.METADATA_FILE} (Orbax 0.6 on, flaxckpt)'


def sharding_summary(text: Any, directory: pathlib.Path | None = None) -> str | None:
  """``_sharding``'s JSON of one array, in a few words ('unreadable' if it is damaged)."""
  if not text:
    return None
  try:
    return _summarise_sharding(_safe_json.loads(text, directory or _metadata.SHARDING_FILE))
  except (ValueError, TypeError, AttributeError):  # Not JSON, or JSON of the wrong shape.
    return 'unreadable'


def _summarise_sharding(entry: Any) -> str | None:
  kind = entry.get('sharding_type')
  if kind == 'NamedSharding':
    axes = ', '.join(f'{name}={size}' for name, size in zip(entry.get('axis_names', []),
                                                            entry.get('shape', [])))
    spec = ', '.join('None' if part is None else repr(part) if isinstance(part, str)
                     else '(' + ', '.join(map(repr, part)) + ')'
                     for part in entry.get('partition_spec', []))
    return f'mesh({axes}) P({spec})'
  if kind == 'SingleDeviceSharding':
    return f'single device {entry.get("device_str")}'
  return str(kind)


def _json_file(path: pathlib.Path) -> Any:
  """The JSON value in ``path`` (nesting bounded), {} when there is no such file."""
  if not _storage.exists(path):
    return {}
  try:
    return _safe_json.loads(_storage.read_bytes(path), path)
  except UnicodeDecodeError as e:
    raise _errors.NotACheckpointError(f'{path}: not UTF-8 text ({e}).') from None
  except ValueError as e:
    if isinstance(e, _errors.CheckpointError):
      raise
    raise _errors.NotACheckpointError(f'{path}: not valid JSON ({e}).') from None


def _unreadable(error: Exception) -> str:
  return f'unreadable ({type(error).__name__})'


def _commit_time(directory: pathlib.Path) -> str:
  """``_saved_at`` from the ``_CHECKPOINT_METADATA`` of ``directory``; 'unreadable (...)' when
  that file is damaged, so that one bad step does not hide the others (verify says more)."""
  try:
    meta = _json_file(directory / _metadata.CHECKPOINT_METADATA_FILE)
  except ValueError as e:  # Not JSON, or JSON nested too deep.
    if isinstance(e, _errors.UnsafeCheckpointError):
      raise
    return _unreadable(e)
  return _saved_at(directory, meta)


def composite(directory: pathlib.Path) -> Description:
  _restore.check_committed(directory)  # As a PyTree checkpoint's reader does.
  items = {}
  for name in _formats.item_names(directory):
    items[name] = _describe(_formats.detect(directory / name), None, 'max')
  return {'format': 'composite', 'path': str(directory), 'saved': _commit_time(directory),
          'items': items}


def _saved_at(directory: pathlib.Path, meta: Any) -> str:
  """When a checkpoint committed: its recorded commit time, else the file's or directory's
  mtime ('unknown' on an object store, where prefixes have none); 'invalid (...)' when the
  recorded time is not a time (a string, 1e300, 10**400)."""
  nanos = (meta.get('commit_timestamp_nsecs') or meta.get('init_timestamp_nsecs')
           if isinstance(meta, dict) else None)
  if not nanos:
    return 'unknown' if _storage.is_remote(directory) else _local_time(directory.stat().st_mtime)
  if isinstance(nanos, bool) or not isinstance(nanos, (int, float)) or not (
      0 <= nanos <= _metadata.LATEST_TIMESTAMP_NSECS):  # Also false for nan.
    shown = repr(nanos) if len(repr(nanos)) <= 24 else repr(nanos)[:21] + '...'
    return f'invalid ({shown})'
  return _local_time(nanos / 1e9)


def _local_time(seconds: float) -> str:
  try:
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec='seconds')
  except (OverflowError, OSError, ValueError):  # Beyond this platform's time_t.
    return f'invalid ({seconds!r} s)'



def manager(root: pathlib.Path, best_metric: str | None, best_mode: str) -> Description:
  steps: list[Description] = []
  for step, path in _formats.manager_steps(root):
    try:
      metrics = _json_file(path / 'metrics' / 'metrics') or None
    except ValueError as e:  # Shown as such; the other steps are still listed and ranked.
      if isinstance(e, _errors.UnsafeCheckpointError):
        raise
      metrics = _unreadable(e)
    steps.append({'step': step, 'path': str(path), 'saved': _commit_time(path),
                  'items': _formats.item_names(path) or None, 'metrics': metrics})
  latest = steps[-1]['step'] if steps else None
  best, rule = _best(steps, best_metric, best_mode)
  for entry in steps:
    entry['latest'] = entry['step'] == latest
    entry['best'] = entry['step'] == best
  description: Description = {'format': 'manager', 'path': str(root), 'steps': steps,
                               'best_by': rule, 'latest_step': latest, 'best_step': best}
  if steps:
    description['latest'] = _describe(_formats.detect(steps[-1]['path']), None, 'max')
  return description


def _best(steps: list[dict[str, Any]], metric: str | None, mode: str
          ) -> tuple[int | None, str | None]:
  """The best step by ``metric`` (``mode`` max or min) and the rule, e.g. ``max loss``."""
  scored = [(entry['step'], entry['metrics']) for entry in steps
            if isinstance(entry['metrics'], dict)]
  if metric is None:
    numeric = {key for _, metrics in scored for key, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if len(numeric) != 1:
      return None, None
    (metric,) = numeric
  values = [(metrics[metric], step) for step, metrics in scored
            if isinstance(metrics.get(metric), (int, float))]
  if not values:
    return None, None
  pick = max if mode == 'max' else min
  return pick(values, key=lambda pair: pair[0])[1], f'{mode} {metric}'


def msgpack_file(path: pathlib.Path) -> Description:
  from flaxckpt.legacy import _gda, _sidecar  # Only flax files need the legacy package.
  leaves = []
  for key, value in _leaf_source.flatten_state(_leaf_source.read_msgpack(path)):
    name = '/'.join(key) if key else '<root>'
    if isinstance(value, (np.ndarray, np.generic)):
      leaves.append(_leaf(name, value.shape, value.dtype,
                          value=value.item() if value.ndim == 0 else None))
    elif isinstance(value, str) and value.startswith(_gda.PLACEHOLDER):
      subpath = _gda.placeholder_subpath(value, f'{path}: leaf {name!r}')
      gda_dir = _leaf_source.gda_dir_of(path)
      shape, dtype, _ = _arrays.read_array_infos(gda_dir, [subpath], use_ocdbt=False,
                                                 use_zarr3=False)[0]
      leaves.append(_leaf(name, shape, dtype, f'multi-process array in {gda_dir.name}'))
    elif value is None or isinstance(value, dict):
      leaves.append(_leaf(name, None, None, value=repr(value), empty=True))
    else:
      leaves.append(_leaf(name, None, None, value=value if _jsonable(value) else repr(value)))
  sidecar = path.with_name(f'.{path.name}{_sidecar.SUFFIX}')
  return _with_totals({'format': 'flax-msgpack', 'path': str(path),
                       'saved': _saved_at(path, None), 'checksums': _storage.is_file(sidecar),
                       'leaves': leaves})


def _jsonable(value: Any) -> bool:
  return value is None or isinstance(value, (bool, int, float, str))


def flax_dir(root: pathlib.Path) -> Description:
  steps: list[Description] = []
  for step, path in _formats.flax_dir_steps(root):
    kind = 'flax-msgpack' if _storage.is_file(path) else 'orbax-pytree'
    steps.append({'step': step, 'path': str(path), 'format': kind,
                  'saved': _commit_time(path) if kind == 'orbax-pytree'
                  else _saved_at(path, None)})
  description: Description = {'format': 'flax-dir', 'path': str(root), 'steps': steps,
                               'latest_step': steps[-1]['step'] if steps else None}
  if steps:
    description['latest'] = _describe(_formats.detect(steps[-1]['path']), None, 'max')
  return description


def gda(directory: pathlib.Path) -> Description:
  names = [name for name in _storage.list_names(directory) if _storage.is_dir(directory / name)]
  infos = _arrays.read_array_infos(directory, names, use_ocdbt=False, use_zarr3=False)
  return _with_totals({'format': 'flax-gda', 'path': str(directory),
                       'leaves': [_leaf(name, shape, dtype) for name, (shape, dtype, _)
                                  in zip(names, infos)]})
