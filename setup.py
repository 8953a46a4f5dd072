"""Build script. The metadata lives in pyproject.toml; this file adds the CUDA extension lnsr_fast._C
(lnsr_fast/csrc/) where nvcc and a CUDA build of torch are present, and says what it built or skipped and
why. Where it is skipped (pip's build isolation hides the installed torch), lnsr_fast/kernels/cuda.py
compiles the same sources on first use."""
import glob
import os

from setuptools import setup

# A100, H100, B200; the PTX lets newer GPUs compile it at load time. The in-manifold kernel needs 8.0+
# (fp64 tensor cores). `make cuda-compile` builds with this default too.
DEFAULT_ARCHS = "8.0;9.0;10.0+PTX"


def cuda_extension() -> dict:
    """setup() arguments that build lnsr_fast._C, or {} when it is skipped. LNSR_FAST_CUDA=1 requires the
    extension (the build fails if it cannot be built), =0 skips it; unset, it is built when possible.
    TORCH_CUDA_ARCH_LIST picks the GPU architectures."""
    wanted = os.environ.get("LNSR_FAST_CUDA", "")
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"lnsr_fast: LNSR_FAST_CUDA must be 0 or 1 (or unset), got {wanted!r}")
    if wanted == "0":
        return _skip("LNSR_FAST_CUDA=0", required=False)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment (pip's build isolation hides the installed "
                     "torch); build it against your torch with `pip install --no-build-isolation .`", wanted == "1")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build", wanted == "1")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        return _skip(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME}); set CUDA_HOME to one", wanted == "1")
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"lnsr_fast: building the CUDA extension lnsr_fast._C for torch {torch.__version__} with {CUDA_HOME}, "
          f"architectures {archs}")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = "lnsr_fast/csrc"
    extension = CUDAExtension(
        "lnsr_fast._C",
        sorted(glob.glob(f"{sources}/*.cpp") + glob.glob(f"{sources}/*.cu")),
        include_dirs=[os.path.join(here, sources)],
        depends=glob.glob(f"{sources}/*.h") + glob.glob(f"{sources}/*.cuh"),
        # No --use_fast_math: the norms, the factorisation and the Box–Muller draws stay IEEE. LNSR_FAST_NVCC_FLAGS
        # adds flags (`make cuda-compile`: -Xptxas -v, whose report it checks for spills).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *os.environ.get("LNSR_FAST_NVCC_FLAGS", "").split()]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def _skip(reason: str, required: bool) -> dict:
    if required:
        raise SystemExit(f"lnsr_fast: LNSR_FAST_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"lnsr_fast: skipping the CUDA extension: {reason}")
    return {}


setup(**cuda_extension())
