"""Triton kernels of the layer-wise stability penalty (DESIGN.md §1, reg = Σ_r λ_r·D(h_r[:B], h_r[B:])):
one launch over all layers for the forward and one for the backward, reading both halves in place."""
from __future__ import annotations

import struct
from typing import Sequence

import torch
import triton
import triton.language as tl

from .launch import launch_config, row_tile


@triton.jit
def _layer_pointer(addr_ptr, like_ptr, VEC: tl.constexpr):
    # Layers are separate tensors: the kernel gets their addresses and views them as like_ptr's type.
    ptr = tl.load(addr_ptr).to(like_ptr.dtype)
    if VEC > 1:  # every address is 16-byte aligned: lets the loads and stores vectorise
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _difference_tile(meta_ptr, like_ptr, real_ptr, n_rows, META: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """h − h̃ in fp32 for the ROWS tokens of program_id(0) in layer program_id(1); 0 at padding."""
    meta = meta_ptr + tl.program_id(1) * META
    d = tl.load(meta)
    if VEC > 1:
        d = tl.multiple_of(d, VEC)
    coef = tl.load(meta + 1).to(tl.float64, bitcast=True).to(tl.float32)
    offs, live2, in_tile = row_tile(real_ptr, n_rows, d, ROWS, BLOCK_D)
    h = tl.load(_layer_pointer(meta + 2, like_ptr, VEC) + offs, mask=live2, other=0.0).to(tl.float32)
    h_noisy = tl.load(_layer_pointer(meta + 3, like_ptr, VEC) + offs, mask=live2, other=0.0).to(tl.float32)
    return h - h_noisy, offs, live2, in_tile, coef, meta


@triton.jit
def _stability_forward_kernel(meta_ptr, like_ptr, real_ptr, partial_ptr, n_rows, META: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    diff, _, _, _, coef, _ = _difference_tile(meta_ptr, like_ptr, real_ptr, n_rows, META, ROWS, BLOCK_D, VEC)
    # One partial per program, summed by torch afterwards: no atomics, so the result is reproducible.
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), coef * tl.sum(diff * diff))


@triton.jit
def _stability_backward_kernel(meta_ptr, like_ptr, real_ptr, scale_ptr, n_rows, META: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    diff, offs, live2, in_tile, coef, meta = _difference_tile(
        meta_ptr, like_ptr, real_ptr, n_rows, META, ROWS, BLOCK_D, VEC)
    g = tl.where(live2, (tl.load(scale_ptr) * coef) * diff, 0.0)
    tl.store(_layer_pointer(meta + 4, like_ptr, VEC) + offs, g.to(like_ptr.dtype.element_ty), mask=in_tile)
    tl.store(_layer_pointer(meta + 5, like_ptr, VEC) + offs, (-g).to(like_ptr.dtype.element_ty), mask=in_tile)


def _prepare(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], real, weights, reduction):
    """Contiguous layers, the launch settings and the per-layer coefficients w_r (/ d_r for "mean")."""
    clean = [h.contiguous() for h in clean]
    noisy = [h.contiguous() for h in noisy]
    dtypes = {h.dtype for h in (*clean, *noisy)}
    if len(dtypes) != 1:
        raise ValueError("the Triton stability kernels need one dtype for all clean and noisy hidden states, "
                         f"got {sorted(str(t) for t in dtypes)}")
    widths = [h.shape[-1] for h in clean]
    cfg = launch_config(max(widths), width_name="hidden width")
    coefs = [w / d if reduction == "mean" else w for w, d in zip(weights, widths)]
    real = None if real is None else real.contiguous().view(torch.uint8)
    return clean, noisy, real, widths, coefs, cfg


def _layer_table(widths, coefs, *columns: Sequence[torch.Tensor]):
    """int64 [L, 2 + len(columns)]: width, coefficient (float64 bits), then each column's address;
    and VEC, the elements of 16 bytes when every address and row is 16-byte aligned (else 1)."""
    meta = [[d, struct.unpack("<q", struct.pack("<d", c))[0], *(col[i].data_ptr() for col in columns)]
            for i, (d, c) in enumerate(zip(widths, coefs))]
    size = columns[0][0].element_size()
    aligned = all(a % 16 == 0 for row in meta for a in row[2:]) and all(d * size % 16 == 0 for d in widths)
    # non_blocking: a pageable source is staged at once, and the stream is not synchronised.
    table = torch.tensor(meta, dtype=torch.int64).to(columns[0][0].device, non_blocking=True)
    return table, 16 // size if aligned else 1


def _n_real(real: torch.Tensor | None, n_rows: int):
    return real.sum().clamp_min(1).to(torch.float32) if real is not None else max(n_rows, 1)


def stability_forward(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], real: torch.Tensor | None,
                      weights: Sequence[float], reduction: str) -> torch.Tensor:
    """Σ_r w_r · mean over real tokens of ‖h_r − h̃_r‖² (/ d_r for "mean") as a 0-dim fp32 tensor
    (see reference.layerwise_stability); padding rows are never read.

    clean[r], noisy[r]: [..., d_r] (layers may differ in width, d_r ≤ launch.MAX_WIDTH; all one dtype);
    real: [...] bool or None. One launch for all layers; fp32 partial sums per program, then one sum:
    bit-reproducible.
    """
    clean, noisy, real, widths, coefs, cfg = _prepare(clean, noisy, real, weights, reduction)
    n_rows = clean[0].numel() // widths[0]
    programs = triton.cdiv(n_rows, cfg.rows)
    partials = torch.empty(len(clean), programs, dtype=torch.float32, device=clean[0].device)
    if programs:
        meta, vec = _layer_table(widths, coefs, clean, noisy)
        _stability_forward_kernel[(programs, len(clean))](
            meta, clean[0], real, partials, n_rows, META=meta.shape[1], ROWS=cfg.rows, BLOCK_D=cfg.block_d,
            VEC=vec, num_warps=cfg.num_warps)
    return partials.sum() / _n_real(real, n_rows)


def stability_backward(grad: torch.Tensor, clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor],
                       real: torch.Tensor | None, weights: Sequence[float], reduction: str):
    """Gradients of stability_forward: (grads_clean, grads_noisy), lists in the layers' dtype, with
    grads_clean[r] = 2·grad·w_r/(#real [·d_r])·(h_r − h̃_r), 0 at padding, and grads_noisy[r] its negative.

    grad: 0-dim upstream gradient (read on the device, no host sync). One launch writes all of them.
    """
    clean, noisy, real, widths, coefs, cfg = _prepare(clean, noisy, real, weights, reduction)
    n_rows = clean[0].numel() // widths[0]
    grads_clean = [torch.empty_like(h) for h in clean]
    grads_noisy = [torch.empty_like(h) for h in noisy]
    if n_rows:
        scale = (2 * grad.to(device=clean[0].device, dtype=torch.float32) / _n_real(real, n_rows)).reshape(1)
        meta, vec = _layer_table(widths, coefs, clean, noisy, grads_clean, grads_noisy)
        _stability_backward_kernel[(triton.cdiv(n_rows, cfg.rows), len(clean))](
            meta, clean[0], real, scale, n_rows, META=meta.shape[1], ROWS=cfg.rows, BLOCK_D=cfg.block_d,
            VEC=vec, num_warps=cfg.num_warps)
    return grads_clean, grads_noisy
