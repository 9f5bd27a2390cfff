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
	$(VENV)/bin/lint-imports --no-cache --no-logo

format: $(STAMP)
	$(PY) -m ruff format proxy tests bench deploy
	$(PY) -m ruff check --fix proxy tests bench deploy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The container image from the Dockerfile, built with docker, else podman; CONTAINER_TOOL names
# another (or picks podman when both are there), IMAGE the tag. Without either tool it says so
# and fails (make exits 2) rather than skipping, so that a script or CI job that asked for an
# image never goes on as if it had one. No virtual environment needed.
IMAGE_VERSION  ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE          ?= royalti-auth-proxy:$(IMAGE_VERSION)
CONTAINER_TOOL ?= $(firstword $(foreach t,docker podman,$(if $(shell command -v $(t) 2>/dev/null),$(t))))

.PHONY: image
image:
	@if [ -z "$(CONTAINER_TOOL)" ]; then \
	  echo "make image: neither docker nor podman is on PATH, so no image was built." >&2; \
	  echo "make image: install one of them, or set CONTAINER_TOOL to a docker-compatible command." >&2; \
	  exit 1; \
	fi
	$(CONTAINER_TOOL) build --tag $(IMAGE) --build-arg VERSION=$(IMAGE_VERSION) \
	  --build-arg REVISION=$(IMAGE_REVISION) --file Dockerfile .
	@echo "make image: built $(IMAGE) with $(CONTAINER_TOOL)"
