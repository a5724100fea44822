# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run PORT=4223` moves the embedded nats-server; `make run ARGS="--join"` passes more.
PORT ?=
ARGS ?=
# `make test` leaves its JUnit XML with the commit's artifacts; `make verify REUSE_TESTS=1`
# (what CI runs right after `make test`) takes the test gate from it instead of a second run.
SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unversioned)
JUNIT := artifacts/$(SHA)/junit.xml
REUSE_TESTS ?=

.PHONY: install tools run test lint verify demo bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# System tools some tests drive (promtool, chromium); CI installs them, elsewhere those tests skip.
tools:
	deploy/install-test-tools.sh

run: install
	$(BIN)/lukhas up $(if $(PORT),--port $(PORT)) $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	mkdir -p $(dir $(JUNIT))
	$(BIN)/pytest --junitxml=$(JUNIT)

verify: install
	$(BIN)/lukhas verify $(if $(REUSE_TESTS),--junit $(JUNIT)) $(ARGS)

demo: install
	$(BIN)/lukhas demo $(ARGS)

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/lukhas bench

# The long fault and fuzz runs (marked `soak`), left out of `make test` to keep it fast.
soak: install
	$(BIN)/pytest -m soak

clean:
	rm -rf $(VENV) .lukhas artifacts *.egg-info
