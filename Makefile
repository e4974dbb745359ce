# Two commands for a fresh machine (Python 3.10+):
#   make demo   set up .venv from requirements.txt, then detect objects in the sample photos (./ssd-out)
#   make test   set up .venv with requirements-dev.txt too, then lint and run the whole test suite
# Both are idempotent: the environment is rebuilt only when a requirements file changes.
#   make test-fast    the suite less the tests marked slow (pytest -m "not slow"): a few minutes instead of ~15
#   make test-floor   the fast suite on the oldest versions requirements.txt admits (requirements-floor.txt,
#                     .venv-floor); FLOOR_ARGS= runs all of it there

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The floor pins are wheels for Python 3.11 (numpy 1.24 has none for 3.12 and later).
FLOOR_PYTHON ?= $(shell command -v python3.11 || echo python3)
FLOOR := .venv-floor

.PHONY: demo test test-fast test-floor bench clean

# TORCH_INDEX: a wheel index to take torch and torchvision from first, e.g. the CPU-only builds:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (requirements.txt then finds them installed and leaves them alone).
TORCH_INDEX ?=
TORCH_PINS := $(shell grep -E '^torch(vision)?[<>=!~]' requirements.txt)

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --progress-bar on --index-url $(TORCH_INDEX) $(foreach pin,$(TORCH_PINS),"$(pin)"))
	$(BIN)/python -m pip install --progress-bar on -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-export.txt
	$(BIN)/python -m pip install --progress-bar on -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/python -m ssd detect $(ARGS)

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Leaves out what is marked slow (pyproject.toml's markers: training runs, torchrun jobs, killed subprocesses,
# notebook and README runs, packaging, and the VGG models' stages of tests/test_models.py) and the tests measured at
# 1 s or more (marked long from tests/data/durations.json: tests/helpers/durations.py says how to re-measure).
test-fast: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not long" $(PYTEST_ARGS)

# One resolve: the exact floors, plus the test tools (whose -r requirements.txt the floors satisfy).
$(FLOOR)/.installed: requirements-floor.txt requirements-dev.txt requirements-export.txt requirements.txt
	test -x $(FLOOR)/bin/python || $(FLOOR_PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install --progress-bar on --upgrade pip
	$(FLOOR)/bin/python -m pip install --progress-bar on -r requirements-floor.txt -r requirements-dev.txt
	touch $@

# The floors decide which APIs exist, and every API the library calls is exercised by the fast tests too; the slow
# ones run the same code for longer (training runs, torchrun, notebooks). So CI (.ci/run) runs the whole suite on
# the current versions and the fast one on the floors: the two suites stay within CI's 25 minutes now that the
# whole suite covers every model (tests/test_models.py). `make test-floor FLOOR_ARGS=` runs all of it there.
FLOOR_ARGS ?= -m "not slow"
test-floor: $(FLOOR)/.installed
	$(FLOOR)/bin/python -m pytest $(FLOOR_ARGS) $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) $(FLOOR) ssd-out build dist *.egg-info .pytest_cache .ruff_cache
