"""Triton kernels of the layer-wise stability penalty (docs/design.md §1, reg = Σ_r λ_r·D(h_r[:B], h_r[B:])):
one launch over up to GROUP layers for the forward and one for the backward, reading the clean and noisy
rows where they lie (views of one concat-mode tensor are fine) and writing each gradient in place."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .launch import row_tile_config

# Layers per launch. Their addresses, widths and coefficients travel as kernel arguments (tuples), so
# nothing is copied host → device per call (and a CUDA graph can capture the launch); a program picks
# its layer's values with a chain of GROUP selects.
GROUP = 16
# Backward modes of the clean side (a runtime argument: one compiled kernel serves all three).
SKIP, GRADIENT, ZEROS = 0, 1, 2


@triton.jit
def _pick(values, i, G: tl.constexpr):
    """values[i] for a runtime i < G (tuples take only constant indices)."""
    v = values[0]
    for j in tl.static_range(1, G):
        v = tl.where(i == j, values[j], v)
    return v


@triton.jit
def _rows(real_ptr, first, n_rows, ROWS: tl.constexpr):
    """The ROWS token indices from `first` (int64), those in range, and those real (padding is never read)."""
    rows = first + tl.arange(0, ROWS).to(tl.int64)
    in_rows = rows < n_rows
    live = in_rows
    if real_ptr is not None:
        live = live & (tl.load(real_ptr + rows, mask=in_rows, other=0) != 0)
    return rows, in_rows, live


@triton.jit
def _stability_forward_kernel(clean, noisy, widths, coefs, real_ptr, partial_ptr, n_tokens,
                              G: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    layer = tl.program_id(1)
    h_ptr, hn_ptr = _pick(clean, layer, G), _pick(noisy, layer, G)
    d, coef = _pick(widths, layer, G), _pick(coefs, layer, G)
    if VEC > 1:  # every row starts 16-byte aligned (d a multiple of VEC elements): vector accesses
        d = tl.multiple_of(d, VEC)
    rows, _, live = _rows(real_ptr, tl.program_id(0).to(tl.int64) * ROWS, n_tokens, ROWS)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        offs = rows[:, None] * d + cols[None, :]
        mask = live[:, None] & (cols < d)[None, :]
        diff = (tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                - tl.load(hn_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        acc += diff * diff
    # One partial per program, summed by torch afterwards: no atomics, so the result is reproducible.
    tl.store(partial_ptr + layer * tl.num_programs(0) + tl.program_id(0), coef * tl.sum(acc))


@triton.jit(do_not_specialize=["clean_mode", "noisy_grad", "n_pair_programs"])
def _stability_backward_kernel(clean, noisy, grad_clean, grad_noisy, widths, coefs, real_ptr, grad_ptr, n_real_ptr,
                               n_real, n_tokens, n_clean_rows, n_pair_programs, clean_mode, noisy_grad,
                               G: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """Programs [0, n_pair_programs) write the gradients of ROWS paired tokens each; the others write
    zeros into grad_clean's rows [n_tokens, n_clean_rows) (the rows of a concat-mode tensor between its
    clean and its noisy block)."""
    layer = tl.program_id(1)
    pid = tl.program_id(0)
    gc_ptr, d = _pick(grad_clean, layer, G), _pick(widths, layer, G)
    if VEC > 1:
        d = tl.multiple_of(d, VEC)
    if pid >= n_pair_programs:
        rows = n_tokens + (pid - n_pair_programs).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = (rows < n_clean_rows)[:, None] & (cols < d)[None, :]
            tl.store(gc_ptr + rows[:, None] * d + cols[None, :], tl.zeros([ROWS, BLOCK_D], tl.float32)
                     .to(gc_ptr.dtype.element_ty), mask=mask)
    else:
        h_ptr, hn_ptr = _pick(clean, layer, G), _pick(noisy, layer, G)
        gn_ptr = _pick(grad_noisy, layer, G)
        if n_real_ptr is not None:
            n_real = tl.load(n_real_ptr)
        scale = 2.0 * tl.load(grad_ptr).to(tl.float32) / n_real * _pick(coefs, layer, G)
        rows, in_rows, live = _rows(real_ptr, pid.to(tl.int64) * ROWS, n_tokens, ROWS)
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            offs = rows[:, None] * d + cols[None, :]
            in_cols = (cols < d)[None, :]
            mask = live[:, None] & in_cols
            diff = (tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    - tl.load(hn_ptr + offs, mask=mask, other=0.0).to(tl.float32))
            g = tl.where(mask, scale * diff, 0.0)  # where, not a product: 0 at padding whatever it holds
            out = in_rows[:, None] & in_cols
            if clean_mode != 0:
                tl.store(gc_ptr + offs, tl.where(clean_mode == 1, g, 0.0).to(gc_ptr.dtype.element_ty), mask=out)
            if noisy_grad != 0:
                tl.store(gn_ptr + offs, (-g).to(gn_ptr.dtype.element_ty), mask=out)


def _groups(n: int):
    return [(start, min(start + GROUP, n)) for start in range(0, n, GROUP)]


def _padded(values: Sequence, start: int, stop: int) -> tuple:
    """values[start:stop] padded to GROUP entries with its first (never picked: layer < stop - start)."""
    part = list(values[start:stop])
    return tuple(part + [part[0]] * (GROUP - len(part)))


def _prepare(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], real, weights, reduction):
    """Contiguous layers, the row tile and the per-layer coefficients w_r (/ d_r for "mean")."""
    clean = [h.contiguous() for h in clean]
    noisy = [h.contiguous() for h in noisy]
    dtypes = {h.dtype for h in (*clean, *noisy)}
    if len(dtypes) != 1:
        raise ValueError("the Triton stability kernels need one dtype for all clean and noisy hidden states, "
                         f"got {sorted(str(t) for t in dtypes)}")
    widths = [h.shape[-1] for h in clean]
    cfg = row_tile_config(max(widths), width_name="hidden width")
    coefs = [float(w / d if reduction == "mean" else w) for w, d in zip(weights, widths)]
    real = None if real is None else real.contiguous().view(torch.uint8)
    return clean, noisy, real, widths, coefs, cfg


def _vector(widths, *columns: Sequence[torch.Tensor]) -> int:
    """The elements of 16 bytes when every row of every tensor starts 16-byte aligned, else 1."""
    size = columns[0][0].element_size()
    aligned = all(d * size % 16 == 0 for d in widths) and all(t.data_ptr() % 16 == 0 for col in columns for t in col)
    return 16 // size if aligned else 1


def n_real(real: torch.Tensor | None, n_tokens: int):
    """max(#real tokens, 1): a 0-dim fp32 tensor (counted on the device, no host sync), or an int."""
    return real.sum().clamp_min(1).to(torch.float32) if real is not None else max(n_tokens, 1)


def stability_forward(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], real: torch.Tensor | None,
                      weights: Sequence[float], reduction: str) -> torch.Tensor:
    """Σ_r w_r · mean over real tokens of ‖h_r − h̃_r‖² (/ d_r for "mean") as a 0-dim fp32 tensor
    (see reference.layerwise_stability); padding rows are never read.

    clean[r], noisy[r]: [..., d_r] (layers may differ in width, d_r ≤ kernels.MAX_WIDTH; all one dtype);
    real: [...] bool or None. One launch per GROUP layers; fp32 partial sums per program, then one sum:
    bit-reproducible.
    """
    clean, noisy, real, widths, coefs, cfg = _prepare(clean, noisy, real, weights, reduction)
    n_tokens = clean[0].numel() // widths[0]
    programs = triton.cdiv(n_tokens, cfg.rows)
    partials = torch.empty(len(clean), programs, dtype=torch.float32, device=clean[0].device)
    vec = _vector(widths, clean, noisy)
    for start, stop in _groups(len(clean)) if programs else []:
        _stability_forward_kernel[(programs, stop - start)](
            _padded(clean, start, stop), _padded(noisy, start, stop), _padded(widths, start, stop),
            _padded(coefs, start, stop), real, partials[start:stop], n_tokens,
            G=GROUP, ROWS=cfg.rows, BLOCK_D=cfg.block_d, VEC=vec, num_warps=cfg.num_warps)
    return partials.sum() / n_real(real, n_tokens)


def stability_backward(grad: torch.Tensor, clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor],
                       real: torch.Tensor | None, weights: Sequence[float], reduction: str,
                       grads_clean: Sequence[torch.Tensor] | None, grads_noisy: Sequence[torch.Tensor] | None,
                       clean_zero: bool = False) -> None:
    """Writes the gradients of stability_forward for the 0-dim upstream `grad` (read on the device, no
    host sync) in one launch per GROUP layers: into grads_clean[r] 2·grad·w_r/(#real [·d_r])·(h_r − h̃_r)
    (zeros instead with clean_zero), into grads_noisy[r] its negative; 0 at padding. None skips a side.

    grads_clean[r] may hold more tokens than clean[r] (a concat-mode gradient [N, T, d] from its first
    row): those after the paired ones are zero-filled. Outputs are contiguous and of the layers' dtype.
    """
    clean, noisy, real, widths, coefs, cfg = _prepare(clean, noisy, real, weights, reduction)
    n_tokens = clean[0].numel() // widths[0]
    clean_mode = SKIP if grads_clean is None else ZEROS if clean_zero else GRADIENT
    noisy_grad = grads_noisy is not None
    n_clean_rows = grads_clean[0].numel() // widths[0] if grads_clean is not None else n_tokens
    pair_programs = triton.cdiv(n_tokens, cfg.rows)
    programs = pair_programs + triton.cdiv(n_clean_rows - n_tokens, cfg.rows)
    if not programs or (grads_clean is None and grads_noisy is None):
        return
    # A skipped side gets the other's pointers, never written.
    grads_clean, grads_noisy = grads_clean or grads_noisy, grads_noisy or grads_clean
    count = n_real(real, n_tokens)
    counted = isinstance(count, torch.Tensor)
    vec = _vector(widths, clean, noisy, grads_clean, grads_noisy)
    for start, stop in _groups(len(clean)):
        _stability_backward_kernel[(programs, stop - start)](
            _padded(clean, start, stop), _padded(noisy, start, stop), _padded(grads_clean, start, stop),
            _padded(grads_noisy, start, stop), _padded(widths, start, stop), _padded(coefs, start, stop), real,
            grad, count if counted else None, 1.0 if counted else float(count), n_tokens, n_clean_rows,
            pair_programs, clean_mode, int(noisy_grad),
            G=GROUP, ROWS=cfg.rows, BLOCK_D=cfg.block_d, VEC=vec, num_warps=cfg.num_warps)
