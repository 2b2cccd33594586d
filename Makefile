# The two commands of the README: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUTO_ML_VENV ?= .venv-pluto-ml
PYTEST_ARGS ?=

.PHONY: install frameworks demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,test]'
	touch $@

$(PLUTO_ML_VENV)/.installed:
	$(PYTHON) -m venv $(PLUTO_ML_VENV)
	$(PLUTO_ML_VENV)/bin/python -m pip install -q pluto-ml==0.0.29
	touch $@

# torch first and pinned: pip takes the CPU build of 2.13.0 from this machine's disk; plain
# `torch` (or lightning pulling it in) would fetch a CUDA build of several GB.
$(VENV)/.frameworks: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,test,integrations]'
	touch $@

install: $(VENV)/.installed

frameworks: $(VENV)/.frameworks

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed $(VENV)/.frameworks $(PLUTO_ML_VENV)/.installed
	PLUTO_ML_PYTHON=$(CURDIR)/$(PLUTO_ML_VENV)/bin/python $(PY) -m pytest $(PYTEST_ARGS)

# unit + integration: no server or rank processes beyond one Redis (about a minute here)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "unit or integration" $(PYTEST_ARGS)

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[server,test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/run_all.py

$(VENV)/.lint: $(VENV)/.installed
	$(PY) -m pip install -q 'ruff>=0.6' 'mypy>=1.10'
	touch $@

# fails on any finding: ruff (rules in pyproject.toml), then mypy (strict on the protocol and SDK)
lint: $(VENV)/.lint
	$(PY) -m ruff check pluto worker backend tests bench examples
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(PLUTO_ML_VENV) .pluto .pytest_cache
