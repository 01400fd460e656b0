"""Step directories of a checkpoint root, as Orbax's ``orbax.checkpoint.path.step`` names them.

A ``NameFormat`` turns a step number into a directory name and finds the committed steps
under a root. ``standard_name_format`` is the one CheckpointManager uses (``23``, ``0023``,
``step_23``, ``step_0023``); its naming rules are those of ``flaxckpt._steps.StepNaming``.

A step directory is committed ("finalized") when its name carries no
``.orbax-checkpoint-tmp`` suffix (saves committed by renaming their temporary directory, the
default on local disks), or, for saves written in place (``CommitFileTemporaryPath``, object
stores), when it holds ``commit_success.txt``. Paths are returned as ``pathlib.Path``.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import functools
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from flaxckpt import _metadata, _multihost, _safe_json, _steps, _storage

__all__ = [
    'ALLOWED_STEP_NAME_PATTERN', 'Metadata', 'NameFormat', 'TMP_DIR_STEP_PATTERN',
    'TMP_DIR_SUFFIX', 'all_temporary_paths', 'any_checkpoint_step', 'build_step_metadatas',
    'build_step_path', 'checkpoint_steps', 'checkpoint_steps_paths', 'composite_name_format',
    'find_step_path', 'get_save_directory', 'is_checkpoint_finalized', 'is_path_finalized',
    'is_path_temporary', 'is_standard_name_format', 'is_tmp_checkpoint',
    'latest_step_metadata', 'maybe_find_step_metadata',
    'single_host_load_and_broadcast_name_format', 'standard_name_format',
    'step_from_checkpoint_name', 'step_metadata_of_checkpoint_path',
    'step_prefix_with_underscore', 'tmp_checkpoints',
]

TMP_DIR_SUFFIX = _metadata.TMP_SUFFIX
# A step name with a prefix: '<prefix>_<digits>'.
ALLOWED_STEP_NAME_PATTERN = r'(.+)_(\d+)'
# The temporary directory of a save: '[<prefix>_]<digits>.orbax-checkpoint-tmp[-<timestamp>]'.
TMP_DIR_STEP_PATTERN = r'.*?_*?(\d+)\.orbax-checkpoint-tmp'

MetadataT = TypeVar('MetadataT', bound='Metadata')
_MetadataCo = TypeVar('_MetadataCo', bound='Metadata', covariant=True)


@dataclasses.dataclass(frozen=True)
class Metadata:
  """A step and its directory; its timestamps are read from ``_CHECKPOINT_METADATA`` on
  first use (None where the file or the field is missing or unreadable)."""
  step: int
  path: pathlib.Path

  @functools.cached_property
  def _checkpoint_metadata(self) -> dict[str, Any]:
    try:
      value = _safe_json.read(_storage.as_path(self.path) / _metadata.CHECKPOINT_METADATA_FILE)
    except (OSError, ValueError):  # Missing or damaged: a step's timestamps are optional.
      return {}
    return value if isinstance(value, dict) else {}

  def _timestamp(self, key: str) -> int | None:
    value = self._checkpoint_metadata.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and (
        0 <= value <= _metadata.LATEST_TIMESTAMP_NSECS):
      return value
    return None

  @property
  def init_timestamp_nsecs(self) -> int | None:
    """When the save of this step started, in ns since the epoch."""
    return self._timestamp('init_timestamp_nsecs')

  @property
  def commit_timestamp_nsecs(self) -> int | None:
    """When this step was committed, in ns since the epoch."""
    return self._timestamp('commit_timestamp_nsecs')

  @property
  def commit_timestamp(self) -> datetime.datetime:
    """When this step was committed (UTC); where no time was recorded (Orbax < 0.6 wrote
    none), the directory's mtime, or on an object store, whose prefixes have no times, the
    epoch (an old step of unknown age)."""
    nsecs = self.commit_timestamp_nsecs
    path = _storage.as_path(self.path)
    if nsecs is not None:
      seconds = nsecs / 1e9
    else:
      seconds = 0.0 if _storage.is_remote(path) else path.stat().st_mtime
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


class NameFormat(Protocol, Generic[_MetadataCo]):
  """Names step directories and finds the committed ones under a root directory."""

  def build_name(self, step: int) -> str:
    """The directory name of ``step``."""
    ...

  @abc.abstractmethod
  def find_all(self, base_path: _storage.PathLike) -> Iterator[_MetadataCo]:
    """Metadata of every committed step under ``base_path`` (uncommitted ones are skipped)."""
    ...

  @abc.abstractmethod
  def find_step(self, base_path: _storage.PathLike, step: int) -> _MetadataCo:
    """Metadata of the committed ``step`` under ``base_path``.

    Raises:
      ValueError: no committed directory of ``step`` is there.
    """
    ...


def _uses_commit_file(temporary_path_cls: type | None, atomicity_options: Any) -> bool:
  """Whether steps are committed by ``commit_success.txt`` rather than by a rename."""
  if temporary_path_cls is not None:
    return any(cls.__name__ == 'CommitFileTemporaryPath' for cls in temporary_path_cls.__mro__)
  mode = getattr(atomicity_options, 'mode', None)
  return str(getattr(mode, 'name', mode)).upper() == 'COMMIT_FILE'


def is_path_finalized(path: _storage.PathLike, *, temporary_path_cls: type | None = None,
                      atomicity_options: Any = None) -> bool:
  """Whether ``path`` is a committed checkpoint directory.

  Committed by rename (the default): no ``.orbax-checkpoint-tmp`` in its name. With
  ``temporary_path_cls=CommitFileTemporaryPath`` (or an ``atomicity_options`` in commit-file
  mode): ``commit_success.txt`` inside it.
  """
  return _steps.is_finalized(_storage.as_path(path),
                             _uses_commit_file(temporary_path_cls, atomicity_options))


def is_path_temporary(path: _storage.PathLike, *, temporary_path_cls: type | None = None,
                      atomicity_options: Any = None) -> bool:
  """Whether ``path`` is the directory of a save that has not committed (the converse rule of
  ``is_path_finalized``; a symbolic link never is one)."""
  return _steps.is_temporary(_storage.as_path(path),
                             _uses_commit_file(temporary_path_cls, atomicity_options))


def all_temporary_paths(root_directory: _storage.PathLike, *,
                        temporary_path_cls: type | None = None,
                        atomicity_options: Any = None) -> list[Any]:
  """The uncommitted saves under ``root_directory``, each as a ``TemporaryPath`` of
  ``temporary_path_cls`` (``AtomicRenameTemporaryPath`` by default) built from its directory."""
  root = _storage.as_path(root_directory)
  if not _storage.is_dir(root):
    return []
  if temporary_path_cls is None:
    from flaxckpt.path import atomicity  # pylint: disable=g-import-not-at-top
    temporary_path_cls = (atomicity.CommitFileTemporaryPath
                          if _uses_commit_file(None, atomicity_options)
                          else atomicity.AtomicRenameTemporaryPath)
  return [temporary_path_cls.from_temporary(root / name)  # type: ignore[attr-defined]
          for name in _storage.list_names(root)
          if is_path_temporary(root / name, temporary_path_cls=temporary_path_cls)]


def tmp_checkpoints(checkpoint_dir: _storage.PathLike) -> list[str]:
  """Names of the uncommitted saves (``<name>.orbax-checkpoint-tmp...``) in ``checkpoint_dir``."""
  root = _storage.as_path(checkpoint_dir)
  if not _storage.is_dir(root):
    return []
  return [name for name in _storage.list_names(root) if is_path_temporary(root / name)]


is_checkpoint_finalized = is_path_finalized
is_tmp_checkpoint = is_path_temporary


def step_prefix_with_underscore(step_prefix: str | None) -> str:
  """``'<step_prefix>_'``, or ``''`` when there is no prefix."""
  return '' if step_prefix is None else f'{step_prefix}_'


def build_step_path(base_path: _storage.PathLike, name_format: NameFormat[Any],
                    step: int) -> pathlib.Path:
  """The directory ``name_format`` gives ``step`` under ``base_path`` (it need not exist)."""
  return _storage.as_path(base_path) / name_format.build_name(step)


def build_step_metadatas(step_paths: Iterable[pathlib.Path],
                         build_metadata: Callable[[pathlib.Path], MetadataT | None]
                         ) -> Iterator[MetadataT]:
  """``build_metadata`` of each path, skipping the paths it answers None for (not steps)."""
  for step_path in step_paths:
    metadata = build_metadata(step_path)
    if metadata is not None:
      yield metadata


@dataclasses.dataclass(frozen=True)
class _StandardNameFormat(NameFormat[Metadata]):
  """``[<step_prefix>_]<step, zero-padded to step_format_fixed_length>``; see
  ``standard_name_format``."""
  step_prefix: str | None = None
  step_format_fixed_length: int | None = None
  single_host_load_and_broadcast: bool = False
  temporary_path_cls: type | None = None
  atomicity_options: Any = None

  def __str__(self) -> str:
    return f'StandardNameFormat("{self.build_name(1234)}")'

  @functools.cached_property
  def naming(self) -> _steps.StepNaming:
    """The naming rules, shared with CheckpointManager."""
    return _steps.StepNaming(
        self.step_prefix, self.step_format_fixed_length,
        commit_file=_uses_commit_file(self.temporary_path_cls, self.atomicity_options))

  def build_name(self, step: int) -> str:
    return self.naming.name(_steps.validate_step(step))

  def build_metadata(self, step_path: _storage.PathLike,
                     step: int | None = None) -> Metadata | None:
    """Metadata of ``step_path`` if it is a committed directory of this format (of ``step``
    when given), else None."""
    path = _storage.as_path(step_path)
    parsed = self.naming.parse(path.name)
    if parsed is None or (step is not None and parsed != step):
      return None
    if not _steps.is_finalized(path, self.naming.commit_file):
      return None
    return Metadata(step=parsed, path=path)

  def find_metadata(self, base_path: _storage.PathLike, step: int) -> Metadata | None:
    """Metadata of the committed ``step`` under ``base_path``, or None."""
    root = _storage.as_path(base_path)
    if not _storage.is_dir(root):
      return None
    return self.build_metadata(self.naming.path(root, step), step)

  def find_all(self, base_path: _storage.PathLike) -> Iterator[Metadata]:
    root = _storage.as_path(base_path)
    if not _storage.is_dir(root):
      return iter([])
    if self.single_host_load_and_broadcast and _multihost.process_count() > 1:
      # The primary lists the steps (one listing of shared storage instead of one per
      # process) and every process takes its answer.
      local = self.naming.list_steps(root) if _multihost.is_primary() else []
      steps = json.loads(_multihost.agree(f'steps:{root}', json.dumps(local)))
      return iter([Metadata(step=int(s), path=root / self.build_name(int(s))) for s in steps])
    return iter([Metadata(step=step, path=path)
                 for step, path in self.naming.list_step_dirs(root)])

  def find_step(self, base_path: _storage.PathLike, step: int) -> Metadata:
    root = _storage.as_path(base_path)
    if not _storage.is_dir(root):
      raise ValueError(f'Invalid base_path: {root} does not exist or is not a directory.')
    metadata = self.find_metadata(root, step)
    if metadata is None:
      raise ValueError(f'No committed step directory named {self.build_name(step)!r} '
                       f'(NameFormat={self}) for step={step} under {root}.')
    return metadata


def standard_name_format(*, step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None,
                         single_host_load_and_broadcast: bool = False,
                         temporary_path_cls: type | None = None,
                         atomicity_options: Any = None) -> NameFormat[Metadata]:
  """The step naming of CheckpointManager.

  ``step_prefix=None, step_format_fixed_length=None`` names step 23 ``23``; ``(None, 4)``:
  ``0023``; ``('step', None)``: ``step_23``; ``('step', 4)``: ``step_0023``. Only committed
  steps are found (``temporary_path_cls=CommitFileTemporaryPath``: those holding
  ``commit_success.txt``). With ``single_host_load_and_broadcast``, process 0 lists the steps
  and every process takes its list (in a multi-process job).

  Example::

    fmt = ocp.step.standard_name_format(step_prefix='ckpt', step_format_fixed_length=5)
    ocp.step.build_step_path('/ckpts', fmt, 10)  # /ckpts/ckpt_00010
    [m.step for m in fmt.find_all('/ckpts')]
  """
  return _StandardNameFormat(step_prefix, step_format_fixed_length,
                             single_host_load_and_broadcast, temporary_path_cls,
                             atomicity_options)


def is_standard_name_format(name_format: NameFormat[Any]) -> bool:
  return isinstance(name_format, _StandardNameFormat)


def single_host_load_and_broadcast_name_format(name_format: NameFormat[Any]
                                               ) -> NameFormat[Metadata]:
  """``name_format`` (a standard one) with ``single_host_load_and_broadcast`` on."""
  if not isinstance(name_format, _StandardNameFormat):
    raise ValueError('single_host_load_and_broadcast is only supported for standard name '
                     f'formats; got {name_format}.')
  return dataclasses.replace(name_format, single_host_load_and_broadcast=True)


@dataclasses.dataclass(frozen=True)
class _CompositeNameFormat(NameFormat[Metadata]):
  """Writes with ``write_name_format``; finds steps with each of ``read_name_formats`` in
  turn (the first that finds a step wins)."""
  write_name_format: NameFormat[Metadata]
  read_name_formats: Sequence[NameFormat[Metadata]]

  def __post_init__(self) -> None:
    if self.write_name_format not in self.read_name_formats:
      raise ValueError(f'write_name_format {self.write_name_format} must be one of '
                       f'read_name_formats: [{", ".join(map(str, self.read_name_formats))}].')

  def __str__(self) -> str:
    return f'Composite([{",".join(map(str, self.read_name_formats))}])'

  def build_name(self, step: int) -> str:
    return self.write_name_format.build_name(step)

  def find_all(self, base_path: _storage.PathLike) -> Iterator[Metadata]:
    seen = set()
    for name_format in self.read_name_formats:
      for metadata in name_format.find_all(base_path):
        if metadata.path not in seen:
          seen.add(metadata.path)
          yield metadata

  def find_step(self, base_path: _storage.PathLike, step: int) -> Metadata:
    errors = []
    for name_format in self.read_name_formats:
      try:
        return name_format.find_step(base_path, step)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError('\n'.join(errors))


def composite_name_format(write_name_format: NameFormat[Metadata],
                          read_name_formats: Sequence[NameFormat[Metadata]]
                          ) -> NameFormat[Metadata]:
  """A format that writes one naming and reads several, e.g. while migrating step names.
  ``read_name_formats`` go from preferred to least; ``write_name_format`` must be among them."""
  return _CompositeNameFormat(write_name_format, tuple(read_name_formats))


def latest_step_metadata(root_path: _storage.PathLike,
                         name_format: NameFormat[MetadataT]) -> MetadataT | None:
  """The metadata of the highest committed step under ``root_path``, or None."""
  return max(sorted(name_format.find_all(root_path), key=lambda m: m.path.name, reverse=True),
             key=lambda m: m.step, default=None)


def step_metadata_of_checkpoint_path(checkpoint_path: _storage.PathLike,
                                     name_format: NameFormat[MetadataT]) -> MetadataT:
  """The metadata of the step whose directory is ``checkpoint_path``.

  Raises:
    ValueError: ``checkpoint_path`` is not a committed step of ``name_format``.
  """
  path = _storage.as_path(checkpoint_path)
  found = list(name_format.find_all(path.parent))
  for metadata in found:
    if metadata.path.name == path.name:
      return metadata
  raise ValueError(f'{path} is not a committed step directory of NameFormat={name_format}; '
                   f'the steps there are {sorted(m.path.name for m in found)}.')


def find_step_path(base_path: _storage.PathLike, name_format: NameFormat[Any], *, step: int,
                   include_uncommitted: bool = False) -> pathlib.Path:
  """The directory of ``step`` under ``base_path``: the committed one, or with
  ``include_uncommitted`` the temporary directory of a save still in flight if there is one.

  Raises:
    ValueError: no such directory.
  """
  root = _storage.as_path(base_path)
  if include_uncommitted and _storage.is_dir(root):
    final = build_step_path(root, name_format, step)
    in_flight = [p for p in _steps.saves_in_flight(final) if _storage.is_dir(p)]
    if in_flight:
      return in_flight[-1]
  return name_format.find_step(root, step).path


def maybe_find_step_metadata(base_path: _storage.PathLike, name_format: NameFormat[MetadataT],
                             *, step: int) -> MetadataT | None:
  """``name_format.find_step(base_path, step)``, or None where there is no such step."""
  try:
    return name_format.find_step(base_path, step)
  except ValueError:
    return None


def get_save_directory(step: int, directory: _storage.PathLike, name: str | None = None,
                       step_prefix: str | None = None,
                       override_directory: _storage.PathLike | None = None,
                       step_format_fixed_length: int | None = None,
                       step_name_format: NameFormat[Any] | None = None) -> pathlib.Path:
  """The directory of item ``name`` (the step's own directory without it) of ``step``.

  ``step_name_format`` overrides ``step_prefix`` and ``step_format_fixed_length``;
  ``override_directory`` replaces the step directory altogether.
  """
  if directory is None:
    raise ValueError('Directory cannot be None.')
  if override_directory is not None:
    result = _storage.as_path(override_directory)
  else:
    name_format = step_name_format or standard_name_format(
        step_prefix=step_prefix, step_format_fixed_length=step_format_fixed_length)
    result = build_step_path(directory, name_format, step)
  if name is not None:
    result = result / _storage.check_entry_name(name, 'name')
  return result


def step_from_checkpoint_name(name: str) -> int:
  """The step a directory name stands for: ``23``, ``<prefix>_23``, or a save in flight's
  ``[<prefix>_]23.orbax-checkpoint-tmp...``.

  Raises:
    ValueError: ``name`` is none of these.
  """
  if name.isdigit():
    return int(name)
  if match := re.fullmatch(ALLOWED_STEP_NAME_PATTERN, name):
    return int(match.group(2))
  if match := re.match(TMP_DIR_STEP_PATTERN, name):
    return int(match.group(1))
  raise ValueError(f'Unrecognized name format: {name}.')


def _is_finalized_step_dir(path: pathlib.Path) -> bool:
  """A committed directory named like a step of any format (digits, or ending in ``_<digits>``).
  """
  name = path.name
  return (name.isdigit() or name.split('_')[-1].isdigit()) and _steps.is_finalized(path)


def checkpoint_steps_paths(checkpoint_dir: _storage.PathLike) -> list[pathlib.Path]:
  """The committed step directories in ``checkpoint_dir``, whatever their prefix or padding."""
  root = _storage.as_path(checkpoint_dir)
  if not _storage.is_dir(root):
    return []
  return [root / name for name in _storage.list_names(root)
          if _is_finalized_step_dir(root / name)]


def checkpoint_steps(checkpoint_dir: _storage.PathLike) -> list[int]:
  """The committed steps in ``checkpoint_dir``, whatever their prefix or padding."""
  return [step_from_checkpoint_name(p.name) for p in checkpoint_steps_paths(checkpoint_dir)]


def any_checkpoint_step(checkpoint_dir: _storage.PathLike) -> int | None:
  """Some committed step in ``checkpoint_dir`` (the first found), or None: a cheap "is there
  any checkpoint" test."""
  root = _storage.as_path(checkpoint_dir)
  for name in _storage.list_names(root):
    if _is_finalized_step_dir(root / name):
      return step_from_checkpoint_name(name)
  return None
