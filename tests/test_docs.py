"""The docs stay true: every ``python`` block runs, and prints what its ``# ->`` lines say."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'


def _sections():
  for doc in sorted(DOCS.glob('*.md')):
    for section in re.split(r'^## ', doc.read_text(), flags=re.M):
      blocks = re.findall(r'```python\n(.*?)```', section, flags=re.S)
      if blocks:
        yield pytest.param('\n'.join(blocks), id=f'{doc.stem}:{section.splitlines()[0]}')


@pytest.mark.parametrize('code', list(_sections()))
def test_doc_section_runs_and_prints_what_it_says(code, tmp_path):
  expected = re.findall(r'# -> (.*)$', code, flags=re.M)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  script = tmp_path / 'section.py'
  script.write_text(code.replace("'/tmp/", f"'{tmp_path}/"))  # Sections run in parallel.
  result = subprocess.run([sys.executable, '-W', 'ignore', str(script)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == expected


def test_readme_front_page_example_runs(tmp_path):
  """The first example of the README (the ten-line one) runs as written."""
  readme = (DOCS.parent / 'README.md').read_text()
  code = re.findall(r'```python\n(.*?)```', readme, flags=re.S)[0]
  script = tmp_path / 'readme.py'
  script.write_text(code.replace("'/tmp/", f"'{tmp_path}/"))
  result = subprocess.run([sys.executable, '-W', 'ignore', str(script)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'run' / '1' / 'default' / '_METADATA').is_file()


def test_compatibility_matrix_names_the_tested_versions_and_tests():
  """The format page's compatibility table claims only what the suite checks: the Orbax and
  Flax installed as peers, and test files and functions that exist."""
  import importlib.metadata
  section = (DOCS / 'format.md').read_text().split('## Compatibility', 1)[1].split('\n## ', 1)[0]
  for dist in ('orbax-checkpoint', 'flax'):
    version = importlib.metadata.version(dist)
    assert re.search(rf'^\| {dist} {re.escape(version)}\b', section, flags=re.M), (
        f'no row for {dist} {version} (installed) in the table')
  tests = DOCS.parent / 'tests'
  for file, function in re.findall(r'`(test_\w+\.py)(?:::(test_\w+))?`', section):
    assert (tests / file).is_file(), file
    if function:
      assert re.search(rf'^def {function}\(', (tests / file).read_text(), flags=re.M), function
