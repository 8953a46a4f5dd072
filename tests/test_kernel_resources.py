"""docs/design.md §6's static target, checked without a GPU: every Triton kernel configuration dispatch can
choose, compiled for sm_80 and sm_90 with Triton's own compiler and bundled ptxas, has no spills
(benchmarks/kernel_resources.py; `make cuda-compile` checks the CUDA kernels' ptxas report the same way),
and the check itself fails on a report that shows one."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_resources  # noqa: E402


@pytest.mark.timeout(300)
def test_every_triton_configuration_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "triton", "--results",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "TRITON_DEFAULT_FP_FUSION": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (tmp_path / "kernel_resources_triton.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    found = {(r["kernel"], r["arch"]) for r in rows}
    kernels = {"gaussian_noise_kernel", "in_manifold_noise_kernel", "stability_forward_kernel",
               "stability_backward_kernel"}
    assert found == {(k, a) for k in kernels for a in ("sm_80", "sm_90")}
    configs = {(r["kernel"], r["config"]) for r in rows}
    assert configs == {("in_manifold_noise_kernel", "BLOCK_K=16 BLOCK_D=64 warps=4"),
                       ("in_manifold_noise_kernel", "BLOCK_K=32 BLOCK_D=64 warps=4"),
                       ("gaussian_noise_kernel", "BLOCK_D=64 ROWS=16 warps=4"),
                       ("gaussian_noise_kernel", "BLOCK_D=256 ROWS=4 warps=4")} | {
        (k, c) for k in ("stability_forward_kernel", "stability_backward_kernel")
        for c in ("BLOCK_D=64 ROWS=64 G=16 VEC=4 warps=4", "BLOCK_D=256 ROWS=16 G=16 VEC=4 warps=4")}
    for r in rows:
        assert r["spill_bytes"] == "0" and int(r["registers"]) <= 255 and int(r["instructions"]) > 0, r


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN4lnsr12_GLOBAL__N_124in_manifold_noise_kernelILi4EEEvNS_14InManifoldArgsEb' for 'sm_90'
ptxas info    : Function properties for _ZN4lnsr12_GLOBAL__N_124in_manifold_noise_kernelILi4EEEvNS_14InManifoldArgsEb
    {stack} bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used 127 registers, used 1 barriers, 29244 bytes smem
"""


@pytest.mark.parametrize("spill,status", [(0, 0), (4, 1)])
def test_the_spill_check_reads_ptxas_and_fails_on_a_spill(tmp_path, spill, status, capsys):
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG.format(stack=8 * bool(spill), spill=spill))
    assert kernel_resources.main(["cuda", str(log), "--results", str(tmp_path)]) == status
    (row,) = csv.DictReader((tmp_path / "kernel_resources_cuda.csv").open(newline=""))
    assert (row["kernel"], row["config"], row["arch"], row["registers"], row["spill_bytes"], row["shared_bytes"]) == (
        "in_manifold_noise_kernel", "<4>", "sm_90", "127", str(spill), "29244")
    assert ("SPILLS in 1 configuration(s): in_manifold_noise_kernel <4> sm_90" in capsys.readouterr().err) == bool(spill)
