# `make demo` and `make test` do all the set-up on a fresh machine: a .venv with everything installed.
# CPU PyTorch is pinned; on CUDA or Jetson override it, e.g. `make test TORCH_SPEC="torch==2.5.0"` with
# the index or wheel that NVIDIA/PyTorch publish for the board (see README, "Install").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ORACLE_SPEC ?= transformers==5.23.0
# every other package at the version the tests ran with (constraints.txt); `make install CONSTRAINTS=` lets pip choose
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "$(ORACLE_SPEC)" -e ".[export,quantize,dev,serve]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) out *.egg-info
