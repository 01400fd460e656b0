"""CheckpointManager: numbered steps under one root, retention, best-metric tracking, async saves.

Each step is one composite checkpoint, ``<root>/<step name>/<item>/``, saved and committed by a
Checkpointer (or AsyncCheckpointer) exactly as a single checkpoint is. A single unnamed item
lives in ``default/``. With ``best_fn``, the metrics of a step are a JSON item ``metrics`` (file
``metrics``), where Orbax keeps them, so rankings survive restarts and both libraries agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import numpy as np

from flaxckpt import _errors, _multihost, _safe_json, _steps, _storage
from flaxckpt._args import Composite, JsonSave
from flaxckpt._checkpointer import AsyncCheckpointer, Checkpointer
from flaxckpt._composite_handler import CompositeCheckpointHandler, item_names
from flaxckpt._handler import CheckpointArgs, CheckpointHandler, args_type_for
from flaxckpt._json_handler import JsonCheckpointHandler
from flaxckpt._steps import StepNaming, is_locked, validate_step

logger = logging.getLogger(__name__)

DEFAULT_ITEM = 'default'
METRICS_ITEM = 'metrics'
_ROOT_METADATA_DIR = 'metadata'
_ROOT_METADATA_FILE = '_ROOT_METADATA'
_LEGACY_ROOT_METADATA_FILE = 'metadata'


@dataclasses.dataclass
class CheckpointManagerOptions:
  """How a CheckpointManager names, keeps and writes steps (Orbax's options of the same names).

  Attributes:
    save_interval_steps: ``should_save`` is True for multiples of this (and the first save).
    save_on_steps: steps that are saved whatever the interval.
    max_to_keep: how many steps to keep (the newest, or with ``best_fn`` the best); None keeps
      every step.
    keep_period: steps divisible by this are never deleted.
    best_fn: maps a step's metrics to a number to rank steps by.
    best_mode: 'max' or 'min': which end of ``best_fn`` is best.
    keep_checkpoints_without_metrics: with ``best_fn``, keep steps saved without metrics.
    keep_latest: with ``best_fn``, also keep this many of the newest steps whatever their
      metrics (Orbax cannot: it keeps only the best once ``best_fn`` is set).
    step_prefix: step directories are named ``<prefix>_<step>``.
    step_format_fixed_length: zero-pad step numbers to this many digits.
    create: create the root directory if it is missing.
    cleanup_tmp_directories: delete the directories of saves that never committed, at start.
    read_only: never write or delete anything; saves return False.
    enable_async_checkpointing: save on a background thread (the default).
    async_timeout_secs: how long ``wait_until_finished`` waits for a background save.
  """
  save_interval_steps: int = 1
  max_to_keep: int | None = None
  keep_period: int | None = None
  best_fn: Callable[[Any], float] | None = None
  best_mode: str = 'max'
  keep_checkpoints_without_metrics: bool = True
  keep_latest: int | None = None
  step_prefix: str | None = None
  step_format_fixed_length: int | None = None
  create: bool = True
  cleanup_tmp_directories: bool = False
  save_on_steps: Container[int] | None = None
  read_only: bool = False
  enable_async_checkpointing: bool = True
  async_timeout_secs: float = 600

  def __post_init__(self):
    for name in ('save_interval_steps', 'max_to_keep', 'keep_period', 'keep_latest',
                 'step_format_fixed_length'):
      value = getattr(self, name)
      if value is None and name != 'save_interval_steps':
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'CheckpointManagerOptions.{name} must be a positive int'
                         f'{"" if name == "save_interval_steps" else " or None"}, got {value!r}.')
    if self.best_mode not in ('max', 'min'):
      raise ValueError(f"CheckpointManagerOptions.best_mode must be 'max' or 'min', got "
                       f'{self.best_mode!r}.')
    if self.save_on_steps is not None:
      self.save_on_steps = frozenset(validate_step(s) for s in self.save_on_steps)


@dataclasses.dataclass
class _StepInfo:
  step: int
  metrics: Any = None


class CheckpointManager:
  """Saves and restores numbered steps of one or more items under ``directory``.

  Current form (seed 000)::

    mngr = CheckpointManager(path, options=CheckpointManagerOptions(max_to_keep=2))
    mngr.save(step, args=args.StandardSave(state))
    mngr = CheckpointManager(path, item_names=('state', 'extra'))
    mngr.save(step, args=args.Composite(state=args.StandardSave(s), extra=args.JsonSave(e)))

  Older form (seed 001): ``CheckpointManager(path, checkpointer, options)`` (or a dict of
  checkpointers), ``save(step, items, save_kwargs=...)``, ``restore(step, items=...,
  restore_kwargs=...)``; it is translated into the current one.

  Args:
    directory: the root holding the step directories.
    checkpointers: older form: one Checkpointer/AsyncCheckpointer, or a dict of them by item.
    options: ``CheckpointManagerOptions``.
    item_names: names of the items of a multi-item manager; handlers are inferred from the
      args type of the first save (or restore) of each.
    item_handlers: a handler (class or instance) for the single item, or a dict by item name.
    metadata: JSON-serializable metadata of the whole run, written once under the root.
  """

  def __init__(self, directory: _storage.PathLike,
               checkpointers: Checkpointer | Mapping[str, Checkpointer] | None = None,
               options: CheckpointManagerOptions | None = None,
               item_names: Sequence[str] | None = None,
               item_handlers: Any = None, metadata: Mapping[str, Any] | None = None):
    if checkpointers is not None and not isinstance(checkpointers, (Checkpointer, Mapping)):
      if isinstance(checkpointers, CheckpointManagerOptions) and options is None:
        options, checkpointers = checkpointers, None
      else:
        raise TypeError('checkpointers must be a Checkpointer, a dict of them, or None; got '
                        f'{type(checkpointers).__name__}.')
    self._options = options or CheckpointManagerOptions()
    self._root = _storage.as_path(directory)
    self._naming = StepNaming(self._options.step_prefix, self._options.step_format_fixed_length)
    handlers, self._single, use_async, self._older_form = self._item_setup(
        checkpointers, item_names, item_handlers)
    if self._options.best_fn is not None:
      if METRICS_ITEM in handlers:
        raise ValueError(f'Item name {METRICS_ITEM!r} is reserved for the metrics of best_fn.')
      handlers[METRICS_ITEM] = JsonCheckpointHandler(METRICS_ITEM)
    names = [n for n, h in handlers.items() if h is None]
    self._composite = CompositeCheckpointHandler(
        *names, **{n: h for n, h in handlers.items() if h is not None})
    self._open_items = self._single is None  # Items unknown until saved or restored (Orbax).
    if self._open_items:
      self._composite.accept_any_items()
    if use_async is None:  # Not fixed by the older form's checkpointers: the options decide.
      use_async = self._options.enable_async_checkpointing
    if use_async:
      self._checkpointer: Checkpointer = AsyncCheckpointer(
          self._composite, timeout_secs=self._options.async_timeout_secs)
    else:
      self._checkpointer = Checkpointer(self._composite)
    self._lock = threading.Lock()
    self._started_step: int | None = None  # The step of the latest save started.
    if not self._options.read_only:
      if self._options.create:
        _storage.make_dirs(self._root)
      if _multihost.is_primary():
        _steps.recover_replaced(self._root)
        if self._options.cleanup_tmp_directories:
          _steps.remove_tmp_step_dirs(self._root)
      if metadata is not None and _multihost.is_primary():
        self._write_root_metadata(metadata)
    self._steps: list[_StepInfo] = self._scan()

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
    """Saves ``step``; returns False when the save policy skips it.

    Raises:
      CheckpointExistsError: ``step`` already exists and ``force`` is False.
      TypeError, ValueError: bad step, args or metrics; nothing is written then.
    """
    step = validate_step(step)
    if self._options.read_only:
      logger.warning('%s is read-only; step %d was not saved.', self._root, step)
      return False
    composite = self._save_args(items, save_kwargs, args)
    metrics = _jsonable_metrics(metrics, step)
    self.check_for_errors()
    path = self._root / self._naming.name(step)  # A new step gets the conventional name.
    if step in self.all_steps():
      path = self._step_dir(step)
      if not force:
        raise _errors.CheckpointExistsError(
            f'Step {step} already exists at {path}; pass force=True to replace it.')
    elif not force and not self.should_save(step):
      logger.debug('Step %d skipped by the save policy (save_interval_steps=%d).', step,
                   self._options.save_interval_steps)
      return False
    if metrics is not None and self._options.best_fn is not None:
      composite = Composite({**composite, METRICS_ITEM: JsonSave(metrics)})
    self._started_step = step
    self._checkpointer._save(path, composite, force, custom_metadata,  # noqa: SLF001
                             on_commit=lambda: self._committed(step, metrics))
    return True

  def _committed(self, step: int, metrics: Any) -> None:
    with self._lock:
      self._steps = [i for i in self._steps if i.step != step] + [_StepInfo(step, metrics)]
      self._steps.sort(key=lambda i: i.step)
      doomed = self._steps_to_delete()
    for info in doomed:
      self._delete_now(info.step)

  def should_save(self, step: int) -> bool:
    """Whether the save policy wants ``step``: newer than the latest step and on the interval,
    in ``save_on_steps``, at a preemption point, or the first save."""
    step = validate_step(step)
    if self._options.read_only:
      return False
    latest = self.latest_step()
    in_flight = self._in_flight_step()
    if in_flight is not None:
      latest = max(latest or 0, in_flight)
    if latest is not None and latest >= step:
      return False
    options = self._options
    return (latest is None or step % options.save_interval_steps == 0
            or (options.save_on_steps is not None and step in options.save_on_steps)
            or self.reached_preemption(step))

  def _in_flight_step(self) -> int | None:
    """The step whose save has started but neither committed nor failed: its temporary
    directory is still there (a commit renames it, a failure deletes it)."""
    step = self._started_step
    if step is None:
      return None
    return step if _steps.saves_in_flight(self._root / self._naming.name(step)) else None

  def reached_preemption(self, step: int) -> bool:
    """True at a preemption sync point of JAX's distributed runtime; False without one."""
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, AttributeError, ValueError):
      return False  # No distributed runtime, or no preemption service in it.

  # --- retention ------------------------------------------------------------------------------

  def _steps_to_delete(self) -> list[_StepInfo]:
    options = self._options
    if options.max_to_keep is None:
      return []
    if options.best_fn is None:
      candidates = self._steps[:-options.max_to_keep]
    else:
      ranked = self._ranked()
      candidates = ranked[:-options.max_to_keep]
      if not options.keep_checkpoints_without_metrics:
        candidates += [i for i in self._steps if i.metrics is None]
      if options.keep_latest:
        newest = {i.step for i in self._steps[-options.keep_latest:]}
        candidates = [i for i in candidates if i.step not in newest]
    if options.keep_period:
      candidates = [i for i in candidates if i.step % options.keep_period]
    return candidates

  def _ranked(self) -> list[_StepInfo]:
    """Steps with metrics, worst first (ties: older first)."""
    scored = [i for i in self._steps if i.metrics is not None]
    sign = 1 if self._options.best_mode == 'max' else -1
    return sorted(scored, key=lambda i: sign * float(self._options.best_fn(i.metrics)))

  def _delete_now(self, step: int) -> None:
    path = self._step_dir(step)
    if is_locked(path):
      logger.info('Step %d is locked by a reader; it will be deleted later.', step)
      return
    if _multihost.is_primary():  # Every process forgets the step; one deletes it.
      _steps.delete(path)
    with self._lock:
      self._steps = [i for i in self._steps if i.step != step]

  def delete(self, step: int) -> None:
    """Deletes ``step`` now (nothing happens with ``read_only``)."""
    step = validate_step(step)
    if self._options.read_only:
      logger.warning('%s is read-only; step %d was not deleted.', self._root, step)
      return
    self.wait_until_finished()
    if step not in self.all_steps():
      raise FileNotFoundError(f'No step {step} under {self._root}; steps: {self.all_steps()}.')
    if _multihost.is_primary():
      _steps.delete(self._step_dir(step))
    with self._lock:
      self._steps = [i for i in self._steps if i.step != step]

  # --- listing ---------------------------------------------------------------------------------

  def _scan(self) -> list[_StepInfo]:
    infos = []
    for step in self._naming.list_steps(self._root):
      metrics = None
      if self._options.best_fn is not None:
        metrics = self._read_metrics(step)
      infos.append(_StepInfo(step, metrics))
    return infos

  def _read_metrics(self, step: int) -> Any:
    path = self._step_dir(step) / METRICS_ITEM / METRICS_ITEM
    if not _storage.is_file(path):
      return None
    try:
      return _safe_json.read(_storage.check_inside(path, self._root))
    except ValueError:
      logger.warning('Unreadable metrics at %s; step %d is ranked as having none.', path, step)
      return None

  def _step_dir(self, step: int, root: Any = None):
    """The directory of ``step``, refused if a link makes it lead outside the root."""
    root = _storage.as_path(root) if root is not None else self._root
    return _storage.check_inside(self._naming.path(root, step), root)

  def all_steps(self, read: bool = False) -> list[int]:
    """Committed steps, ascending; ``read=True`` lists the directory again first."""
    if read:
      self.reload()
    with self._lock:
      return [i.step for i in self._steps]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The best step by ``best_fn``; the latest step without ``best_fn`` or metrics."""
    if self._options.best_fn is None:
      return self.latest_step()
    with self._lock:
      ranked = self._ranked()
    return ranked[-1].step if ranked else self.latest_step()

  def reload(self) -> None:
    """Re-reads the steps (and their metrics) from disk."""
    steps = self._scan()
    with self._lock:
      self._steps = steps

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
      restore args).
    """
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No steps to restore under {self._root}.')
    step = validate_step(step)
    path = self._step_dir(step, directory)
    if not _storage.is_dir(path):
      where = directory if directory is not None else self._root
      raise FileNotFoundError(f'No step {step} at {path}; steps under {where}: '
                              f'{self._naming.list_steps(_storage.as_path(where))}.')
    self._settle_single(_storage.is_dir(path / DEFAULT_ITEM))
    composite = self._restore_args(items, restore_kwargs, args)
    if composite is None:  # Every item whose handler is known or can be inferred, as Orbax.
      names = [DEFAULT_ITEM] if self._single else item_names(path)
      composite = Composite({n: None for n in names})
    result = self._checkpointer.restore(path, args=composite)
    return result[DEFAULT_ITEM] if self._single else result

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
    return self._read_metrics(validate_step(step))

  def metadata(self) -> dict[str, Any]:
    """The run metadata given to the constructor (this or an earlier run), or {}."""
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
    """Blocks until a background save has committed and its retention has run."""
    self._checkpointer.wait_until_finished()

  def check_for_errors(self) -> None:
    self._checkpointer.check_for_errors()

  def close(self) -> None:
    self._checkpointer.close()

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
