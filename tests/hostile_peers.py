"""Orbax and flax beside flaxckpt on the same hostile inputs: re-runs the table of
``docs/security.md`` ("Orbax and flax on the same inputs").

Each case builds one crafted checkpoint or directory in a fresh sandbox (``tests/hostile.py``)
for each library, runs the same operation with the peer (``orbax.checkpoint`` or
``flax.training.checkpoints``) and with flaxckpt in a subprocess with a deadline and an
address-space cap, and reports how it ended and whether the canary beside the sandbox was read
back or changed. Nothing is asserted: this is a record, not a test (``tests/test_hostile_peers.py``
checks the script itself on two cheap cases).

    .venv/bin/python tests/hostile_peers.py [--cases a,b] [--timeout 20] [--json out.json]
    make peers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import hostile  # noqa: E402

DEFAULT_TIMEOUT = 20.0
DEEP = '{"a":' * 100000 + '1' + '}' * 100000

# --- building inputs (in this process, with flaxckpt) --------------------------------------------


def _ocp():
  import flaxckpt
  return flaxckpt


def _drop_checksums(directory: pathlib.Path) -> None:
  """Makes a flaxckpt checkpoint look as Orbax writes it: without flaxckpt's checksum folders,
  so flaxckpt's other checks are what is compared."""
  for found in list(directory.rglob('flaxckpt_checksums')):
    shutil.rmtree(found)


def _save(path: pathlib.Path, tree: dict, use_ocdbt: bool = True) -> pathlib.Path:
  ocp = _ocp()
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(
      path, args=ocp.args.PyTreeSave(tree))
  _drop_checksums(path)
  return path


def _edit_json(path: pathlib.Path, edit) -> None:
  path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _declare(path: pathlib.Path, leaf: str, **fields) -> None:
  _edit_json(path / leaf / '.zarray', lambda meta: {**meta, **fields})


def _deepen(path: pathlib.Path) -> None:
  """Adds a member nested 50000 deep to a JSON object file, keeping what it held."""
  text = path.read_text().rstrip()
  path.write_text(text[:-1] + ', "deep": ' + '[' * 50000 + ']' * 50000 + '}')


def build_deep_metadata(sb: hostile.Sandbox) -> None:
  _deepen(_save(sb.box / 'ckpt', {'w': _np().arange(3)}) / '_METADATA')


def build_deep_checkpoint_metadata(sb: hostile.Sandbox) -> None:
  path = _save(sb.box / 'ckpt', {'w': _np().arange(3)})
  (path / '_CHECKPOINT_METADATA').write_text(DEEP)


def build_deep_sharding(sb: hostile.Sandbox) -> None:
  import jax
  path = _save(sb.box / 'ckpt', {'w': jax.numpy.arange(3)})
  (path / '_sharding').write_text('[' * 100000 + ']' * 100000)


def build_deep_sharding_entry(sb: hostile.Sandbox) -> None:
  """The leaf's own entry of ``_sharding`` (where its sharding is looked up) nested deep."""
  import jax
  path = _save(sb.box / 'ckpt', {'w': jax.numpy.arange(3)})
  (key,) = json.loads((path / '_sharding').read_text())
  (path / '_sharding').write_text('{' + json.dumps(key) + ': ' + DEEP + '}')


def _strings_ckpt(sb: hostile.Sandbox) -> pathlib.Path:
  import jax
  return _save(sb.box / 'ckpt', {'w': jax.numpy.arange(3), 's': 'text'}, use_ocdbt=False)


def build_fifo_strings(sb: hostile.Sandbox) -> None:
  path = _strings_ckpt(sb)
  (path / '_strings.json').unlink()
  os.mkfifo(path / '_strings.json')


def build_fifo_sharding(sb: hostile.Sandbox) -> None:
  import jax
  path = _save(sb.box / 'ckpt', {'w': jax.numpy.arange(3)})
  (path / '_sharding').unlink()
  os.mkfifo(path / '_sharding')


def build_strings_dev_zero(sb: hostile.Sandbox) -> None:
  path = _strings_ckpt(sb)
  (path / '_strings.json').unlink()
  (path / '_strings.json').symlink_to('/dev/zero')


def build_strings_link_outside(sb: hostile.Sandbox) -> None:
  path = _strings_ckpt(sb)
  (path / '_strings.json').unlink()
  (path / '_strings.json').symlink_to(sb.canary / '_strings.json')


def build_string_leaf_dotdot(sb: hostile.Sandbox) -> None:
  """canary/ holds a ``_strings.json``: a string leaf named '../../canary' would find it."""
  path = _save(sb.box / 'ckpt', {'text': 'hello', 'w': _np().arange(3)}, use_ocdbt=False)
  hostile.rename_leaf(path, "'text'", ['../../canary'])


def build_array_leaf_dotdot(sb: hostile.Sandbox) -> None:
  path = _save(sb.box / 'ckpt', {'w': _np().arange(3)}, use_ocdbt=False)
  hostile.rename_leaf(path, "'w'", ['../../canary/empty'])


def build_zarray_trillion(sb: hostile.Sandbox) -> None:
  np = _np()
  path = _save(sb.box / 'ckpt', {'w': np.arange(3, dtype=np.float32)}, use_ocdbt=False)
  _declare(path, 'w', shape=[10**12], chunks=[1])


def build_missing_chunk(sb: hostile.Sandbox) -> None:
  np = _np()
  path = _save(sb.box / 'ckpt', {'n': np.arange(8, dtype=np.int32)}, use_ocdbt=False)
  _declare(path, 'n', chunks=[4], fill_value=7)
  (path / 'n' / '0').write_bytes(np.arange(4, dtype='<i4').tobytes())
  (path / 'n' / '1').unlink(missing_ok=True)
  _edit_json(path / '_METADATA',
             lambda meta: {**meta, 'store_array_data_equal_to_fill_value': False})


def build_chunk_link_outside(sb: hostile.Sandbox) -> None:
  np = _np()
  outside = _save(sb.canary / 'lookalike', {'w': np.frombuffer(hostile.SECRET, np.uint8)},
                  use_ocdbt=False)
  sb._before = hostile.snapshot(sb.canary)
  path = _save(sb.box / 'ckpt', {'w': np.zeros(120, np.uint8)}, use_ocdbt=False)
  (path / 'w' / '0').unlink()
  (path / 'w' / '0').symlink_to(outside / 'w' / '0')


def _ocdbt():
  import test_hostile_ocdbt
  return test_hostile_ocdbt


def build_ocdbt_fifo(sb: hostile.Sandbox) -> None:
  o = _ocdbt()
  path = sb.box / 'ckpt'
  o.save(path)
  os.mkfifo(path / o.DATA_DIR / 'pipe')
  o.point_value(path, b'x/0', 'ocdbt.process_0/', 'd/pipe')


def build_ocdbt_link_outside(sb: hostile.Sandbox) -> None:
  o = _ocdbt()
  path = sb.box / 'ckpt'
  o.save(path)
  (path / o.DATA_DIR / 'leak').symlink_to(sb.secret)
  o.point_value(path, b'x/0', 'ocdbt.process_0/', 'd/leak')


def build_huge_timestamp(sb: hostile.Sandbox) -> None:
  ocp = _ocp()
  with ocp.CheckpointManager(sb.box / 'run', options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)) as manager:
    manager.save(1, args=ocp.args.StandardSave({'w': _np().arange(4.0)}))
  _drop_checksums(sb.box / 'run')
  _edit_json(sb.box / 'run' / '1' / '_CHECKPOINT_METADATA',
             lambda meta: {**meta, 'commit_timestamp_nsecs': 1e300})


def build_flax_dir(sb: hostile.Sandbox) -> None:
  (sb.box / 'ckpts').mkdir()


def build_flax_prefix_orbax(sb: hostile.Sandbox) -> None:
  """ckpt_dir holds a file, and beside it a sibling folder whose name sorts after it."""
  (sb.box / 'ckpts').mkdir()
  (sb.box / 'ckpts' / 'keep-me').write_text('x')
  (sb.box / 'logs').mkdir()


def build_flax_tmp_link(sb: hostile.Sandbox) -> None:
  (sb.box / 'ckpts').mkdir()
  (sb.box / 'ckpts' / 'checkpoint_tmp').symlink_to(sb.secret)


def build_flax_fifo(sb: hostile.Sandbox) -> None:
  (sb.box / 'ckpts').mkdir()
  os.mkfifo(sb.box / 'ckpts' / 'checkpoint_1')


def _np():
  import numpy
  return numpy


# --- operations (run in a subprocess; cwd is the sandbox root; may assign ``result``) -------------

_CKPTR = '''
import os, numpy as np
import {lib} as ocp
path = os.path.abspath('box/ckpt')
ckptr = ocp.PyTreeCheckpointer()
'''
_RESTORE = _CKPTR + 'result = ckptr.restore(path)\n'
_METADATA = _CKPTR + 'result = ckptr.metadata(path)\n'
_RESTORE_TARGET = _CKPTR + '''
import jax
target = {target}
result = ckptr.restore(path, args=ocp.args.PyTreeRestore(target))
'''
_STD_RESTORE = '''
import os, numpy as np
import {lib} as ocp
path = os.path.abspath('box/ckpt')
result = ocp.StandardCheckpointer().restore(path)
'''
_MANAGER = '''
import os
import {lib} as ocp
manager = ocp.CheckpointManager(os.path.abspath('box/run'))
result = (manager.all_steps(), manager.restore(1))
'''
_FLAX = '''
import os, numpy as np
import flax
flax.config.update('flax_use_orbax_checkpointing', {use_orbax})
from {lib} import checkpoints
ckpt_dir = os.path.abspath('box/ckpts')
'''
_FLAX_PREFIX = _FLAX + '''
result = checkpoints.save_checkpoint(ckpt_dir, {{'x': np.arange(4)}}, 1, prefix='../', keep=1)
'''
_FLAX_SAVE = _FLAX + '''
result = checkpoints.save_checkpoint(ckpt_dir, {{'x': np.arange(4)}}, 1)
'''
_FLAX_RESTORE = _FLAX + '''
result = checkpoints.restore_checkpoint(ckpt_dir, None)
'''

ORBAX, FLAX, OURS = 'orbax', 'flax', 'flaxckpt'
_MODULES = {ORBAX: 'orbax.checkpoint', FLAX: 'flax.training', OURS: 'flaxckpt'}
_LEGACY = {FLAX: 'flax.training', OURS: 'flaxckpt.legacy'}


@dataclasses.dataclass
class Case:
  name: str
  peer: str  # ORBAX or FLAX.
  build: Callable[[hostile.Sandbox], None]
  code: str  # Formatted with lib= (and the extra fields).
  doc: str  # The row of docs/security.md this reproduces.
  fields: dict = dataclasses.field(default_factory=dict)
  list_box: bool = False  # Report what the box holds afterwards.

  def source(self, library: str) -> str:
    lib = (_LEGACY if self.peer == FLAX else _MODULES)[library]
    return self.code.format(lib=lib, **self.fields)


_STRINGS_TARGET = "{'w': jax.device_put(np.zeros(3, int)), 's': ''}"

CASES = {case.name: case for case in [
    Case('deep-metadata-restore', ORBAX, build_deep_metadata, _RESTORE,
         'Deeply nested `_METADATA`'),
    Case('deep-metadata-metadata', ORBAX, build_deep_metadata, _METADATA,
         'Deeply nested `_METADATA`'),
    Case('deep-checkpoint-metadata', ORBAX, build_deep_checkpoint_metadata,
         _METADATA + 'ckptr.restore(path)\n', 'Deeply nested `_CHECKPOINT_METADATA`'),
    Case('deep-sharding', ORBAX, build_deep_sharding, _RESTORE, 'Deeply nested `_sharding`'),
    Case('deep-sharding-entry', ORBAX, build_deep_sharding_entry, _RESTORE,
         'Deeply nested `_sharding`'),
    Case('fifo-strings', ORBAX, build_fifo_strings, _RESTORE_TARGET,
         'FIFO as `_strings.json` or `_sharding`', {'target': _STRINGS_TARGET}),
    Case('fifo-sharding', ORBAX, build_fifo_sharding, _RESTORE,
         'FIFO as `_strings.json` or `_sharding`'),
    Case('strings-dev-zero', ORBAX, build_strings_dev_zero, _RESTORE_TARGET,
         '`_strings.json` linked to `/dev/zero`', {'target': _STRINGS_TARGET}),
    Case('strings-link-outside', ORBAX, build_strings_link_outside, _RESTORE_TARGET,
         '`_strings.json` linked outside', {'target': _STRINGS_TARGET}),
    Case('string-leaf-dotdot', ORBAX, build_string_leaf_dotdot, _RESTORE,
         '(a string leaf named ../../canary, zarr layout)'),
    Case('array-leaf-dotdot', ORBAX, build_array_leaf_dotdot, _RESTORE,
         '(an array leaf named ../../canary/empty, zarr layout)'),
    Case('zarray-trillion', ORBAX, build_zarray_trillion, _RESTORE,
         '`.zarray` declaring 10**12 elements in chunks of 1'),
    Case('missing-zarr2-chunk', ORBAX, build_missing_chunk,
         _RESTORE + "result = np.asarray(result['n']).tolist()\n", 'A missing zarr v2 chunk'),
    Case('chunk-link-outside', ORBAX, build_chunk_link_outside, _RESTORE,
         '(a zarr chunk file linked to a look-alike outside)'),
    Case('ocdbt-fifo', ORBAX, build_ocdbt_fifo, _STD_RESTORE,
         'FIFO as an OCDBT data or node file'),
    Case('ocdbt-link-outside', ORBAX, build_ocdbt_link_outside, _STD_RESTORE,
         'OCDBT data file that is a link leading outside'),
    Case('huge-timestamp', ORBAX, build_huge_timestamp, _MANAGER,
         '`commit_timestamp_nsecs: 1e300`'),
    Case('flax-prefix-msgpack', FLAX, build_flax_dir, _FLAX_PREFIX, "`prefix='../'`",
         {'use_orbax': False}, list_box=True),
    Case('flax-prefix-orbax', FLAX, build_flax_prefix_orbax, _FLAX_PREFIX, "`prefix='../'`",
         {'use_orbax': True}, list_box=True),
    Case('flax-tmp-link', FLAX, build_flax_tmp_link, _FLAX_SAVE,
         'A link at `checkpoint_tmp` to a secret file', {'use_orbax': False}, list_box=True),
    Case('flax-fifo-restore', FLAX, build_flax_fifo, _FLAX_RESTORE, 'FIFO as `checkpoint_1`',
         {'use_orbax': False}),
]}


# --- running and reporting ------------------------------------------------------------------------


def _canary(sb: hostile.Sandbox, outcome: hostile.Outcome) -> str:
  """'read back', 'changed', both, or 'untouched', from the harness's own checks."""
  found = []
  try:
    sb.assert_canary_untouched()
  except AssertionError:
    found.append('changed')
  try:
    sb.assert_canary_untouched(outcome)
  except AssertionError as e:
    if 'came back' in str(e):
      found.append('read back')
  return ' and '.join(found) or 'untouched'


def classify(outcome: hostile.Outcome, root: pathlib.Path | None = None) -> tuple[str, str]:
  """(kind, text): kind is 'returned', 'raised', 'hung' or 'crashed'; paths below ``root``
  (the sandbox) are shown relative to it."""
  def line(text: str) -> str:
    if root is not None:
      text = text.replace(str(root) + '/', '')
    text = ' '.join(text.split())
    return text[:80]
  if outcome.timed_out:
    return 'hung', 'hung (deadline)'
  if outcome.crashed:
    code = outcome.returncode
    if code is not None and code < 0:
      try:
        how = f'signal {signal.Signals(-code).name}'
      except ValueError:
        how = f'signal {-code}'
    else:
      how = f'exit code {code}'
    hint = next((w for w in ('bad_alloc', 'MemoryError', 'Segmentation') if w in outcome.stderr),
                None)
    return 'crashed', f'crashed ({how}{", " + hint if hint else ""})'
  if outcome.ok:
    return 'returned', f'returned {line(outcome.result)}'
  return 'raised', f'raised {outcome.error}: {line(outcome.message)}'


def _listing(box: pathlib.Path) -> str:
  names = []
  for path in sorted(box.rglob('*')):
    relative = path.relative_to(box)
    if len(relative.parts) <= 2:
      names.append(str(relative) + ('@' if path.is_symlink() else '/' if path.is_dir() else ''))
  return ' '.join(names)[:200]


def run_case(case: Case, library: str, timeout: float, workdir: pathlib.Path) -> dict:
  """Builds the case afresh in ``workdir`` and runs it with ``library``: one row."""
  sb = hostile.Sandbox(workdir)
  row = {'case': case.name, 'library': library, 'doc': case.doc}
  try:
    case.build(sb)
  except Exception as e:  # A case that cannot be built here is reported, not fatal.
    row.update(kind='unbuilt', outcome=f'could not build: {type(e).__name__}: {e}'[:120],
               canary='untouched')
    return row
  outcome = sb.run(case.source(library), timeout=timeout)
  kind, text = classify(outcome, sb.root)
  canary = _canary(sb, outcome)
  if 'read back' in canary:
    text = f'canary bytes came back ({text})'
  row.update(kind=kind, outcome=text, canary=canary, error=outcome.error, mro=outcome.mro,
             returncode=outcome.returncode)
  if case.list_box:
    row['box'] = _listing(sb.box)
  return row


def run_cases(names: list[str], timeout: float = DEFAULT_TIMEOUT,
              libraries: tuple[str, ...] | None = None, progress=None) -> list[dict]:
  rows = []
  for name in names:
    case = CASES[name]
    for library in libraries or (case.peer, OURS):
      with tempfile.TemporaryDirectory(prefix=f'peers-{name}-') as tmp:
        row = run_case(case, library, timeout, pathlib.Path(tmp))
      rows.append(row)
      if progress:
        progress(row)
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ['| case | library | outcome | canary |', '|---|---|---|---|']
  for row in rows:
    outcome = row['outcome'].replace('|', '\\|')
    if row.get('box'):
      outcome += f' [box: {row["box"]}]'
    lines.append(f'| {row["case"]} | {row["library"]} | {outcome} | {row["canary"]} |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', help='comma-separated case names (default: all): '
                      + ', '.join(CASES))
  parser.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT,
                      help='seconds each operation may run (default %(default)s)')
  parser.add_argument('--json', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  names = args.cases.split(',') if args.cases else list(CASES)
  unknown = [name for name in names if name not in CASES]
  if unknown:
    parser.error(f'unknown case(s): {", ".join(unknown)}')
  rows = run_cases(names, args.timeout, progress=lambda row: print(
      f'{row["case"]} / {row["library"]}: {row["outcome"]} (canary {row["canary"]})',
      file=sys.stderr, flush=True))
  print(format_table(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
