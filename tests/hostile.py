"""Harness for the hostile-input tests: run one operation in a fresh process with a deadline and
an address-space limit, inside a sandbox whose surroundings are watched.

A ``Sandbox`` is a temporary folder with ``box/`` (where the checkpoint or run directory under
test lives) and ``canary/`` beside it, holding a secret file and an empty folder that nothing
may read, create, change or remove. ``run`` executes Python code in a subprocess
(``JAX_PLATFORMS=cpu``, an ``RLIMIT_AS`` cap, a timeout) and returns how it ended: the
exception's type and message, or the value the code assigned to ``result`` (its ``repr``), so a
test can check that no canary bytes came back as data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

SECRET = b'CANARY-SECRET-0123456789abcdef' * 4  # 120 bytes: fits arrays of many shapes.
MEMORY_LIMIT = 3 << 30  # Enough for jax and tensorstore; far below what a bomb would allocate.
DEADLINE = 90.0

_PRELUDE = '''
import json, os, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
outcome = {{'ok': False}}
try:
    result = None
{body}
    outcome = {{'ok': True, 'result': repr(result)[:100000]}}
except BaseException as e:
    outcome = {{'ok': False, 'error': type(e).__name__, 'message': str(e)[:5000],
               'mro': [c.__name__ for c in type(e).__mro__],
               'traceback': traceback.format_exc()[-5000:]}}
with open({out!r}, 'w') as f:
    json.dump(outcome, f)
'''


@dataclasses.dataclass
class Outcome:
  """How an operation run by ``run`` ended."""
  ok: bool
  timed_out: bool = False
  crashed: bool = False  # Died without reporting (a signal, an abort, out of memory).
  returncode: int | None = None
  error: str | None = None  # Exception type name.
  mro: list[str] = dataclasses.field(default_factory=list)
  message: str = ''
  result: str = ''  # repr of ``result`` when ok.
  stderr: str = ''
  traceback: str = ''

  def raised(self, name: str) -> bool:
    """Whether it ended with an exception of class ``name`` (or a subclass)."""
    return not self.ok and name in self.mro

  def describe(self) -> str:
    if self.timed_out:
      return 'timed out'
    if self.crashed:
      return f'crashed (exit {self.returncode}): {self.stderr[-2000:]}'
    if self.ok:
      return f'returned {self.result[:300]}'
    return f'raised {self.error}: {self.message[:500]}\n{self.traceback}'


def run(code: str, cwd: pathlib.Path, *, timeout: float = DEADLINE,
        memory: int = MEMORY_LIMIT, env: dict[str, str] | None = None) -> Outcome:
  """Runs ``code`` (statements; may assign ``result``) in a new Python process in ``cwd``."""
  out = pathlib.Path(cwd) / '.outcome.json'
  if out.exists():
    out.unlink()
  body = textwrap.indent(textwrap.dedent(code).strip('\n'), '    ')
  script = _PRELUDE.format(memory=memory, body=body, out=str(out))
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  full_env.pop('XLA_FLAGS', None)
  try:
    proc = subprocess.run([sys.executable, '-c', script], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired as e:
    return Outcome(ok=False, timed_out=True, stderr=str(e.stderr or '')[-5000:])
  if not out.exists():
    return Outcome(ok=False, crashed=True, returncode=proc.returncode,
                   stderr=proc.stderr[-5000:])
  data = json.loads(out.read_text())
  out.unlink()
  return Outcome(ok=data['ok'], returncode=proc.returncode, error=data.get('error'),
                 mro=data.get('mro', []), message=data.get('message', ''),
                 result=data.get('result', ''), stderr=proc.stderr[-5000:],
                 traceback=data.get('traceback', ''))


def run_cli(args: list[str], cwd: pathlib.Path, *, timeout: float = DEADLINE,
            memory: int = MEMORY_LIMIT) -> subprocess.CompletedProcess | None:
  """Runs ``python -m flaxckpt ARGS`` with the same limits; None when it timed out."""
  prelude = (f'import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n'
             'import runpy, sys; sys.argv = ["flaxckpt"] + sys.argv[1:]\n'
             'runpy.run_module("flaxckpt", run_name="__main__")')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  try:
    return subprocess.run([sys.executable, '-c', prelude, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired:
    return None


def snapshot(root: pathlib.Path) -> dict[str, tuple]:
  """Every entry below ``root`` (links not followed): kind, size, mtime and content digest."""
  entries: dict[str, tuple] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = pathlib.Path(dirpath) / name
      info = path.lstat()
      digest = None
      if stat.S_ISREG(info.st_mode):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
      elif stat.S_ISLNK(info.st_mode):
        digest = os.readlink(path)
      entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size,
                                              info.st_mtime_ns, digest)
  return entries


class Sandbox:
  """``box/`` for the input under test; ``canary/`` beside it must stay untouched and unread."""

  def __init__(self, tmp_path: pathlib.Path):
    self.root = pathlib.Path(tmp_path)
    self.box = self.root / 'box'
    self.canary = self.root / 'canary'
    self.box.mkdir(parents=True, exist_ok=True)
    (self.canary / 'empty').mkdir(parents=True, exist_ok=True)
    self.secret = self.canary / 'secret.bin'
    self.secret.write_bytes(SECRET)
    (self.canary / '_strings.json').write_text(json.dumps({'x': SECRET.decode()}))
    self._before = snapshot(self.canary)

  def assert_canary_untouched(self, outcome: Outcome | None = None) -> None:
    """Nothing below canary/ changed, and no canary bytes came back in ``outcome``."""
    assert snapshot(self.canary) == self._before, 'the canary directory was changed'
    if outcome is not None:
      text = outcome.result + outcome.message
      assert SECRET.decode()[:30] not in text, f'canary bytes came back: {outcome.describe()}'
      # Numbers too: the secret's first bytes read as uint8 or int8 values.
      numbers = ', '.join(str(b) for b in SECRET[:12])
      assert numbers not in text.replace('\n', '').replace('  ', ' '), (
          f'canary bytes came back as numbers: {outcome.describe()}')

  def run(self, code: str, **kwargs) -> Outcome:
    return run(code, self.root, **kwargs)


def rename_leaf(directory: pathlib.Path, old: str, new_keys: list[str]) -> None:
  """Gives the leaf whose ``_METADATA`` key contains ``old`` the key path ``new_keys`` (what a
  crafted checkpoint would name it); the file's recorded checksum is left as it was."""
  path = pathlib.Path(directory) / '_METADATA'
  meta = json.loads(path.read_text())
  entries = meta['tree_metadata']
  entry = entries.pop(next(k for k in entries if old in k))
  entry['key_metadata'] = [{'key': k, 'key_type': 2} for k in new_keys]
  entries[str(tuple(new_keys))] = entry
  path.write_text(json.dumps(meta))
