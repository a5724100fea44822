# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint verify demo bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/lukhas up

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest

verify: install
	$(BIN)/lukhas verify

demo: install
	$(BIN)/lukhas demo

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/lukhas bench

# The long fault and fuzz runs (marked `soak`), left out of `make test` to keep it fast.
soak: install
	$(BIN)/pytest -m soak

clean:
	rm -rf $(VENV) .lukhas artifacts *.egg-info
