"""Step- and root-level metadata: a step's ``_CHECKPOINT_METADATA`` file, read as Orbax reads it.

The file is untrusted input: it is read through ``_storage`` (a regular file of bounded size)
and parsed with bounded nesting (``_safe_json``), and every field is type-checked.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from flaxckpt import _errors, _metadata, _safe_json, _storage


@dataclasses.dataclass
class StepMetadata:
  """What a checkpoint step records about itself (not about any one item).

  Attributes:
    item_handlers: the handler type string of each item (a dict by item name), or one string
      for a single-item checkpoint.
    item_metadata: each item's metadata (a dict by item name), or one item's.
    metrics: the metrics given at save (for instance to ``CheckpointManager.save``).
    performance_metrics: timings recorded at save (a dict of Orbax's ``StepStatistics`` fields).
    init_timestamp_nsecs: when the save began, in nanoseconds since the epoch.
    commit_timestamp_nsecs: when it committed.
    custom_metadata: the caller's own JSON object (plus any field this reader does not know).
  """
  item_handlers: dict[str, str] | str | None = None
  item_metadata: Any = None
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  performance_metrics: Any = dataclasses.field(default_factory=dict)
  init_timestamp_nsecs: int | None = None
  commit_timestamp_nsecs: int | None = None
  custom_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RootMetadata:
  """Metadata of a whole checkpoint directory (all steps): Orbax's own and the caller's."""
  internal_metadata: dict[str, Any] | None = dataclasses.field(default_factory=dict)
  custom_metadata: dict[str, Any] | None = dataclasses.field(default_factory=dict)


def _check(path: os.PathLike, field: str, value: Any, types: tuple[type, ...]) -> Any:
  wrong_type = value is not None and not isinstance(value, types)
  if wrong_type or (isinstance(value, bool) and bool not in types):
    names = ' or '.join(t.__name__ for t in types)
    raise _errors.NotACheckpointError(
        f'{os.fspath(path)}: field {field!r} should be {names} or null, found '
        f'{type(value).__name__}; the file is damaged.')
  return value


def parse_step_metadata(data: bytes, path: os.PathLike, item_metadata: Any = None
                        ) -> StepMetadata:
  """Parses the bytes of a ``_CHECKPOINT_METADATA`` file read from ``path``.

  Raises:
    NotACheckpointError: it is not a JSON object of the expected fields.
    LimitExceededError: it nests too deeply.
  """
  try:
    raw = _safe_json.loads(data, path)
  except ValueError as e:
    if isinstance(e, _errors.CheckpointError):
      raise
    raise _errors.NotACheckpointError(f'{os.fspath(path)}: not JSON ({e}).') from e
  if not isinstance(raw, dict):
    raise _errors.NotACheckpointError(
        f'{os.fspath(path)}: expected a JSON object, found {type(raw).__name__}.')
  handlers = _check(path, 'item_handlers', raw.get('item_handlers'), (str, dict))
  if isinstance(handlers, dict) and not all(
      isinstance(v, (str, type(None))) for v in handlers.values()):
    raise _errors.NotACheckpointError(
        f'{os.fspath(path)}: field \'item_handlers\' should map item names to handler type '
        'strings; the file is damaged.')
  custom = dict(_check(path, 'custom_metadata', raw.get('custom_metadata'), (dict,)) or {})
  known = {'item_handlers', 'item_metadata', 'metrics', 'performance_metrics',
           'init_timestamp_nsecs', 'commit_timestamp_nsecs', 'custom_metadata'}
  for key in raw.keys() - known:  # As Orbax: fields it does not know join the custom ones.
    if key in custom:
      raise _errors.NotACheckpointError(
          f'{os.fspath(path)}: field {key!r} is both a top-level and a custom_metadata key.')
    custom[key] = raw[key]
  return StepMetadata(
      item_handlers=handlers,
      item_metadata=item_metadata,
      metrics=dict(_check(path, 'metrics', raw.get('metrics'), (dict,)) or {}),
      performance_metrics=dict(_check(path, 'performance_metrics',
                                      raw.get('performance_metrics'), (dict,)) or {}),
      init_timestamp_nsecs=_check(path, 'init_timestamp_nsecs',
                                  raw.get('init_timestamp_nsecs'), (int,)),
      commit_timestamp_nsecs=_check(path, 'commit_timestamp_nsecs',
                                    raw.get('commit_timestamp_nsecs'), (int,)),
      custom_metadata=custom)


def read_step_metadata(directory: _storage.PathLike, item_metadata: Any = None) -> StepMetadata:
  """The ``StepMetadata`` of the step at ``directory``, with ``item_metadata`` filled in (what
  ``Checkpointer.metadata`` and ``CheckpointManager.metadata(step)`` return). A step without a
  ``_CHECKPOINT_METADATA`` file (saved by Orbax before 0.9) gives empty fields.

  Raises:
    NotACheckpointError: the file is damaged. LimitExceededError: it nests too deeply.
  """
  path = _storage.as_path(directory) / _metadata.CHECKPOINT_METADATA_FILE
  if not _storage.is_file(path):
    return StepMetadata(item_metadata=item_metadata)
  return parse_step_metadata(_read(path), path, item_metadata)


def _read(path: pathlib.Path) -> bytes:
  """The file's bytes, refused when a link leads it outside its step directory."""
  _storage.check_inside(path, path.parent, 'the step metadata file')
  return _storage.read_bytes(path)


def get_step_metadata(path: _storage.PathLike) -> StepMetadata:
  """The ``StepMetadata`` recorded in the step directory ``path`` (``item_metadata`` is None:
  it is not in the file).

  Raises:
    ValueError: ``path`` has no ``_CHECKPOINT_METADATA`` file (NotACheckpointError, a
      ValueError, when it is damaged).
    NotADirectoryError: ``path`` is a file.
  """
  directory = _storage.as_path(path)
  if _storage.exists(directory) and not _storage.is_dir(directory):
    raise NotADirectoryError(f'Path is not a directory: {directory}')
  file = directory / _metadata.CHECKPOINT_METADATA_FILE
  if not _storage.is_file(file):
    raise ValueError(f'Step metadata not found at {file}')
  return parse_step_metadata(_read(file), file)
