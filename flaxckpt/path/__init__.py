"""Checkpoint paths, as in ``orbax.checkpoint.path``: ``atomicity`` (how a save commits) and
``step`` (step directory names)."""

from __future__ import annotations

import importlib
from typing import Any

from flaxckpt.path import atomicity

__all__ = ['atomicity', 'step']


def __getattr__(name: str) -> Any:
  """Imports ``step`` on first use."""
  if name == 'step':
    return importlib.import_module('flaxckpt.path.step')
  raise AttributeError(f'module "flaxckpt.path" has no attribute {name!r}')
