# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ember-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ember demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

bench: $(STAMP)
	$(PY) benchmarks/minilm_cpu.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
