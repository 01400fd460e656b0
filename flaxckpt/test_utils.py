"""Helpers for tests and examples (imported on demand, never by ``import flaxckpt``)."""

from __future__ import annotations

import pathlib

from flaxckpt import _storage


def erase_and_create_empty(directory: _storage.PathLike) -> pathlib.Path:
  """Deletes ``directory`` if present, creates it empty and returns it as a ``pathlib.Path``."""
  path = _storage.as_path(directory)
  _storage.remove_tree(path)
  _storage.make_dirs(path)
  return path
