"""The Sphinx docs build without a warning, and every public name has a docstring."""

import inspect
import pathlib
import shutil
import subprocess
import sys

import flaxckpt
from flaxckpt.legacy import checkpoints, orbax_utils

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_sphinx_builds_with_warnings_as_errors(tmp_path):
  """The committed notebooks (outputs stripped) stand in for the executed copies."""
  source = tmp_path / 'docs'
  shutil.copytree(REPO / 'docs', source, ignore=shutil.ignore_patterns('_notebooks', '_build'))
  (source / '_notebooks').mkdir()
  for notebook in (REPO / 'notebooks').glob('*.ipynb'):
    shutil.copy(notebook, source / '_notebooks')
  result = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
                           'html', str(source), str(tmp_path / 'html')],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert (tmp_path / 'html' / 'api.html').read_text().count('flaxckpt.CheckpointManager') > 0


def _public_names():
  """(qualified name, object) of every public class, function and module we export."""
  own_utils = [name for name, value in vars(orbax_utils).items()
               if not name.startswith('_') and getattr(value, '__module__', None) ==
               orbax_utils.__name__]
  for module, names in ((flaxckpt, flaxckpt.__all__), (checkpoints, checkpoints.__all__),
                        (orbax_utils, own_utils)):
    for name in names:
      value = getattr(module, name)
      if inspect.isclass(value) or inspect.isfunction(value) or inspect.ismodule(value):
        yield f'{module.__name__}.{name}', value


def test_every_public_name_has_a_docstring():
  missing = [name for name, value in _public_names() if not (value.__doc__ or '').strip()]
  assert not missing, f'public names without a docstring: {missing}'
