"""Triton kernel of in-manifold LNSR noise (docs/design.md §1–§2, ε = noise(...)), one program per token:
a pass over its k neighbour rows accumulates the Gram matrix of the differences to x_t in fp64 (on the
tensor cores), a Cholesky factorisation with the reference's rank test gives the Gram–Schmidt factor R,
and a second pass writes ε = Σ_j c_j (e_j − x_t) with c = R⁻¹z — the reference's Σ_j z_j q_j."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian_noise import TINY
from .launch import in_manifold_config

# Philox counters of the generated draws (key: the 64-bit seed as is, so any seed in [0, 2**63) works;
# counters: int64, so no overflow at any realistic N·d): coefficient j of token t at t·k + j, fallback
# element c of token t at FALLBACK_COUNTER + t·d + c. The ranges are disjoint for any N·k < 2**62, so
# the fallback draws are independent of the coefficients.
FALLBACK_COUNTER = tl.constexpr(1 << 62)


@triton.jit
def _differences(x_ptr, w_ptr, t, nbr, live_js, cols, d, embed_scale, is_real):
    """(e_j − x_t for the neighbour rows live_js at columns `cols`, 0 elsewhere; x_t there), fp32. A
    padding token reads nothing: its x may hold NaN. (Masks from widths, not `block & scalar`, which the
    interpreter turns into an unsupported mask dtype.)"""
    x = tl.load(x_ptr + t * d + cols, mask=cols < tl.where(is_real, d, 0), other=0.0).to(tl.float32)
    live = live_js[:, None] & (cols < d)[None, :]
    rows = tl.load(w_ptr + nbr[:, None] * d + cols[None, :], mask=live, other=0.0).to(tl.float32)
    return tl.where(live, rows * embed_scale - x[None, :], 0.0), x


@triton.jit(do_not_specialize=["k", "seed"])  # one compiled kernel for every k of a tile size
def _in_manifold_noise_kernel(x_ptr, ids_ptr, table_ptr, w_ptr, real_ptr, z_ptr, fz_ptr, eps_ptr, fell_ptr,
                              d, k, ratio, rank_tol, embed_scale, seed,
                              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_K)
    is_real = tl.full([], 1, tl.int1)
    if real_ptr is not None:
        is_real = tl.load(real_ptr + t) != 0
    live_js = js < tl.where(is_real, k, 0)  # padding rows of the tile (j >= k) are never read
    nbr = tl.load(table_ptr + tl.load(ids_ptr + t) * k + js, mask=live_js, other=0).to(tl.int64)

    # Pass 1: the Gram matrix G = D Dᵀ of the differences and ‖x_t‖², accumulated in fp64, where the
    # products of fp32 values are exact: the rank test resolves residuals far below fp32's √eps.
    gram = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float64)
    x_sq = tl.zeros([BLOCK_D], dtype=tl.float64)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        diffs, x = _differences(x_ptr, w_ptr, t, nbr, live_js, cols, d, embed_scale, is_real)
        diffs = diffs.to(tl.float64)
        gram = tl.dot(diffs, tl.trans(diffs), gram)
        x_sq += x.to(tl.float64) * x.to(tl.float64)

    # Cholesky G = RᵀR, row by row: R_jj is the norm of d_j's residual after projecting out the kept
    # directions before it, as in the reference's modified Gram–Schmidt; a residual at or below
    # rank_tol·‖d_j‖ (or NaN) drops direction j (row j of R stays 0), as there. Only the k real rows.
    # (Entries picked by where + sum, inline: a helper's call costs the Triton interpreter milliseconds.)
    row_ids = js[:, None]
    norm0 = tl.sqrt(tl.sum(tl.where(row_ids == js[None, :], gram, 0.0), axis=0))  # ‖d_j‖
    factor = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float64)
    inv_diag = tl.zeros([BLOCK_K], dtype=tl.float64)  # 1 / R_jj, 0 where direction j was dropped
    for j in range(k):
        row = tl.sum(tl.where(row_ids == j, gram, 0.0), axis=0)  # the trailing matrix's row j
        residual = tl.sqrt(tl.maximum(tl.sum(tl.where(js == j, row, 0.0)), 0.0))  # rounding may leave it < 0
        keep = residual > rank_tol * tl.sum(tl.where(js == j, norm0, 0.0))
        inv = tl.where(keep, 1.0 / tl.where(keep, residual, 1.0), 0.0)
        r_row = tl.where(js >= j, row * inv, 0.0)
        factor = tl.where(row_ids == j, r_row[None, :], factor)
        inv_diag = tl.where(js == j, inv, inv_diag)
        gram -= r_row[:, None] * r_row[None, :]

    # c = R⁻¹z over the kept directions, so that Dᵀc = Σ_j z_j q_j: back substitution by columns (c_j is
    # final once the columns after it are subtracted; 0 where direction j was dropped). The q_j are
    # orthonormal: ‖ε_t‖ = ‖z‖ over the kept j, known before ε is written.
    if z_ptr is None:
        z = tl.where(js < k, tl.randn(seed, t * k + js), 0.0).to(tl.float64)
    else:
        z = tl.load(z_ptr + t * k + js, mask=js < k, other=0.0).to(tl.float64)
    coef = z
    for step in range(k):
        j = k - 1 - step
        c_j = tl.sum(tl.where(js == j, coef * inv_diag, 0.0))
        column = tl.sum(tl.where(js[None, :] == j, factor, 0.0), axis=1)  # R_ij over the rows i
        coef = tl.where(js == j, c_j, tl.where(js < j, coef - column * c_j, coef))
    kept = inv_diag > 0
    z_norm = tl.sqrt(tl.sum(tl.where(kept, z * z, 0.0)))
    fell = (tl.sum(kept.to(tl.int32)) == 0) & is_real
    if fell:  # the differences span nothing: full-width Gaussian noise instead, its norm first
        fz_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            if fz_ptr is None:
                fz = tl.where(cols < d, tl.randn(seed, t * d + cols + FALLBACK_COUNTER), 0.0)
            else:
                fz = tl.load(fz_ptr + t * d + cols, mask=cols < d, other=0.0)
            fz_sq += fz * fz
        z_norm = tl.sqrt(tl.sum(fz_sq)).to(tl.float64)
    scale = ratio * tl.sqrt(tl.sum(x_sq)) / tl.maximum(z_norm, TINY)

    # Pass 2: ε_t = scale · Σ_j c_j d_j (0 at padding, where nothing was kept), accumulated in fp64.
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        if fell:
            if fz_ptr is None:
                eps = tl.randn(seed, t * d + cols + FALLBACK_COUNTER).to(tl.float64)
            else:
                eps = tl.load(fz_ptr + t * d + cols, mask=cols < d, other=0.0).to(tl.float64)
        else:
            diffs, _ = _differences(x_ptr, w_ptr, t, nbr, live_js, cols, d, embed_scale, is_real)
            eps = tl.sum(coef[:, None] * diffs.to(tl.float64), axis=0)
        tl.store(eps_ptr + t * d + cols, (eps * scale).to(tl.float32).to(eps_ptr.dtype.element_ty), mask=cols < d)
    tl.store(fell_ptr + t, fell.to(tl.uint8))


def in_manifold_noise(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, ratio: float,
                      rank_tol: float, seed: int, real: torch.Tensor | None = None, embed_scale: float = 1.0,
                      z: torch.Tensor | None = None, fallback_z: torch.Tensor | None = None):
    """In-manifold LNSR noise for x [N, d] of token ids [N] (see reference.in_manifold_noise).

    The neighbours of token t are embed_scale·weight[table[ids[t]]] (table [V, k] int32, weight
    [V, d] in any float dtype). Returns (ε [N, d] in x's dtype, fell_back [N] bool). z [N, k] and
    fallback_z [N, d] (fp32, both or neither) give the Gaussian draws; None draws them with Philox
    keyed by seed: coefficient j of token t at counter t·k + j, fallback element c at
    2**62 + t·d + c — same seed, bit-identical ε. d ≤ kernels.MAX_WIDTH, k ≤ kernels.MAX_K.
    """
    if (z is None) != (fallback_z is None):
        given = lambda t: "None" if t is None else "a tensor"  # noqa: E731
        raise ValueError(f"z and fallback_z must be given together or both be None, got z={given(z)}, "
                         f"fallback_z={given(fallback_z)}")
    n, d = x.shape
    k = table.shape[1]
    cfg = in_manifold_config(d, k, width_name="x.shape[1]")
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
        d, k, float(ratio), float(rank_tol), float(embed_scale), int(seed),
        BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return eps, fell_back
