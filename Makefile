# Developer entry points: `make demo`, `make test` (= `make lint typecheck` and pytest),
# `make bench`, `make growth`, `make drill`, `make peers`, `make notebooks`, `make docs`,
# `make clean`.
# Every target runs inside .venv, which is created on first use and re-synced
# (pip install -e '.[test]') whenever setup.cfg or pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

TYPECHECK := build/typecheck

.PHONY: demo test lint typecheck bench growth drill peers notebooks docs clean $(VENV)

demo: $(VENV)
	$(PY) -m flaxckpt.demo

# Any finding of ruff or mypy, and any non-zero pytest exit (including 5, no tests collected),
# fails the target.
test: lint typecheck
	$(PY) -m pytest -n 2 -q

lint: $(VENV)
	$(VENV)/bin/ruff check flaxckpt legacy tests benchmarks

# mypy checks the package as pip installs it: setup.cfg maps legacy/ to flaxckpt.legacy, which
# mypy cannot follow in the source tree, so it reads a tree of links with legacy/ in its place
# (and reports legacy's findings under legacy/ again).
typecheck: $(VENV)
	rm -rf $(TYPECHECK)/flaxckpt && mkdir -p $(TYPECHECK)/flaxckpt
	ln -s $(CURDIR)/flaxckpt/* $(TYPECHECK)/flaxckpt/
	ln -s $(CURDIR)/legacy $(TYPECHECK)/flaxckpt/legacy
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
	  -p flaxckpt > mypy.txt; rc=$$?; sed 's|^flaxckpt/legacy/|legacy/|' mypy.txt; exit $$rc

bench: $(VENV)
	mkdir -p build/bench
	$(PY) benchmarks/bench.py --cases all --object-store --object-mib 256,1024 \
	  --case-repeats s3-1024MiB=3,gs-1024MiB=3 --json build/bench/results.json
	$(PY) benchmarks/report.py build/bench/results.json

# Save and restore times from 1k to 64k leaves and from 64 MiB to 4 GiB, beside Orbax and the
# raw floor (the growth table of docs/performance.md; several minutes).
growth: $(VENV)
	mkdir -p build/bench
	$(PY) benchmarks/growth.py --json build/bench/growth.json

# The crash and corruption drills at full size, flaxckpt and Orbax side by side (make test runs a
# few trials of each); each prints its outcome table.
drill: $(VENV)
	$(PY) tests/drill_crash.py --trials 100
	$(PY) tests/drill_corruption.py --trials 200

# Orbax and flax beside flaxckpt on the hostile inputs of docs/security.md; prints the table.
peers: $(VENV)
	$(PY) tests/hostile_peers.py

# Executed copies land in build/notebooks/ (make test executes them too, in tests/).
notebooks: $(VENV)
	$(PY) notebooks/execute.py

# HTML in build/html, warnings as errors; renders the notebooks as `make notebooks` executed them.
docs: notebooks
	rm -rf docs/_notebooks && mkdir -p docs/_notebooks && cp build/notebooks/*.ipynb docs/_notebooks/
	$(PY) -m sphinx -W --keep-going -q -b html docs build/html

$(VENV): $(STAMP)

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test]'
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)

clean:
	rm -rf build dist *.egg-info demo_output bench_output docs/_notebooks
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
