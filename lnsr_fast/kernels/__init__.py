"""Compute backends of the LNSR step (docs/design.md §1): `torch` (plain PyTorch, kernels/reference.py, the
oracle of every other backend), `triton` (kernels/triton/) and `cuda` (lnsr_fast/csrc/, loaded by kernels/cuda.py).

The ops are registered with torch.library in kernels/ops.py; this module says which ops each backend
implements and up to which sizes, which backends a device offers, and which one `backend="auto"` takes.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..checks import check_choice, is_int

BACKENDS = ("auto", "cuda", "triton", "torch")
OPS = ("gaussian_noise", "in_manifold_noise", "layerwise_stability")
# The ops each compiled backend implements and the largest sizes it takes (d: the row width, k: the
# neighbours per token); `torch`, the reference, implements every op at any size. The kernels are
# compiled and checked for spills up to these sizes (tests/test_kernel_resources.py).
MAX_WIDTH, MAX_K = 8192, 32
LIMITS = {backend: {"gaussian_noise": {"d": MAX_WIDTH}, "in_manifold_noise": {"d": MAX_WIDTH, "k": MAX_K},
                    "layerwise_stability": {"d": MAX_WIDTH}}
          for backend in ("cuda", "triton")}
# What `auto` prefers for each op on a CUDA device. Triton first: its kernels are the ones CI executes
# (under the Triton interpreter) against the reference; the CUDA extension is only compiled in CI.
# Reorder from the measurements of `make gpu-check` (benchmarks/results/).
AUTO_ORDER = {op: ("triton", "cuda", "torch") for op in OPS}


@functools.cache
def _triton_installed() -> bool:
    # Cached: backends are resolved at every step, and a failed find_spec searches all of sys.path.
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(device: torch.device) -> bool:
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    # On the CPU Triton only runs interpreted: correct but slow, for tests, never picked by `auto`.
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return _triton_runs_on(device)
    if device.type != "cuda":
        return False
    from . import cuda
    return cuda.is_available()


def available_backends(device, op: str | None = None) -> list[str]:
    """The backends that can run `op` (None: any op) on `device`, in `auto`'s order of preference;
    "torch" is always there and last."""
    device = torch.device(device)
    order = AUTO_ORDER[check_choice("op", op, OPS)] if op is not None else AUTO_ORDER[OPS[0]]
    return [b for b in order if b != "torch" and _runs_on(b, device)] + ["torch"]


def _beyond_limits(op: str, backend: str, sizes: dict) -> str:
    """Why `backend` cannot take `op` at `sizes` (ValueError's words), or "" when it can."""
    if backend == "torch":
        return ""
    limits = LIMITS[backend].get(op)
    if limits is None:
        return (f"backend={backend!r} does not implement {op}; backends that do: "
                f"{[b for b in LIMITS if op in LIMITS[b]] + ['torch']}")
    for name, value in sizes.items():
        if is_int(value) and name in limits and value > limits[name]:
            return (f"{name}={value} is beyond the limit of backend={backend!r} for {op}: {name} <= {limits[name]}; "
                    "use backend='torch' (any size) or 'auto'")
    return ""


def check_supported(op: str, backend: str, device, *, d: int, k: int | None = None) -> None:
    """ValueError, naming the size, the limit and the backend, when `backend` cannot run `op` with rows
    of width d (and k neighbours per token). For "auto" it checks the backend auto takes on `device`,
    which always fits: auto passes over a backend that cannot take the sizes. Availability on `device`
    is not checked (a module built on the CPU may run on a GPU later); resolve_backend checks it per call."""
    check_choice("op", op, OPS)
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        why = _beyond_limits(op, backend, {"d": d, "k": k})
        if why:
            raise ValueError(why)


def resolve_backend(backend: str, device, dtype: torch.dtype | None = None, op: str | None = None, **sizes) -> str:
    """The concrete backend for `op` on tensors of `device` and `dtype` with sizes d (row width) and k
    (neighbours per token). `auto` takes the first backend of AUTO_ORDER[op] that runs on the device and
    takes the sizes (`torch` for float64, which only the reference computes, and on the CPU, where Triton
    is only interpreted); a named backend must run there and take the op and the sizes (ValueError
    naming what does not fit). op=None (the older call form) checks the backend for every op."""
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    if backend == "torch":
        return backend
    if dtype == torch.float64:
        if backend == "auto":
            return "torch"
        raise ValueError(f"backend={backend!r} supports float32, bfloat16 and float16; float64 needs backend='torch'")
    ops = OPS if op is None else (check_choice("op", op, OPS),)
    if backend == "auto":
        if device.type != "cuda":  # the Triton interpreter is a test vehicle, not a CPU backend
            return "torch"
        # Lazily, in order: a backend after the one taken is never loaded (nor compiled, for `cuda`).
        return next(b for b in AUTO_ORDER[ops[0]]
                    if not any(_beyond_limits(o, b, sizes) for o in ops) and _runs_on(b, device))
    for o in ops:
        why = _beyond_limits(o, backend, sizes)
        if why:
            raise ValueError(why)
    if not _runs_on(backend, device):
        raise ValueError(f"backend={backend!r} is not available on {device}: {_why_not(backend, device)}; "
                         f"available: {available_backends(device, op)}")
    return backend


def _why_not(backend: str, device: torch.device) -> str:
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        return ("Triton runs on CUDA devices (or on the CPU only under TRITON_INTERPRET=1)" if device.type != "cuda"
                else "torch sees no CUDA device")
    if device.type != "cuda":
        return "the CUDA extension runs on CUDA devices only"
    from . import cuda
    return cuda.unavailable_reason()
