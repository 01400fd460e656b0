"""The checkpoints old Orbax and flax releases wrote (tests/data/old-formats), shared by the test
modules: their manifest, the ``state.py`` that rebuilds their values bit for bit, and scratch
copies to restore from (so no test can alter tests/data)."""

import importlib.util
import json
import pathlib
import shutil
from typing import Any

DATA = pathlib.Path(__file__).parent / 'data' / 'old-formats'
MANIFEST = json.loads((DATA / 'manifest.json').read_text())


def _load_state():
  spec = importlib.util.spec_from_file_location('old_formats_state', DATA / 'state.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


state = _load_state()


def cases(kind: str) -> list[dict[str, Any]]:
  """The manifest's cases of ``kind`` ('orbax_pytree', 'orbax_manager' or 'flax')."""
  return [case for case in MANIFEST['cases'] if case['kind'] == kind]


def case_at(path: str) -> dict[str, Any]:
  """The manifest's case at ``path`` ('f0610-ocp018/pytree')."""
  return next(case for case in MANIFEST['cases'] if case['path'] == path)


def copy_case(case: dict[str, Any], tmp_path: pathlib.Path) -> pathlib.Path:
  """A scratch copy of ``case``, with the empty directories its writer left (Git keeps none)."""
  directory = tmp_path / case['path'].replace('/', '_')
  shutil.copytree(DATA / case['path'], directory)
  for name in case.get('empty_dirs') or ():
    (directory / name).mkdir(parents=True, exist_ok=True)
  return directory
