"""Crash drill: kill a checkpoint writer with SIGKILL at random moments, then check what is left.

Each trial starts a writer process that saves steps 0, 1, 2, ... forever, with values that are a
function of the step, and kills it with SIGKILL, either a random time after its k-th save returned
("time" trials: kills land inside TensorStore writes, fsyncs, background commits) or just before
its n-th file-system call under the checkpoint directory ("op" trials: the writer wraps ``open``
for writing, ``mkdir``, ``rename``, ``replace``, ``unlink``, ``rmdir`` and ``fsync``, so kills
land on every step of the commit protocol and of retention's deletions). A fresh reader then checks:

- every listed step restores exactly (values, dtypes, structure);
- the latest step known to have committed before the kill is listed;
- no temporary directory is listed;
- a new manager (``cleanup_tmp_directories=True``), or for the legacy API the next
  ``save_checkpoint``, leaves no temporary directory, and the next step saves and restores.

Contenders: flaxckpt's async ``CheckpointManager``, flaxckpt's legacy ``save_checkpoint``
(msgpack, msgpack with an ``AsyncManager``, Orbax backend with an ``AsyncCheckpointer``), and
Orbax's own ``CheckpointManager`` for comparison (reported, never failing the run).

Usage: ``python tests/drill_crash.py --trials 100`` (trials per contender); exits 1 when a
flaxckpt trial is not ``ok``. ``--start T --trials 1 --seed S --contenders C`` replays one trial.
The module is also imported by ``tests/test_drill_crash.py``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

CONTENDERS = ('flaxckpt-manager', 'flaxckpt-legacy-msgpack', 'flaxckpt-legacy-msgpack-async',
              'flaxckpt-legacy-orbax', 'orbax-manager')
OUTCOMES = ('ok', 'listed-step-unrestorable', 'wrong-values', 'lost-latest', 'tmp-listed',
            'tmp-not-cleaned', 'cannot-continue', 'reader-crash', 'hang', 'writer-error')
# How many steps the savers keep; retention deletes older ones, so kills land there too.
KEEP = 3
# Seconds: a writer must reach its kill point, a check must finish, within these.
WRITER_TIMEOUT = 60.0
CHECK_TIMEOUT = 120.0
_TMP_MARKS = ('.orbax-checkpoint-tmp', 'checkpoint_tmp', '.flaxckpt-tmp-')  # Orbax's, flax's, ours.
_REPLY = '@@drill '  # Prefix of the checker's answers (libraries may print to stdout too).
_ENV = {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3', 'PYTHONUNBUFFERED': '1'}


def is_flaxckpt(contender: str) -> bool:
  return contender.startswith('flaxckpt-')


def _is_legacy(contender: str) -> bool:
  return '-legacy-' in contender


def _is_async(contender: str) -> bool:
  return contender != 'flaxckpt-legacy-msgpack'


def _is_tmp(name: str) -> bool:
  return any(mark in name for mark in _TMP_MARKS)


# --- the saved values --------------------------------------------------------------------------


def expected_tree(step: int) -> dict[str, Any]:
  """The numpy tree saved at ``step``: about 5 MB in four dtypes and a 0-d leaf."""
  import ml_dtypes
  import numpy as np
  n = 768 * 1024
  return {
      'params': {
          'kernel': ((np.arange(n, dtype=np.float32) % 1000) * (step + 1)).reshape(768, 1024),
          'bias': ((np.arange(n // 2) % 128) + step).astype(ml_dtypes.bfloat16),
      },
      'opt': {
          'count': np.arange(n // 4, dtype=np.int32) + 7 * step,
          'mask': ((np.arange(n // 8) + step) % 256).astype(np.uint8),
          'step': np.asarray(step, np.int32),
      },
  }


def _differences(restored: Any, expected: Any, path: str = '') -> list[str]:
  """Where ``restored`` differs from ``expected`` (structure, dtype, shape or values)."""
  import numpy as np
  if isinstance(expected, dict):
    if not hasattr(restored, 'keys') or set(restored.keys()) != set(expected):
      keys = sorted(restored.keys()) if hasattr(restored, 'keys') else type(restored).__name__
      return [f'{path or "/"}: keys {keys} != {sorted(expected)}']
    return [d for k in expected for d in _differences(restored[k], expected[k], f'{path}/{k}')]
  try:
    got = np.asarray(restored)
  except Exception as e:  # noqa: BLE001
    return [f'{path}: not an array ({type(restored).__name__}: {e})']
  if got.dtype != expected.dtype or got.shape != expected.shape:
    return [f'{path}: {got.dtype}{list(got.shape)} != {expected.dtype}{list(expected.shape)}']
  if not np.array_equal(got, expected):
    return [f'{path}: values differ at {int(np.sum(got != expected))} positions']
  return []


# --- savers and readers ------------------------------------------------------------------------


class _Saver:
  """Saves steps the way one contender does; ``finish`` waits for a save in flight."""

  def __init__(self, contender: str, directory: str, cleanup: bool = False):
    self.directory = directory
    self._mngr = None
    if not _is_legacy(contender):
      self._lib = lib = _manager_lib(contender)
      self._mngr = lib.CheckpointManager(directory, options=lib.CheckpointManagerOptions(
          max_to_keep=KEEP, cleanup_tmp_directories=cleanup))
      return
    import flax
    import flaxckpt
    from flaxckpt.legacy import checkpoints
    self._checkpoints = checkpoints
    flax.config.update('flax_use_orbax_checkpointing', contender == 'flaxckpt-legacy-orbax')
    self._async_manager = (checkpoints.AsyncManager()
                           if contender == 'flaxckpt-legacy-msgpack-async' else None)
    self._checkpointer = (flaxckpt.AsyncCheckpointer(flaxckpt.PyTreeCheckpointHandler())
                          if contender == 'flaxckpt-legacy-orbax' else None)

  def save(self, step: int, tree: Any) -> None:
    if self._mngr is not None:
      self._mngr.save(step, args=self._lib.args.StandardSave(tree))
    else:
      self._checkpoints.save_checkpoint(self.directory, tree, step, keep=KEEP,
                                        async_manager=self._async_manager,
                                        orbax_checkpointer=self._checkpointer)

  def finish(self) -> None:
    if self._mngr is not None:
      self._mngr.wait_until_finished()
      self._mngr.close()
    elif self._async_manager is not None:
      self._async_manager.wait_previous_save()
    elif self._checkpointer is not None:
      self._checkpointer.wait_until_finished()


def _manager_lib(contender: str) -> Any:
  if contender == 'orbax-manager':
    import orbax.checkpoint as ocp
    return ocp
  import flaxckpt
  return flaxckpt


def list_steps(contender: str, directory: str) -> tuple[list[int], list[str]]:
  """(steps a fresh reader lists, the names of their files or directories)."""
  if _is_legacy(contender):
    from flaxckpt.legacy import checkpoints
    paths = checkpoints._all_checkpoints(directory)  # noqa: SLF001
    return [int(s) for s in checkpoints.available_steps(directory)], [
        os.path.basename(p) for p in paths]
  lib = _manager_lib(contender)
  mngr = lib.CheckpointManager(directory, options=lib.CheckpointManagerOptions(read_only=True))
  steps = list(mngr.all_steps())
  return steps, [str(s) for s in steps]


def restore_step(contender: str, directory: str, step: int) -> Any:
  """Restores ``step`` with a fresh reader and no target: dtypes come from the files."""
  if _is_legacy(contender):
    from flaxckpt.legacy import checkpoints
    return checkpoints.restore_checkpoint(directory, None, step=step)
  lib = _manager_lib(contender)
  mngr = lib.CheckpointManager(directory, options=lib.CheckpointManagerOptions(read_only=True))
  return mngr.restore(step)


def _flax_listing_problems(directory: str, steps: list[int]) -> list[tuple[str, str]]:
  """flax's own listing must show the same checkpoints as flaxckpt's."""
  from flax.training import checkpoints as flax_checkpoints
  paths = flax_checkpoints._all_checkpoints(directory)  # noqa: SLF001
  names = [os.path.basename(p) for p in paths]
  problems = [('tmp-listed', f'flax lists {name}') for name in names if _is_tmp(name)]
  if names != [f'checkpoint_{s}' for s in steps]:
    problems.append(('listed-step-unrestorable', f'flax lists {names}; flaxckpt {steps}'))
  return problems


# --- the check after a kill --------------------------------------------------------------------


def check_directory(contender: str, directory: str, committed: int | None) -> dict[str, Any]:
  """Checks a directory a killed writer left; ``committed`` is the latest step known to have
  committed before the kill (None if none was). Returns ``outcome`` (the first failure, in the
  order of OUTCOMES, or 'ok'), ``problems`` (every failure seen) and what was found."""
  problems: list[tuple[str, str]] = []
  left = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  found: dict[str, Any] = {'entries': left}
  try:
    steps, names = list_steps(contender, directory)
  except Exception as e:  # noqa: BLE001
    return {'outcome': 'reader-crash', 'problems': [('reader-crash', f'listing: {e!r}')],
            **found}
  found['listed'] = steps
  for name in names:
    if _is_tmp(name):
      problems.append(('tmp-listed', name))
  if _is_legacy(contender):
    problems += _flax_listing_problems(directory, steps)
  for step in steps:
    try:
      restored = restore_step(contender, directory, step)
    except Exception as e:  # noqa: BLE001
      problems.append(('listed-step-unrestorable', f'step {step}: {type(e).__name__}: '
                                                   f'{str(e)[:300]} [{_files(directory, step)}]'))
      continue
    for diff in _differences(restored, expected_tree(step))[:3]:
      problems.append(('wrong-values', f'step {step}: {diff}'))
  if committed is not None and committed not in steps:
    problems.append(('lost-latest', f'step {committed} committed before the kill; listed: '
                                    f'{steps}'))
  next_step = max(steps + [-1 if committed is None else committed]) + 1
  found['next_step'] = next_step
  problems += _continue(contender, directory, next_step)
  order = {name: i for i, name in enumerate(OUTCOMES)}
  outcome = min((p[0] for p in problems), key=order.__getitem__, default='ok')
  return {'outcome': outcome, 'problems': problems, **found}


def _files(directory: str, step: int) -> str:
  """What is left of the file or directory of ``step`` (for reports)."""
  path = next((os.path.join(directory, n) for n in (str(step), f'checkpoint_{step}')
               if os.path.exists(os.path.join(directory, n))), None)
  if path is None or not os.path.isdir(path):
    return f'{path}: a file' if path else 'nothing on disk'
  files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path)
                 for f in fs)
  return f'{len(files)} files left in {os.path.basename(path)}/: {", ".join(files[:8])}'


def _continue(contender: str, directory: str, step: int) -> list[tuple[str, str]]:
  """A new saver cleans up and saves ``step``; a fresh reader restores it exactly."""
  problems = []
  try:
    saver = _Saver(contender, directory, cleanup=True)
    if is_flaxckpt(contender) and not _is_legacy(contender):  # It cleans up as it starts.
      problems += [('tmp-not-cleaned', f'{name} after a manager started with '
                                       'cleanup_tmp_directories=True')
                   for name in sorted(os.listdir(directory)) if _is_tmp(name)]
    saver.save(step, _as_jax(expected_tree(step)))
    saver.finish()
  except Exception as e:  # noqa: BLE001
    return problems + [('cannot-continue', f'saving step {step}: {type(e).__name__}: '
                                           f'{str(e)[:400]}')]
  # Orbax's manager cleans up in the background; the legacy API's next save reuses or replaces
  # what the killed one left. Either way nothing may be left once the next save is done.
  if not problems:
    problems += [('tmp-not-cleaned', f'{name} after the next save')
                 for name in sorted(os.listdir(directory)) if _is_tmp(name)]
  try:
    steps, _ = list_steps(contender, directory)
    if step not in steps:
      return problems + [('cannot-continue', f'step {step} saved but not listed: {steps}')]
    diffs = _differences(restore_step(contender, directory, step), expected_tree(step))
  except Exception as e:  # noqa: BLE001
    return problems + [('cannot-continue', f'restoring step {step}: {type(e).__name__}: '
                                           f'{str(e)[:400]}')]
  return problems + [('cannot-continue', f'step {step}: {d}') for d in diffs[:3]]


def _as_jax(tree: Any) -> Any:
  import jax
  import jax.numpy as jnp
  return jax.tree_util.tree_map(jnp.asarray, tree)


# --- the writer process ------------------------------------------------------------------------


def _install_kill_hooks(directory: str, kill_at: str | None) -> collections.Counter:
  """Wraps the file-system calls that change ``directory`` (and ``fsync``); the call that
  ``kill_at`` names kills this process, before it runs. ``kill_at`` is ``<n>`` (the n-th call,
  from 1) or ``<name>:<n>`` (the n-th call of that name; names as in the returned counts, with
  ``@fd`` for calls relative to a directory descriptor, as ``shutil.rmtree`` makes them; or
  ``delete`` for any ``unlink``, ``remove`` or ``rmdir``). Returns the counts by call name."""
  import builtins
  import io
  root = os.path.realpath(directory)
  counts: collections.Counter = collections.Counter()
  lock = threading.Lock()
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

  def ours(args: tuple, kwargs: dict) -> bool:
    if kwargs.get('dir_fd') is not None or kwargs.get('src_dir_fd') is not None:
      return True  # shutil.rmtree's relative calls.
    return bool(args) and isinstance(args[0], (str, os.PathLike)) and os.path.realpath(
        os.fspath(args[0])).startswith(root)

  kill_name, _, kill_n = (kill_at or '').rpartition(':')
  matching = [0]  # Calls that count towards kill_at.

  def matches(name: str) -> bool:
    if kill_name == 'delete':
      return name.split('@')[0] in ('unlink', 'remove', 'rmdir')
    return not kill_name or name == kill_name

  def hit(name: str, target: Any) -> None:
    with lock:
      counts[name] += 1
      matching[0] += matches(name)
      n = matching[0]
    if kill_n and matches(name) and n == int(kill_n):
      where = os.path.relpath(os.fspath(target), root) if isinstance(
          target, (str, os.PathLike)) and not str(target).startswith('<fd>') else target
      sys.stdout.write(f'killop {n} {name} {where}\n')
      sys.stdout.flush()
      os.kill(os.getpid(), signal.SIGKILL)

  def wrap(module: Any, name: str, mutates: Any = None) -> None:
    func = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
      if name == 'fsync' or (ours(args, kwargs) and (mutates is None or mutates(args, kwargs))):
        at_fd = kwargs.get('dir_fd') is not None or kwargs.get('src_dir_fd') is not None
        hit(name + ('@fd' if at_fd else ''), (f'<fd>/{args[0]}' if at_fd else args[0]) if args
            else '?')
      return func(*args, **kwargs)

    setattr(module, name, wrapper)

  for name in ('mkdir', 'rename', 'replace', 'unlink', 'remove', 'rmdir', 'fsync'):
    wrap(os, name)
  wrap(os, 'open', lambda a, k: bool((a[1] if len(a) > 1 else k.get('flags', 0)) & write_flags))
  opens_for_write = lambda a, k: any(c in str(a[1] if len(a) > 1 else k.get('mode', 'r'))
                                     for c in 'wax+')
  wrap(builtins, 'open', opens_for_write)
  io.open = builtins.open
  return counts


def run_writer(contender: str, directory: str, kill_at: str | None, steps: int | None) -> None:
  """Saves steps 0, 1, ... (``steps`` of them, then waits and exits; else forever), printing
  ``returned <step>`` as each ``save`` returns. With ``kill_at``, dies on that file-system call;
  with ``steps`` it prints the number of calls made, ``ops <n>``, at the end."""
  import jax
  jax.numpy.zeros(1).block_until_ready()
  saver = _Saver(contender, directory)
  counts = _install_kill_hooks(directory, kill_at) if kill_at or steps else None
  print('ready', flush=True)
  step = 0
  while steps is None or step < steps:
    saver.save(step, _as_jax(expected_tree(step)))
    print(f'returned {step}', flush=True)
    step += 1
  saver.finish()
  print(f'ops {sum(counts.values())} {dict(counts)}', flush=True)


# --- the checker process -----------------------------------------------------------------------


def run_checker() -> None:
  """Answers JSON requests on stdin, one a line: {"contender", "directory", "committed"}."""
  import jax
  jax.numpy.zeros(1).block_until_ready()
  print(_REPLY + json.dumps({'ready': True}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    try:
      result = check_directory(request['contender'], request['directory'],
                               request['committed'])
    except Exception as e:  # noqa: BLE001
      result = {'outcome': 'reader-crash', 'problems': [('reader-crash', repr(e)[:400])]}
    print(_REPLY + json.dumps(result, default=str), flush=True)


class _Checker:
  """A long-lived checker process (jax imported once); restarted after a crash or hang."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._proc: subprocess.Popen | None = None
    self._lines: list[str] = []
    self._cond = threading.Condition()

  def _start(self) -> None:
    self._lines = []
    self._stderr = open(os.path.join(self._workdir, f'checker-{id(self)}.log'), 'a')  # noqa: SIM115
    self._proc = _spawn(['--checker'], stdin=subprocess.PIPE, stderr=self._stderr)
    self._thread = threading.Thread(target=self._pump, args=(self._proc,), daemon=True)
    self._thread.start()
    if self._await(CHECK_TIMEOUT) is None:
      raise RuntimeError('The checker process did not start.')

  def _pump(self, proc: subprocess.Popen) -> None:
    for line in proc.stdout:
      if line.startswith(_REPLY):
        with self._cond:
          self._lines.append(line[len(_REPLY):])
          self._cond.notify_all()
    with self._cond:
      self._cond.notify_all()

  def _await(self, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    with self._cond:
      while not self._lines and self._proc.poll() is None and time.monotonic() < deadline:
        self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
      return json.loads(self._lines.pop(0)) if self._lines else None

  def check(self, contender: str, directory: str, committed: int | None) -> dict[str, Any]:
    if self._proc is None or self._proc.poll() is not None:
      self._start()
    request = {'contender': contender, 'directory': directory, 'committed': committed}
    self._proc.stdin.write(json.dumps(request) + '\n')
    self._proc.stdin.flush()
    result = self._await(CHECK_TIMEOUT)
    if result is None:
      outcome = 'hang' if self._proc.poll() is None else 'reader-crash'
      detail = (f'no answer within {CHECK_TIMEOUT} s' if outcome == 'hang'
                else f'checker exited with {self._proc.returncode}')
      self.close()
      return {'outcome': outcome, 'problems': [(outcome, detail)]}
    return result

  def close(self) -> None:
    if self._proc is not None:
      if self._proc.poll() is None:
        self._proc.kill()
      self._proc.wait()
      self._thread.join(10)
      for file in (self._proc.stdin, self._proc.stdout, self._stderr):
        file.close()
      self._proc = None


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen:
  env = {**os.environ, **_ENV}
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                          stdout=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


# --- trials ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
  """One trial's plan (a function of seed, contender and index) and what came of it."""
  contender: str
  index: int
  seed: int
  mode: str = ''  # 'time' or 'op'.
  after_returns: int = 0  # time: kill this long after the after_returns-th save returned.
  delay_ms: int = 0
  kill_at_op: str = ''  # op: kill just before this file-system call (see _install_kill_hooks).
  outcome: str = ''
  problems: list = dataclasses.field(default_factory=list)
  returned: int = 0  # How many saves had returned at the kill.
  committed: int | None = None  # The latest step known to have committed then.
  killed_on: str = ''  # op: the call the kill landed on.
  listed: list = dataclasses.field(default_factory=list)
  entries: list = dataclasses.field(default_factory=list)  # What the directory held.
  seconds: float = 0.0


def plan_trial(contender: str, index: int, seed: int, ops_per_save: float) -> Trial:
  rng = random.Random(f'{seed}/{contender}/{index}')
  trial = Trial(contender, index, seed)
  if rng.random() < 0.5:
    trial.mode = 'time'
    trial.after_returns = rng.randint(0, 5)
    trial.delay_ms = rng.randint(0, 300)
  else:
    trial.mode = 'op'
    trial.kill_at_op = str(rng.randint(1, max(2, int(ops_per_save * (KEEP + 3)))))
  return trial


def _committed(contender: str, returned: int) -> int | None:
  """The latest step known to have committed once ``returned`` saves returned: the last one
  for a synchronous save; for an async one, the one before it (each save waits for the
  previous one to commit before it starts)."""
  last = returned - 1 - (1 if _is_async(contender) else 0)
  return last if last >= 0 else None


class _Writer:
  """A writer process and the lines it printed."""

  def __init__(self, contender: str, directory: str, log: str, kill_at: str | None = None,
               steps: int | None = None):
    args = ['--writer', contender, '--dir', directory]
    args += ['--kill-at-op', kill_at] if kill_at else []
    args += ['--steps', str(steps)] if steps else []
    self._stderr = open(log, 'w')  # noqa: SIM115
    self.proc = _spawn(args, stderr=self._stderr)
    self.lines: list[str] = []
    self._cond = threading.Condition()
    self._thread = threading.Thread(target=self._pump, daemon=True)
    self._thread.start()

  def _pump(self) -> None:
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line.strip())
        self._cond.notify_all()
    with self._cond:
      self._cond.notify_all()

  def returned(self) -> int:
    with self._cond:
      return sum(line.startswith('returned ') for line in self.lines)

  def wait_for(self, returns: int, timeout: float) -> bool:
    """Waits until ``returns`` saves returned (0: until it is ready); False if it died or
    timed out first."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while time.monotonic() < deadline and self.proc.poll() is None:
        if 'ready' in self.lines and self.returned() >= returns:
          return True
        self._cond.wait(0.05)
      return 'ready' in self.lines and self.returned() >= returns

  def kill(self) -> None:
    if self.proc.poll() is None:
      os.kill(self.proc.pid, signal.SIGKILL)

  def join(self, timeout: float) -> bool:
    """Waits for the process to end; False if it had to be killed."""
    try:
      self.proc.wait(timeout)
      clean = True
    except subprocess.TimeoutExpired:
      self.kill()
      self.proc.wait()
      clean = False
    self._thread.join(10)
    self.proc.stdout.close()
    self._stderr.close()
    return clean


def _stderr_tail(log: str) -> str:
  with open(log) as f:
    return f.read()[-600:]


def calibrate(contender: str, workdir: str) -> float:
  """File-system calls per save of ``contender``, from an unkilled run of 2 * KEEP saves."""
  directory = os.path.join(workdir, f'calibrate-{contender}')
  log = directory + '.log'
  writer = _Writer(contender, directory, log, steps=2 * KEEP)
  writer.join(WRITER_TIMEOUT * 2)
  ops = [line for line in writer.lines if line.startswith('ops ')]
  if not ops:
    raise RuntimeError(f'Calibrating {contender} failed:\n{_stderr_tail(log)}')
  return int(ops[0].split()[1]) / (2 * KEEP)


def run_trial(trial: Trial, workdir: str, checker: _Checker) -> Trial:
  """Runs the writer of ``trial`` to its kill, then the check."""
  start = time.monotonic()
  directory = os.path.join(workdir, f'{trial.contender}-{trial.index}')
  log = directory + '.log'
  if trial.mode == 'time':
    writer = _Writer(trial.contender, directory, log)
    if writer.wait_for(trial.after_returns, WRITER_TIMEOUT):
      time.sleep(trial.delay_ms / 1000)
    killed = writer.proc.poll() is None
    writer.kill()
    writer.join(10)
  else:
    writer = _Writer(trial.contender, directory, log, kill_at=trial.kill_at_op)
    killed = writer.join(WRITER_TIMEOUT) and writer.proc.returncode == -signal.SIGKILL
    trial.killed_on = next((line[len('killop '):] for line in writer.lines
                            if line.startswith('killop ')), '')
  trial.returned = writer.returned()
  trial.committed = _committed(trial.contender, trial.returned)
  if not killed or 'ready' not in writer.lines:
    trial.outcome = 'writer-error'
    trial.problems = [('writer-error', f'not killed as planned (exit {writer.proc.returncode}): '
                                       f'{_stderr_tail(log)}')]
  else:
    result = checker.check(trial.contender, directory, trial.committed)
    trial.outcome = result['outcome']
    trial.problems = [tuple(p) for p in result.get('problems', [])]
    trial.listed = result.get('listed', [])
    trial.entries = result.get('entries', [])
  trial.seconds = round(time.monotonic() - start, 2)
  return trial


def run_trials(contenders: list[str], trials: int, seed: int, workdir: str, start: int = 0,
               jobs: int = 2, progress: bool = False) -> list[Trial]:
  """Runs ``trials`` seeded trials (indices ``start``...) per contender, ``jobs`` at a time,
  in directories under ``workdir``; returns them in plan order."""
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    per_save = dict(zip(contenders, pool.map(lambda c: calibrate(c, workdir), contenders)))
  plans = [plan_trial(c, i, seed, per_save[c]) for i in range(start, start + trials)
           for c in contenders]
  return run_plans(plans, workdir, jobs, progress)


def run_plans(plans: list[Trial], workdir: str, jobs: int = 2,
              progress: bool = False) -> list[Trial]:
  """Runs the planned trials, ``jobs`` at a time; returns them in order."""
  checkers = [_Checker(workdir) for _ in range(jobs)]
  free = list(checkers)
  lock = threading.Lock()
  done = [0]

  def one(trial: Trial) -> Trial:
    with lock:
      checker = free.pop()
    try:
      run_trial(trial, workdir, checker)
    finally:
      with lock:
        free.append(checker)
        done[0] += 1
    if progress:
      print(f'[{done[0]}/{len(plans)}] {describe(trial)}: {trial.outcome}', file=sys.stderr,
            flush=True)
    return trial

  try:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      return list(pool.map(one, plans))
  finally:
    for checker in checkers:
      checker.close()


def describe(trial: Trial) -> str:
  """Which trial, and where its kill landed."""
  if trial.mode == 'time':
    how = f'{trial.delay_ms} ms after save {trial.after_returns} returned'
  else:
    how = f'killed on call {trial.killed_on or trial.kill_at_op + " (not reached)"}'
  return (f'{trial.contender} seed {trial.seed} trial {trial.index} ({how}; '
          f'{trial.returned} saves returned)')


def table(results: list[Trial]) -> str:
  """Contenders by outcome counts."""
  contenders = list(dict.fromkeys(t.contender for t in results))
  seen = [o for o in OUTCOMES if any(t.outcome == o for t in results)]
  width = max(len(c) for c in contenders + ['contender'])
  rows = [f'{"contender":<{width}}  {"trials":>6}  ' + '  '.join(f'{o:>{len(o)}}' for o in seen)]
  for contender in contenders:
    counts = collections.Counter(t.outcome for t in results if t.contender == contender)
    rows.append(f'{contender:<{width}}  {sum(counts.values()):>6}  ' +
                '  '.join(f'{counts[o]:>{len(o)}}' for o in seen))
  return '\n'.join(rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trials', type=int, default=100, help='trials per contender')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--start', type=int, default=0, help='index of the first trial')
  parser.add_argument('--contenders', nargs='+', choices=CONTENDERS, default=list(CONTENDERS))
  parser.add_argument('--jobs', type=int, default=2, help='trials run at the same time')
  parser.add_argument('--json', help='write every trial to this file')
  parser.add_argument('--keep', action='store_true', help='keep the work directory')
  parser.add_argument('--writer', choices=CONTENDERS, help=argparse.SUPPRESS)
  parser.add_argument('--dir', help=argparse.SUPPRESS)
  parser.add_argument('--kill-at-op', help=argparse.SUPPRESS)
  parser.add_argument('--steps', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--checker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.writer:
    run_writer(args.writer, args.dir, args.kill_at_op, args.steps)
    return 0
  if args.checker:
    run_checker()
    return 0
  start = time.monotonic()
  workdir = tempfile.mkdtemp(prefix='drill-crash-')
  try:
    results = run_trials(args.contenders, args.trials, args.seed, workdir, args.start,
                         args.jobs, progress=True)
  finally:
    if not args.keep:
      import shutil
      shutil.rmtree(workdir, ignore_errors=True)
  elapsed = time.monotonic() - start
  print(table(results))
  for trial in results:
    if trial.outcome != 'ok':
      print(f'{describe(trial)}: {trial.outcome}: {trial.problems[0][1] if trial.problems else ""}')
  print(f'{len(results)} trials in {elapsed:.0f} s (seed {args.seed}, {args.jobs} at a time)'
        + (f'; work directory {workdir}' if args.keep else ''))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([dataclasses.asdict(t) for t in results], f, indent=1)
  bad = [t for t in results if is_flaxckpt(t.contender) and t.outcome != 'ok']
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
