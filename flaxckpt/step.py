"""``orbax.checkpoint.step``: the names of ``flaxckpt.path.step`` (step naming and lookup)."""

from __future__ import annotations

from flaxckpt.path import step as _step
from flaxckpt.path.step import *  # noqa: F403  (the same objects, under Orbax's shorter name)

__all__ = list(_step.__all__)
