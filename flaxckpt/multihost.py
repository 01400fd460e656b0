"""Multi-host helpers (``orbax.checkpoint.multihost``'s names): which process is primary, and
barriers between all processes that time out with an error naming the missing ones."""

from flaxckpt._errors import BarrierTimeoutError
from flaxckpt._multihost import barrier as sync_global_processes
from flaxckpt._multihost import process_count, process_index, set_barrier_timeout

__all__ = ['BarrierTimeoutError', 'is_primary_host', 'process_count', 'process_index',
           'set_barrier_timeout', 'sync_global_processes']


def is_primary_host(primary_host: int | None = 0) -> bool:
  """Whether this process is ``primary_host`` (None: every process is)."""
  return primary_host is None or process_index() == primary_host
