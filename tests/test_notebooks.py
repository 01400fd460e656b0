"""The notebooks run top to bottom in a fresh kernel; their assert cells are the checks."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / 'notebooks').glob('*.ipynb'))


def execute(path: pathlib.Path, workdir: pathlib.Path) -> nbformat.NotebookNode:
  """Runs ``path`` in a new kernel of this interpreter; raises on the first failing cell."""
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': str(workdir)}}).execute()
  return notebook


def test_notebooks_are_committed_without_outputs():
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, path.name


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.setenv('PYTHONWARNINGS', 'ignore')
  notebook = execute(path, tmp_path)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(cell.execution_count for cell in code_cells)
  for cell in code_cells:  # Plots reach the rendered docs as images.
    if 'plt.show()' in cell.source:
      assert any('image/png' in output.get('data', {}) for output in cell.outputs), cell.source
