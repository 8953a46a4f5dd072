"""Cost of the stability penalty Σ_r λ_r‖h_r − h̃_r‖² over all layers (the `reg` of docs/design.md §1), forward
and backward, per variant, against the bytes floor — measured the way a concat-mode step uses it.

Each layer's hidden state is one [2B, T, d] tensor computed from a parameter (as a layer output is), its
rows [0, B) clean and [B, 2B) noisy; a quarter of the rows end in padding; the gradient is taken with
respect to the parameters, so whatever autograd adds between the penalty and the layers is timed too.
Variants: for every kernel backend the device runs, `concat_<backend>` (layerwise_stability_concat on
the whole tensors: one gradient per layer) and `split_<backend>` (layerwise_stability on the views h[:B],
h[B:]: autograd adds a slice_backward per half and an add per layer), and the straightforward PyTorch one,
a per-layer `F.mse_loss` loop on the views. Times are the GPU's (common.measure_kernels), with the memory
each variant allocates. The floor is reading every layer once forward, and again while writing its
gradient backward, at the device's measured copy bandwidth.

    python benchmarks/bench_stability.py [--quick] [--device cuda] [--dtypes float32,bfloat16]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lnsr_fast as lf
from common import kernel_parser, kernel_setup, measure_kernels, results_folder, write_results
from lnsr_fast.stability import layerwise_stability_concat
from render import render

# Layers × width of the hidden states.
SIZES = {"bert-base": (12, 768), "bert-large": (24, 1024)}
QUICK_SIZES = {"tiny": (4, 96)}


def stability_inputs(layers: int, dim: int, batch: int, seq: int, dtype: torch.dtype, device: torch.device):
    """(params, hidden, attention_mask): per layer a leaf parameter [2B, T, d] and the hidden state computed
    from it (a view, so no work is timed for it, but a non-leaf whose gradient autograd must assemble whole),
    and a [B, T] mask of the clean rows whose last quarter is part padding."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(2 * batch, seq, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
              for _ in range(layers)]
    hidden = [p.view(p.shape) for p in params]
    lengths = torch.randint(seq // 2, seq + 1, (batch,), device=device, generator=gen)
    lengths[: batch - batch // 4] = seq
    mask = (torch.arange(seq, device=device) < lengths[:, None]).long()
    return params, hidden, mask


def mse_loss_loop(hidden, mask):
    """What one writes without a fused kernel: one F.mse_loss per layer on the two halves, masked, in fp32."""
    batch = mask.shape[0]
    real = mask.to(torch.float32)
    total = 0.0
    for h in hidden:
        total = total + (F.mse_loss(h[:batch].float(), h[batch:].float(), reduction="none").sum(-1) * real).sum()
    return total / real.sum().clamp_min(1)


def stability_variants(backends: list[str]) -> dict:
    """Name -> penalty function (hidden, mask) -> 0-dim tensor."""
    variants = {}
    for b in backends:
        variants[f"concat_{b}"] = lambda hs, m, b=b: layerwise_stability_concat(hs, m.shape[0], m, backend=b)
        variants[f"split_{b}"] = lambda hs, m, b=b: lf.layerwise_stability(
            [h[:m.shape[0]] for h in hs], [h[m.shape[0]:] for h in hs], m, backend=b)
    variants["mse_loss_loop"] = mse_loss_loop
    return variants


def forward_backward(penalty, params, hidden, mask):
    """One call of the penalty and the gradients of every layer's parameter."""
    return torch.autograd.grad(penalty(hidden, mask), params)


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
            params, hidden, mask = stability_inputs(layers, dim, batch, seq, getattr(torch, dtype_name), device)
            floor_ms = 3 * layers * params[0].numel() * params[0].element_size() / bandwidth * 1e3
            timings = {name: measure_kernels(lambda f=f: forward_backward(f, params, hidden, mask), device, reps=reps)
                       for name, f in stability_variants(backends).items()}
            timings["bytes_floor"] = {"median_ms": floor_ms, "p20_ms": floor_ms, "p80_ms": floor_ms, "peak_mib": ""}
            for variant, t in timings.items():
                rows.append({"variant": variant, "size": f"{layers}x{dim}", "batch": batch, "seq": seq, "dtype": dtype_name,
                             **t, "x_floor": t["median_ms"] / floor_ms})
                print(f"{size} {layers}x{dim} {dtype_name} {variant}: {t['median_ms']:.4g} ms "
                      f"({t['median_ms'] / floor_ms:.3g}x floor)", flush=True)
            del params, hidden
    md = render(write_results("stability", rows, device, results_folder(args.results, args.quick)))
    print(md.read_text())


if __name__ == "__main__":
    main()
