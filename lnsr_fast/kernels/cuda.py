"""The CUDA C++ backend of the LNSR ops (docs/design.md §1): the extension lnsr_fast._C built from
lnsr_fast/csrc/, and its kernels as plain functions with the Triton modules' arguments.

Where the extension was not built at install time (pip's build isolation hides the installed torch from
setup.py), it is compiled on first use with ninja for the GPU present, into a cache folder
($LNSR_FAST_CACHE, default ~/.cache/lnsr_fast), once per torch version and source; LNSR_FAST_CUDA=0
turns that off. Where it cannot be built (a CPU torch, no nvcc), unavailable_reason() says why in one line
and `auto` takes the Triton and torch backends.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)
SOURCES = Path(__file__).resolve().parents[1] / "csrc"

_extension = None
_load_error: str | None = None  # why the extension did not load, once tried


def _build_reason() -> str:
    """Why the extension cannot be compiled here, or ""."""
    if os.environ.get("LNSR_FAST_CUDA") == "0":
        return "LNSR_FAST_CUDA=0 turns the CUDA extension off"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME to one"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return ""


def _jit_build():
    """Compile csrc/ with ninja into the cache (a no-op when it is there) and import it."""
    from torch.utils.cpp_extension import load

    sources = sorted(p for p in SOURCES.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    cache = Path(os.environ.get("LNSR_FAST_CACHE", Path.home() / ".cache" / "lnsr_fast"))
    folder = cache / f"torch-{torch.__version__}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    logger.warning("lnsr_fast: compiling its CUDA kernels for this GPU into %s (first use only; about a minute)",
                   folder)
    return load(name="lnsr_fast_C", sources=[str(p) for p in sources if p.suffix in (".cpp", ".cu")],
                extra_include_paths=[str(SOURCES)], build_directory=str(folder),
                # No --use_fast_math: the norms, the factorisation and the Box–Muller draws stay IEEE.
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])


def _load():
    global _extension, _load_error
    if _extension is None and _load_error is None:
        try:
            _extension = importlib.import_module("lnsr_fast._C")
        except (ImportError, OSError) as e:  # not built at install time, or built against another torch
            reason = _build_reason()
            if reason:
                _load_error = f"the CUDA extension lnsr_fast._C is not built ({type(e).__name__}: {e}) and cannot " \
                              f"be compiled here: {reason}"
            else:
                try:
                    _extension = _jit_build()
                except (RuntimeError, OSError, ImportError) as build_error:
                    _load_error = f"compiling the CUDA extension failed: {build_error}"
    return _extension


def is_available() -> bool:
    """True when the extension loaded (or was compiled) and torch sees a CUDA device."""
    return torch.cuda.is_available() and _load() is not None


def unavailable_reason() -> str:
    """Why is_available() is False; "" when it is True."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return "" if _load() is not None else _load_error


def _ext():
    ext = _load()
    if ext is None:
        raise RuntimeError(_load_error)
    return ext


def gaussian_noise(x: torch.Tensor, ratio: float, seed: int, real: torch.Tensor | None = None,
                   z: torch.Tensor | None = None) -> torch.Tensor:
    """Standard LNSR noise for x [N, d] (see reference.gaussian_noise): ε in x's dtype. z [N, d] fp32 gives
    the draws; None draws them in the kernel from Philox4x32-10 keyed by (seed, subsequence = token
    index): element i is normal i of the token's stream (4 per 128-bit block, Box–Muller)."""
    return _ext().gaussian_noise(x, ratio, seed, real, z)


def in_manifold_noise(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, ratio: float,
                      rank_tol: float, seed: int, real: torch.Tensor | None = None, embed_scale: float = 1.0,
                      z: torch.Tensor | None = None, fallback_z: torch.Tensor | None = None):
    """In-manifold noise for x [N, d] of token ids [N], neighbours embed_scale·weight[table[ids]]: returns
    (ε [N, d] in x's dtype, fell_back [N] bool) as reference.in_manifold_noise does.

    z [N, k] and fallback_z [N, d] (fp32, both or neither) are the Gaussian draws; None draws them in the
    kernel from Philox4x32-10 keyed by (seed, subsequence = token index): z_tj is normal j of the
    token's stream, fallback element i is normal 32 + i. The same seed gives bit-identical noise. Takes
    k <= 32 and d <= 8192 (kernels.LIMITS); the extension checks every argument.
    """
    return _ext().in_manifold_noise(x, ids, table, weight, ratio, rank_tol, seed, real, embed_scale, z, fallback_z)


def stability_forward(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], real: torch.Tensor | None,
                      weights: Sequence[float], reduction: str) -> torch.Tensor:
    """reference.layerwise_stability over all layers (at most 64) in one launch: a 0-dim fp32 tensor.
    clean[i] and noisy[i] are read in place (views of one [N, T, d] tensor are fine) and must be
    contiguous; padding rows are never read. Bit-reproducible for a given shape and device."""
    return _ext().stability_forward(list(clean), list(noisy), real, [float(w) for w in weights], reduction)


def stability_backward(grad: torch.Tensor, clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor],
                       real: torch.Tensor | None, weights: Sequence[float], reduction: str,
                       grads_clean: Sequence[torch.Tensor] | None, grads_noisy: Sequence[torch.Tensor] | None,
                       clean_zero: bool = False) -> None:
    """Writes the gradients of stability_forward for the 0-dim fp32 upstream `grad` in one launch:
    grads_clean[r] = 2·grad·w_r/(#real [·d_r])·(h_r − h̃_r) (zeros with clean_zero), grads_noisy[r] its
    negative, 0 at padding; None skips a side. grads_clean[r] may hold more tokens than clean[r] (a
    concat-mode gradient from its first row): the rows after the paired ones are zero-filled."""
    _ext().stability_backward(grad, list(clean), list(noisy), real, [float(w) for w in weights], reduction,
                              None if grads_clean is None else list(grads_clean),
                              None if grads_noisy is None else list(grads_noisy), clean_zero)
