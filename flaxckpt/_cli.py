"""The ``flaxckpt`` command (also ``python -m flaxckpt``): inspect, verify, convert, diff.

Exit status: 0 when all is well, 1 when ``verify`` finds problems or ``diff`` finds differences,
2 when a command cannot run (no checkpoint at the path, bad arguments); errors are one line on
stderr, never a traceback. Everything runs on the CPU; no accelerator is needed.

Every path may also be a ``gs://`` or ``s3://`` URL (see docs/object_storage.md). Long
operations (``verify``, ``convert``) show their progress on stderr, drawn by ``rich`` (imported
only then): by default when stdout and stderr are terminals and the work is long (an object
store, or 64 MiB of arrays or more); ``--progress`` asks for it, ``--no-progress`` never shows it.

Whatever is printed that came from a checkpoint (key paths, item and file names, values, error
messages) goes through ``printable`` first: a checkpoint is untrusted input, and a name holding
ESC, CR or a bidi override must not drive the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

# Local work on fewer array bytes than this ends too soon for a progress bar to help.
_PROGRESS_MIN_BYTES = 64 << 20
_URL_SCHEMES = ('gs://', 's3://')


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Reading files needs no accelerator.
  try:
    return args.run(args)
  except KeyboardInterrupt:
    return 130
  except BrokenPipeError:  # The reader (``| head``) is gone; say nothing more.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except Exception as e:  # Whatever failed, one line and no traceback.
    _say(f'flaxckpt {args.command}: error: {error_line(e, _paths_of(args))}', sys.stderr)
    return 2


def printable(text: Any) -> str:
  """``text`` with every character that could act on a terminal written as an escape (``\\x1b``,
  ``\\r``, ``\\u202e``): C0 and C1 controls, DEL, format characters such as bidi overrides and
  zero-width ones, line and paragraph separators, lone surrogates and unassigned code points.
  Letters of every script and plain spaces are kept."""
  text = str(text)
  if text.isprintable():
    return text
  return ''.join(char if char.isprintable() or unicodedata.category(char) == 'Zs'
                 else _escape(char) for char in text)


def _escape(char: str) -> str:
  code = ord(char)
  if code < 0x100:
    return f'\\x{code:02x}'
  return f'\\u{code:04x}' if code < 0x10000 else f'\\U{code:08x}'


# What a failure says when its message is not enough: errors of the interpreter rather than of
# flaxckpt, raised by a checkpoint that is damaged or built to break readers.
_EXPLAINED = {
    RecursionError: 'nested too deeply to read (RecursionError); the checkpoint is damaged or '
                    'hostile',
    MemoryError: 'declares more data than fits in memory (MemoryError); the checkpoint is '
                 'damaged or hostile',
    OverflowError: 'holds a number too large to use (OverflowError: {message}); the checkpoint '
                   'is damaged or hostile',
}


def error_line(error: BaseException, paths: Sequence[str] = ()) -> str:
  """``error`` as one printable line that names the path it is about: its message when that
  names one of ``paths`` (or any absolute path), else the first of ``paths`` before it."""
  message = ' '.join(str(error).split())
  for kind, explanation in _EXPLAINED.items():
    if isinstance(error, kind):
      message = explanation.format(message=message or 'no message')
      break
  else:
    known = (OSError, ValueError, TypeError, KeyError, NotImplementedError)
    if not isinstance(error, known):  # A bug or an unforeseen failure: say what it was.
      message = f'{type(error).__name__}: {message}' if message else type(error).__name__
  message = message or type(error).__name__
  names_a_path = message.startswith('/') or any(path and path in message for path in paths)
  if paths and not names_a_path:
    message = f'{paths[0]}: {message}'
  return printable(message)


def _paths_of(args: argparse.Namespace) -> list[str]:
  """The paths a command was given, as typed and absolute (messages name the absolute one;
  URLs are absolute as typed)."""
  given = [getattr(args, name) for name in ('path', 'source', 'destination', 'first', 'second')
           if getattr(args, name, None)]
  return [path if _is_url(path) else os.path.abspath(path) for path in given] + given


def _is_url(path: str) -> bool:
  return path.startswith(_URL_SCHEMES)


def _say(line: str, out: TextIO) -> None:
  print(printable(line), file=out)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='flaxckpt', description='Look inside, check, convert and compare checkpoints '
      '(Orbax and flaxckpt PyTree checkpoints, CheckpointManager roots, flax msgpack files). '
      'Each path may be local or a gs:// or s3:// URL.')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  inspect = commands.add_parser('inspect', help='show the format, tree and steps of a '
                                'checkpoint (metadata only)')
  inspect.add_argument('path')
  inspect.add_argument('--json', action='store_true', help='print JSON instead of a table')
  inspect.add_argument('--best-metric', help='the metric that ranks a manager\'s steps '
                       '(default: the only numeric one)')
  inspect.add_argument('--best-mode', choices=('max', 'min'), default='max',
                       help='whether a higher or lower metric is better (default: max, as '
                       'CheckpointManagerOptions)')
  inspect.set_defaults(run=_inspect)

  verify = commands.add_parser('verify', help='read every byte, check commit markers and '
                               'checksums; exit 1 on any problem')
  verify.add_argument('path')
  _add_progress_flags(verify)
  verify.set_defaults(run=_verify)

  convert = commands.add_parser('convert', help='flax msgpack <-> Orbax PyTree checkpoint, '
                                'streamed leaf by leaf')
  convert.add_argument('source')
  convert.add_argument('destination')
  convert.add_argument('--to', required=True, choices=('orbax', 'msgpack'))
  convert.add_argument('--batch-mib', type=int, default=256,
                       help='array data staged at once when writing Orbax (default: 256)')
  _add_progress_flags(convert)
  convert.set_defaults(run=_convert)

  diff = commands.add_parser('diff', help='leaves added, removed and changed between two '
                             'checkpoints; exit 1 if they differ')
  diff.add_argument('first')
  diff.add_argument('second')
  diff.add_argument('--json', action='store_true', help='print JSON instead of text')
  diff.set_defaults(run=_diff)
  return parser


def _add_progress_flags(command: argparse.ArgumentParser) -> None:
  shown = command.add_mutually_exclusive_group()
  shown.add_argument('--progress', action='store_true', default=None,
                     help='always show progress on stderr (default: when stdout and stderr are '
                     'terminals, for an object store or large checkpoints)')
  shown.add_argument('--no-progress', dest='progress', action='store_false',
                     help='never show progress')


# --- inspect -----------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
  from flaxckpt import _inspect as inspect
  description = inspect.describe(args.path, args.best_metric, args.best_mode)
  if args.json:
    # ensure_ascii (the default) writes control characters as \u escapes.
    json.dump(description, sys.stdout, indent=1, default=str)
    print()
  else:
    _print_description(description, sys.stdout)
  return 0


def human_bytes(count: int) -> str:
  """``count`` bytes in B to EiB; a hostile checkpoint may declare sizes no float can hold."""
  if count < 1024:
    return f'{count} B'
  if count >= 1 << 70:
    return f'about 2^{int(count).bit_length() - 1} B'
  for power, unit in enumerate(('KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'), start=1):
    if count < 1024 ** (power + 1) or unit == 'EiB':
      return f'{count / 1024 ** power:.1f} {unit}'
  raise AssertionError('unreachable')


def _print_description(description: dict[str, Any], out: TextIO, indent: str = '') -> None:
  kind = description['format']
  if kind in ('manager', 'flax-dir'):
    _print_steps(description, out, indent)
    return
  if kind == 'composite':
    names = ', '.join(description['items']) or 'none'
    _say(f'{indent}{description["path"]}: checkpoint of items {names}, saved '
         f'{description["saved"]}', out)
    for item in description['items'].values():
      _print_description(item, out, indent + '  ')
    return
  if kind == 'json':
    shown = description.get('error') or json.dumps(description['value'])
    _say(f'{indent}{description["path"]}: JSON {shown}', out)
    return
  details = [kind]
  if 'storage' in description:
    details.append(description['storage'])
  if 'layout' in description:
    details.append(description['layout'])
  if 'checksums' in description:
    details.append('checksums' if description['checksums'] else 'no checksums')
  _say(f'{indent}{description["path"]}: {", ".join(details)}', out)
  rows = [('key path', 'shape', 'dtype', 'size', 'sharding / value')]
  for leaf in description['leaves']:
    if leaf['shape'] is None:
      shown = leaf['value'] if leaf['kind'] == 'empty' else _short(leaf['value'])
      rows.append((leaf['path'], '', '', '', shown))
    else:
      rows.append((leaf['path'], str(tuple(leaf['shape'])), leaf['dtype'],
                   human_bytes(leaf['bytes']), leaf['sharding'] or _short(leaf['value'])))
  _print_table(rows, out, indent + '  ')
  totals = description['totals']
  _say(f'{indent}  {totals["leaves"]} leaves, {totals["arrays"]} arrays, '
       f'{human_bytes(totals["bytes"])}', out)


def _short(value: Any) -> str:
  if value is None:
    return ''
  text = repr(value) if isinstance(value, str) else str(value)
  return text if len(text) <= 40 else text[:37] + '...'


def _print_table(rows: Sequence[tuple[str, ...]], out: TextIO, indent: str) -> None:
  rows = [tuple(printable(cell) for cell in row) for row in rows]  # Escaped, then aligned.
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  for row in rows:
    _say(indent + '  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), out)


def _print_steps(description: dict[str, Any], out: TextIO, indent: str) -> None:
  steps = description['steps']
  what = 'CheckpointManager root' if description['format'] == 'manager' else 'flax directory'
  rule = f', best by {description["best_by"]}' if description.get('best_by') else ''
  _say(f'{indent}{description["path"]}: {what}, {len(steps)} steps{rule}', out)
  with_metrics = any(entry.get('metrics') is not None for entry in steps)
  rows = [('step', 'saved') + (('metrics',) if with_metrics else ()) + ('',)]
  for entry in steps:
    marks = ', '.join(mark for mark in ('latest', 'best') if entry.get(mark))
    metrics = json.dumps(entry['metrics']) if entry.get('metrics') is not None else ''
    rows.append((str(entry['step']), entry['saved']) + ((metrics,) if with_metrics else ())
                + (marks,))
  _print_table(rows, out, indent + '  ')
  if 'latest' in description:
    _say(f'{indent}latest step {description["latest_step"]}:', out)
    _print_description(description['latest'], out, indent + '  ')


# --- verify ------------------------------------------------------------------------------------


class _Progress:
  """The progress of one long operation, drawn on stderr by ``rich`` (results go to stdout, so
  progress never mixes with them): shown when ``shown`` is True; when it is None, only if stdout
  and stderr are terminals and the work is long (an object store, or ``_PROGRESS_MIN_BYTES``
  or more). Called with (bytes done, bytes in all); None done while the amount is unknown."""

  def __init__(self, what: str, shown: bool | None, paths: Sequence[str]):
    self._what = what
    self._shown = shown
    self._remote = any(_is_url(path) for path in paths)
    self._bar: Any = None
    self._task: Any = None
    self._decided = False

  def __enter__(self) -> _Progress:
    return self

  def __exit__(self, *_: object) -> None:
    if self._bar is not None:
      self._bar.stop()

  def __call__(self, done: int | None, total: int) -> None:
    if not self._decided:
      self._decided = True
      if self._shown or self._shown is None and (
          self._remote or total >= _PROGRESS_MIN_BYTES) and _on_terminals():
        self._start()
    if self._bar is not None:
      self._bar.update(self._task, total=None if done is None else total, completed=done or 0)

  def _start(self) -> None:
    from rich import console, progress  # Only for long operations: it takes a while to import.
    self._bar = progress.Progress(
        progress.TextColumn('{task.description}'), progress.BarColumn(),
        progress.TaskProgressColumn(), progress.DownloadColumn(binary_units=True),
        progress.TimeRemainingColumn(), console=console.Console(file=sys.stderr),
        redirect_stdout=False, redirect_stderr=False)
    self._task = self._bar.add_task(self._what, total=None)
    self._bar.start()


def _on_terminals() -> bool:
  """Whether stdout and stderr are terminals (for stderr, as ``rich`` sees it: FORCE_COLOR and
  TTY_COMPATIBLE count)."""
  from rich import console
  return sys.stdout.isatty() and console.Console(file=sys.stderr).is_terminal


def _verify(args: argparse.Namespace) -> int:
  from flaxckpt import _verify as verify
  with _Progress('verifying', args.progress, [args.path]) as progress:
    problems = verify.verify(args.path, progress=progress)
  for problem in problems:
    _say(str(problem), sys.stdout)
  if problems:
    _say(f'{len(problems)} problem{"s" if len(problems) > 1 else ""} found in {args.path}',
         sys.stderr)
    return 1
  _say(f'{args.path}: OK', sys.stdout)
  return 0


# --- convert and diff --------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
  from flaxckpt import _convert as convert
  with _Progress('converting', args.progress, [args.source, args.destination]) as progress:
    target = convert.convert(args.source, args.destination, args.to, args.batch_mib << 20,
                             progress=progress)
  _say(f'wrote {target}', sys.stdout)
  return 0


def _diff(args: argparse.Namespace) -> int:
  from flaxckpt import _diff as diff
  found = diff.diff(args.first, args.second)
  if args.json:
    json.dump({'identical': found.identical, 'added': found.added, 'removed': found.removed,
               'changed': [change._asdict() for change in found.changed],
               'same': found.same}, sys.stdout, indent=1)
    print()
    return 0 if found.identical else 1
  for path in found.removed:
    _say(f'- {path}', sys.stdout)
  for path in found.added:
    _say(f'+ {path}', sys.stdout)
  for change in found.changed:
    detail = f'{change.before} -> {change.after}'
    if change.what == 'values' and change.max_abs_diff is not None:
      detail = f'{change.before}, max abs diff {change.max_abs_diff:.6g}'
    _say(f'~ {change.path}: {change.what} differ ({detail})', sys.stdout)
  _say(f'{len(found.removed)} removed, {len(found.added)} added, {len(found.changed)} changed, '
       f'{found.same} equal', sys.stdout)
  return 0 if found.identical else 1
