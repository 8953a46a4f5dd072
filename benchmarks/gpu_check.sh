#!/usr/bin/env bash
# `make gpu-check`, for a machine with an NVIDIA GPU (one command, under 5 minutes on an H100): builds the
# CUDA extension in place for this card, runs the kernel tests on the GPU, then the kernel benchmarks (every
# backend against the plain-PyTorch variants of DESIGN.md §5 and the bytes floor) and the LNSR step at
# B=32, and prints DESIGN.md §6's targets last. CSV/markdown/PNG go to $RESULTS (benchmarks/results/),
# tagged with the card's name. Without a GPU it is a dry run: no build, the tests with the Triton
# interpreter, the benchmarks with --quick into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    RESULTS=${RESULTS:-benchmarks/results}
    quick=()
    say "building the CUDA extension for $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")"
    arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} LNSR_FAST_CUDA=1 \
        MAX_JOBS=${MAX_JOBS:-8} "$PYTHON" setup.py --quiet build_ext --inplace
else
    RESULTS=${RESULTS:-$(mktemp -d)}
    quick=(--quick)
    say "no CUDA device: dry run (no build, Triton interpreted, benchmarks --quick into $RESULTS)"
fi

say "kernel tests"
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
"$PYTHON" -m pytest -q -x -p no:cacheprovider "${parallel[@]}" tests/test_kernels_triton.py \
    tests/test_cuda_extension.py tests/test_backends.py tests/test_stability.py tests/test_noise.py

say "kernel benchmarks"
"$PYTHON" benchmarks/bench_noise.py "${quick[@]}" --results "$RESULTS"
"$PYTHON" benchmarks/bench_stability.py "${quick[@]}" --results "$RESULTS"
if [ ${#quick[@]} -eq 0 ]; then step_args=(--sizes bert-base,bert-large --batches 32); else step_args=(--quick); fi
"$PYTHON" benchmarks/bench_step.py "${step_args[@]}" --methods ft,lnsr,lnsr_in_manifold --modes concat \
    --results "$RESULTS"

say "targets"
"$PYTHON" benchmarks/render.py --targets "$RESULTS"
