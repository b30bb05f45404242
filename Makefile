# Two commands do all set-up on a fresh machine with Python >= 3.11 and pip:
#   make demo   create .venv if needed, install, train on the embedded data set, print a result table
#   make test   same set-up, then the whole test suite and the documentation build
#   make docs   same set-up, then the documentation site into site/ (warnings are errors)
#   make demo GPU=1   the same with JAX for NVIDIA GPUs (installs the cuda12 extra)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
comma  := ,
EXTRAS := dev$(if $(filter 1,$(GPU)),$(comma)cuda12)
STAMP  := $(VENV)/.installed$(if $(filter 1,$(GPU)),-cuda12)

.PHONY: demo test docs install clean

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
# Then the documentation build, so that a broken docstring, link or page fails the tests too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2
	$(MAKE) --no-print-directory docs

# The site from mkdocs.yml and docs/ (the API reference read from the docstrings, the notebooks rendered with
# their stored outputs, nothing executed); --strict: any warning (a broken link or anchor, a docstring
# reference that does not resolve, a page left out of the navigation) fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache site .cache
