"""Triton kernel of standard LNSR noise (DESIGN.md §1, ε = noise(...)): a Gaussian draw rescaled per
token to ratio·‖x_t‖ in the same pass, 0 at padding."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_config, row_tile

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the reference's clamp of ‖ε_t‖


@triton.jit(do_not_specialize=["seed"])
def _gaussian_noise_kernel(x_ptr, real_ptr, z_ptr, eps_ptr, n_rows, d, ratio, seed,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs, live2, in_tile = row_tile(real_ptr, n_rows, d, ROWS, BLOCK_D)
    x = tl.load(x_ptr + offs, mask=live2, other=0.0).to(tl.float32)
    if z_ptr is None:
        z = tl.where(live2, tl.randn(seed, offs), 0.0)  # counter = element index t·d + c
    else:
        z = tl.load(z_ptr + offs, mask=live2, other=0.0)
    scale = ratio * tl.sqrt(tl.sum(x * x, axis=1)) / tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), TINY)
    tl.store(eps_ptr + offs, (z * scale[:, None]).to(eps_ptr.dtype.element_ty), mask=in_tile)


def gaussian_noise(x: torch.Tensor, ratio: float, seed: int, real: torch.Tensor | None = None,
                   z: torch.Tensor | None = None) -> torch.Tensor:
    """Standard LNSR noise for x [N, d]: ε_t = z_t·ratio·‖x_t‖/‖z_t‖, 0 where real [N] is False.

    z [N, d] fp32 gives the draws; None draws them with Philox keyed by (seed, element index t·d + c),
    so the same seed gives bit-identical ε. Returns ε in x's dtype. d is limited to launch.MAX_WIDTH.
    """
    n, d = x.shape
    cfg = launch_config(d, width_name="x.shape[1]")
    x = x.contiguous()
    eps = torch.empty_like(x)
    if n == 0:
        return eps
    real = None if real is None else real.contiguous().view(torch.uint8)
    z = None if z is None else z.contiguous()
    _gaussian_noise_kernel[(triton.cdiv(n, cfg.rows),)](
        x, real, z, eps, n, d, float(ratio), int(seed), ROWS=cfg.rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return eps
