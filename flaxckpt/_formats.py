"""What a path holds: which checkpoint format, told from the names on disk alone.

The command-line tools (inspect, verify, convert, diff) start here, so that each of them
accepts the same things: a PyTree checkpoint (Orbax OCDBT, per-array zarr v2/v3 folders), a
checkpoint with several items, a CheckpointManager root, a flax msgpack file, flax's ``_gda``
folder of multi-process arrays, or a flax checkpoint directory holding several of those. Each
may be a local path or a ``gs://``/``s3://`` URL; on an object store a step directory counts
once it holds ``commit_success.txt`` (``_steps.is_finalized``), as for CheckpointManager.
"""

from __future__ import annotations

import enum
import pathlib
import re
from typing import NamedTuple

from flaxckpt import _errors, _metadata, _steps, _storage

_GDA_SUFFIX = '_gda'
_GDA_COMMIT = 'commit_success.txt'
_STEP_NAME = re.compile(r'(?:(?P<prefix>.*?)_)?(?P<step>\d+)')
DEFAULT_FLAX_PREFIX = 'checkpoint_'
_FLAX_NAME = re.compile(r'(?P<prefix>.*?)(?P<step>-?\d+(?:\.\d+)?)')


class Kind(enum.Enum):
  PYTREE = 'pytree'  # One PyTree item: _METADATA and arrays.
  COMPOSITE = 'composite'  # A checkpoint of named items (a CheckpointManager step).
  MANAGER = 'manager'  # A CheckpointManager root: one directory per step.
  MSGPACK = 'msgpack'  # One flax msgpack checkpoint file.
  FLAX_DIR = 'flax-dir'  # A flax ``save_checkpoint`` directory: ``<prefix><step>`` entries.
  GDA = 'gda'  # flax's ``<checkpoint>_gda`` folder of multi-process arrays.
  JSON = 'json'  # A JSON item (metrics, configs) inside a composite checkpoint.


class Found(NamedTuple):
  kind: Kind
  path: pathlib.Path


class Step(NamedTuple):
  step: int | float
  path: pathlib.Path


def is_pytree_dir(path: pathlib.Path) -> bool:
  return any(_storage.exists(path / name) for name in (
      _metadata.METADATA_FILE, 'manifest.ocdbt', _metadata.LEGACY_AGGREGATE_FILE))


def is_temporary(name: str) -> bool:
  """Names of saves that never committed (Orbax's and flax's)."""
  return _metadata.TMP_SUFFIX in name or name.endswith('tmp')


def detect(path: _storage.PathLike) -> Found:
  """The kind of checkpoint at ``path``.

  Raises:
    FileNotFoundError: nothing is at ``path``.
    NotACheckpointError: ``path`` is a directory that holds none of the known layouts.
  """
  location = _storage.as_path(path)
  if not _storage.exists(location):
    raise FileNotFoundError(f'{location}: no such file or directory.')
  if _storage.is_file(location):
    if location.name in (_metadata.METADATA_FILE, _metadata.CHECKPOINT_METADATA_FILE):
      raise _errors.NotACheckpointError(
          f'{location}: this is a file inside a checkpoint; pass its directory, '
          f'{location.parent}.')
    return Found(Kind.MSGPACK, location)
  if location.name.endswith(_GDA_SUFFIX) and _storage.exists(location / _GDA_COMMIT):
    return Found(Kind.GDA, location)
  if is_pytree_dir(location):
    return Found(Kind.PYTREE, location)
  if flax_dir_steps(location):
    return Found(Kind.FLAX_DIR, location)
  if manager_steps(location):
    return Found(Kind.MANAGER, location)
  if _storage.exists(location / _metadata.CHECKPOINT_METADATA_FILE) or _only_items(location):
    return Found(Kind.COMPOSITE, location)
  if (json_path := json_file(location)) is not None:
    return Found(Kind.JSON, json_path)
  names = _storage.list_names(location)
  raise _errors.NotACheckpointError(
      f'{location}: not a checkpoint (expected a PyTree checkpoint with '
      f'{_metadata.METADATA_FILE}, a CheckpointManager root of step directories, or flax '
      f'checkpoint files; found {names[:8] or "an empty directory"}).')


def item_names(path: pathlib.Path) -> list[str]:
  """The items of a composite checkpoint: subdirectories that hold a PyTree or a JSON file."""
  items = []
  for name in _storage.list_names(path):
    sub = path / name
    if _storage.is_dir(sub) and not is_temporary(name) and (
        is_pytree_dir(sub) or json_file(sub) is not None):
      items.append(name)
  return items


def json_file(item: pathlib.Path) -> pathlib.Path | None:
  """The file of a JSON item: the one file in its directory (named after the item, or
  ``metadata`` as older Orbax named it), beside at most a commit marker."""
  names = [name for name in _storage.list_names(item)
           if name != _metadata.COMMIT_SUCCESS_FILE and not name.startswith('.')]
  if names in ([item.name], ['metadata']) and _storage.is_file(item / names[0]):
    return item / names[0]
  return None


def _only_items(path: pathlib.Path) -> bool:
  """Whether every entry of ``path`` (there is one at least) is an item of a checkpoint."""
  names = [name for name in _storage.list_names(path) if not name.startswith('.')]
  return bool(names) and item_names(path) == names


def manager_steps(root: pathlib.Path) -> list[Step]:
  """The committed step directories of a manager root (``3``, ``0003``, ``ckpt_3``), ascending.

  All step names share one prefix; directories of saves in flight never match (on an object
  store, where saves are written in place, those without ``commit_success.txt``).
  """
  by_prefix: dict[str, list[Step]] = {}
  for name in _storage.list_names(root):
    match = _STEP_NAME.fullmatch(name)
    if match is not None and _steps.is_finalized(root / name):
      by_prefix.setdefault(match.group('prefix') or '', []).append(
          Step(int(match.group('step')), root / name))
  return sorted(by_prefix.popitem()[1]) if len(by_prefix) == 1 else []


def flax_dir_steps(root: pathlib.Path) -> list[Step]:
  """Checkpoints of a flax ``save_checkpoint`` directory (msgpack files, Orbax folders),
  ascending by step; saves in flight and ``_gda`` folders are left out (on an object store,
  also Orbax folders without ``commit_success.txt``).

  The prefix is the one msgpack files share (flax's default ``checkpoint_`` when several do);
  a directory without such files has none.
  """
  by_prefix: dict[str, list[Step]] = {}
  with_files = set()
  for name in _storage.list_names(root):
    match = _FLAX_NAME.fullmatch(name)
    if match is None or is_temporary(name):
      continue
    entry = root / name
    is_file = _storage.is_file(entry)
    if not (is_file or _storage.renames_atomically(entry) or _steps.is_finalized(entry)):
      continue  # An Orbax checkpoint on an object store that never committed.
    step = float(match.group('step'))
    prefix = match.group('prefix')
    by_prefix.setdefault(prefix, []).append(
        Step(int(step) if step.is_integer() else step, entry))
    if is_file:
      with_files.add(prefix)
  if len(with_files) > 1:
    with_files &= {DEFAULT_FLAX_PREFIX}
  return sorted(by_prefix[with_files.pop()]) if len(with_files) == 1 else []
