"""Plain-PyTorch definitions of the ops in one LNSR step (docs/design.md §1).

They are the documentation of what every faster backend computes and the oracle its tests compare
against, so they favour clarity over speed. All arithmetic is fp32 (or float64 when given float64);
the callers cast back to the activation dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch

# A Gram–Schmidt residual smaller than this fraction of the original difference vector's norm is
# treated as linearly dependent on the directions already kept (tied or duplicated embeddings).
DEFAULT_RANK_TOL = 1e-4


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def orthonormal_directions(diffs: torch.Tensor, rank_tol: float = DEFAULT_RANK_TOL):
    """Modified Gram–Schmidt over the k difference vectors of every token.

    diffs: [N, k, d]. Returns (q [N, k, d], kept [N, k] bool): q[:, j] is the j-th orthonormal
    direction, or 0 where the residual of diffs[:, j] fell below rank_tol·‖diffs[:, j]‖ (dropped).
    """
    v = diffs.to(_compute_dtype(diffs)).clone()
    norms0 = v.norm(dim=-1)
    n, k, _ = v.shape
    kept = torch.zeros(n, k, dtype=torch.bool, device=v.device)
    for j in range(k):
        # "Modified": project the running residual, not the original vector, against each kept q_i.
        for i in range(j):
            v[:, j] -= (v[:, i] * v[:, j]).sum(-1, keepdim=True) * v[:, i]
        res = v[:, j].norm(dim=-1)
        kept[:, j] = res > rank_tol * norms0[:, j]
        v[:, j] = torch.where(kept[:, j, None], v[:, j] / res.clamp_min(torch.finfo(v.dtype).tiny)[:, None], 0.0)
    return v, kept


def rescale_to_ratio(eps: torch.Tensor, x: torch.Tensor, ratio: float, real: torch.Tensor | None) -> torch.Tensor:
    """ε_t ← ε_t · ratio·‖x_t‖ / ‖ε_t‖ for every token; 0 where `real` is False (padding)."""
    x = x.to(eps.dtype)
    scale = ratio * x.norm(dim=-1, keepdim=True) / eps.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(eps.dtype).tiny)
    eps = eps * scale
    if real is not None:  # where, not a product: whatever padding holds, its ε is 0
        eps = torch.where(real[..., None].bool(), eps, 0.0)
    return eps


def gaussian_noise(x: torch.Tensor, z: torch.Tensor, ratio: float, real: torch.Tensor | None = None) -> torch.Tensor:
    """Standard LNSR noise: the Gaussian draw z [N, d] rescaled per token to ratio·‖x_t‖."""
    return rescale_to_ratio(z.to(_compute_dtype(x)), x, ratio, real)


def in_manifold_noise(
    x: torch.Tensor,
    neighbor_rows: torch.Tensor,
    z: torch.Tensor,
    fallback_z: torch.Tensor,
    ratio: float,
    real: torch.Tensor | None = None,
    rank_tol: float = DEFAULT_RANK_TOL,
):
    """In-manifold LNSR noise for N tokens.

    x [N, d] token embeddings; neighbor_rows [N, k, d] the embeddings of each token's k nearest
    vocabulary rows; z [N, k] N(0,1) coefficients; fallback_z [N, d] the Gaussian used by tokens whose
    neighbour differences span nothing. Returns (ε [N, d] in the compute dtype, fell_back [N] bool).
    ε_t = Σ_j z_tj q_tj over the kept orthonormal directions q_tj of span{e_nbr − x_t}, i.e. an isotropic
    Gaussian inside that span, then rescaled to ratio·‖x_t‖ and zeroed at padding.
    """
    dt = _compute_dtype(x)
    q, kept = orthonormal_directions(neighbor_rows.to(dt) - x.to(dt)[:, None, :], rank_tol)
    eps = torch.einsum("nk,nkd->nd", z.to(dt) * kept, q)
    fell_back = ~kept.any(dim=1)
    if real is not None:
        fell_back &= real
    eps = torch.where(fell_back[:, None], fallback_z.to(dt), eps)
    return rescale_to_ratio(eps, x, ratio, real), fell_back


def layerwise_stability(
    clean: Sequence[torch.Tensor],
    noisy: Sequence[torch.Tensor],
    real: torch.Tensor | None,
    weights: Sequence[float],
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ_r w_r · mean over real tokens of ‖h_r,t − h̃_r,t‖² (eq. 11); `mean` also divides by d.

    clean/noisy: sequences of [B, T, d]; real: [B, T] bool or None (all real). Returns a 0-dim fp32
    (float64 for float64 inputs) tensor; 0 when no token is real.
    """
    dt = _compute_dtype(clean[0])
    total = torch.zeros((), dtype=dt, device=clean[0].device)
    for h, h_noisy, w in zip(clean, noisy, weights):
        per_token = (h.to(dt) - h_noisy.to(dt)).pow(2).sum(-1)
        if reduction == "mean":
            per_token = per_token / h.shape[-1]
        if real is not None:  # where, not a product: padding never matters, even if it holds NaN/Inf
            per_token = torch.where(real.bool(), per_token, 0.0)
        total = total + w * per_token.sum()
    n_real = real.sum() if real is not None else torch.tensor(clean[0].shape[:-1].numel(), device=total.device)
    return total / n_real.clamp_min(1).to(dt)


def layerwise_stability_backward(
    grad: torch.Tensor,
    clean: Sequence[torch.Tensor],
    noisy: Sequence[torch.Tensor],
    real: torch.Tensor | None,
    weights: Sequence[float],
    reduction: str = "sum",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of `layerwise_stability` given its upstream gradient `grad` (0-dim).

    ∂/∂h_r = 2·grad·w_r·(h_r − h̃_r) / #real (also / d for `mean`), 0 at padding; ∂/∂h̃_r is its
    negative. Each gradient comes back in its input's dtype.
    """
    dt = grad.dtype
    n_real = real.sum().clamp_min(1).to(dt) if real is not None else clean[0].shape[:-1].numel()
    grads_clean, grads_noisy = [], []
    for h, h_noisy, w in zip(clean, noisy, weights):
        scale = 2 * w * grad / (n_real * h.shape[-1] if reduction == "mean" else n_real)
        g = (h.to(dt) - h_noisy.to(dt)) * scale
        if real is not None:
            g = torch.where(real[..., None], g, 0.0)
        grads_clean.append(g.to(h.dtype))
        grads_noisy.append((-g).to(h_noisy.dtype))
    return grads_clean, grads_noisy


def _halves(hidden: Sequence[torch.Tensor], pairs: int):
    """The clean rows [0, pairs) and the noisy rows [N - pairs, N) of concat-mode hidden states [N, ...]."""
    return [h[:pairs] for h in hidden], [h[h.shape[0] - pairs:] for h in hidden]


def layerwise_stability_concat(hidden: Sequence[torch.Tensor], pairs: int, real: torch.Tensor | None,
                               weights: Sequence[float], reduction: str = "sum") -> torch.Tensor:
    """`layerwise_stability` between rows [0, pairs) and [N - pairs, N) of each hidden state [N, ..., d];
    real: [pairs, ...] of the clean rows or None."""
    return layerwise_stability(*_halves(hidden, pairs), real, weights, reduction)


def layerwise_stability_concat_backward(grad: torch.Tensor, hidden: Sequence[torch.Tensor], pairs: int,
                                        real: torch.Tensor | None, weights: Sequence[float], reduction: str = "sum",
                                        detach_clean: bool = False) -> list[torch.Tensor]:
    """One gradient per hidden state [N, ..., d]: the clean rows' (0 with detach_clean), 0 in the rows
    between the two blocks, the noisy rows' — as `layerwise_stability_backward` gives them."""
    grads_clean, grads_noisy = layerwise_stability_backward(grad, *_halves(hidden, pairs), real, weights, reduction)
    return [torch.cat([torch.zeros_like(g_clean) if detach_clean else g_clean,
                       h.new_zeros((h.shape[0] - 2 * pairs, *h.shape[1:])), g_noisy])
            for h, g_clean, g_noisy in zip(hidden, grads_clean, grads_noisy)]
