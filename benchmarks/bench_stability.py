"""Cost of the stability penalty Σ_r λ_r‖h_r − h̃_r‖² over all layers (the `reg` of DESIGN.md §1), forward
and backward, per variant, against the bytes floor.

The hidden states are laid out as in a concat pass: layer r's clean and noisy halves are views h[:B] and
h[B:] of one [2B, T, d] tensor; a quarter of the rows end in padding. Variants: every kernel backend the
device runs (`stability_<backend>`, through lf.layerwise_stability) and the straightforward PyTorch
one, a per-layer `F.mse_loss` loop in autograd. The floor is reading both halves of every layer once
forward, and again while writing their two gradients backward, at the device's measured copy bandwidth.

    python benchmarks/bench_stability.py [--quick] [--device cuda] [--dtypes float32,bfloat16]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

import lnsr_fast as lf
from common import kernel_parser, kernel_setup, measure, write_results
from render import render

# Layers × width of the hidden states.
SIZES = {"bert-base": (12, 768), "bert-large": (24, 1024)}
QUICK_SIZES = {"tiny": (4, 96)}


def stability_inputs(layers: int, dim: int, batch: int, seq: int, dtype: torch.dtype, device: torch.device):
    """(clean, noisy, attention_mask): per layer the two halves of one [2B, T, d] tensor, as leaves whose
    gradients autograd returns directly, and a [B, T] mask whose last quarter of rows is part padding."""
    gen = torch.Generator(device=device).manual_seed(0)
    clean, noisy = [], []
    for _ in range(layers):
        h = torch.randn(2 * batch, seq, dim, device=device, dtype=dtype, generator=gen)
        clean.append(h[:batch].requires_grad_())
        noisy.append(h[batch:].requires_grad_())
    lengths = torch.randint(seq // 2, seq + 1, (batch,), device=device, generator=gen)
    lengths[: batch - batch // 4] = seq
    mask = (torch.arange(seq, device=device) < lengths[:, None]).long()
    return clean, noisy, mask


def mse_loss_loop(clean, noisy, mask):
    """What one writes without a fused kernel: one F.mse_loss per layer, masked, in fp32."""
    real = mask.to(torch.float32)
    total = 0.0
    for h, h_noisy in zip(clean, noisy):
        total = total + (F.mse_loss(h.float(), h_noisy.float(), reduction="none").sum(-1) * real).sum()
    return total / real.sum().clamp_min(1)


def stability_variants(backends: list[str]) -> dict:
    """Name -> penalty function (clean, noisy, mask) -> 0-dim tensor."""
    variants = {f"stability_{b}": lambda c, n, m, b=b: lf.layerwise_stability(c, n, m, backend=b) for b in backends}
    variants["mse_loss_loop"] = mse_loss_loop
    return variants


def forward_backward(penalty, clean, noisy, mask):
    """One call of the penalty and its gradients for every hidden state."""
    return torch.autograd.grad(penalty(clean, noisy, mask), [*clean, *noisy])


def main(argv=None) -> None:
    p = kernel_parser(__doc__, SIZES)
    p.add_argument("--batch", type=int, default=None, help="B, rows per half (default 32; 4 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="T (default 128; 24 with --quick)")
    p.add_argument("--dtypes", default=None, help="comma-separated (default float32,bfloat16; float32 with --quick)")
    args = p.parse_args(argv)
    device, sizes, reps, backends, bandwidth = kernel_setup(args, SIZES, QUICK_SIZES)
    batch, seq = args.batch or (4 if args.quick else 32), args.seq or (24 if args.quick else 128)
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    rows = []
    for size, (layers, dim) in sizes.items():
        for dtype_name in dtypes:
            clean, noisy, mask = stability_inputs(layers, dim, batch, seq, getattr(torch, dtype_name), device)
            floor_ms = 6 * layers * clean[0].numel() * clean[0].element_size() / bandwidth * 1e3
            timings = {name: measure(lambda f=f: forward_backward(f, clean, noisy, mask), device, reps=reps)
                       for name, f in stability_variants(backends).items()}
            timings["bytes_floor"] = (floor_ms,) * 3
            for variant, (median, p20, p80) in timings.items():
                rows.append({"variant": variant, "size": f"{layers}x{dim}", "batch": batch, "seq": seq, "dtype": dtype_name,
                             "median_ms": median, "p20_ms": p20, "p80_ms": p80, "x_floor": median / floor_ms})
                print(f"{size} {layers}x{dim} {dtype_name} {variant}: {median:.4g} ms ({median / floor_ms:.3g}x floor)",
                      flush=True)
            del clean, noisy
    md = render(write_results("stability", rows, device, args.results))
    print(md.read_text())


if __name__ == "__main__":
    main()
