"""Executes every notebook here in a fresh kernel and writes the executed copies to
``build/notebooks/`` (for the docs build); stops at the first failing cell.

Usage: ``make notebooks`` (or ``.venv/bin/python notebooks/execute.py [NAME.ipynb ...]``).
"""

import os
import pathlib
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent / 'build' / 'notebooks'


def main(names: list[str]) -> None:
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  OUT.mkdir(parents=True, exist_ok=True)
  for path in [HERE / n for n in names] or sorted(HERE.glob('*.ipynb')):
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      NotebookClient(notebook, timeout=300, kernel_name='python3',
                     resources={'metadata': {'path': workdir}}).execute()
    nbformat.write(notebook, OUT / path.name)
    print(f'{path.name}: ran in {time.perf_counter() - started:.1f} s -> {OUT / path.name}')


if __name__ == '__main__':
  main(sys.argv[1:])
