"""Compute backends of the LNSR step (DESIGN.md §1): `torch` (plain PyTorch, kernels/reference.py, the
oracle of every other backend), `triton` (kernels/triton/) and `cuda` (csrc/, loaded by kernels/cuda.py).

The ops are registered with torch.library in kernels/ops.py; this module only says which backends a
device offers and which one `backend="auto"` takes.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
# What `auto` prefers on a CUDA device. Triton first: its kernels are the ones CI executes (under the
# Triton interpreter) against the reference; the CUDA extension is only compiled in CI. Reorder from
# the measurements of `make gpu-check` (benchmarks/results/).
AUTO_ORDER = ("triton", "cuda", "torch")


def _triton_runs_on(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return backend
    if dtype == torch.float64:
        if backend == "auto":
            return "torch"
        raise ValueError(f"backend={backend!r} supports float32, bfloat16 and float16; float64 needs backend='torch'")
    available = available_backends(device)
    if backend == "auto":
        # The Triton interpreter is a test vehicle, not a CPU backend.
        return available[0] if device.type == "cuda" else "torch"
    if backend not in available:
        raise ValueError(f"backend={backend!r} is not available on {device}: {_why_not(backend, device)}; "
                         f"available: {available}")
    return backend


def _why_not(backend: str, device: torch.device) -> str:
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        return ("Triton runs on CUDA devices (or on the CPU only under TRITON_INTERPRET=1)" if device.type != "cuda"
                else "torch sees no CUDA device")
    if device.type != "cuda":
        return "the CUDA extension runs on CUDA devices only"
    from . import cuda
    return cuda.unavailable_reason()
