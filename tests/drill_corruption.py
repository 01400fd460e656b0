"""Corruption drill: damage one file of a saved checkpoint and check what restore makes of it.

Each trial copies a pristine checkpoint, picks one of its files uniformly (data, metadata,
manifests, checksum files, the msgpack sidecar: every file) and damages it one way: truncate it,
delete it, flip 1-8 bytes, or zero it. Each contender then restores it, with a target and
without, in a long-lived worker process, and ``flaxckpt verify`` checks it. A restore must
raise a clear error (one that names the checkpoint directory or a path under it) or return the
exact original values; returning different values (silent-wrong), killing the process (crash)
or running past the deadline (hang) fails the drill, and so does a checkpoint that restore
rejects but verify passes (verify-miss).

Contenders (a writer and a reader of one checkpoint):

- ``flaxckpt``, ``flaxckpt-zarr``: written by flaxckpt (OCDBT; per-array zarr folders), read
  by flaxckpt.
- ``flaxckpt-msgpack``: ``flaxckpt.legacy.checkpoints.save_checkpoint`` with Orbax
  checkpointing off (a flax msgpack file and its ``.<name>.crc32c`` sidecar), read by
  ``restore_checkpoint(dir, target, step=...)``.
- ``orbax``: written and read by orbax-checkpoint; for comparison, never fails the drill.
- ``flaxckpt-reads-orbax``: the same damaged Orbax checkpoints read by flaxckpt. Orbax writes
  no checksums, so silent-wrong values are expected there and reported; any other bad outcome
  fails the drill.

Run ``python tests/drill_corruption.py --trials 200`` (``make drill``); ``--only SEED`` replays
single trials, as the list of bad trials prints them. ``run_trials`` is what the test calls.
A seed picks the same file and damage in every run wherever the saved files are the same;
Orbax splits its data into a different number of OCDBT files from save to save (its writes
race), so its rows vary a little between runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

OUTCOMES = ('exact', 'error', 'silent-wrong', 'unclear-error', 'crash', 'hang')
DAMAGES = ('truncate', 'delete', 'flip', 'zero')
MODES = ('target', 'no-target')
MSGPACK_STEP = 3
DEADLINE_S = 20.0  # Per restore or verify; past it the worker is killed: a hang.
STARTUP_S = 180.0  # A worker's imports on a busy machine.


@dataclasses.dataclass(frozen=True)
class Contender:
  name: str
  writer: str  # The pristine checkpoint it reads: 'flaxckpt', 'flaxckpt-zarr', 'msgpack', 'orbax'.
  reader: str  # 'flaxckpt', 'legacy' or 'orbax'.
  gated: bool = True  # Whether its bad outcomes fail the drill.
  expected_silent_wrong: bool = False  # No checksums exist: silent-wrong is reported, not bad.


CONTENDERS = {c.name: c for c in (
    Contender('flaxckpt', 'flaxckpt', 'flaxckpt'),
    Contender('flaxckpt-zarr', 'flaxckpt-zarr', 'flaxckpt'),
    Contender('flaxckpt-msgpack', 'msgpack', 'legacy'),
    Contender('orbax', 'orbax', 'orbax', gated=False),
    Contender('flaxckpt-reads-orbax', 'orbax', 'flaxckpt', expected_silent_wrong=True),
)}


# --- the tree, and telling a restore's result apart -------------------------------------------


def make_tree() -> dict[str, Any]:
  """Leaves of several dtypes and sizes (a 1 MiB kernel in 4 chunks, bfloat16 in 5, scalars,
  a string), some jax arrays and some numpy."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(20240607)
  return {
      'params': {
          'dense': {'kernel': jnp.asarray(rng.standard_normal((256, 1024), dtype=np.float32)),
                    'bias': rng.standard_normal(1024).astype(np.float32)},
          'embed': jnp.asarray(rng.standard_normal((300, 64)), jnp.bfloat16)},
      'opt_state': {'count': np.arange(7, dtype=np.int32) * 1000 + 7,
                    'mu': jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)},
      'step': 1234, 'lr': 3e-4, 'name': 'drill-run'}


def chunk_sizes() -> dict[tuple[str, ...], int]:
  """``chunk_byte_size`` of the leaves saved in several chunks."""
  return {('params', 'dense', 'kernel'): 256 << 10, ('params', 'embed'): 8 << 10}


def _flat(tree: Any) -> dict[str, Any]:
  import jax
  pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): leaf for path, leaf in pairs}


def compare(original: Any, restored: Any) -> str | None:
  """None when ``restored`` holds exactly ``original``'s values (same tree paths; arrays of the
  same shape, dtype and bytes, jax or numpy alike; equal scalars and strings of the same
  type); else what differs first."""
  import numpy as np
  want, got = _flat(original), _flat(restored)
  if set(want) != set(got):
    return (f'tree paths differ: missing {sorted(set(want) - set(got))[:4]}, '
            f'extra {sorted(set(got) - set(want))[:4]}')
  for key, expected in want.items():
    value = got[key]
    if isinstance(expected, (str, int, float)):
      if type(value) is not type(expected) or value != expected:
        return f'{key}: {value!r:.60} ({type(value).__name__}) instead of {expected!r}'
      continue
    if not hasattr(value, 'shape') or not hasattr(value, 'dtype'):
      return f'{key}: a {type(value).__name__} instead of an array'
    expected, value = np.asarray(expected), np.asarray(value)
    if value.shape != expected.shape or value.dtype != expected.dtype:
      return (f'{key}: {value.dtype}{list(value.shape)} instead of '
              f'{expected.dtype}{list(expected.shape)}')
    if value.tobytes() != expected.tobytes():
      wrong = np.count_nonzero(value.view(np.uint8) != expected.view(np.uint8))
      return f'{key}: {wrong} of {expected.nbytes} bytes differ'
  return None


def classify(original: Any, root: pathlib.Path | str, result: Any = None,
             error: BaseException | None = None) -> dict[str, Any]:
  """The outcome of one restore of the checkpoint at ``root``: it returned ``result`` or raised
  ``error``. An error is clear when its message names ``root`` (every file of the checkpoint
  lies under it), so that a user can tell which checkpoint is damaged."""
  if error is not None:
    message = str(error)
    # The root itself, or a path under it (not a sibling such as <root>0 or <root>.tmp).
    names_root = re.search(re.escape(str(root)) + r'(?![\w-]|\.[\w-])', message) is not None
    clear = isinstance(error, Exception) and names_root
    return {'outcome': 'error' if clear else 'unclear-error',
            'error_type': type(error).__name__, 'detail': message}
  difference = compare(original, result)
  if difference is None:
    return {'outcome': 'exact'}
  return {'outcome': 'silent-wrong', 'detail': difference}


# --- the worker: saves, restores and verifies where a crash or a hang cannot hurt the drill ----


class _Libraries:
  """What the worker does, with the libraries imported once."""

  def __init__(self):
    import flax
    import jax
    import numpy as np
    import orbax.checkpoint as orbax
    import flaxckpt
    from flaxckpt import _verify
    from flaxckpt.legacy import checkpoints
    flax.config.update('flax_use_orbax_checkpointing', False)
    self.jax, self.np, self.orbax, self.flaxckpt = jax, np, orbax, flaxckpt
    self.verify_fn, self.checkpoints = _verify.verify, checkpoints
    self.tree = make_tree()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(x: Any) -> Any:
      if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
      if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)  # Restores as numpy.
      return type(x)()  # 0, 0.0, '': a target leaf the right values must replace.

    self.abstract = jax.tree.map(abstract, self.tree)
    self.zeros = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype) if hasattr(x, 'shape') else type(x)(), self.tree)

  def save_args(self, lib: Any) -> Any:
    sizes = chunk_sizes()
    pairs, treedef = self.jax.tree_util.tree_flatten_with_path(self.tree)
    return self.jax.tree_util.tree_unflatten(treedef, [
        lib.SaveArgs(chunk_byte_size=sizes.get(tuple(k.key for k in path)))
        for path, _ in pairs])

  def save(self, writer: str, root: pathlib.Path) -> None:
    if writer == 'msgpack':
      self.checkpoints.save_checkpoint(root, self.tree, step=MSGPACK_STEP)
      return
    lib = self.orbax if writer == 'orbax' else self.flaxckpt
    options = {'use_ocdbt': False} if writer == 'flaxckpt-zarr' else {}
    checkpointer = lib.PyTreeCheckpointer(**options)
    checkpointer.save(root, args=lib.args.PyTreeSave(self.tree, save_args=self.save_args(lib)))

  def restore(self, reader: str, mode: str, root: pathlib.Path) -> Any:
    target = mode == 'target'
    if reader == 'legacy':
      return self.checkpoints.restore_checkpoint(root, self.zeros if target else None,
                                                 step=MSGPACK_STEP)
    if reader == 'orbax':
      if not target:
        return self.orbax.PyTreeCheckpointer().restore(root)
      restore_args = self.orbax.checkpoint_utils.construct_restore_args(self.abstract)
      return self.orbax.PyTreeCheckpointer().restore(root, args=self.orbax.args.PyTreeRestore(
          item=self.abstract, restore_args=restore_args))
    if not target:
      return self.flaxckpt.PyTreeCheckpointer().restore(root)
    return self.flaxckpt.StandardCheckpointer().restore(root, self.abstract)

  def handle(self, request: dict[str, Any]) -> dict[str, Any]:
    op, root = request['op'], pathlib.Path(request.get('root', ''))
    if op == 'save':
      self.save(request['writer'], root)
      return {}
    if op == 'restore':
      try:
        result = self.restore(request['reader'], request['mode'], root)
      except Exception as e:  # What restore raises is what the drill judges.
        return classify(self.tree, root, error=e)
      return classify(self.tree, root, result=result)
    if op == 'verify':
      try:
        return {'problems': [str(p) for p in self.verify_fn(root)]}
      except Exception as e:  # verify reports problems; raising is a failure of its own.
        return {'verify_error': f'{type(e).__name__}: {e}'}
    if op == 'misbehave':  # For the test of the drill itself.
      if request['how'] == 'crash':
        os.abort()
      time.sleep(3600)
    raise ValueError(f'unknown request {op!r}')


def _worker_main() -> None:
  """Answers one JSON request per stdin line with one JSON line on the original stdout (the
  libraries' own output goes to stderr)."""
  replies = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)
  libraries = _Libraries()
  replies.write('{"ready": true}\n')
  replies.flush()
  for line in sys.stdin:
    try:
      reply = libraries.handle(json.loads(line))
    except Exception:  # A broken request or save: the parent shows it and stops.
      reply = {'internal_error': traceback.format_exc()}
    replies.write(json.dumps(reply) + '\n')
    replies.flush()


class WorkerFailure(Exception):
  """The worker died or missed its deadline; ``outcome`` is 'crash' or 'hang'."""

  def __init__(self, outcome: str, detail: str):
    super().__init__(f'{outcome}: {detail}')
    self.outcome, self.detail = outcome, detail


class _Worker:
  """The worker process, restarted after each crash or hang."""

  def __init__(self, log: pathlib.Path):
    self._log = log
    self._proc: subprocess.Popen | None = None
    self._buffer = b''
    self.restarts = 0

  def _start(self) -> None:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
    with open(self._log, 'ab') as log:
      self._proc = subprocess.Popen([sys.executable, __file__, '--worker'], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, env=env)
    self._buffer = b''
    if 'ready' not in self._read(STARTUP_S, 'starting'):
      raise RuntimeError('the drill worker did not start')

  def call(self, request: dict[str, Any], deadline: float = DEADLINE_S) -> dict[str, Any]:
    if self._proc is None:
      self._start()
    try:
      self._proc.stdin.write((json.dumps(request) + '\n').encode())
      self._proc.stdin.flush()
    except BrokenPipeError:
      pass  # Dead already: _read reports how it ended.
    reply = self._read(deadline, request['op'])
    if 'internal_error' in reply:
      raise RuntimeError(f'the drill worker failed on {request}:\n{reply["internal_error"]}')
    return reply

  def _read(self, deadline: float, what: str) -> dict[str, Any]:
    end = time.monotonic() + deadline
    fd = self._proc.stdout.fileno()
    while b'\n' not in self._buffer:
      remaining = end - time.monotonic()
      if remaining <= 0:
        self._stop()
        raise WorkerFailure('hang', f'{what} ran past {deadline:.0f} s')
      if select.select([fd], [], [], remaining)[0]:
        data = os.read(fd, 1 << 16)
        if not data:
          code = self._proc.wait()
          self._discard()
          raise WorkerFailure('crash', f'{what}: the process ended with status {code}; '
                              f'stderr ends {self._log_tail()!r}')
        self._buffer += data
    line, self._buffer = self._buffer.split(b'\n', 1)
    return json.loads(line)

  def _log_tail(self) -> str:
    try:
      return self._log.read_bytes()[-300:].decode(errors='replace')
    except OSError:
      return ''

  def _stop(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._discard()

  def _discard(self) -> None:
    """Forgets the ended process (the next call starts another)."""
    for pipe in (self._proc.stdin, self._proc.stdout):
      try:
        pipe.close()
      except OSError:
        pass  # A broken pipe to a dead process.
    self._proc = None
    self.restarts += 1

  def close(self) -> None:
    if self._proc is not None:
      try:
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self._proc.kill()
        self._proc.wait()
      self._proc.stdout.close()
      self._proc = None


# --- damage --------------------------------------------------------------------------------


def checkpoint_files(root: pathlib.Path) -> list[pathlib.Path]:
  """Every file under ``root`` in an order that does not depend on the random names OCDBT
  gives its data files (folder, then size, then name), so a seed picks the same file again."""
  files = [p for p in root.rglob('*') if p.is_file()]
  return sorted(files, key=lambda p: (str(p.parent.relative_to(root)), p.stat().st_size, p.name))


def plan_damage(rng: random.Random, files: list[pathlib.Path], root: pathlib.Path
                ) -> dict[str, Any]:
  """One file and one damage to it, from ``rng``."""
  file = rng.choice(files)
  size = file.stat().st_size
  damage = rng.choice(DAMAGES) if size else 'delete'
  plan: dict[str, Any] = {'file': str(file.relative_to(root)), 'size': size, 'damage': damage}
  if damage == 'truncate':
    draw = rng.random()
    plan['length'] = 0 if draw < 0.2 else size - 1 if draw < 0.4 else rng.randrange(size)
  elif damage == 'flip':
    offsets = sorted(rng.sample(range(size), min(size, rng.randint(1, 8))))
    plan['flips'] = [(offset, rng.randint(1, 255)) for offset in offsets]
  return plan


def apply_damage(root: pathlib.Path, plan: dict[str, Any]) -> None:
  path = root / plan['file']
  if plan['damage'] == 'delete':
    path.unlink()
  elif plan['damage'] == 'truncate':
    os.truncate(path, plan['length'])
  elif plan['damage'] == 'zero':
    path.write_bytes(bytes(plan['size']))
  else:
    data = bytearray(path.read_bytes())
    for offset, mask in plan['flips']:
      data[offset] ^= mask
    path.write_bytes(bytes(data))


def describe_damage(plan: dict[str, Any]) -> str:
  if plan['damage'] == 'truncate':
    return f'truncate {plan["size"]} -> {plan["length"]} bytes'
  if plan['damage'] == 'flip':
    return 'flip ' + ', '.join(f'@{offset}^{mask:#04x}' for offset, mask in plan['flips'])
  return f'{plan["damage"]} ({plan["size"]} bytes)'


# --- trials --------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
  contender: str
  seed: int
  file: str
  damage: str
  restores: dict[str, dict[str, Any]]  # mode -> classify()'s dict, or crash/hang.
  problems: list[str] | None  # verify's problems; None when verify itself failed.
  verify_failure: str | None = None

  @property
  def rejected(self) -> bool:
    return any(r['outcome'] in ('error', 'unclear-error') for r in self.restores.values())

  @property
  def verify_miss(self) -> bool:
    return self.rejected and self.problems == []

  def bad(self, contender: Contender) -> list[str]:
    """What in this trial fails the drill (for ``contender``'s rules)."""
    allowed = {'exact', 'error'} | ({'silent-wrong'} if contender.expected_silent_wrong else set())
    found = [f'{mode}: {r["outcome"]}' for mode, r in self.restores.items()
             if r['outcome'] not in allowed]
    if self.verify_miss:
      found.append('verify-miss')
    if self.verify_failure:
      found.append(f'verify failed ({self.verify_failure})')
    return found


def run_trials(contenders: list[str], trials: int = 200, seed: int = 0,
               only: list[int] | None = None, deadline: float = DEADLINE_S,
               progress: Callable[[str], None] | None = None) -> list[Trial]:
  """Runs ``trials`` trials (seeds ``seed`` onwards, or the seeds in ``only``) per contender;
  contenders reading one writer's checkpoint see the same damage at the same seed."""
  seeds = list(only) if only else list(range(seed, seed + trials))
  by_writer: dict[str, list[Contender]] = collections.defaultdict(list)
  for name in contenders:
    by_writer[CONTENDERS[name].writer].append(CONTENDERS[name])
  results: list[Trial] = []
  with tempfile.TemporaryDirectory(prefix='drill-corruption-') as tmp:
    work = pathlib.Path(tmp).resolve()
    worker = _Worker(work / 'worker.log')
    try:
      for writer, readers in by_writer.items():
        pristine = work / 'pristine' / writer
        worker.call({'op': 'save', 'writer': writer, 'root': str(pristine)}, STARTUP_S)
        files = checkpoint_files(pristine)
        started = time.monotonic()
        for trial_seed in seeds:
          results.extend(_trial(worker, writer, readers, pristine, files, trial_seed,
                                work / f'{writer}-{trial_seed}', deadline))
        if progress is not None:
          progress(f'{writer}: {len(seeds)} trials in {time.monotonic() - started:.1f} s '
                   f'({", ".join(c.name for c in readers)})')
    finally:
      worker.close()
  return results


def _trial(worker: _Worker, writer: str, readers: list[Contender], pristine: pathlib.Path,
           files: list[pathlib.Path], trial_seed: int, root: pathlib.Path,
           deadline: float) -> list[Trial]:
  plan = plan_damage(random.Random(f'{writer}/{trial_seed}'), files, pristine)
  shutil.copytree(pristine, root)
  try:
    apply_damage(root, plan)
    outcomes = {}
    for contender in readers:
      outcomes[contender.name] = {mode: _call_restore(worker, contender, mode, root, deadline)
                                  for mode in MODES}
    problems, verify_failure = None, None
    try:
      reply = worker.call({'op': 'verify', 'root': str(root)}, deadline)
      problems, verify_failure = reply.get('problems'), reply.get('verify_error')
    except WorkerFailure as e:
      verify_failure = str(e)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return [Trial(contender.name, trial_seed, plan['file'], describe_damage(plan),
                outcomes[contender.name], problems, verify_failure) for contender in readers]


def _call_restore(worker: _Worker, contender: Contender, mode: str, root: pathlib.Path,
                  deadline: float) -> dict[str, Any]:
  try:
    return worker.call({'op': 'restore', 'reader': contender.reader, 'mode': mode,
                        'root': str(root)}, deadline)
  except WorkerFailure as e:
    return {'outcome': e.outcome, 'detail': e.detail}


# --- report --------------------------------------------------------------------------------


def _short(message: str, limit: int = 150) -> str:
  """A message with the trial's checkpoint directory as <ckpt>, data file names as <hash> and
  numbers as N, so that messages differing only in them group together."""
  text = ' '.join(message.split())
  text = re.sub(r'/[^\s\'",)]*drill-corruption-[^/\s\'",)]*/[^/\s\'",)]+', '<ckpt>', text)
  text = re.sub(r'\b[0-9a-f]{32}\b', '<hash>', text)
  text = re.sub(r'0x[0-9a-f]+|\b\d+\b', 'N', text)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def report(results: list[Trial], contenders: list[str]) -> tuple[str, bool]:
  """The outcome table, the errors seen and the bad trials; and whether the drill passed."""
  by_contender = {name: [t for t in results if t.contender == name] for name in contenders}
  header = f'{"contender":<22}{"restore":<11}{"trials":>7}' + ''.join(
      f'{o:>14}' for o in OUTCOMES)
  lines = ['Restore outcomes', header, '-' * len(header)]
  for name, mine in by_contender.items():
    for mode in MODES:
      counts = collections.Counter(t.restores[mode]['outcome'] for t in mine)
      lines.append(f'{name:<22}{mode:<11}{len(mine):>7}' + ''.join(
          f'{counts[o]:>14}' for o in OUTCOMES))
  lines += ['', 'verify (flagged: reported a problem; rejected: a restore raised; miss: rejected '
            'but not flagged)',
            f'{"contender":<22}{"flagged":>9}{"rejected":>10}{"misses":>8}{"flagged-exact":>15}'
            f'{"silent-wrong-unflagged":>24}{"verify-failed":>15}']
  for name, mine in by_contender.items():
    exact = [t for t in mine if t.problems and all(
        r['outcome'] == 'exact' for r in t.restores.values())]
    unflagged_wrong = [t for t in mine if t.problems == [] and any(
        r['outcome'] == 'silent-wrong' for r in t.restores.values())]
    lines.append(f'{name:<22}{sum(bool(t.problems) for t in mine):>9}'
                 f'{sum(t.rejected for t in mine):>10}{sum(t.verify_miss for t in mine):>8}'
                 f'{len(exact):>15}{len(unflagged_wrong):>24}'
                 f'{sum(bool(t.verify_failure) for t in mine):>15}')
  lines += ['', 'Errors raised (type: message; paths under the checkpoint as <ckpt>, numbers as N)']
  for name, mine in by_contender.items():
    seen = collections.Counter(
        f'{r["error_type"]}{"" if r["outcome"] == "error" else " [UNCLEAR]"}: '
        f'{_short(r["detail"])}'
        for t in mine for r in t.restores.values() if r['outcome'] in ('error', 'unclear-error'))
    lines.append(f'  {name}: {len(seen)} kinds')
    lines += [f'    {count:>5}  {text}' for text, count in seen.most_common()]
  failing, informing = [], []
  for t in results:
    contender = CONTENDERS[t.contender]
    bad = t.bad(contender)
    notes = bad + [f'{mode}: silent-wrong (expected: no checksums)'
                   for mode, r in t.restores.items()
                   if contender.expected_silent_wrong and r['outcome'] == 'silent-wrong']
    if not notes:
      continue
    details = '; '.join(f'{mode}: {_short(r.get("detail", ""), 300)}'
                        for mode, r in t.restores.items() if r['outcome'] not in ('exact', 'error'))
    line = (f'{t.contender} --only {t.seed}: {t.file}, {t.damage}: {", ".join(notes)}'
            + (f' -- {details}' if details else ''))
    (failing if contender.gated and bad else informing).append(line)
  lines += ['', f'Failing trials ({len(failing)}; replay one with --contenders NAME --only SEED)']
  lines += [f'  {line}' for line in failing] or ['  none']
  lines += ['', f'Other trials neither exact nor a clear error (not failures; {len(informing)})']
  lines += [f'  {line}' for line in informing] or ['  none']
  return '\n'.join(lines), not failing


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trials', type=int, default=200, help='trials per contender')
  parser.add_argument('--seed', type=int, default=0, help='seed of the first trial')
  parser.add_argument('--only', type=int, nargs='+', help='run just these trial seeds')
  parser.add_argument('--contenders', nargs='+', default=list(CONTENDERS),
                      choices=list(CONTENDERS))
  parser.add_argument('--deadline', type=float, default=DEADLINE_S,
                      help='seconds a restore or verify may take before it counts as a hang')
  parser.add_argument('--json', type=pathlib.Path, help='write every trial here')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker_main()
    return 0
  started = time.monotonic()
  results = run_trials(args.contenders, args.trials, args.seed, args.only, args.deadline,
                       progress=lambda line: print(line, flush=True))
  text, passed = report(results, args.contenders)
  print()
  print(text)
  print(f'\n{len(results)} trials in {time.monotonic() - started:.1f} s: '
        f'{"PASS" if passed else "FAIL"}')
  if args.json:
    args.json.write_text(json.dumps([dataclasses.asdict(t) for t in results], indent=1))
  return 0 if passed else 1


if __name__ == '__main__':
  sys.exit(main())
