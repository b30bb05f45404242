# Two commands do all set-up on a fresh machine with Python >= 3.11 and pip:
#   make demo   create .venv if needed, install, train on the embedded data set, print a result table
#   make test   same set-up, then the whole test suite
#   make demo GPU=1   the same with JAX for NVIDIA GPUs (installs the cuda12 extra)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
comma  := ,
EXTRAS := dev$(if $(filter 1,$(GPU)),$(comma)cuda12)
STAMP  := $(VENV)/.installed$(if $(filter 1,$(GPU)),-cuda12)

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Two workers: most of the suite's time is single-threaded compilation, so this machine's 2 cores halve it.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache
