"""Exception types raised by flaxckpt.

Every error names the checkpoint path or tree path it is about, what was expected and what was
found. The classes subclass the builtin a caller would naturally catch (``FileNotFoundError``,
``KeyError``, ``ValueError``, ``TypeError``), so code written against Orbax keeps working.
"""


class CheckpointError(Exception):
  """Base class of flaxckpt's own errors."""


class NotACheckpointError(CheckpointError, ValueError):
  """A directory exists but holds no checkpoint flaxckpt can read."""


class IncompleteCheckpointError(CheckpointError, ValueError):
  """A checkpoint was never committed (temporary name, or commit marker missing)."""


class CheckpointExistsError(CheckpointError, ValueError):
  """Saving would overwrite an existing checkpoint and ``force`` was not set."""


class UnsupportedLeafError(CheckpointError, TypeError, ValueError):
  """A tree leaf has a type that cannot be saved (a ``ValueError`` too, as Orbax raises)."""


class NameCollisionError(CheckpointError, ValueError):
  """Two tree paths would be stored under the same name (names join keys with '.')."""


class StructureMismatchError(CheckpointError, ValueError):
  """The target tree and the checkpoint disagree about a leaf's shape, dtype or kind."""


class MissingKeysError(CheckpointError, KeyError):
  """The target asks for tree paths the checkpoint does not hold."""

  def __str__(self) -> str:  # KeyError would repr() the message.
    return str(self.args[0]) if self.args else ''


class AsyncSaveError(CheckpointError, RuntimeError):
  """A background save failed; raised from the next call that checks on it."""


class BarrierTimeoutError(CheckpointError, TimeoutError):
  """Some processes of a multi-host job did not reach a checkpoint barrier in time."""


class ChecksumError(CheckpointError, ValueError):
  """Stored array data does not match the checksum recorded when it was saved."""

  def __init__(self, message: str, name: str | None = None):
    super().__init__(message)
    self.name = name  # The stored array's name, when one chunk is at fault.


class CorruptCheckpointError(CheckpointError, ValueError):
  """A flax msgpack checkpoint file is truncated or is not a msgpack checkpoint."""


class ChecksumMismatchError(CorruptCheckpointError, ChecksumError):
  """A flax msgpack file's size or crc32c differs from what its sidecar recorded at save, or the
  sidecar itself is unreadable."""


class UnsafeCheckpointError(CheckpointError, ValueError):
  """A name or entry of a checkpoint (or of a caller) would lead outside the checkpoint, or a
  file to be read is not a regular file (a FIFO, a device, a socket, a link leaving the root)."""


class LimitExceededError(CheckpointError, ValueError):
  """A checkpoint declares more than flaxckpt reads from untrusted input (an array larger than
  memory or its target, too many chunks, JSON nested too deep, a metadata file too large)."""
