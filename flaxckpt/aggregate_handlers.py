"""Whole-tree files, as in ``orbax.checkpoint.aggregate_handlers``.

``MsgpackHandler`` writes a tree as one msgpack file in flax's encoding: the ``checkpoint`` file
that Orbax releases before 0.6 kept beside (or instead of) ``_METADATA``.
"""

from __future__ import annotations

import abc
from typing import Any

from flaxckpt import _errors, _multihost, _storage

__all__ = ['AggregateHandler', 'MsgpackHandler']


class _Done:
  """The already-finished write ``serialize`` returns (Orbax returns a commit future)."""

  def result(self, timeout: float | None = None) -> None:
    del timeout


class AggregateHandler(abc.ABC):
  """Reads and writes a whole tree as one file."""

  @abc.abstractmethod
  async def serialize(self, path: _storage.PathLike, item: Any) -> Any:
    """Writes ``item`` to the file ``path`` (on the primary process); returns a future."""

  @abc.abstractmethod
  def deserialize(self, path: _storage.PathLike) -> Any:
    """Reads the tree in the file ``path``."""

  @abc.abstractmethod
  def close(self) -> None:
    """Releases resources."""


class MsgpackHandler(AggregateHandler):
  """A tree in one msgpack file (flax's encoding: nested dicts and lists, numpy arrays).

  Tuples are written as lists and NamedTuples as dicts, as Orbax writes them.

  Args:
    primary_host: the process that writes the file.
    pytree_metadata_options: accepted for Orbax call sites; rich types are not written here.
  """

  def __init__(self, primary_host: int | None = 0, pytree_metadata_options: Any = None):
    if getattr(pytree_metadata_options, 'support_rich_types', False):
      raise NotImplementedError('MsgpackHandler cannot write rich typed metadata; pass '
                                'PyTreeMetadataOptions(support_rich_types=False).')
    self._primary = primary_host

  async def serialize(self, path: _storage.PathLike, item: Any) -> _Done:
    from flaxckpt import tree  # pylint: disable=import-outside-toplevel
    from flaxckpt.legacy import _msgpack  # pylint: disable=import-outside-toplevel
    if self._primary is None or _multihost.is_primary(self._primary):
      state = tree.serialize_tree(item, keep_empty_nodes=True)
      _storage.write_bytes(_storage.as_path(path), _msgpack.encode(state))
    return _Done()

  def deserialize(self, path: _storage.PathLike) -> Any:
    """Raises ``FileNotFoundError`` when there is no file, ``NotACheckpointError`` when it is
    not a msgpack tree."""
    from flaxckpt.legacy import _msgpack  # pylint: disable=import-outside-toplevel
    file = _storage.as_path(path)
    if not _storage.is_file(file):
      raise FileNotFoundError(f'Checkpoint does not exist at {file}.')
    try:
      return _msgpack.decode(_storage.read_into_buffer(file))
    except _msgpack.MsgpackDecodeError as e:
      raise _errors.NotACheckpointError(f'{file}: not a msgpack tree: {e}.') from e

  def close(self) -> None:
    return None
