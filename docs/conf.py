"""Sphinx configuration: Markdown pages (myst), the notebooks (myst-nb, rendered as they were
last executed, never re-executed here) and the API reference (autodoc)."""

import flaxckpt

project = 'flaxckpt'
author = 'flaxckpt developers'
release = flaxckpt.__version__
extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.autosummary', 'sphinx.ext.napoleon']
source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', 'README.md', 'conf.py', 'performance_results.md']  # included
html_theme = 'furo'
html_title = 'flaxckpt'
nb_execution_mode = 'off'
myst_heading_anchors = 3
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
napoleon_google_docstring = True
suppress_warnings = ['myst.xref_missing']
