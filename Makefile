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
# The tests run in two processes (pytest-xdist): most of the suite's time is real processes
# waiting, which the second process fills. loadgroup: each process is handed a few tests at a
# time, so a few long real-process tests do not end the run alone (tests/conftest.py hands
# out the modules of real-process tests first); the tests of one xdist_group (the shared real
# deployment, tests/integration/conftest.py; the shared simulation SuperLink, tests/conftest.py)
# go to one process, which starts it once and stops it after the group's last test.
test: $(STAMP)
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/ruff format --check --quiet .
	$(PY) -m pytest -q -n 2 --dist loadgroup

# mypy checks the namespace as installed, `fedcare.*`: the folders are mapped onto it in
# pyproject.toml, so a tree of links under build/ shows mypy the same mapping.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/fedcare
	for d in common models client server simulations; do ln -s ../../../$$d $(TYPECHECK)/fedcare/$$d; done
	for f in fedcare/*.py fedcare/py.typed; do ln -s ../../../$$f $(TYPECHECK)/fedcare/; done
	MYPYPATH=$(TYPECHECK) $(VENV)/bin/mypy -p fedcare

clean:
	rm -rf runs .pytest_cache
