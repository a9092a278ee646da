# Two commands: `make demo` and `make test`. Each creates .venv (python3 -m venv) and
# installs flowkit into it when .venv is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing flowkit and its dependencies into $(VENV) (torch is large: a few minutes the first time)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flowkit demo

test: lint
	$(BIN)/python -m pytest -q --doctest-modules flowkit tests

# what `make test` checks before the tests: lint (ruff), formatting (ruff format) and types (mypy)
lint: $(STAMP)
	$(BIN)/ruff check flowkit tests examples benchmarks
	$(BIN)/ruff format --check flowkit tests examples benchmarks
	$(BIN)/mypy

# rewrite the sources the way `make lint` wants them
format: $(STAMP)
	$(BIN)/ruff check --fix flowkit tests examples benchmarks
	$(BIN)/ruff format flowkit tests examples benchmarks

check: $(STAMP)
	$(BIN)/flowkit check

clean:
	rm -rf $(VENV) runs build *.egg-info
