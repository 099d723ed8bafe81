# segcli: the commands the README and CI use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test bench bench-train clean

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'

test:
	$(PY) -m pytest -q

bench:
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_predict.py --memory

bench-train:
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
