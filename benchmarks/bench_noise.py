"""Cost of drawing LNSR noise for one batch, per variant, against the bytes floor (DESIGN.md §5).

Variants: Gaussian (GaussianNoise), in-manifold through the package (table gather + modified
Gram–Schmidt, kernels/reference.py), the per-step kNN search the paper does instead of a table, and
the one-off table build. The floor is reading k+1 rows and writing one row per token at the device's
measured copy bandwidth. `--quick` uses small shapes for a CPU check.

    python benchmarks/bench_noise.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

import lnsr_fast as lf
from common import RESULTS, measure, write_results


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy (read + write)."""
    src = torch.empty(64 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    median, _, _ = measure(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (median / 1e3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 4096; 512 with --quick)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the CSV, markdown and PNG (default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    n = args.tokens or (512 if args.quick else 4096)
    sizes = [(2000, 128)] if args.quick else [(30522, 768), (50265, 1024)]
    reps = 3 if args.quick else 10
    bandwidth = copy_bandwidth(device)
    rows = []
    for vocab, dim in sizes:
        torch.manual_seed(0)
        weight = torch.randn(vocab, dim, device=device)
        ids = torch.randint(0, vocab, (n // 128 or 1, min(n, 128)), device=device)
        x = weight[ids]
        t = time.perf_counter()
        table = lf.build_neighbor_table(weight, args.k, backend="torch")
        build_ms = (time.perf_counter() - t) * 1e3
        gaussian = lf.GaussianNoise(ratio=0.05)
        in_manifold = lf.InManifoldNoise(weight, k=args.k, ratio=0.1, knn_backend="torch")
        in_manifold.table = table

        def knn_search():  # what searching every step (as the paper does) costs instead of a table
            d = torch.cdist(x.reshape(-1, dim), weight)
            return d.topk(args.k + 1, largest=False)

        floor_ms = (args.k + 2) * ids.numel() * dim * 4 / bandwidth * 1e3
        size = f"{vocab}x{dim}"
        for variant, fn in (("gaussian", lambda: gaussian(ids, x)), ("in_manifold_reference", lambda: in_manifold(ids, x)),
                            ("knn_search_per_step", knn_search)):
            median, p20, p80 = measure(fn, device, reps=reps)
            rows.append({"variant": variant, "size": size, "tokens": ids.numel(), "median_ms": median, "p20_ms": p20,
                         "p80_ms": p80, "x_floor": median / floor_ms})
        rows.append({"variant": "table_build_once", "size": size, "tokens": ids.numel(), "median_ms": build_ms,
                     "p20_ms": build_ms, "p80_ms": build_ms, "x_floor": build_ms / floor_ms})
        rows.append({"variant": "bytes_floor", "size": size, "tokens": ids.numel(), "median_ms": floor_ms,
                     "p20_ms": floor_ms, "p80_ms": floor_ms, "x_floor": 1.0})
    stem = write_results("noise", rows, device, x="size", out_dir=args.results)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
