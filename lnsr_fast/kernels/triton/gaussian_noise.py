"""Triton kernel of standard LNSR noise (docs/design.md §1, ε = noise(...)): a Gaussian draw rescaled per
token to ratio·‖x_t‖, 0 at padding — one read of x, one write of ε."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import row_tile_config

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the reference's clamp of ‖ε_t‖


@triton.jit
def _draws(z_ptr, seed, offs, mask):
    """The Gaussian draws of the elements `offs` (counter = element index t·d + c), 0 outside `mask`."""
    if z_ptr is None:
        z = tl.where(mask, tl.randn(seed, offs), 0.0)
    else:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    return z


@triton.jit(do_not_specialize=["seed"])
def _gaussian_noise_kernel(x_ptr, real_ptr, z_ptr, eps_ptr, n_rows, d, ratio, seed,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    in_rows = rows < n_rows
    live = in_rows
    if real_ptr is not None:  # padding rows are never read: they may hold anything, NaN included
        live = live & (tl.load(real_ptr + rows, mask=in_rows, other=0) != 0)
    x_sq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    z_sq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        offs = rows[:, None] * d + cols[None, :]
        mask = live[:, None] & (cols < d)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _draws(z_ptr, seed, offs, mask)
        x_sq += x * x
        z_sq += z * z
    scale = ratio * tl.sqrt(tl.sum(x_sq, axis=1)) / tl.maximum(tl.sqrt(tl.sum(z_sq, axis=1)), TINY)
    # Second pass: the draws again (recomputed, not re-read), scaled; padding rows get 0.
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        offs = rows[:, None] * d + cols[None, :]
        z = _draws(z_ptr, seed, offs, live[:, None] & (cols < d)[None, :])
        tl.store(eps_ptr + offs, (z * scale[:, None]).to(eps_ptr.dtype.element_ty),
                 mask=in_rows[:, None] & (cols < d)[None, :])


def gaussian_noise(x: torch.Tensor, ratio: float, seed: int, real: torch.Tensor | None = None,
                   z: torch.Tensor | None = None) -> torch.Tensor:
    """Standard LNSR noise for x [N, d]: ε_t = z_t·ratio·‖x_t‖/‖z_t‖, 0 where real [N] is False.

    z [N, d] fp32 gives the draws; None draws them with Philox keyed by (seed, element index t·d + c),
    so the same seed gives bit-identical ε. Returns ε in x's dtype. d ≤ kernels.MAX_WIDTH.
    """
    n, d = x.shape
    cfg = row_tile_config(d, width_name="x.shape[1]", noise=True)
    x = x.contiguous()
    eps = torch.empty_like(x)
    if n == 0:
        return eps
    real = None if real is None else real.contiguous().view(torch.uint8)
    z = None if z is None else z.contiguous()
    _gaussian_noise_kernel[(triton.cdiv(n, cfg.rows),)](
        x, real, z, eps, n, d, float(ratio), int(seed), ROWS=cfg.rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return eps
