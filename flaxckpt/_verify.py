"""``flaxckpt verify``: read every stored byte of a checkpoint and report what is wrong with it.

A problem is anything a restore would refuse or could get wrong: a save that never committed,
unreadable metadata, a missing or short chunk, a chunk whose crc32c differs from the one saved
with it, a truncated msgpack file. Arrays are read in batches of bounded size, so checking a
checkpoint needs memory for one batch, not for the whole state.
"""

from __future__ import annotations

import functools
import logging
import math
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from flaxckpt import (_arrays, _checksums, _errors, _formats, _leaf_source, _metadata, _restore,
                      _safe_json, _storage, _tree)

# Arrays are read in batches of about this many bytes (a larger array is its own batch).
_BATCH_BYTES = 256 << 20

Progress = Callable[[int, int], None]  # (bytes checked so far, bytes to check in all)


class Problem(NamedTuple):
  """One thing wrong with a checkpoint: where (a file or a checkpoint directory) and what."""
  path: str
  message: str

  def __str__(self) -> str:
    return f'{self.path}: {self.message}'


class _Job(NamedTuple):
  nbytes: int
  run: Callable[[], None]


def verify(path: _storage.PathLike, progress: Progress | None = None) -> list[Problem]:
  """Checks the checkpoint at ``path`` (a checkpoint directory, a CheckpointManager root, a
  flax msgpack file or checkpoint directory); returns its problems, none if it is intact."""
  checker = _Checker()
  try:
    found = _formats.detect(path)
    _check_surroundings(found.path)
  except Exception as e:  # Whatever stops the checks is the problem reported.
    location = _storage.as_path(path)
    return [Problem(str(location), _one_line(e, location))]
  try:
    jobs = list(checker.jobs(found))
    total = sum(job.nbytes for job in jobs)
    done = 0
    for job in jobs:
      job.run()
      done += job.nbytes
      if progress is not None:
        progress(done, total)
  except Exception as e:  # A failure outside the guarded checks ends them; it is one more.
    checker.report(found.path, e)
  return checker.problems


def _check_surroundings(path: pathlib.Path) -> None:
  """Refuses, before anything is read, a checkpoint holding a FIFO, device or socket (reading
  one would block forever or never end) or a link leading outside it (see ``_inspect``)."""
  from flaxckpt import _inspect
  _inspect.check_surroundings(path)


def _one_line(error: BaseException, path: pathlib.Path | str = '') -> str:
  """The error's type and message on one line, without a leading ``<path>: ``."""
  text = ' '.join(str(error).split()).removeprefix(f'{path}: ')
  if isinstance(error, RecursionError):
    text = f'nested too deeply to read ({text})'
  return f'{type(error).__name__}: {text}'


class _Checker:
  """Builds the checks of a checkpoint as jobs (so progress knows the total up front) and
  collects the problems they find."""

  def __init__(self):
    self.problems: list[Problem] = []

  def report(self, path: pathlib.Path | str, error: BaseException | str) -> None:
    message = error if isinstance(error, str) else _one_line(error, path)
    self.problems.append(Problem(str(path), message))

  def guarded(self, path: pathlib.Path, check: Callable[[], Any]) -> Any:
    """Runs ``check``; a failure becomes a problem at ``path`` (and None is returned)."""
    try:
      return check()
    except Exception as e:  # Any failure to read is what verify exists to report.
      self.report(path, e)
      return None

  def jobs(self, found: _formats.Found) -> Iterator[_Job]:
    kind, path = found
    if kind is _formats.Kind.PYTREE:
      yield from self.pytree(path)
    elif kind is _formats.Kind.COMPOSITE:
      yield from self.composite(path)
    elif kind is _formats.Kind.JSON:
      yield _Job(0, lambda: self.guarded(path, lambda: _safe_json.loads(
          _storage.read_bytes(path), path)))
    elif kind is _formats.Kind.MANAGER:
      for step in _formats.manager_steps(path):
        yield from self.step(step.path)
    elif kind is _formats.Kind.MSGPACK:
      yield from self.msgpack(path)
    elif kind is _formats.Kind.FLAX_DIR:
      for step in _formats.flax_dir_steps(path):
        yield from self.step(step.path)
    elif kind is _formats.Kind.GDA:
      yield from self.gda(path)

  def step(self, path: pathlib.Path) -> Iterator[_Job]:
    found = self.guarded(path, lambda: _formats.detect(path))
    if found is not None:
      yield from self.jobs(found)

  def composite(self, path: pathlib.Path) -> Iterator[_Job]:
    # A PyTree checkpoint's reader checks this itself; on an object store, where saves are
    # written in place, it is the missing commit_success.txt of a save that stopped midway.
    self.guarded(path, functools.partial(_restore.check_committed, path))
    meta = path / _metadata.CHECKPOINT_METADATA_FILE
    if _storage.exists(meta):
      yield _Job(0, lambda: self.guarded(meta, lambda: _check_checkpoint_metadata(meta)))
    items = _formats.item_names(path)
    if not items:
      self.report(path, 'a checkpoint with no items (expected subdirectories holding a '
                  f'{_metadata.METADATA_FILE} or a JSON file)')
    for name in items:
      yield from self.step(path / name)

  def pytree(self, directory: pathlib.Path) -> Iterator[_Job]:
    checksums = _checksums.Recorded(directory)
    # Damaged checksums are reported; everything else is then read unchecked.
    recorded = None if self.guarded(directory, lambda: checksums.chunks) is None else checksums
    meta = self.guarded(directory, lambda: _restore.read_tree_metadata(directory, recorded))
    if meta is None:
      return
    reader = _restore._Reader(directory, meta, recorded)
    for name, check in ((_metadata.SHARDING_FILE, _check_shardings),
                        (_metadata.STRINGS_FILE, _check_json_object),
                        (_metadata.CHECKPOINT_METADATA_FILE, _check_checkpoint_metadata)):
      if _storage.exists(directory / name):
        file = directory / name
        yield _Job(0, functools.partial(self.guarded, file,
                                        functools.partial(check, file, recorded)))
    folder = directory / _metadata.ARRAY_METADATAS_DIR
    if _storage.is_dir(folder):
      for name in _storage.list_names(folder):
        file = folder / name
        yield _Job(0, functools.partial(self.guarded, file, functools.partial(
            _restore.read_side_file, file, _metadata.parse_array_metadatas, recorded)))
    sums = recorded.chunks if recorded is not None else None
    arrays = [leaf for leaf in meta.leaves if _restore._is_stored_array(leaf)]
    try:
      sizes = _array_sizes(directory, meta, arrays)
    except Exception:  # The reads below report it, leaf by leaf; only progress is vaguer.
      sizes = [0] * len(arrays)
    sized = list(zip(arrays, sizes))
    for batch in _arrays.in_batches(sized, lambda pair: pair[1], _BATCH_BYTES) if sized else []:
      yield _Job(sum(size for _, size in batch),
                 functools.partial(self.read_arrays, reader, [leaf for leaf, _ in batch]))
    others = [leaf for leaf in meta.leaves
              if not _restore._is_stored_array(leaf) and leaf.value_type != _metadata.STRING]
    if others:  # Empty values, and value types restore refuses.
      yield _Job(0, lambda: self.guarded(directory / _metadata.METADATA_FILE,
                                         lambda: reader.read_many(others)))
    strings = [leaf for leaf in meta.leaves if leaf.value_type == _metadata.STRING]
    if strings:
      yield _Job(0, lambda: self.read_strings(directory, reader, strings))
    stored = {leaf.name for leaf in arrays}
    for name in sorted(set(sums or {}) - stored):
      self.report(directory / _checksums.DIR,
                  f'checksums are recorded for array {name!r}, which the checkpoint metadata '
                  'does not list')

  def read_strings(self, directory: pathlib.Path, reader: Any,
                   leaves: list[_metadata.LeafMetadata]) -> None:
    """Reads the string leaves up to the first failure (which usually holds for all of them)."""
    for leaf in leaves:
      if self.guarded(directory, functools.partial(reader.string, leaf)) is None:
        return

  def read_arrays(self, reader: Any, leaves: list[_metadata.LeafMetadata]) -> None:
    """Reads the leaves together; on a failure, one by one, so that each problem names its
    leaves (leaves failing for one reason, such as a damaged index, share one problem)."""
    try:
      reader.read_many(leaves)
      return
    except Exception as e:  # A damaged checkpoint can fail in any way: report it, go on.
      failures = {_one_line(e, reader.directory): leaves} if len(leaves) == 1 else {}
    if not failures:
      for leaf in leaves:
        try:
          reader.read_many([leaf])
        except Exception as e:  # As above.
          failures.setdefault(_one_line(e, reader.directory), []).append(leaf)
    for message, failed in failures.items():
      names = ', '.join(repr(_tree.path_str(leaf.path)) for leaf in failed)
      self.report(reader.directory,
                  f'{"leaf" if len(failed) == 1 else "leaves"} {names}: {message}')

  def msgpack(self, path: pathlib.Path) -> Iterator[_Job]:
    from flaxckpt.legacy import _gda, checkpoints  # Imported only for flax checkpoints.

    def check() -> None:
      # Without a target, restore leaves multi-process arrays as placeholders (and says so in
      # a warning); they are read below.
      legacy_log = logging.getLogger(checkpoints.__name__)
      level = legacy_log.level
      legacy_log.setLevel(logging.ERROR)
      try:
        state = checkpoints.restore_checkpoint(str(path), None,
                                               allow_partial_mpa_restoration=True)
      finally:
        legacy_log.setLevel(level)
      subpaths = [subpath for _, subpath in _gda.placeholders(state, path)]
      if subpaths:
        self.check_gda_arrays(_leaf_source.gda_dir_of(path), subpaths)

    # An object's size is not known before it is read (progress is vaguer there).
    size = 0 if _storage.is_remote(path) else self.guarded(path, lambda: path.stat().st_size)
    yield _Job(size or 0, lambda: self.guarded(path, check))

  def gda(self, directory: pathlib.Path) -> Iterator[_Job]:
    names = [name for name in _storage.list_names(directory)
             if _storage.is_dir(directory / name)]
    yield _Job(0, lambda: self.check_gda_arrays(directory, names))

  def check_gda_arrays(self, directory: pathlib.Path, subpaths: list[str]) -> None:
    if not _storage.is_dir(directory):
      self.report(directory, 'the multi-process arrays this checkpoint refers to are missing')
      return
    for subpath in subpaths:
      self.guarded(directory / subpath, functools.partial(
          _arrays.read_arrays, directory, [subpath], use_ocdbt=False, use_zarr3=False,
          missing_chunks_are_errors=True))


def _check_json_object(path: pathlib.Path,
                       recorded: _checksums.Recorded | None = None) -> dict[str, Any]:
  """Checks ``path`` against its recorded checksum, if any, and that it holds a JSON object."""
  data = _storage.read_bytes(path)
  if recorded is not None:
    recorded.check_file(path.name, data)
  try:
    value = _safe_json.loads(data, path)
  except ValueError as e:  # Also UnicodeDecodeError; LimitExceededError says enough itself.
    if isinstance(e, _errors.LimitExceededError):
      raise
    raise ValueError(f'not valid JSON ({e})') from e
  if not isinstance(value, dict):
    raise ValueError(f'expected a JSON object, found {type(value).__name__}')
  return value


_TIMESTAMPS = ('init_timestamp_nsecs', 'commit_timestamp_nsecs')


def _check_checkpoint_metadata(path: pathlib.Path,
                               recorded: _checksums.Recorded | None = None) -> None:
  """``_check_json_object``, and that the recorded save times are times (ns since 1970)."""
  value = _check_json_object(path, recorded)
  for key in _TIMESTAMPS:
    nanos = value.get(key)
    if nanos is not None and (isinstance(nanos, bool) or not isinstance(nanos, int)
                              or not 0 <= nanos <= _metadata.LATEST_TIMESTAMP_NSECS):
      shown = repr(nanos) if len(repr(nanos)) <= 40 else repr(nanos)[:37] + '...'
      raise ValueError(f'{key} is {shown}, not a time in nanoseconds since 1970 (an integer '
                       f'from 0 to {_metadata.LATEST_TIMESTAMP_NSECS})')


def _check_shardings(path: pathlib.Path, recorded: _checksums.Recorded | None) -> None:
  """Parses every sharding in ``_sharding``, as a restore without a target does."""
  for key, text in _restore.read_side_file(path, recorded=recorded).items():
    _restore.parse_side_file(path, functools.partial(_metadata.sharding_from_json, text),
                             f'the sharding of entry {key!r}')


def _array_sizes(directory: pathlib.Path, meta: _metadata.TreeMetadata,
                 arrays: list[_metadata.LeafMetadata]) -> list[int]:
  """Each array's declared bytes, from its metadata: products of Python ints, so a declared
  shape of any size costs nothing here (reading it is what the bounds in ``_zarr`` refuse)."""
  infos = _arrays.read_array_infos(directory, [leaf.name for leaf in arrays],
                                   use_ocdbt=meta.use_ocdbt, use_zarr3=meta.use_zarr3)
  return [math.prod(info.shape) * info.dtype.itemsize for info in infos]
