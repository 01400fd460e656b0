"""Futures of asynchronous saves (``orbax.checkpoint.future``'s names).

``AsyncCheckpointHandler.async_save`` returns a list of objects with ``result(timeout=None)``,
which blocks until the background work it stands for is done (it never starts it). The
classes here cover the usual cases: background work on a thread (``CommitFuture``), nothing
to wait for (``NoopFuture``), and several futures followed by a callback (``ChainedFuture``).

Orbax's commit futures can also wait for, and send, "signals" through the JAX distributed
key-value store, so that one handler's background commit waits for another's (e.g. for a
directory created asynchronously). flaxckpt creates a save's directories before ``save``
returns, so no handler has anything to wait for: the futures here run their work at once, and
``CommitFutureAwaitingContractedSignals`` is a ``CommitFuture``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ['ChainedFuture', 'CommitFuture', 'CommitFutureAwaitingContractedSignals', 'Future',
           'NoopFuture', 'get_remaining_time']


@runtime_checkable
class Future(Protocol):
  """Anything with ``result(timeout=None)`` that waits for work already under way
  (``concurrent.futures.Future``, tensorstore futures, the classes below)."""

  def result(self, timeout: float | None = None) -> Any:
    """Waits for the work to finish and returns its result (raising its error)."""
    ...

  def cancel(self) -> bool | None:
    """Cancels the work if it can."""
    ...


class NoopFuture:
  """A future of no work: ``result`` returns None at once."""

  def result(self, timeout: float | None = None) -> Any:
    del timeout
    return None

  def cancel(self) -> None:
    pass


def get_remaining_time(start_time: float, timeout_secs: float | None) -> float | None:
  """Seconds left of ``timeout_secs`` counted from ``start_time`` (None: no limit).

  Raises:
    TimeoutError: none are left.
  """
  if timeout_secs is None:
    return None
  elapsed = time.time() - start_time
  if elapsed >= timeout_secs:
    raise TimeoutError(f'Timed out after {elapsed:.2f} seconds.')
  return timeout_secs - elapsed


class ChainedFuture:
  """Waits for ``futures`` in turn, all within one ``timeout``, then calls ``cb``."""

  def __init__(self, futures: Sequence[Future], cb: Callable[[], None]):
    self._futures = list(futures)
    self._cb = cb

  def result(self, timeout: float | None = None) -> Any:
    start = time.time()
    for done, future in enumerate(self._futures):
      try:
        future.result(timeout=get_remaining_time(start, timeout))
      except TimeoutError as e:
        raise TimeoutError(f'ChainedFuture completed {done}/{len(self._futures)} futures but '
                           f'timed out after {time.time() - start:.2f} seconds.') from e
    self._cb()

  def cancel(self) -> None:
    for future in self._futures:
      future.cancel()


class CommitFuture:
  """Runs ``coro`` (a coroutine, or a callable returning a value or a coroutine) on a
  background thread, started at once; ``result`` waits for it and re-raises its error.

  Raises (from ``result``):
    TimeoutError: the work did not finish within ``timeout``.
    concurrent.futures.CancelledError: ``cancel`` stopped it.
  """

  def __init__(self, coro: Coroutine[Any, Any, Any] | Callable[[], Any], *,
               name: str | None = None, send_signals: Sequence[Any] | None = None,
               receive_signals: Sequence[Any] | None = None,
               timeout_secs: float | None = None, operation_id: str | None = None):
    del send_signals, operation_id  # Nothing in flaxckpt waits for signals (see the module).
    if receive_signals:
      raise NotImplementedError(
          'flaxckpt futures do not wait for signals: every directory a save needs exists '
          'before its background work starts.')
    if timeout_secs is not None and timeout_secs <= 0:
      raise ValueError(f'Timeout must be positive, but got {timeout_secs} seconds.')
    self.name = name
    self._work = coro
    self._result: Any = None
    self._error: BaseException | None = None
    self._cancelled = False
    self._loop: asyncio.AbstractEventLoop | None = None
    self._task: asyncio.Task[Any] | None = None
    self._thread = threading.Thread(target=self._run, name=name)
    self._thread.start()

  def _run(self) -> None:
    try:
      if self._cancelled:
        raise concurrent.futures.CancelledError()
      value = self._work() if callable(self._work) else self._work
      if inspect.isawaitable(value):
        value = asyncio.run(self._await(value))
      self._result = value
    except BaseException as e:  # pylint: disable=broad-exception-caught
      self._error = e
      if isinstance(e, asyncio.CancelledError) or self._cancelled:
        self._error = concurrent.futures.CancelledError()

  async def _await(self, awaitable: Any) -> Any:
    self._loop = asyncio.get_running_loop()
    self._task = asyncio.ensure_future(awaitable)
    if self._cancelled:
      self._task.cancel()
    return await self._task

  def result(self, timeout: float | None = None) -> Any:
    self._thread.join(timeout)
    if self._thread.is_alive():
      raise TimeoutError(f'Thread {self._thread.name} did not complete within {timeout} '
                         'seconds.')
    if self._error is not None:
      raise self._error
    return self._result

  def cancel(self) -> None:
    """Stops the work: before it starts, or, for a coroutine, at its next ``await``."""
    self._cancelled = True
    if self._loop is not None and self._task is not None:
      self._loop.call_soon_threadsafe(self._task.cancel)


class CommitFutureAwaitingContractedSignals(CommitFuture):
  """Orbax's commit future that first waits for the signals other handlers contracted to
  send; flaxckpt handlers contract none, so it is a ``CommitFuture`` (see the module)."""

  def __init__(self, coro: Coroutine[Any, Any, Any] | Callable[[], Any], *,
               name: str | None = None, send_signals: Sequence[Any] | None = None,
               timeout_secs: float | None = None, operation_id: str | None = None):
    super().__init__(coro, name=name, send_signals=send_signals, timeout_secs=timeout_secs,
                     operation_id=operation_id)
