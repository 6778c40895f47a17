# Two commands do all the set-up: `make demo` and `make test` (each creates .venv first if needed).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raysl-installed
# The sandbox's extra package indexes print one harmless warning per package; hide only those lines.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: venv demo test lint unit integration bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import raysl, torch, ray, mlflow, timm, moto"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/raysl demo

lint: venv
	$(VENV)/bin/ruff check raysl tests infra
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit -q

integration: venv
	$(VENV)/bin/pytest tests/integration -q

test: lint
	$(VENV)/bin/pytest tests/unit tests/integration -q --durations=15

bench: venv
	$(VENV)/bin/raysl bench ingest
	$(VENV)/bin/raysl bench step

clean:
	rm -rf demo-output raysl-runs mlflow.db mlartifacts .pytest_cache .mypy_cache .ruff_cache
