"""JSON items (small metadata, configs, dataset state) stored as one file."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from flaxckpt import _errors, _multihost, _safe_json, _storage
from flaxckpt._args import JsonRestore, JsonSave
from flaxckpt._handler import CheckpointHandler, register_with_handler


class JsonCheckpointHandler(CheckpointHandler):
  """Saves a JSON-serializable object to ``<directory>/<filename>`` (default ``metadata``)."""

  typestr = 'orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler'

  def __init__(self, filename: str | None = None):
    self._filename = filename or 'metadata'

  def save(self, directory: pathlib.Path, args: JsonSave) -> None:
    try:
      text = json.dumps(args.item)
    except TypeError as e:
      raise TypeError(f'JsonSave item for {directory} is not JSON-serializable: {e}') from e
    if _multihost.is_primary():  # Every process has the same object; one writes it.
      _storage.write_text(_storage.as_path(directory) / self._filename, text)

  def restore(self, directory: pathlib.Path, args: JsonRestore | None = None) -> Any:
    path = _storage.as_path(directory) / self._filename
    if not _storage.is_file(path):
      if not _storage.exists(path.parent):
        raise FileNotFoundError(f'No checkpoint at {path.parent}: the path does not exist.')
      raise _errors.NotACheckpointError(f'{path.parent}: expected a JSON item file '
                                        f'{self._filename!r}; it is missing.')
    _storage.check_inside(path, path.parent)
    return _safe_json.read(path)

  def metadata(self, directory: pathlib.Path) -> Any:
    return None


register_with_handler(JsonCheckpointHandler, for_save=True)(JsonSave)
register_with_handler(JsonCheckpointHandler, for_restore=True)(JsonRestore)
