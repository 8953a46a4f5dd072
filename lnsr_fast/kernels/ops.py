"""The ops of one LNSR step (DESIGN.md §1) registered with torch.library: each runs the backend its
`backend` argument names (resolved by kernels.resolve_backend), and has a fake implementation, so
torch.compile traces through them without graph breaks. Arguments are validated by the callers
(noise.py, stability.py); these ops trust them.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch
from torch import Tensor

from . import reference

_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _kernels(backend: str, op: str):
    """The module implementing `op` for a compiled backend; kernels/cuda.py and kernels/triton/<op>.py
    expose the same functions with the same arguments."""
    if backend == "cuda":
        from . import cuda
        return cuda
    return importlib.import_module(f"{__package__}.triton.{op}")


def _on(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one (several GPUs per process)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("lnsr_fast::gaussian_noise", mutates_args=())
def gaussian_noise(x: Tensor, real: Optional[Tensor], ratio: float, seed: int, backend: str) -> Tensor:
    """Standard LNSR noise for x [N, d]: a Gaussian draw keyed by `seed`, rescaled per token to
    ratio·‖x_t‖, 0 where `real` [N] is False. Returns ε in x's dtype."""
    if backend == "torch":
        z = torch.randn(x.shape, generator=_generator(x.device, seed), device=x.device, dtype=torch.float32)
        return reference.gaussian_noise(x, z, ratio, real).to(x.dtype)
    with _on(x.device):
        return _kernels(backend, "gaussian_noise").gaussian_noise(x.contiguous(), ratio, seed, real)


@gaussian_noise.register_fake
def _(x, real, ratio, seed, backend):
    return torch.empty_like(x)


@torch.library.custom_op("lnsr_fast::in_manifold_noise", mutates_args=())
def in_manifold_noise(x: Tensor, ids: Tensor, table: Tensor, weight: Tensor, real: Optional[Tensor], ratio: float,
                      rank_tol: float, seed: int, embed_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """In-manifold LNSR noise for x [N, d] of token ids [N]: the neighbours are
    embed_scale·weight[table[ids]]. Returns (ε in x's dtype, fell_back [N] bool); see
    reference.in_manifold_noise for the definition."""
    if backend == "torch":
        gen = _generator(x.device, seed)
        z = torch.randn(x.shape[0], table.shape[1], generator=gen, device=x.device, dtype=torch.float32)
        fallback_z = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        neighbor_rows = weight[table[ids].long()]
        if embed_scale != 1.0:
            neighbor_rows = neighbor_rows * embed_scale
        eps, fell_back = reference.in_manifold_noise(x, neighbor_rows, z, fallback_z, ratio, real, rank_tol)
        return eps.to(x.dtype), fell_back
    with _on(x.device):
        return _kernels(backend, "in_manifold_noise").in_manifold_noise(
            x.contiguous(), ids.contiguous(), table.contiguous(), weight.contiguous(), ratio, rank_tol, seed, real,
            embed_scale)


@in_manifold_noise.register_fake
def _(x, ids, table, weight, real, ratio, rank_tol, seed, embed_scale, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.bool)


@torch.library.custom_op("lnsr_fast::layerwise_stability", mutates_args=())
def layerwise_stability(clean: list[Tensor], noisy: list[Tensor], real: Optional[Tensor], weights: list[float],
                        reduction: str, backend: str) -> Tensor:
    """Σ_r w_r · mean over real tokens of ‖h_r − h̃_r‖² (see reference.layerwise_stability)."""
    if backend == "torch":
        return reference.layerwise_stability(clean, noisy, real, weights, reduction)
    with _on(clean[0].device):
        return _kernels(backend, "layerwise_stability").stability_forward(
            [h.contiguous() for h in clean], [h.contiguous() for h in noisy], real, weights, reduction)


@layerwise_stability.register_fake
def _(clean, noisy, real, weights, reduction, backend):
    return clean[0].new_empty((), dtype=torch.float64 if clean[0].dtype == torch.float64 else torch.float32)


@torch.library.custom_op("lnsr_fast::layerwise_stability_backward", mutates_args=())
def layerwise_stability_backward(grad: Tensor, clean: list[Tensor], noisy: list[Tensor], real: Optional[Tensor],
                                 weights: list[float], reduction: str, backend: str) -> list[Tensor]:
    """The gradients of `layerwise_stability` for the clean then the noisy hidden states."""
    if backend == "torch":
        grads_clean, grads_noisy = reference.layerwise_stability_backward(grad, clean, noisy, real, weights, reduction)
    else:
        with _on(grad.device):
            grads_clean, grads_noisy = _kernels(backend, "layerwise_stability").stability_backward(
                grad, [h.contiguous() for h in clean], [h.contiguous() for h in noisy], real, weights, reduction)
    return [*grads_clean, *grads_noisy]


@layerwise_stability_backward.register_fake
def _(grad, clean, noisy, real, weights, reduction, backend):
    return [torch.empty_like(h) for h in (*clean, *noisy)]


def _setup_context(ctx, inputs, output):
    clean, noisy, real, weights, reduction, backend = inputs
    # Only the hidden states, which the graph keeps alive anyway: no per-layer difference is stored.
    ctx.save_for_backward(real, *clean, *noisy)
    ctx.weights, ctx.reduction, ctx.backend = weights, reduction, backend


def _backward(ctx, grad):
    real, *hidden = ctx.saved_tensors
    n = len(hidden) // 2
    grads = layerwise_stability_backward(grad, hidden[:n], hidden[n:], real, ctx.weights, ctx.reduction, ctx.backend)
    return grads[:n], grads[n:], None, None, None, None


layerwise_stability.register_autograd(_backward, setup_context=_setup_context)
