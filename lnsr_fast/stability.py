"""The layer-wise stability penalty Σ_r λ_r ‖h_r(x+ε) − h_r(x)‖² (eq. 11; docs/design.md §1–§2)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .checks import check_choice, is_int, is_real
from .kernels import ops, resolve_backend

REDUCTIONS = ("sum", "mean", "sequence")


def resolve_weights(weights, n_layers: int, name: str = "weights") -> list[float]:
    """A float, or one weight per layer, as a list of n_layers finite floats ≥ 0 (a negative λ would reward the
    noise for moving the layers)."""
    if is_real(weights):
        weights = [float(weights)] * n_layers
    elif isinstance(weights, (list, tuple)) or (isinstance(weights, torch.Tensor) and weights.dim() == 1):
        weights = [float(w) for w in weights]
        if len(weights) != n_layers:
            raise ValueError(f"{name} has {len(weights)} entries but there are {n_layers} layers")
    else:
        raise TypeError(f"{name} must be a float or a sequence of floats, got {type(weights).__name__}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"{name} must be finite and >= 0, got {weights}")
    return weights


def _check_types(name: str, hidden: Sequence[torch.Tensor]) -> None:
    for i, h in enumerate(hidden):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating-point tensor, got {getattr(h, 'dtype', type(h).__name__)}")


def _check_shapes(name: str, hidden: Sequence[torch.Tensor], shape: torch.Size, device: torch.device) -> None:
    for i, h in enumerate(hidden):
        if h.dim() < 2 or h.shape[:-1] != shape[:-1] or h.device != device:
            raise ValueError(f"{name}[{i}] has shape {tuple(h.shape)} on {h.device}; every hidden state must be "
                             f"[..., d] with token shape {tuple(shape[:-1])} on {device}")


def _real_tokens(attention_mask, shape, device) -> torch.Tensor | None:
    """The boolean mask of real tokens (None: all real) from an attention mask of shape `shape`."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(shape)}")
    return (attention_mask != 0).to(device)


def _per_sequence(penalty: torch.Tensor, real: torch.Tensor | None, shape) -> torch.Tensor:
    """The "sum" penalty (a mean over real tokens) as a sum over each sequence's real tokens, averaged over the
    sequences (all dimensions of the token shape `shape` but its last)."""
    sequences = shape[:-1].numel()
    tokens = real.sum().to(penalty.dtype) if real is not None else shape.numel()
    return penalty * (tokens / sequences)


def _backend(backend: str, hidden: Sequence[torch.Tensor]) -> str:
    dtypes = {h.dtype for h in hidden}
    if backend == "auto" and len(dtypes) > 1:  # the kernels take one activation dtype per call
        backend = "torch"
    return resolve_backend(backend, hidden[0].device, torch.float64 if torch.float64 in dtypes else None,
                           op="layerwise_stability", d=max(h.shape[-1] for h in hidden))


def layerwise_stability(clean_hidden: Sequence[torch.Tensor], noisy_hidden: Sequence[torch.Tensor],
                        attention_mask: torch.Tensor | None = None, weights=1.0, reduction: str = "sum",
                        backend: str = "auto") -> torch.Tensor:
    """The LNSR penalty over chosen layers, padding excluded, accumulated in fp32.

    clean_hidden, noisy_hidden: equally long sequences of [B, T, d] tensors (layer r of the clean and
    of the noisy pass). reduction, per layer: "sum", the mean over real tokens of ‖h_t − h̃_t‖²; "mean", that
    divided by d (the mean over the real tokens' elements); "sequence", the sum over each sequence's real tokens
    averaged over the sequences (eq. 11 read literally: ‖f_r(x̃) − f_r(x)‖² of a sequence's whole layer output;
    docs/design.md §2 converts λ between them). weights: one λ for all layers or one per layer. backend:
    "auto" | "cuda" | "triton" | "torch" (see lnsr_fast.kernels).
    Returns a differentiable 0-dim fp32 tensor (float64 for float64 inputs), 0 when no token is real;
    gradients (first and second) reach only the inputs that require them. For the halves of one
    concat-mode batch, `layerwise_stability_concat` writes one gradient per layer instead of two.

    >>> reg = layerwise_stability(out.hidden_states[1:], noisy_out.hidden_states[1:], attention_mask)
    """
    clean_hidden, noisy_hidden = list(clean_hidden), list(noisy_hidden)
    if len(clean_hidden) != len(noisy_hidden):
        raise ValueError(f"clean_hidden has {len(clean_hidden)} layers but noisy_hidden has {len(noisy_hidden)}")
    if not clean_hidden:
        raise ValueError("clean_hidden is empty: choose at least one layer")
    check_choice("reduction", reduction, REDUCTIONS)
    weights = resolve_weights(weights, len(clean_hidden))
    _check_types("clean_hidden", clean_hidden)
    _check_types("noisy_hidden", noisy_hidden)
    shape, device = clean_hidden[0].shape, clean_hidden[0].device
    _check_shapes("clean_hidden", clean_hidden, shape, device)
    _check_shapes("noisy_hidden", noisy_hidden, shape, device)
    for i, (h, h_noisy) in enumerate(zip(clean_hidden, noisy_hidden)):
        if h.shape != h_noisy.shape:
            raise ValueError(f"clean_hidden[{i}] has shape {tuple(h.shape)} but noisy_hidden[{i}] has {tuple(h_noisy.shape)}")
    real = _real_tokens(attention_mask, shape[:-1], device)
    backend = _backend(backend, clean_hidden + noisy_hidden)
    if reduction == "sequence":
        return _per_sequence(ops.layerwise_stability(clean_hidden, noisy_hidden, real, weights, "sum", backend),
                             real, shape[:-1])
    return ops.layerwise_stability(clean_hidden, noisy_hidden, real, weights, reduction, backend)


def layerwise_stability_concat(hidden: Sequence[torch.Tensor], pairs: int, attention_mask: torch.Tensor | None = None,
                               weights=1.0, reduction: str = "sum", backend: str = "auto",
                               detach_clean: bool = False) -> torch.Tensor:
    """The LNSR penalty of a concat-mode pass, on each chosen layer's whole hidden state.

    hidden: a sequence of [N, T, d] tensors (one per chosen layer) whose rows [0, pairs) are clean and rows
    [N - pairs, N) their noisy copies, in the same order. attention_mask: [pairs, T] of the clean rows (None:
    every token is real). detach_clean: no gradient reaches the clean rows. Otherwise as `layerwise_stability`.
    The gradient of each hidden state is one tensor written by one launch for all layers (clean rows, noisy
    rows, 0 in the rows between the two blocks), not assembled from slices.
    """
    hidden = list(hidden)
    if not hidden:
        raise ValueError("hidden is empty: choose at least one layer")
    check_choice("reduction", reduction, REDUCTIONS)
    weights = resolve_weights(weights, len(hidden))
    _check_types("hidden", hidden)
    shape, device = hidden[0].shape, hidden[0].device
    _check_shapes("hidden", hidden, shape, device)
    if not is_int(pairs) or not 1 <= pairs <= shape[0] // 2:
        raise ValueError(f"pairs must be an int in [1, {shape[0] // 2}] for hidden states of {shape[0]} rows, "
                         f"got {pairs!r}")
    if not isinstance(detach_clean, bool):
        raise TypeError(f"detach_clean must be a bool, got {detach_clean!r}")
    tokens = torch.Size((pairs, *shape[1:-1]))
    real = _real_tokens(attention_mask, tokens, device)
    kernel_reduction = "sum" if reduction == "sequence" else reduction
    penalty = ops.layerwise_stability_concat(hidden, pairs, real, weights, kernel_reduction, detach_clean,
                                             _backend(backend, hidden))
    return _per_sequence(penalty, real, tokens) if reduction == "sequence" else penalty
