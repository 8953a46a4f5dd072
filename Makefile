# `make test` and `make demo` work on a fresh machine: they create .venv, install torch (the CPU wheel
# torch==2.13.0 when the venv has no torch; never an unpinned torch, which would pull a multi-GB CUDA
# build), then this package with its extras. Stamps make a re-run install nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo clean
install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Pin whatever torch the venv ends up with, so no later install can swap it for another build.
$(VENV)/constraints.txt: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $@

$(VENV)/.installed: pyproject.toml setup.py $(VENV)/constraints.txt
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt -e ".[dev,demo,faiss]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/lnsr-fast demo

clean:
	rm -rf $(VENV) build *.egg-info
