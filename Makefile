# Two commands for a fresh machine (Python 3.10+):
#   make demo   set up .venv from requirements.txt, then detect objects in the sample photos (./ssd-out)
#   make test   set up .venv with requirements-dev.txt too, then lint and run the whole test suite
# Both are idempotent: the environment is rebuilt only when a requirements file changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/python -m ssd detect $(ARGS)

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) ssd-out .pytest_cache .ruff_cache
