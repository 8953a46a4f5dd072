"""Triton kernel of in-manifold LNSR noise (DESIGN.md §1–§2, ε = noise(...)): per token, gather the k
neighbour rows, orthonormalise their differences to x_t by modified Gram–Schmidt in fp32 registers,
combine Gaussian coefficients, rescale to ratio·‖x_t‖ — one read of the rows, one write of ε."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian_noise import TINY
from .launch import launch_config

# Philox counters of the generated draws (key: the 64-bit seed as is, so any seed in [0, 2**63) works;
# counters: int64, so no overflow at any realistic N·d): coefficient j of token t at t·k + j, fallback
# element c of token t at FALLBACK_COUNTER + t·d + c. The ranges are disjoint for any N·k < 2**62, so
# the fallback draws are independent of the coefficients.
FALLBACK_COUNTER = tl.constexpr(1 << 62)


@triton.jit(do_not_specialize=["seed"])
def _in_manifold_noise_kernel(x_ptr, ids_ptr, table_ptr, w_ptr, real_ptr, z_ptr, fz_ptr, eps_ptr, fell_ptr,
                              d, ratio, rank_tol, embed_scale, seed,
                              K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    js = tl.arange(0, BLOCK_K)
    in_cols = cols < d
    is_real = tl.full([], 1, tl.int1)
    if real_ptr is not None:
        is_real = tl.load(real_ptr + t) != 0
    # A padding token reads nothing (its x may hold NaN) and ends with ε = 0. (Masks from widths, not
    # `block & scalar`, which the interpreter turns into an unsupported mask dtype.)
    live_cols = cols < tl.where(is_real, d, 0)
    live_js = js < tl.where(is_real, K, 0)
    x = tl.load(x_ptr + t * d + cols, mask=live_cols, other=0.0).to(tl.float32)
    nbr = tl.load(table_ptr + tl.load(ids_ptr + t) * K + js, mask=live_js, other=0).to(tl.int64)
    live = live_js[:, None] & live_cols[None, :]
    rows = tl.load(w_ptr + nbr[:, None] * d + cols[None, :], mask=live, other=0.0).to(tl.float32)
    v = tl.where(live, rows * embed_scale - x[None, :], 0.0)  # the k differences, one per tile row
    norm0 = tl.sqrt(tl.sum(v * v, axis=1))
    if z_ptr is None:
        z = tl.randn(seed, t * K + js)
    else:
        z = tl.load(z_ptr + t * K + js, mask=live_js, other=0.0)

    # Modified Gram–Schmidt, right-looking: once q_j is final, its projection leaves every later row.
    # Each row sees the same sequence of subtractions as in the reference's left-looking loop.
    eps = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_kept = 0
    for j in tl.static_range(K):
        row_j = js == j
        v_j = tl.sum(tl.where(row_j[:, None], v, 0.0), axis=0)
        res = tl.sqrt(tl.sum(v_j * v_j))
        keep = res > rank_tol * tl.sum(tl.where(row_j, norm0, 0.0))
        q = tl.where(keep, v_j / tl.maximum(res, TINY), 0.0)
        eps += tl.sum(tl.where(row_j, z, 0.0)) * q
        n_kept += keep.to(tl.int32)
        if j + 1 < K:
            dots = tl.sum(v * q[None, :], axis=1)
            v -= tl.where(js > j, dots, 0.0)[:, None] * q[None, :]

    fell = (n_kept == 0) & is_real
    if fell:
        if fz_ptr is None:
            eps = tl.where(in_cols, tl.randn(seed, t * d + cols + FALLBACK_COUNTER), 0.0)
        else:
            eps = tl.load(fz_ptr + t * d + cols, mask=in_cols, other=0.0)
    scale = ratio * tl.sqrt(tl.sum(x * x)) / tl.maximum(tl.sqrt(tl.sum(eps * eps)), TINY)
    out = tl.where(is_real, eps * scale, 0.0)
    tl.store(eps_ptr + t * d + cols, out.to(eps_ptr.dtype.element_ty), mask=in_cols)
    tl.store(fell_ptr + t, fell.to(tl.uint8))


def in_manifold_noise(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, ratio: float,
                      rank_tol: float, seed: int, real: torch.Tensor | None = None, embed_scale: float = 1.0,
                      z: torch.Tensor | None = None, fallback_z: torch.Tensor | None = None):
    """In-manifold LNSR noise for x [N, d] of token ids [N] (see reference.in_manifold_noise).

    The neighbours of token t are embed_scale·weight[table[ids[t]]] (table [V, k] int32, weight
    [V, d] in any float dtype). Returns (ε [N, d] in x's dtype, fell_back [N] bool). z [N, k] and
    fallback_z [N, d] (fp32, both or neither) give the Gaussian draws; None draws them with Philox
    keyed by seed: coefficient j of token t at counter t·k + j, fallback element c at
    2**62 + t·d + c — same seed, bit-identical ε. d ≤ launch.MAX_WIDTH, k ≤ launch.MAX_K.
    """
    if (z is None) != (fallback_z is None):
        given = lambda t: "None" if t is None else "a tensor"  # noqa: E731
        raise ValueError(f"z and fallback_z must be given together or both be None, got z={given(z)}, "
                         f"fallback_z={given(fallback_z)}")
    n, d = x.shape
    k = table.shape[1]
    cfg = launch_config(d, k, width_name="x.shape[1]")
    x, ids, table, weight = x.contiguous(), ids.contiguous(), table.contiguous(), weight.contiguous()
    eps = torch.empty_like(x)
    fell_back = torch.empty(n, dtype=torch.bool, device=x.device)
    if n == 0:
        return eps, fell_back
    real = None if real is None else real.contiguous().view(torch.uint8)
    z = None if z is None else z.contiguous()
    fallback_z = None if fallback_z is None else fallback_z.contiguous()
    _in_manifold_noise_kernel[(n,)](
        x, ids, table, weight, real, z, fallback_z, eps, fell_back.view(torch.uint8),
        d, float(ratio), float(rank_tol), float(embed_scale), int(seed),
        K=k, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return eps, fell_back
