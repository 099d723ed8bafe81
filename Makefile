# segcli: the commands the README and CI use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint docs bench bench-train clean

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'

test:
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check segcli tests benchmarks docs/hooks

docs:
	$(PY) -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

bench:
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_predict.py --memory

bench-train:
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf runs .pytest_cache build site *.egg-info
