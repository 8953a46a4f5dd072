#!/usr/bin/env bash
# `make gpu-check`, for a machine with an NVIDIA GPU (one command, about 6 minutes on an H100 with the build):
# builds the CUDA extension for this card where nvcc is present (else says so and checks Triton and torch
# only), runs the kernel tests on the GPU, compute-sanitizer's memcheck and racecheck on the in-manifold,
# Gaussian and stability kernels where the tool is present, the kernel benchmarks (every backend against the
# plain-PyTorch variants of docs/design.md §5 and the bytes floor) and the LNSR step at B=32, then docs/design.md §6's
# targets. A failing step never stops the run: the failures are listed at the end (exit status 1). CSV,
# markdown, PNG and this run's log go to $RESULTS (benchmarks/results/), tagged with the card's name.
# Without a GPU it is a dry run: no build, the tests with the Triton interpreter, the benchmarks with
# --quick, everything into a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()
say() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
step() {  # step NAME COMMAND...: run it, remember a failure, go on
    local name=$1
    shift
    say "$name"
    "$@" || { failed+=("$name (exit $?)"); echo "!! $name failed; going on"; }
}

if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    gpu=1
    RESULTS=${RESULTS:-benchmarks/results}
    quick=()
else
    gpu=0
    RESULTS=${RESULTS:-$(mktemp -d)}
    quick=(--quick)
fi
mkdir -p "$RESULTS"
tag=$("$PYTHON" -c "import sys, torch; sys.path.insert(0, 'benchmarks'); import common
print(common.device_tag(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))")
exec > >(tee "$RESULTS/gpu_check_$tag.log") 2>&1

if [ $gpu = 0 ]; then
    say "no CUDA device: dry run (no build, Triton interpreted, benchmarks --quick into $RESULTS)"
elif command -v "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" >/dev/null || command -v nvcc >/dev/null; then
    arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    step "building the CUDA extension for $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())") ($arch)" \
        env CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} LNSR_FAST_CUDA=1 \
        MAX_JOBS=${MAX_JOBS:-8} "$PYTHON" setup.py --quiet build_ext --inplace
else
    say "no nvcc on this machine: the CUDA extension is not built; checking the Triton and torch backends only"
    export LNSR_FAST_CUDA=0
fi

step "kernel tests" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_cuda_extension.py \
    tests/test_backends.py tests/test_stability.py tests/test_noise.py

if [ $gpu = 1 ] && command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        step "compute-sanitizer $tool" compute-sanitizer --tool $tool --error-exitcode 1 \
            "$PYTHON" benchmarks/sanitizer_workload.py
    done
else
    say "compute-sanitizer not run (no GPU, or the tool is not on PATH)"
fi

step "noise benchmark" "$PYTHON" benchmarks/bench_noise.py "${quick[@]}" --results "$RESULTS"
step "stability benchmark" "$PYTHON" benchmarks/bench_stability.py "${quick[@]}" --results "$RESULTS"
if [ $gpu = 1 ]; then step_args=(--sizes bert-base,bert-large --batches 32); else step_args=(--quick); fi
step "step benchmark" "$PYTHON" benchmarks/bench_step.py "${step_args[@]}" --methods ft,lnsr,lnsr_in_manifold \
    --modes concat --results "$RESULTS"
step "targets" "$PYTHON" benchmarks/render.py --targets "$RESULTS"

say "done: results and this log in $RESULTS"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!! %s\n' "${failed[@]}"
    exit 1
fi
