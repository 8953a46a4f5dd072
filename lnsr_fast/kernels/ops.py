"""The ops of one LNSR step (docs/design.md §1) registered with torch.library: each runs the backend its
`backend` argument names (resolved per op by kernels.resolve_backend), and has a fake implementation
whose outputs have the real ones' shapes, dtypes and (contiguous) strides, so torch.compile traces
through them without graph breaks. Arguments are validated by the callers (noise.py, stability.py);
these ops trust them.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Optional

import torch
from torch import Tensor

from . import LIMITS, reference

# The torch backend's generators, one per device and thread: samplers drawing in two threads at once never
# reseed each other's generator between its seeding and its draw.
_GENERATORS = threading.local()


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generators = _GENERATORS.__dict__.setdefault("by_device", {})
    gen = generators.get(device)
    if gen is None:
        gen = generators[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _kernels(backend: str, op: str):
    """The module implementing `op` for a compiled backend (kernels.LIMITS says which do);
    kernels/cuda.py and kernels/triton/<op>.py expose the same functions with the same arguments."""
    if op not in LIMITS[backend]:
        raise ValueError(f"backend={backend!r} does not implement {op}")
    if backend == "cuda":
        from . import cuda
        return cuda
    return importlib.import_module(f"{__package__}.triton.{op}")


def _on(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one (several GPUs per process)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ noise

@torch.library.custom_op("lnsr_fast::gaussian_noise", mutates_args=())
def gaussian_noise(x: Tensor, real: Optional[Tensor], ratio: float, seed: int, backend: str) -> Tensor:
    """Standard LNSR noise for x [N, d]: a Gaussian draw keyed by `seed`, rescaled per token to
    ratio·‖x_t‖, 0 where `real` [N] is False. Returns ε in x's dtype, contiguous."""
    if backend == "torch":
        z = torch.randn(x.shape, generator=_generator(x.device, seed), device=x.device, dtype=torch.float32)
        return reference.gaussian_noise(x, z, ratio, real).to(x.dtype).contiguous()
    with _on(x.device):
        return _kernels(backend, "gaussian_noise").gaussian_noise(x.contiguous(), ratio, seed, real)


@gaussian_noise.register_fake
def _(x, real, ratio, seed, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("lnsr_fast::in_manifold_noise", mutates_args=())
def in_manifold_noise(x: Tensor, ids: Tensor, table: Tensor, weight: Tensor, real: Optional[Tensor], ratio: float,
                      rank_tol: float, seed: int, embed_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """In-manifold LNSR noise for x [N, d] of token ids [N]: the neighbours are
    embed_scale·weight[table[ids]]. Returns (ε in x's dtype, fell_back [N] bool), contiguous; see
    reference.in_manifold_noise for the definition."""
    if backend == "torch":
        gen = _generator(x.device, seed)
        z = torch.randn(x.shape[0], table.shape[1], generator=gen, device=x.device, dtype=torch.float32)
        fallback_z = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        neighbor_rows = weight[table[ids].long()]
        if embed_scale != 1.0:
            neighbor_rows = neighbor_rows * embed_scale
        eps, fell_back = reference.in_manifold_noise(x, neighbor_rows, z, fallback_z, ratio, real, rank_tol)
        return eps.to(x.dtype).contiguous(), fell_back
    with _on(x.device):
        return _kernels(backend, "in_manifold_noise").in_manifold_noise(
            x.contiguous(), ids.contiguous(), table.contiguous(), weight.contiguous(), ratio, rank_tol, seed, real,
            embed_scale)


@in_manifold_noise.register_fake
def _(x, ids, table, weight, real, ratio, rank_tol, seed, embed_scale, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=torch.bool)


# -------------------------------------------------------------------------------------------- stability
# Two ops share the kernels: `layerwise_stability` takes the clean and the noisy hidden states as separate
# tensors (the public function of the same name), `layerwise_stability_concat` each layer's whole
# concat-mode tensor [N, T, d] (clean rows [0, pairs), noisy rows [N - pairs, N)) and returns one
# gradient per layer, written by one launch: no slicing, zero-filling or adding in autograd.

def _penalty_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _stability_forward(clean, noisy, real, weights, reduction, backend) -> Tensor:
    if backend == "torch":
        return reference.layerwise_stability(clean, noisy, real, weights, reduction)
    with _on(clean[0].device):
        return _kernels(backend, "layerwise_stability").stability_forward(clean, noisy, real, weights, reduction)


def _stability_backward(grad, clean, noisy, real, weights, reduction, grads_clean, grads_noisy, clean_zero, backend):
    """Writes the gradients into the given (contiguous) tensors; see cuda.stability_backward."""
    if backend == "torch":
        ref_clean, ref_noisy = reference.layerwise_stability_backward(grad, clean, noisy, real, weights, reduction)
        for outs, refs in ((grads_clean, ref_clean), (grads_noisy, ref_noisy)):
            for out, ref in zip(outs or (), refs):
                n = ref.numel()
                out.view(-1)[:n].copy_(ref.reshape(-1))
                out.view(-1)[n:].zero_()
        if clean_zero and grads_clean is not None:
            for out in grads_clean:
                out.zero_()
        return
    with _on(grad.device):
        _kernels(backend, "layerwise_stability").stability_backward(
            grad, clean, noisy, real, weights, reduction, grads_clean, grads_noisy, clean_zero)


@torch.library.custom_op("lnsr_fast::layerwise_stability", mutates_args=())
def layerwise_stability(clean: list[Tensor], noisy: list[Tensor], real: Optional[Tensor], weights: list[float],
                        reduction: str, backend: str) -> Tensor:
    """Σ_r w_r · mean over real tokens of ‖h_r − h̃_r‖² (see reference.layerwise_stability)."""
    return _stability_forward(clean, noisy, real, weights, reduction, backend)


@layerwise_stability.register_fake
def _(clean, noisy, real, weights, reduction, backend):
    return clean[0].new_empty((), dtype=_penalty_dtype(clean[0]))


@torch.library.custom_op("lnsr_fast::layerwise_stability_backward", mutates_args=())
def layerwise_stability_backward(grad: Tensor, clean: list[Tensor], noisy: list[Tensor], real: Optional[Tensor],
                                 weights: list[float], reduction: str, clean_grad: bool, noisy_grad: bool,
                                 backend: str) -> list[Tensor]:
    """The gradients of `layerwise_stability` for the clean (if clean_grad) then the noisy (if
    noisy_grad) hidden states, contiguous, in their dtypes."""
    grads_clean = [h.new_empty(h.shape) for h in clean] if clean_grad else None
    grads_noisy = [h.new_empty(h.shape) for h in noisy] if noisy_grad else None
    _stability_backward(grad, clean, noisy, real, weights, reduction, grads_clean, grads_noisy, False, backend)
    return [*(grads_clean or ()), *(grads_noisy or ())]


@layerwise_stability_backward.register_fake
def _(grad, clean, noisy, real, weights, reduction, clean_grad, noisy_grad, backend):
    return [h.new_empty(h.shape) for h in (*(clean if clean_grad else ()), *(noisy if noisy_grad else ()))]


@torch.library.custom_op("lnsr_fast::layerwise_stability_concat", mutates_args=())
def layerwise_stability_concat(hidden: list[Tensor], pairs: int, real: Optional[Tensor], weights: list[float],
                               reduction: str, detach_clean: bool, backend: str) -> Tensor:
    """The penalty between rows [0, pairs) and [N - pairs, N) of each hidden state [N, ..., d]; real:
    [pairs, ...] of the clean rows. detach_clean only matters for the gradient."""
    return _stability_forward([h[:pairs] for h in hidden], [h[h.shape[0] - pairs:] for h in hidden], real, weights,
                              reduction, backend)


@layerwise_stability_concat.register_fake
def _(hidden, pairs, real, weights, reduction, detach_clean, backend):
    return hidden[0].new_empty((), dtype=_penalty_dtype(hidden[0]))


@torch.library.custom_op("lnsr_fast::layerwise_stability_concat_backward", mutates_args=())
def layerwise_stability_concat_backward(grad: Tensor, hidden: list[Tensor], pairs: int, real: Optional[Tensor],
                                        weights: list[float], reduction: str, detach_clean: bool,
                                        backend: str) -> list[Tensor]:
    """One gradient per hidden state, contiguous: the clean rows' (0 with detach_clean), the noisy
    rows', 0 in the rows between the two blocks and at padding."""
    grads = [h.new_empty(h.shape) for h in hidden]
    _stability_backward(grad, [h[:pairs] for h in hidden], [h[h.shape[0] - pairs:] for h in hidden], real, weights,
                        reduction, [g[:g.shape[0] - pairs] for g in grads], [g[g.shape[0] - pairs:] for g in grads],
                        detach_clean, backend)
    return grads


@layerwise_stability_concat_backward.register_fake
def _(grad, hidden, pairs, real, weights, reduction, detach_clean, backend):
    return [h.new_empty(h.shape) for h in hidden]


def _needed(flags: list[bool], *lists):
    """The entries of each list whose flag is set."""
    return [[x for x, f in zip(values, flags) if f] for values in lists]


def _scatter(flags: list[bool], values: list):
    """values (one per set flag) spread over the flags, None where unset."""
    it = iter(values)
    return [next(it) if f else None for f in flags]


def _setup_split(ctx, inputs, output):
    clean, noisy, real, weights, reduction, backend = inputs
    # Only the hidden states, which the graph keeps alive anyway: no per-layer difference is stored.
    ctx.save_for_backward(real, *clean, *noisy)
    ctx.weights, ctx.reduction, ctx.backend = weights, reduction, backend


def _backward_split(ctx, grad):
    real, *hidden = ctx.saved_tensors
    n = len(hidden) // 2
    need_clean, need_noisy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # Layers of which neither side needs a gradient are left out; a side no layer needs is not written.
    layers = [c or m for c, m in zip(need_clean, need_noisy)]
    clean, noisy, weights = _needed(layers, hidden[:n], hidden[n:], ctx.weights)
    clean_grad, noisy_grad = any(need_clean), any(need_noisy)
    grads = layerwise_stability_backward(grad, clean, noisy, real, weights, ctx.reduction, clean_grad, noisy_grad,
                                         ctx.backend)
    m = len(clean)
    grads_clean = _scatter(layers, grads[:m]) if clean_grad else [None] * n
    grads_noisy = _scatter(layers, grads[m:] if clean_grad else grads) if noisy_grad else [None] * n
    return ([g if f else None for g, f in zip(grads_clean, need_clean)],
            [g if f else None for g, f in zip(grads_noisy, need_noisy)], None, None, None, None)


layerwise_stability.register_autograd(_backward_split, setup_context=_setup_split)


def _setup_concat(ctx, inputs, output):
    hidden, pairs, real, weights, reduction, detach_clean, backend = inputs
    ctx.save_for_backward(real, *hidden)
    ctx.pairs, ctx.weights, ctx.reduction, ctx.detach_clean, ctx.backend = pairs, weights, reduction, detach_clean, backend


def _backward_concat(ctx, grad):
    real, *hidden = ctx.saved_tensors
    layers = ctx.needs_input_grad[0]
    hidden, weights = _needed(layers, hidden, ctx.weights)
    grads = layerwise_stability_concat_backward(grad, hidden, ctx.pairs, real, weights, ctx.reduction,
                                                ctx.detach_clean, ctx.backend) if hidden else []
    return _scatter(layers, grads), None, None, None, None, None, None


layerwise_stability_concat.register_autograd(_backward_concat, setup_context=_setup_concat)


# Double backward (the gradient of a gradient, e.g. for a penalty on gradient norms): autograd through
# the reference's gradient, on every backend; it is linear in the upstream gradient and the hidden states,
# so plain PyTorch is cheap next to the model. A third derivative is refused rather than silently cut.

def _second_order(ctx, reference_backward, grad_outputs):
    if torch.is_grad_enabled():
        raise RuntimeError("lnsr_fast's layer-wise stability supports first and second derivatives, not a third "
                           "(create_graph=True in a second backward)")
    grad, real, *hidden = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (grad, *hidden)]
        outs = [o for o in reference_backward(leaves[0], leaves[1:], real) if o is not None]
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
        return list(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True))


def _setup_split_backward(ctx, inputs, output):
    grad, clean, noisy, real, weights, reduction, clean_grad, noisy_grad, backend = inputs
    ctx.save_for_backward(grad, real, *clean, *noisy)
    ctx.weights, ctx.reduction, ctx.sides = weights, reduction, (clean_grad, noisy_grad)


def _double_backward_split(ctx, grad_outputs):
    def reference_backward(grad, hidden, real):
        n = len(hidden) // 2
        grads_clean, grads_noisy = reference.layerwise_stability_backward(grad, hidden[:n], hidden[n:], real,
                                                                          ctx.weights, ctx.reduction)
        return [*(grads_clean if ctx.sides[0] else ()), *(grads_noisy if ctx.sides[1] else ())]

    d_grad, *d_hidden = _second_order(ctx, reference_backward, grad_outputs)
    n = len(d_hidden) // 2
    return d_grad, d_hidden[:n], d_hidden[n:], None, None, None, None, None, None


layerwise_stability_backward.register_autograd(_double_backward_split, setup_context=_setup_split_backward)


def _setup_concat_backward(ctx, inputs, output):
    grad, hidden, pairs, real, weights, reduction, detach_clean, backend = inputs
    ctx.save_for_backward(grad, real, *hidden)
    ctx.pairs, ctx.weights, ctx.reduction, ctx.detach_clean = pairs, weights, reduction, detach_clean


def _double_backward_concat(ctx, grad_outputs):
    d_grad, *d_hidden = _second_order(
        ctx, lambda grad, hidden, real: reference.layerwise_stability_concat_backward(
            grad, hidden, ctx.pairs, real, ctx.weights, ctx.reduction, ctx.detach_clean), grad_outputs)
    return d_grad, d_hidden, None, None, None, None, None, None


layerwise_stability_concat_backward.register_autograd(_double_backward_concat, setup_context=_setup_concat_backward)
