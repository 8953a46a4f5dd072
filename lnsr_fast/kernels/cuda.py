"""The CUDA C++ backend of the LNSR ops (DESIGN.md §1): loads the extension lnsr_fast._C (csrc/, built by
setup.py where nvcc and a CUDA build of torch are present) and exposes its kernels as plain functions.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch

_extension = None
_load_error: str | None = None  # why the extension did not load, once tried


def _load():
    global _extension, _load_error
    if _extension is None and _load_error is None:
        try:
            _extension = importlib.import_module("lnsr_fast._C")
        except (ImportError, OSError) as e:  # not built, or built against another torch
            _load_error = (f"the CUDA extension lnsr_fast._C did not load ({type(e).__name__}: {e}); build it where "
                           "nvcc and a CUDA build of torch are present with `pip install --no-build-isolation .`")
    return _extension


def is_available() -> bool:
    """True when the extension loaded and torch sees a CUDA device."""
    return _load() is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    """Why is_available() is False; "" when it is True."""
    if _load() is None:
        return _load_error
    return "" if torch.cuda.is_available() else "torch sees no CUDA device"


def _ext():
    ext = _load()
    if ext is None:
        raise RuntimeError(_load_error)
    return ext


def in_manifold_noise(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, ratio: float,
                      rank_tol: float, seed: int, real: torch.Tensor | None = None, embed_scale: float = 1.0,
                      z: torch.Tensor | None = None, fallback_z: torch.Tensor | None = None):
    """In-manifold noise for x [N, d] of token ids [N], neighbours embed_scale·weight[table[ids]]: returns
    (ε [N, d] in x's dtype, fell_back [N] bool) as reference.in_manifold_noise does.

    z [N, k] and fallback_z [N, d] (fp32, both or neither) are the Gaussian draws; None draws them in the
    kernel from Philox4x32-10 keyed by (seed, subsequence = token index): z_tj is normal j of the
    token's stream, fallback element i is normal 32 + i (4 normals per 128-bit block, Box–Muller). The
    same seed gives bit-identical noise. Takes k <= 32 and d up to 4096 (k <= 8), 2048 (k <= 16) or
    1024 (k <= 32); the extension checks every argument.
    """
    return _ext().in_manifold_noise(x, ids, table, weight, ratio, rank_tol, seed, real, embed_scale, z, fallback_z)


def stability_forward(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], real: torch.Tensor | None,
                      weights: Sequence[float], reduction: str) -> torch.Tensor:
    """reference.layerwise_stability over all layers (at most 64) in one launch: a 0-dim fp32 tensor.
    clean[i] and noisy[i] are read in place (views of one [2B, T, d] tensor are fine) and must be
    contiguous; padding rows are never read. Bit-reproducible for a given shape and device."""
    return _ext().stability_forward(list(clean), list(noisy), real, [float(w) for w in weights], reduction)


def stability_backward(grad: torch.Tensor, clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor],
                       real: torch.Tensor | None, weights: Sequence[float], reduction: str):
    """Gradients of stability_forward for the 0-dim fp32 upstream `grad`, in one launch: (grads_clean,
    grads_noisy), lists in the dtypes of clean and noisy; 0 at padding."""
    return _ext().stability_backward(grad, list(clean), list(noisy), real, [float(w) for w in weights], reduction)
