# Every target creates the virtual environment it needs; `make demo` and `make test` are the
# only two commands a newcomer runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint format faults bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/royalti-proxy demo

test: $(STAMP)
	$(PY) -m pytest -q

# The hostile-input and fault suite alone, with its summary (also part of `make test`).
faults: $(STAMP)
	$(PY) -m pytest -q tests/faults

# The benchmark suite: a table on stdout, JSON in bench-results/ (see docs/performance.md).
bench: $(STAMP)
	$(PY) bench/run.py

lint: $(STAMP)
	$(PY) -m ruff check proxy tests bench deploy
	$(PY) -m ruff format --check proxy tests bench deploy
	$(PY) -m mypy proxy

format: $(STAMP)
	$(PY) -m ruff format proxy tests bench deploy
	$(PY) -m ruff check --fix proxy tests bench deploy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
