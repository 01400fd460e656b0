"""Step directories of a CheckpointManager root: their names and which of them are complete.

Names follow Orbax: ``<prefix>_`` (when a prefix is set), then the step, zero-padded to a fixed
length when one is set: ``3``, ``0003``, ``ckpt_3``, ``ckpt_00010``. A save in flight lives in
``<name>.orbax-checkpoint-tmp``, which never matches the step pattern, so it is never listed.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

from flaxckpt import _metadata, _storage

# A directory inside a step that marks it as being read (created by wait_for_new_checkpoint);
# retention leaves locked steps alone. Orbax wrote it from mid-2023 to late 2024.
LOCK_DIR = 'LOCKED'
# Where current Orbax copies a step while wait_for_new_checkpoint holds it; never an item.
SNAPSHOTS_DIR = '_SNAPSHOTS'
# Temporary names: a save in flight ('<name>.orbax-checkpoint-tmp', Orbax adds '-<timestamp>'),
# a checkpoint being replaced ('-replaced') or deleted ('-deleting').
_TMP_STEP = re.compile(r'.*?_*?(\d+)' + re.escape(_metadata.TMP_SUFFIX) + r'(-.*)?')
REPLACED_SUFFIX = _metadata.TMP_SUFFIX + '-replaced'
# Any step directory name, whatever the prefix or fixed length.
_STEP_NAME = re.compile(r'(?:.+_)?\d+')
DELETING_SUFFIX = _metadata.TMP_SUFFIX + '-deleting'


def is_finalized(path: pathlib.Path, commit_file: bool = False) -> bool:
  """Whether ``path`` is a committed checkpoint directory: a directory whose name carries no
  temporary suffix (saves committed by rename), or, with ``commit_file`` and wherever renames
  are not atomic, one holding ``commit_success.txt`` (saves written in place)."""
  if not _storage.is_dir(path):
    return False
  if commit_file or not _storage.renames_atomically(path):
    return _storage.exists(path / _metadata.COMMIT_SUCCESS_FILE)
  return _metadata.TMP_SUFFIX not in path.name


def is_temporary(path: pathlib.Path, commit_file: bool = False) -> bool:
  """Whether ``path`` is an uncommitted checkpoint directory (the converse rule of
  ``is_finalized``; a symbolic link never is one)."""
  if _storage.is_link(path) or not _storage.is_dir(path):
    return False
  if commit_file or not _storage.renames_atomically(path):
    return not _storage.exists(path / _metadata.COMMIT_SUCCESS_FILE)
  return _metadata.TMP_SUFFIX in path.name


@dataclasses.dataclass(frozen=True)
class StepNaming:
  """How step numbers map to directory names, and which step directories count as committed
  (``commit_file``: only those holding ``commit_success.txt``, as saves through
  ``CommitFileTemporaryPath`` leave them)."""
  prefix: str | None = None
  fixed_length: int | None = None
  commit_file: bool = False

  def __post_init__(self) -> None:
    if self.prefix is not None:  # An empty prefix names steps as no prefix does.
      _storage.check_entry_name(self.prefix or 'x', 'step_prefix')

  def name(self, step: int) -> str:
    digits = f'{step:0{self.fixed_length}d}' if self.fixed_length else str(step)
    return f'{self.prefix}_{digits}' if self.prefix else digits

  @functools.cached_property
  def _pattern(self) -> re.Pattern[str]:
    prefix = re.escape(self.prefix) + '_' if self.prefix else ''
    if self.fixed_length:
      digits = rf'0\d{{{self.fixed_length - 1}}}|[1-9]\d{{{self.fixed_length - 1},}}'
    else:
      digits = r'0|[1-9]\d*'
    return re.compile(rf'{prefix}({digits})')

  def parse(self, name: str) -> int | None:
    """The step a directory name stands for, or None if it is not a step name."""
    match = self._pattern.fullmatch(name)
    return int(match.group(1)) if match else None

  def list_steps(self, root: pathlib.Path) -> list[int]:
    """Committed steps under ``root``, ascending. Temporary directories never match."""
    if not _storage.is_dir(root):
      return []
    return sorted(step for step, _ in self.list_step_dirs(root))

  def list_step_dirs(self, root: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """(step, directory) of each committed step under ``root``, in listing order."""
    if not _storage.is_dir(root):
      return []
    found = []
    for name in _storage.list_names(root):
      step = self.parse(name)
      if step is not None and is_finalized(root / name, self.commit_file):
        found.append((step, root / name))
    return found

  def path(self, root: pathlib.Path, step: int) -> pathlib.Path:
    """The directory of ``step``: the conventional name, else any name that parses to it
    (``0010`` written with another fixed length is still step 10)."""
    conventional = root / self.name(step)
    if _storage.is_dir(conventional) or not _storage.is_dir(root):
      return conventional
    for name in _storage.list_names(root):
      if self.parse(name) == step and _storage.is_dir(root / name):
        return root / name
    return conventional


def tmp_step_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  """Directories of saves that never committed, and of deletions and replacements cut short.
  Where renames are not atomic (object stores), saves are written in place: there they are
  also the step-named prefixes (``<digits>``, ``<prefix>_<digits>``) without
  ``commit_success.txt``."""
  if not _storage.is_dir(root):
    return []
  names = _storage.list_names(root)
  found = [root / name for name in names if _TMP_STEP.fullmatch(name)]
  if not _storage.renames_atomically(root):
    found += [root / name for name in names
              if _STEP_NAME.fullmatch(name) and is_temporary(root / name)]
  return found


def remove_tmp_step_dirs(root: pathlib.Path) -> None:
  """Removes what ``tmp_step_dirs`` lists, except the directories of saves still running
  (their writers hold a lock on them). An object store has no locks: there all are removed,
  so no other process may be saving under ``root`` meanwhile."""
  lockable = _storage.renames_atomically(root)
  for path in tmp_step_dirs(root):
    if lockable and is_save_in_flight(path.name):
      _storage.remove_if_abandoned(path)
    else:
      _storage.remove_tree(path)


def is_save_in_flight(name: str) -> bool:
  """Whether ``name`` is that of a save's temporary directory (flaxckpt's and Orbax's
  ``<name>.orbax-checkpoint-tmp-<timestamp>``, older releases' ``<name>.orbax-checkpoint-tmp``)."""
  mark = name.rfind(_metadata.TMP_SUFFIX)
  return mark > 0 and (name[mark + len(_metadata.TMP_SUFFIX):] == '' or
                       name[mark + len(_metadata.TMP_SUFFIX):][:1] == '-' and
                       name[mark + len(_metadata.TMP_SUFFIX) + 1:].isdigit())


def saves_in_flight(final: pathlib.Path) -> list[pathlib.Path]:
  """The temporary directories of saves to ``final`` that never committed (running or dead)."""
  prefix = final.name + _metadata.TMP_SUFFIX
  return [final.parent / name for name in _storage.list_names(final.parent)
          if name.startswith(prefix) and is_save_in_flight(name)]


def remove_abandoned_saves(final: pathlib.Path) -> None:
  """Removes the temporary directories of earlier saves to ``final`` whose writer is gone."""
  for path in saves_in_flight(final):
    _storage.remove_if_abandoned(path)


def delete(path: pathlib.Path) -> None:
  """Deletes a checkpoint directory so that a crash part-way never leaves a listed, half-deleted
  checkpoint: it first moves to a name no listing takes (where renames are not atomic, it
  loses its commit marker instead), then is removed."""
  if _storage.renames_atomically(path):
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    _storage.remove_tree(doomed)
    _storage.rename(path, doomed)
  else:
    _storage.remove(path / _metadata.COMMIT_SUCCESS_FILE)
    doomed = path
  _storage.remove_tree(doomed)


def move_aside(path: pathlib.Path, destination: pathlib.Path) -> None:
  """Moves the checkpoint at ``path`` to ``destination`` (its parent is created; an older copy
  there is replaced), so that a deleted step stays readable outside the listing."""
  _storage.make_dirs(destination.parent)
  _storage.check_inside(destination.parent, path.parent, 'the todelete_subdir')
  if _storage.exists(destination):
    delete(destination)
  _storage.rename(path, destination)


def recover_replaced(root: pathlib.Path) -> None:
  """Puts back checkpoints that a ``force=True`` save had moved aside when it was cut off
  before the new checkpoint took their name."""
  if not _storage.is_dir(root):
    return
  for name in _storage.list_names(root):
    if name.endswith(REPLACED_SUFFIX):
      final = root / name[:-len(REPLACED_SUFFIX)]
      if not _storage.exists(final):
        _storage.rename(root / name, final)


def is_locked(step_dir: pathlib.Path) -> bool:
  """Whether a reader holds ``step_dir``: a ``LOCKED`` directory inside it (on an object
  store, objects under the ``<step>/LOCKED/`` prefix)."""
  return _storage.is_dir(step_dir / LOCK_DIR)


def lock(step_dir: pathlib.Path) -> None:
  """Marks ``step_dir`` as being read: an empty ``LOCKED`` directory; on an object store, where
  a prefix exists only while an object lies under it, the empty object ``<step>/LOCKED/lock``
  (an empty ``LOCKED/`` object, as gfile leaves on GCS, is not listed under its own prefix by
  tensorstore's S3 kvstore)."""
  if _storage.is_remote(step_dir):
    _storage.write_bytes(step_dir / LOCK_DIR / 'lock', b'')
  else:
    _storage.make_dirs(step_dir / LOCK_DIR)


def unlock(step_dir: pathlib.Path) -> None:
  """Removes the ``LOCKED`` marker of ``step_dir`` and anything under it; missing is fine."""
  _storage.remove_tree(step_dir / LOCK_DIR)


def validate_step(step: object) -> int:
  """Steps are non-negative ints (numpy integers too); anything else is refused."""
  if isinstance(step, bool) or not hasattr(step, '__index__'):
    raise TypeError(f'A step must be a non-negative int, got {step!r} '
                    f'({type(step).__name__}).')
  value = step.__index__()
  if value < 0:
    raise ValueError(f'A step must be a non-negative int, got {value}.')
  return value
