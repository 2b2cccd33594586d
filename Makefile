# The two commands of the README: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUTO_ML_VENV ?= .venv-pluto-ml
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,test]'
	touch $@

$(PLUTO_ML_VENV)/.installed:
	$(PYTHON) -m venv $(PLUTO_ML_VENV)
	$(PLUTO_ML_VENV)/bin/python -m pip install -q pluto-ml==0.0.29
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed $(PLUTO_ML_VENV)/.installed
	PLUTO_ML_PYTHON=$(CURDIR)/$(PLUTO_ML_VENV)/bin/python $(PY) -m pytest $(PYTEST_ARGS)

# unit + integration: no server or rank processes beyond one Redis (about a minute here)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "unit or integration" $(PYTEST_ARGS)

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[server,test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/run_all.py

lint: $(VENV)/.installed
	$(PY) -m ruff check pluto worker backend tests bench || true

clean:
	rm -rf $(VENV) $(PLUTO_ML_VENV) .pluto .pytest_cache
