# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv when missing and installs fedcare with torch pinned by
# constraints.txt (the CPU wheel; an unpinned torch pulls several GB of CUDA).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedcare-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedcare demo --out runs/demo

# ruff (pinned in constraints.txt) gates the tests: a lint or format finding fails `make test`.
test: $(STAMP)
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/ruff format --check --quiet .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy client server common models simulations

clean:
	rm -rf runs .pytest_cache
