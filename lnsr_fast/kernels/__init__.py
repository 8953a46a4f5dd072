"""Compute backends of the LNSR step (DESIGN.md §1): `torch` (plain PyTorch, kernels/reference.py, the
oracle of every other backend), `triton` (kernels/triton/) and `cuda` (csrc/, loaded by kernels/cuda.py).

The ops are registered with torch.library in kernels/ops.py; this module only says which backends a
device offers and which one `backend="auto"` takes.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..checks import check_choice

BACKENDS = ("auto", "cuda", "triton", "torch")
# What `auto` prefers on a CUDA device. Triton first: its kernels are the ones CI executes (under the
# Triton interpreter) against the reference; the CUDA extension is only compiled in CI. Reorder from
# the measurements of `make gpu-check` (benchmarks/results/).
AUTO_ORDER = ("triton", "cuda", "torch")


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


def available_backends(device) -> list[str]:
    """The backends that can run on `device`, in `auto`'s order of preference; "torch" is always there."""
    device = torch.device(device)
    found = []
    for name in AUTO_ORDER:
        if name == "triton" and _triton_runs_on(device):
            found.append(name)
        elif name == "cuda" and device.type == "cuda":
            from . import cuda
            if cuda.is_available():
                found.append(name)
    return found + ["torch"]


def resolve_backend(backend: str, device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for tensors on `device`: `auto` takes the preferred available one (and
    `torch` for float64, which only the reference computes); a named backend must be available."""
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    if backend == "torch":
        return backend
    if dtype == torch.float64:
        if backend == "auto":
            return "torch"
        raise ValueError(f"backend={backend!r} supports float32, bfloat16 and float16; float64 needs backend='torch'")
    if backend == "auto":
        # The Triton interpreter is a test vehicle, not a CPU backend.
        return available_backends(device)[0] if device.type == "cuda" else "torch"
    available = available_backends(device)
    if backend not in available:
        raise ValueError(f"backend={backend!r} is not available on {device}: {_why_not(backend, device)}; "
                         f"available: {available}")
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
