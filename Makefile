# Bootstrap and run: `make demo` for the main job, `make test` for the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Inside the venv, so a recreated venv is reinstalled; remade whenever the dependencies change.
STAMP := $(VENV)/.nenni-installed

.PHONY: install demo test test-slow lint

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes first and pinned: an unpinned resolve of the project's range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/nenni demo

# The quick suite (a few minutes on two cores); the slow tests (full CIFAR-10 runs, the whole zoo, the docs'
# examples) run in CI: `make test-slow`.
# Two workers: the suite is many small single-threaded tests, and the machines have two cores.
test: install
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .
