"""Options for checkpointers and managers, as in ``orbax.checkpoint.options``.

Frozen dataclasses with Orbax's field names and defaults; ``dataclasses.replace`` derives a
variant.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Set
from typing import Any

__all__ = ['AsyncOptions', 'AtomicityMode', 'AtomicityOptions', 'FileOptions',
           'MultiprocessingOptions']

# ``barrier_sync_fn(key=..., timeout_ms=...)``: Orbax's signature for a custom barrier.
BarrierSyncFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class AsyncOptions:
  """How background saves behave.

  Attributes:
    timeout_secs: how long ``wait_until_finished`` waits for a save before raising
      ``TimeoutError``.
    barrier_sync_fn: replaces the barrier the processes meet at while a background save
      commits; called as ``barrier_sync_fn(key=str, timeout_ms=int)``.
    post_finalization_callback: called with no arguments after each save has committed.
    create_directories_asynchronously: accepted for Orbax call sites; directories are always
      created before ``save`` returns (it is cheap locally).
  """
  timeout_secs: int = 1200
  barrier_sync_fn: BarrierSyncFn | None = None
  post_finalization_callback: Callable[[], None] | None = None
  create_directories_asynchronously: bool = True


@dataclasses.dataclass(frozen=True)
class MultiprocessingOptions:
  """Which processes take part in a save and how they meet.

  Attributes:
    primary_host: the process that creates, finalizes and commits checkpoint directories.
    active_processes: the processes taking part (None: all). Only all processes are supported.
    barrier_sync_key_prefix: prepended to every barrier key, so two checkpointers or managers
      used at the same time do not meet at each other's barriers.
  """
  primary_host: int | None = 0
  active_processes: Set[int] | None = None
  barrier_sync_key_prefix: str | None = None


@dataclasses.dataclass(frozen=True)
class FileOptions:
  """How checkpoint directories and files are created.

  Attributes:
    path_permission_mode: permission bits (e.g. ``0o750``) of every directory a save creates.
    skip_sync_file_validations: accepted for Orbax call sites; validations are cheap here.
  """
  path_permission_mode: int | None = None
  skip_sync_file_validations: bool = False


class AtomicityMode(str, enum.Enum):
  """How a save becomes a checkpoint (see ``flaxckpt.path.atomicity``)."""
  AUTO = 'auto'  # Atomic renames where the storage has them, else a commit file.
  COMMIT_FILE = 'commit_file'  # ``CommitFileTemporaryPath``: in place, commit_success.txt last.
  ATOMIC_RENAME = 'atomic_rename'  # ``AtomicRenameTemporaryPath``: a temporary directory, renamed.


@dataclasses.dataclass(frozen=True)
class AtomicityOptions:
  """The commit protocol of saves, as a mode instead of a ``temporary_path_class``.

  Attributes:
    mode: an ``AtomicityMode``.
    allow_legacy_atomic_rename: accepted for Orbax call sites; flaxckpt always reads
      checkpoints committed by a rename, with or without ``commit_success.txt``.
  """
  mode: AtomicityMode = AtomicityMode.AUTO
  allow_legacy_atomic_rename: bool = False
