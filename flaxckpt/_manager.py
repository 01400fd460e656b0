"""CheckpointManager: numbered steps under one root, save and preservation policies, async saves.

Each step is one composite checkpoint, ``<root>/<step name>/<item>/``, saved and committed by a
Checkpointer (or AsyncCheckpointer) exactly as a single checkpoint is. A single unnamed item
lives in ``default/``. Metrics passed with ``best_fn`` are a JSON item ``metrics`` (file
``metrics``), where Orbax keeps them, so rankings survive restarts and both libraries agree.

Which steps are saved and which are kept is decided by one ``SaveDecisionPolicy`` and one
``PreservationPolicy`` (``flaxckpt.checkpoint_managers``); the older options
(``save_interval_steps``, ``max_to_keep``, ``best_fn``, ...) are translated into them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flaxckpt import _errors, _policies, _registry, _safe_json, _steps, _storage
from flaxckpt import logging as logging_lib
from flaxckpt._args import Composite, JsonSave
from flaxckpt._checkpointer import AsyncCheckpointer, Checkpointer
from flaxckpt._composite_handler import CompositeCheckpointHandler, item_names
from flaxckpt._handler import CheckpointArgs, CheckpointHandler, args_type_for
from flaxckpt._json_handler import JsonCheckpointHandler
from flaxckpt._manager_options import (CheckpointManagerOptions, preservation_policy,
                                      save_decision_policy)
from flaxckpt._policies import CheckpointInfo
from flaxckpt._steps import is_locked, validate_step
from flaxckpt.metadata import StepMetadata, read_step_metadata
from flaxckpt.path import step as step_lib

logger = logging.getLogger(__name__)

DEFAULT_ITEM = 'default'
METRICS_ITEM = 'metrics'
_ROOT_METADATA_DIR = 'metadata'
_ROOT_METADATA_FILE = '_ROOT_METADATA'
_LEGACY_ROOT_METADATA_FILE = 'metadata'
# The time of a step whose metadata was not read (lightweight_initialize), as Orbax.
_UNREAD_TIME = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)


class StepAlreadyExistsError(ValueError):
  """``save(step, force=True)`` of a step that already exists (or is being saved): a manager
  never overwrites a step (Orbax's ``checkpoint_manager.StepAlreadyExistsError``)."""


def is_async_checkpointer(checkpointer: Any) -> bool:
  """Whether ``checkpointer`` saves in the background."""
  return isinstance(checkpointer, AsyncCheckpointer)


class CheckpointManager:
  """Saves and restores numbered steps of one or more items under ``directory``.

  Current form (seed 000)::

    mngr = CheckpointManager(path, options=CheckpointManagerOptions(max_to_keep=2))
    mngr.save(step, args=args.StandardSave(state))
    mngr = CheckpointManager(path, item_names=('state', 'extra'))
    mngr.save(step, args=args.Composite(state=args.StandardSave(s), extra=args.JsonSave(e)))

  With policies (``flaxckpt.checkpoint_managers``)::

    options = CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(100),
        preservation_policy=checkpoint_managers.LatestN(3))

  Older form (seed 001): ``CheckpointManager(path, checkpointer, options)`` (or a dict of
  checkpointers), ``save(step, items, save_kwargs=...)``, ``restore(step, items=...,
  restore_kwargs=...)``; it is translated into the current one.

  Args:
    directory: the root holding the step directories.
    checkpointers: older form: one Checkpointer/AsyncCheckpointer, or a dict of them by item.
    options: ``CheckpointManagerOptions``.
    metadata: JSON-serializable metadata of the whole run, written once under the root.
    item_names: names of the items of a multi-item manager; handlers are inferred from the
      args type of the first save (or restore) of each.
    item_handlers: a handler (class or instance) for the single item, or a dict by item name.
    logger: a ``flaxckpt.logging.AbstractLogger`` given one entry per save and restore.
    handler_registry: a ``CheckpointHandlerRegistry`` of the items' handlers.

  Raises:
    ValueError: ``options.preservation_policy`` combined with the options it replaces.
  """

  def __init__(self, directory: _storage.PathLike,
               checkpointers: Checkpointer | Mapping[str, Checkpointer] | None = None,
               options: CheckpointManagerOptions | None = None,
               metadata: Mapping[str, Any] | None = None,
               item_names: Sequence[str] | None = None,
               item_handlers: Any = None, logger: logging_lib.AbstractLogger | None = None,
               handler_registry: Any = None):
    if checkpointers is not None and not isinstance(checkpointers, (Checkpointer, Mapping)):
      if isinstance(checkpointers, CheckpointManagerOptions) and options is None:
        options, checkpointers = checkpointers, None
      else:
        raise TypeError('checkpointers must be a Checkpointer, a dict of them, or None; got '
                        f'{type(checkpointers).__name__}.')
    if isinstance(metadata, CheckpointManagerOptions):  # Orbax's older (dir, ckptrs, options).
      raise TypeError('metadata must be a mapping; pass options=CheckpointManagerOptions(...).')
    if logger is not None and not isinstance(logger, logging_lib.AbstractLogger):
      raise TypeError(f'logger must be a flaxckpt.logging.AbstractLogger, got '
                      f'{type(logger).__name__}.')
    if handler_registry is not None and (checkpointers is not None or item_names is not None
                                         or item_handlers is not None):
      raise ValueError('handler_registry replaces checkpointers, item_names and item_handlers; '
                       'pass one or the other.')
    self._options = options = options or CheckpointManagerOptions()
    self._save_policy = save_decision_policy(options)
    self._preservation_policy = preservation_policy(options)
    self._logger = logger or logging_lib.StandardLogger()
    self._root = _storage.as_path(directory)
    self._name_format = options.step_name_format or step_lib.standard_name_format(
        step_prefix=options.step_prefix,
        step_format_fixed_length=options.step_format_fixed_length,
        single_host_load_and_broadcast=options.single_host_load_and_broadcast,
        temporary_path_cls=options.temporary_path_class)
    handlers, self._single, use_async, self._older_form = self._item_setup(
        checkpointers, item_names, item_handlers)
    if handler_registry is not None:
      self._single = None  # The first save's args decide, as without items.
    if options.best_fn is not None:
      if METRICS_ITEM in handlers:
        raise ValueError(f'Item name {METRICS_ITEM!r} is reserved for the metrics of best_fn.')
      if handler_registry is None:
        handlers[METRICS_ITEM] = JsonCheckpointHandler(METRICS_ITEM)
      else:
        handler_registry = _registry.DefaultCheckpointHandlerRegistry(handler_registry)
        if not handler_registry.has(METRICS_ITEM, JsonSave):
          handler_registry.add(METRICS_ITEM, JsonSave, JsonCheckpointHandler(METRICS_ITEM))
    if handler_registry is not None:
      self._composite = CompositeCheckpointHandler(handler_registry=handler_registry)
    else:
      given: dict[str, Any] = {n: h for n, h in handlers.items() if h is not None}
      self._composite = CompositeCheckpointHandler(
          *[n for n, h in handlers.items() if h is None], **given)
    self._open_items = self._single is None  # Items unknown until saved or restored (Orbax).
    if self._open_items:
      self._composite.accept_any_items()
    if use_async is None:  # Not fixed by the older form's checkpointers: the options decide.
      use_async = options.enable_async_checkpointing
    self._checkpointer = self._make_checkpointer(use_async)
    self._lock = threading.Lock()
    self._started: CheckpointInfo | None = None  # The latest save started.
    self._last_save_time: float | None = None
    self._deleter = (concurrent.futures.ThreadPoolExecutor(1, 'flaxckpt-delete')
                     if options.enable_background_delete else None)
    self._deletions: list[concurrent.futures.Future[None]] = []
    if not options.read_only:
      if options.create:
        self._create_root()
      if self._is_primary():
        _steps.recover_replaced(self._root)  # Left by force=True saves of older releases.
        if options.cleanup_tmp_directories:
          _steps.remove_tmp_step_dirs(self._root)
      if metadata is not None and options.save_root_metadata and self._is_primary():
        self._write_root_metadata(metadata)
    self._infos: list[CheckpointInfo] = self._scan(read_metadata=not options.lightweight_initialize)

  def _make_checkpointer(self, use_async: bool) -> Checkpointer:
    options = self._options
    if use_async:
      timeout = None if options.async_options else options.async_timeout_secs
      return AsyncCheckpointer(self._composite, timeout, async_options=options.async_options,
                               multiprocessing_options=options.multiprocessing_options,
                               file_options=options.file_options,
                               temporary_path_class=options.temporary_path_class)
    return Checkpointer(self._composite, multiprocessing_options=options.multiprocessing_options,
                        file_options=options.file_options,
                        temporary_path_class=options.temporary_path_class)

  def _is_primary(self) -> bool:
    primary = self._options.multiprocessing_options.primary_host
    return primary is None or jax.process_index() == primary

  def _create_root(self) -> None:
    mode = self._options.file_options.path_permission_mode
    existed = _storage.is_dir(self._root)
    _storage.make_dirs(self._root)
    if mode is not None and not existed and self._is_primary():
      self._root.chmod(mode)  # mkdir's mode is cut by the umask; the option means the mode.

  # --- items ----------------------------------------------------------------------------------

  @staticmethod
  def _item_setup(checkpointers: Any, item_names: Sequence[str] | None, item_handlers: Any
                  ) -> tuple[dict[str, CheckpointHandler | None], bool | None, bool | None, bool]:
    """(handlers by item, single-item? (None: not known yet), async override, older form?)."""
    if checkpointers is not None:
      if item_names is not None or item_handlers is not None:
        raise TypeError('Pass either checkpointers (the older form) or item_names/'
                        'item_handlers, not both.')
      if isinstance(checkpointers, Checkpointer):
        return ({DEFAULT_ITEM: checkpointers.handler}, True,
                isinstance(checkpointers, AsyncCheckpointer), True)
      return ({name: c.handler for name, c in checkpointers.items()}, False,
              any(isinstance(c, AsyncCheckpointer) for c in checkpointers.values()), True)
    if item_names is not None:
      if isinstance(item_names, str):
        raise TypeError(f'item_names must be a sequence of names, got the string '
                        f'{item_names!r}; write item_names=({item_names!r},).')
      handlers: dict[str, CheckpointHandler | None] = {n: None for n in item_names}
      if isinstance(item_handlers, Mapping):
        handlers.update({n: _instance(h) for n, h in item_handlers.items()})
      elif item_handlers is not None:
        raise TypeError('With item_names, item_handlers must be a dict by item name.')
      return handlers, False, None, False
    if isinstance(item_handlers, Mapping):
      return {n: _instance(h) for n, h in item_handlers.items()}, False, None, False
    if item_handlers is not None:
      return {DEFAULT_ITEM: _instance(item_handlers)}, True, None, False
    return {}, None, None, False

  def _settle_single(self, single: bool) -> None:
    """Fixes whether a manager created without items holds one unnamed item; the first save
    (its args) or restore (the step's layout: a ``default/`` item) decides, as in Orbax."""
    if self._single is None:
      self._single = single

  def _save_args(self, items: Any, save_kwargs: Any, args: Any) -> Composite:
    if args is not None:
      if items is not None or save_kwargs is not None:
        raise TypeError('Pass either args=... or the older items/save_kwargs, not both.')
      self._settle_single(not isinstance(args, Composite))
      return self._as_composite(args, for_save=True)
    if items is None:
      raise TypeError('save() needs what to save: save(step, args=...) or save(step, items).')
    self._settle_single(True)
    return self._older_args(items, save_kwargs, for_save=True)

  def _restore_args(self, items: Any, restore_kwargs: Any, args: Any) -> Composite | None:
    if args is not None:
      if items is not None or restore_kwargs is not None:
        raise TypeError('Pass either args=... or the older items/restore_kwargs, not both.')
      return self._as_composite(args, for_save=False)
    if items is None and restore_kwargs is None:
      return None
    return self._older_args(items, restore_kwargs, for_save=False)

  def _as_composite(self, args: Any, for_save: bool) -> Composite:
    if self._single:
      if isinstance(args, Composite):
        if set(args) - {DEFAULT_ITEM}:
          raise ValueError(f'This manager holds one unnamed item; got Composite items '
                           f'{sorted(args)}. Pass the item\'s args directly, or create the '
                           'manager with item_names=...')
        return args
      if not isinstance(args, CheckpointArgs):
        raise TypeError(f'args must be a CheckpointArgs (e.g. args.StandardSave(state)), got '
                        f'{type(args).__name__}.')
      return Composite({DEFAULT_ITEM: args})
    if not isinstance(args, Composite):
      raise TypeError(f'This manager holds the items {self._known_items()}; pass '
                      f'args=args.Composite(name=...), got {type(args).__name__}.')
    unknown = [n for n in args if (n == METRICS_ITEM and for_save) or (
        not self._open_items and n not in self._composite.item_handlers)]
    if unknown:
      raise ValueError(f'Unknown item names {unknown}; this manager holds '
                       f'{self._known_items()}.')
    for name, item_args in args.items():
      if item_args is not None and not isinstance(item_args, CheckpointArgs):
        raise TypeError(f'Item {name!r}: expected a CheckpointArgs (e.g. args.StandardSave), '
                        f'got {type(item_args).__name__}.')
    return args

  def _older_args(self, items: Any, kwargs: Any, for_save: bool) -> Composite:
    """``save(step, items, save_kwargs=...)`` / ``restore(step, items=..., restore_kwargs=...)``
    expressed with the args classes of the items' handlers."""
    if self._single:
      items, kwargs = {DEFAULT_ITEM: items}, {DEFAULT_ITEM: kwargs or {}}
    elif not isinstance(items or {}, Mapping):
      raise TypeError(f'This manager holds the items {self._known_items()}; pass items as a '
                      'dict by item name.')
    items = dict(items or {})
    kwargs = dict(kwargs or {})
    out = {}
    for name in sorted(set(items) | set(kwargs)):
      handler = self._composite.item_handlers.get(name)
      if handler is None:
        raise ValueError(f'Item {name!r} has no handler in this manager (items: '
                         f'{self._known_items()}); pass args=... instead.')
      args_type = args_type_for(handler, for_save)
      if args_type is None:
        raise TypeError(f'{type(handler).__name__} (item {name!r}) has no registered args type;'
                        ' pass args=... instead.')
      fields = {k: v for k, v in (kwargs.get(name) or {}).items() if v is not None}
      try:
        out[name] = args_type(items.get(name), **fields)
      except TypeError as e:
        raise TypeError(f'Item {name!r}: {args_type.__name__} does not accept '
                        f'{sorted(fields)}: {e}') from e
    return Composite(out)

  def _known_items(self) -> list[str]:
    return sorted(n for n in self._composite.item_handlers if n != METRICS_ITEM)

  # --- saving ---------------------------------------------------------------------------------

  def save(self, step: int, items: Any = None, save_kwargs: Any = None, *,
           args: CheckpointArgs | None = None, metrics: Any = None, force: bool = False,
           custom_metadata: dict[str, Any] | None = None) -> bool:
    """Saves ``step`` if ``should_save(step)`` (or ``force``); returns whether it did.

    A step that already exists, or is not newer than the latest, is not saved (False), so a
    loop resumed at step 20 may call ``save(20, ...)`` again. ``force=True`` saves whatever
    the policy says but never overwrites a step.

    Raises:
      StepAlreadyExistsError: ``force=True`` and ``step`` exists or is being saved.
      TypeError, ValueError: bad step, args or metrics; nothing is written then.
    """
    started = time.time()
    step = validate_step(step)
    if self._options.read_only:
      logger.warning('%s is read-only; step %d was not saved.', self._root, step)
      return False
    composite = self._save_args(items, save_kwargs, args)
    metrics = _jsonable_metrics(metrics, step)
    self.check_for_errors()
    if not force and not self.should_save(step):
      logger.debug('Step %d skipped by the save decision policy.', step)
      return False
    stats = logging_lib.SaveStepStatistics(
        step=step, directory=str(self._root), checkpoint_manager_blocking_start_time=started,
        synchronous=not is_async_checkpointer(self._checkpointer))
    if self.reached_preemption(step):
      stats.reached_preemption, stats.preemption_received_at = True, time.time()
    stats.wait_for_prev_start_time = time.time()
    if self._last_save_time is not None:
      stats.time_between_consecutive_saves_sec = stats.wait_for_prev_start_time - (
          self._last_save_time)
    self._checkpointer.wait_until_finished()  # Not for background deletions: they go on.
    stats.wait_for_prev_duration_secs = time.time() - stats.wait_for_prev_start_time
    if step in self.all_steps():
      raise StepAlreadyExistsError(
          f'Step {step} already exists at {self._step_dir(step)}; a manager never overwrites '
          'a step (delete(step) first to replace it).')
    if (metrics is not None and self._options.best_fn is not None
        and not self._options.prevent_write_metrics):
      composite = Composite({**composite, METRICS_ITEM: JsonSave(metrics)})
    path = self._root / self._name_format.build_name(step)
    info = CheckpointInfo(step, datetime.datetime.now(tz=datetime.timezone.utc), metrics)
    self._started = info
    self._last_save_time = stats.checkpointer_blocking_start_time = time.time()
    self._checkpointer._save(path, composite, False, custom_metadata,  # noqa: SLF001
                             on_commit=lambda: self._committed(info))
    stats.checkpointer_blocking_duration_secs = time.time() - self._last_save_time
    stats.checkpoint_manager_blocking_duration_secs = time.time() - started
    self._logger.log_entry(dataclasses.asdict(stats))
    return True

  def _committed(self, info: CheckpointInfo) -> None:
    """After ``info.step`` has committed: it joins the steps, and the preservation policy
    decides which steps stay."""
    with self._lock:
      self._infos = sorted([i for i in self._infos if i.step != info.step] + [info],
                           key=lambda i: i.step)
      infos = list(self._infos)
    keep = list(self._preservation_policy.should_preserve(
        infos, context=_policies.PreservationContext()))
    if len(keep) != len(infos):
      raise ValueError(f'{self._preservation_policy!r}.should_preserve returned {len(keep)} '
                       f'flags for {len(infos)} steps.')
    for doomed, kept in zip(infos, keep):
      if not kept:
        self._remove(doomed.step, skip_locked=True)

  def should_save(self, step: int) -> bool:
    """Whether ``step`` would be saved: it is newer than every step saved or being saved, and
    the save decision policy wants it."""
    step = validate_step(step)
    if self._options.read_only:
      return False
    latest = self.latest_step()
    in_flight = self._in_flight_step()
    if in_flight is not None:
      latest = max(latest or 0, in_flight)
    if latest is not None and latest >= step:
      return False
    context = _policies.DecisionContext(
        is_saving_in_progress=(self._options.enable_should_save_is_saving_in_progress_check
                               and self.is_saving_in_progress()),
        reached_preemption=self.reached_preemption(step),
        multiprocessing_options=self._options.multiprocessing_options)
    with self._lock:
      previous = list(self._infos)
    if in_flight is not None and self._started is not None:  # Counts as saved, as in Orbax.
      previous.append(self._started)
    current = CheckpointInfo(step, datetime.datetime.now(tz=datetime.timezone.utc))
    return bool(self._save_policy.should_save(current, previous_steps=previous,
                                              context=context))

  def is_saving_in_progress(self) -> bool:
    """Whether a background save has started and not yet committed (or failed)."""
    return self._in_flight_step() is not None

  def _in_flight_step(self) -> int | None:
    """The step whose save has started but neither committed nor failed: its temporary
    directory is still there (a commit renames it, a failure deletes it). Where saves are
    written in place (object stores) there is no such directory, and possibly nothing written
    yet: there the background save is in flight until its thread ends."""
    step = self._started.step if self._started is not None else None
    if step is None or step in self.all_steps():
      return None
    final = self._root / self._name_format.build_name(step)
    if _storage.renames_atomically(final):
      return step if _steps.saves_in_flight(final) else None
    saving = getattr(self._checkpointer, 'is_saving', None)  # An AsyncCheckpointer's.
    return step if saving is not None and saving() else None

  def reached_preemption(self, step: int) -> bool:
    """True at a preemption sync point of JAX's distributed runtime; False without one."""
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, AttributeError, ValueError):
      return False  # No distributed runtime, or no preemption service in it.

  # --- deleting -------------------------------------------------------------------------------

  def _remove(self, step: int, skip_locked: bool = False) -> None:
    """Forgets ``step`` and deletes its directory (on the deletion thread with
    ``enable_background_delete``)."""
    path = self._step_dir(step)
    if skip_locked and is_locked(path):
      logger.info('Step %d is locked by a reader; it will be deleted later.', step)
      return
    with self._lock:
      self._infos = [i for i in self._infos if i.step != step]
    if not self._is_primary():  # Every process forgets the step; the primary deletes it.
      return
    delete: Callable[[], None] = functools.partial(_steps.delete, path)
    if self._options.todelete_subdir is not None:
      trash = self._root / self._options.todelete_subdir
      delete = functools.partial(_steps.move_aside, path, trash / path.name)
    if self._deleter is None:
      delete()
    else:
      with self._lock:
        self._deletions = [f for f in self._deletions if not f.done() or f.exception()]
        self._deletions.append(self._deleter.submit(delete))

  def delete(self, step: int) -> None:
    """Deletes ``step`` (nothing happens with ``read_only``).

    Raises:
      FileNotFoundError: there is no such step.
    """
    step = validate_step(step)
    if self._options.read_only:
      logger.warning('%s is read-only; step %d was not deleted.', self._root, step)
      return
    self._checkpointer.wait_until_finished()
    if step not in self.all_steps():
      raise FileNotFoundError(f'No step {step} under {self._root}; steps: {self.all_steps()}.')
    self._remove(step)

  def _wait_for_deletions(self) -> None:
    with self._lock:
      pending, self._deletions = self._deletions, []
    errors = [f.exception() for f in pending]  # Waits for each.
    failed = [e for e in errors if e is not None]
    if failed:
      raise failed[0]

  # --- listing ---------------------------------------------------------------------------------

  def _scan(self, read_metadata: bool = True) -> list[CheckpointInfo]:
    infos = []
    for found in self._name_format.find_all(self._root):
      if read_metadata:
        info = CheckpointInfo(found.step, found.commit_timestamp, self._read_metrics(found.path))
      else:
        info = CheckpointInfo(found.step, _UNREAD_TIME)
      infos.append(info)
    return sorted(infos, key=lambda i: i.step)

  def _read_metrics(self, step_dir: Any) -> Any:
    path = step_dir / METRICS_ITEM / METRICS_ITEM
    if not _storage.is_file(path):
      return None
    try:
      return _safe_json.read(_storage.check_inside(path, self._root))
    except ValueError:
      logger.warning('Unreadable metrics at %s; the step is ranked as having none.', path)
      return None

  def _step_dir(self, step: int, root: Any = None):
    """The directory of the committed ``step``, refused if a link makes it lead outside the
    root; where there is none, the path a new save of it would take."""
    root = _storage.as_path(root) if root is not None else self._root
    try:
      path = self._name_format.find_step(root, step).path
    except ValueError:
      path = root / self._name_format.build_name(step)
    return _storage.check_inside(_storage.as_path(path), root)

  def all_steps(self, read: bool = False) -> list[int]:
    """Committed steps, ascending; ``read=True`` lists the directory again first."""
    if read:
      self.reload()
    with self._lock:
      return [i.step for i in self._infos]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The best step by ``best_fn``; the latest step without ``best_fn`` or metrics."""
    if self._options.best_fn is None:
      return self.latest_step()
    with self._lock:
      scored = [i for i in self._infos if i.metrics is not None]
    ranked = sorted(scored, key=lambda i: self._options.best_fn(i.metrics),  # type: ignore[misc]
                    reverse=self._options.best_mode == 'min')
    return ranked[-1].step if ranked else self.latest_step()

  def reload(self) -> None:
    """Re-reads the steps (and their metrics and times) from disk."""
    infos = self._scan()
    with self._lock:
      self._infos = infos

  # --- restoring ------------------------------------------------------------------------------

  def restore(self, step: int | None = None, items: Any = None, restore_kwargs: Any = None, *,
              directory: _storage.PathLike | None = None,
              args: CheckpointArgs | None = None) -> Any:
    """Restores ``step`` (default: the latest); waits for a save still in flight first.

    A manager created without items or checkpointers holds one unnamed item when the step has
    a ``default/`` item (the first save or restore decides).

    Returns:
      The item for a single-item manager, else a ``Composite`` by item name (without args:
      every item of the step, ``metrics`` included, each with its inferred handler's default
      restore args, and None for each of the manager's ``item_names`` the step lacks).
    """
    started = time.time()
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No steps to restore under {self._root}.')
    step = validate_step(step)
    path = self._step_dir(step, directory)
    if not _storage.is_dir(path):
      where = _storage.as_path(directory) if directory is not None else self._root
      raise FileNotFoundError(f'No step {step} at {path}; steps under {where}: '
                              f'{[m.step for m in self._name_format.find_all(where)]}.')
    self._settle_single(_storage.is_dir(path / DEFAULT_ITEM))
    composite = self._restore_args(items, restore_kwargs, args)
    absent: list[str] = []
    if composite is None:  # Every item whose handler is known or can be inferred, as Orbax.
      names = [DEFAULT_ITEM] if self._single else item_names(path)
      composite = Composite({n: None for n in names})
      if not self._single:
        absent = [n for n in self._known_items() if n not in names]
    stats = logging_lib.RestoreStepStatistics(
        step=step, directory=str(path.parent), checkpoint_manager_start_time=started)
    stats.checkpointer_start_time = checkpointer_started = time.time()
    result = self._checkpointer.restore(path, args=composite)
    stats.checkpointer_duration_secs = time.time() - checkpointer_started
    stats.checkpoint_manager_duration_secs = time.time() - started
    self._logger.log_entry(dataclasses.asdict(stats))
    if self._single:
      return result[DEFAULT_ITEM]
    return Composite({**result, **{n: None for n in absent}}) if absent else result

  def item_metadata(self, step: int) -> Any:
    """What each item of ``step`` holds, without reading array data."""
    path = self._step_dir(validate_step(step))
    self._settle_single(_storage.is_dir(path / DEFAULT_ITEM))
    meta = self._composite.metadata(path)
    if self._single:
      return meta[DEFAULT_ITEM] if DEFAULT_ITEM in meta else None
    return Composite({n: v for n, v in meta.items() if n != METRICS_ITEM})

  def metrics(self, step: int) -> Any:
    """The metrics saved with ``step``, or None."""
    return self._read_metrics(self._step_dir(validate_step(step)))

  def metadata(self, step: int | None = None) -> Any:
    """Without ``step``: the run metadata given to the constructor (this or an earlier run),
    or {} (the mapping the reference docs promise). With ``step``: that step's
    ``ocp.metadata.StepMetadata``, its ``item_metadata`` as ``item_metadata(step)`` gives it."""
    if step is not None:
      step = validate_step(step)
      item_metadata = self.item_metadata(step)
      try:
        return read_step_metadata(self._step_dir(step), item_metadata)
      except (_errors.NotACheckpointError, _errors.LimitExceededError) as e:
        logger.warning('Ignoring the step metadata of step %d: %s', step, e)
        return StepMetadata(item_metadata=item_metadata)
    folder = self._root / _ROOT_METADATA_DIR
    for name, key in ((_ROOT_METADATA_FILE, 'custom_metadata'),
                      (_LEGACY_ROOT_METADATA_FILE, None)):
      if _storage.is_file(folder / name):
        data = _safe_json.read(folder / name)
        return (data.get(key) or {}) if key else data
    return {}

  def _write_root_metadata(self, metadata: Mapping[str, Any]) -> None:
    try:
      text = json.dumps({'internal_metadata': {}, 'custom_metadata': dict(metadata)})
    except TypeError as e:
      raise TypeError(f'CheckpointManager metadata must be JSON-serializable: {e}') from e
    folder = self._root / _ROOT_METADATA_DIR
    if _storage.is_file(folder / _ROOT_METADATA_FILE):
      return  # Written by the first run; Orbax does not rewrite it either.
    _storage.make_dirs(folder)
    _storage.write_text(folder / _ROOT_METADATA_FILE, text)

  # --- lifecycle ------------------------------------------------------------------------------

  @property
  def directory(self):
    return self._root

  def wait_until_finished(self) -> None:
    """Blocks until a background save has committed, its old steps are deleted (background
    deletions included)."""
    self._checkpointer.wait_until_finished()
    self._wait_for_deletions()

  def check_for_errors(self) -> None:
    self._checkpointer.check_for_errors()

  def close(self) -> None:
    """Waits for saves and deletions in flight, then releases the background threads."""
    try:
      self.wait_until_finished()
    finally:
      self._checkpointer.close()
      if self._deleter is not None:
        self._deleter.shutdown(wait=True)

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _instance(handler: Any) -> CheckpointHandler | None:
  if handler is None or isinstance(handler, CheckpointHandler):
    return handler
  if isinstance(handler, type) and issubclass(handler, CheckpointHandler):
    return handler()
  raise TypeError(f'Expected a CheckpointHandler class or instance, got {handler!r}.')


def _jsonable_metrics(metrics: Any, step: int) -> Any:
  """Metrics as plain JSON values (numpy and 0-d jax scalars become Python numbers); anything
  else is refused before a byte is written."""
  if metrics is None:
    return None

  def convert(value: Any) -> Any:
    if isinstance(value, Mapping):
      return {str(k): convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [convert(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
      return value
    if isinstance(value, np.generic) or (hasattr(value, 'shape') and value.shape == ()):
      return np.asarray(value).item()
    raise TypeError(f'Metrics of step {step} must be JSON-serializable (numbers, strings, '
                    f'lists, dicts); got {type(value).__name__}: {value!r}.')

  return convert(metrics)
