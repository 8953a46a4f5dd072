"""A small run of every compiled kernel for compute-sanitizer (benchmarks/gpu_check.sh): in-manifold and
Gaussian noise and the stability penalty's forward and backward (concat mode, rows between the blocks),
on every backend the GPU offers, with padding, widths that are and are not multiples of 4 and 16, k up to
32. Exits 0 when every call returns; the sanitizer reports memory errors and races.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_workload.py
"""
import torch

import lnsr_fast as lf
from lnsr_fast.kernels import available_backends, ops
from lnsr_fast.stability import layerwise_stability_concat


def main() -> None:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    for backend in [b for b in available_backends(device) if b != "torch"]:
        for d, k in ((771, 10), (768, 32), (64, 3), (8192, 17)):
            weight = torch.randn(300, d, device=device, generator=gen)
            ids = torch.randint(0, 300, (37,), device=device, generator=gen)
            table = lf.build_neighbor_table(weight, k, backend="torch")
            real = torch.rand(37, device=device, generator=gen) > 0.2
            x = weight[ids].clone()
            ops.in_manifold_noise(x, ids, table, weight, real, 0.1, 1e-4, 1, 1.0, backend)
            ops.gaussian_noise(x.bfloat16(), real, 0.05, 1, backend)
        for rows, dtype in ((8, torch.float32), (9, torch.bfloat16)):
            hidden = [torch.randn(rows, 13, d, device=device, dtype=dtype, generator=gen).requires_grad_()
                      for d in (768, 771)]
            mask = torch.rand(4, 13, device=device, generator=gen) > 0.2
            layerwise_stability_concat(hidden, 4, mask, backend=backend).backward()
        torch.cuda.synchronize()
        print(f"{backend}: done")


if __name__ == "__main__":
    main()
