"""Cost of drawing LNSR noise for one batch (the ε of docs/design.md §1), per variant, against the bytes floor.

Times are the GPU's (common.measure_kernels: the launch queue kept busy), with the memory each variant
allocates. Variants: every kernel backend the device runs, through the package's samplers (`gaussian_<backend>`,
`in_manifold_<backend>`), and the plain-PyTorch ways of docs/design.md §5: a kNN search per step (what the
paper does instead of a table), the one-off neighbour-table build, and per step a table gather followed
by `torch.linalg.qr`, by the modified Gram–Schmidt loop of kernels/reference.py, or by a projection
solve (a Gaussian projected onto the neighbour span through the normal equations). The floor is reading
k+1 rows and writing one row per token at the device's measured copy bandwidth. fp32, like the word
embeddings of a model trained under autocast.

    python benchmarks/bench_noise.py [--quick] [--device cuda] [--sizes bert-base,roberta-large]
"""
from __future__ import annotations

import time

import torch

import lnsr_fast as lf
from lnsr_fast.kernels import reference
from common import kernel_parser, kernel_setup, measure_kernels, results_folder, sync, write_results
from render import render

# Vocabulary × width of the word embeddings.
SIZES = {"bert-base": (30522, 768), "bert-large": (30522, 1024), "roberta-large": (50265, 1024)}
QUICK_SIZES = {"tiny": (2000, 128)}
GAUSSIAN_RATIO, IN_MANIFOLD_RATIO = 0.05, 0.1


def noise_variants(weight: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, k: int,
                   backends: list[str]) -> dict:
    """Name -> callable drawing ε for the tokens `ids` [N] with embeddings x [N, d] (neighbour table given)."""
    n, dim = x.shape
    variants = {}
    for b in backends:
        gaussian = lf.GaussianNoise(ratio=GAUSSIAN_RATIO, backend=b)
        variants[f"gaussian_{b}"] = lambda g=gaussian: g(ids, x)
    for b in backends:
        in_manifold = lf.InManifoldNoise(weight, k=k, ratio=IN_MANIFOLD_RATIO, knn_backend="torch", backend=b)
        variants[f"in_manifold_{b}"] = lambda m=in_manifold: m(ids, x)

    def knn_search_per_step():
        return torch.cdist(x, weight).topk(k + 1, largest=False)

    def diffs():
        return weight[table[ids].long()] - x[:, None, :]

    def gather_qr():
        q, _ = torch.linalg.qr(diffs().transpose(1, 2))  # [N, d, k]
        z = torch.randn(n, k, 1, device=x.device)
        return reference.rescale_to_ratio((q @ z).squeeze(-1), x, IN_MANIFOLD_RATIO, None)

    def gather_mgs_reference():
        z, fallback_z = torch.randn(n, k, device=x.device), torch.randn(n, dim, device=x.device)
        return reference.in_manifold_noise(x, weight[table[ids].long()], z, fallback_z, IN_MANIFOLD_RATIO)

    def gather_projection_solve():
        d = diffs()
        g = torch.randn(n, dim, 1, device=x.device)
        coef = torch.linalg.solve(d @ d.transpose(1, 2), d @ g)  # normal equations of min ‖Dᵀc − g‖
        return reference.rescale_to_ratio((d.transpose(1, 2) @ coef).squeeze(-1), x, IN_MANIFOLD_RATIO, None)

    variants.update(knn_search_per_step=knn_search_per_step, gather_qr=gather_qr,
                    gather_mgs_reference=gather_mgs_reference, gather_projection_solve=gather_projection_solve)
    return variants


def main(argv=None) -> None:
    p = kernel_parser(__doc__, SIZES)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 4096 = 32 x 128; 512 with --quick)")
    args = p.parse_args(argv)
    device, sizes, reps, backends, bandwidth = kernel_setup(args, SIZES, QUICK_SIZES)
    n = args.tokens or (512 if args.quick else 4096)
    rows = []
    for size, (vocab, dim) in sizes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(vocab, dim, device=device, generator=gen)
        ids = torch.randint(0, vocab, (n,), device=device, generator=gen)
        x = weight[ids]
        # Timed once, before anything else builds (and caches) this matrix's table.
        sync(device)
        t = time.perf_counter()
        table = lf.build_neighbor_table(weight, args.k, backend="torch")
        sync(device)
        build_ms = (time.perf_counter() - t) * 1e3
        floor_ms = (args.k + 2) * n * dim * x.element_size() / bandwidth * 1e3
        timings = {variant: measure_kernels(fn, device, reps=reps)
                   for variant, fn in noise_variants(weight, table, ids, x, args.k, backends).items()}
        timings.update({name: {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mib": ""}
                        for name, ms in (("table_build_once", build_ms), ("bytes_floor", floor_ms))})
        for variant, t in timings.items():
            rows.append({"variant": variant, "size": f"{vocab}x{dim}", "tokens": n, "k": args.k, "dtype": "float32",
                         **t, "x_floor": t["median_ms"] / floor_ms})
            print(f"{size} {vocab}x{dim} {variant}: {t['median_ms']:.4g} ms ({t['median_ms'] / floor_ms:.3g}x floor)",
                  flush=True)
    md = render(write_results("noise", rows, device, results_folder(args.results, args.quick)))
    print(md.read_text())


if __name__ == "__main__":
    main()
