# Two commands for a new user:  `make demo`  and  `make test`  (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test install-lint lint clean

demo: $(VENV)/.installed  ## install into .venv, then run the demo on the bundled model and sample images
	$(BIN)/bloodcell demo

test: $(VENV)/.installed-test  ## install into .venv with test extras, then run the whole test suite
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-lint: $(VENV)/.installed-lint

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-lint: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[lint]'
	touch $@

lint: $(VENV)/.installed-lint  ## install ruff and mypy into .venv, then check the code and its types
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache
