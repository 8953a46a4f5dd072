"""The benchmarks still run in their quick CPU mode, write the rows and columns they promise (ratios to
FT from the same run, multiples of the bytes floor), and render them to markdown and a PNG."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lnsr_fast as lf

ROOT = Path(__file__).resolve().parents[1]
META = {"run", "device", "torch", "transformers", "triton", "lnsr_fast", "backends"}
TIMES = {"median_ms", "p20_ms", "p80_ms"}
# One intra-op thread: the shapes are tiny, and the machine running the tests is often shared.
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str, **env) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ENV, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def results(folder: Path, name: str) -> tuple[Path, list[str], list[dict]]:
    (path,) = folder.glob(f"{name}_*.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return path, reader.fieldnames, list(reader)


def assert_rendered(csv_path: Path, header: str) -> None:
    assert header in csv_path.with_suffix(".md").read_text()
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_floor_multiples(rows: list[dict], case: tuple) -> None:
    floors = {tuple(r[c] for c in case): float(r["median_ms"]) for r in rows if r["variant"] == "bytes_floor"}
    for r in rows:
        median = float(r["median_ms"])
        assert 0 < float(r["p20_ms"]) <= median <= float(r["p80_ms"]), r
        assert math.isclose(float(r["x_floor"]), median / floors[tuple(r[c] for c in case)], rel_tol=1e-9), r


def test_bench_noise_quick(tmp_path):
    # The interpreter is switched on, and must still not be benchmarked: its timings mean nothing.
    run("bench_noise.py", "--quick", "--results", str(tmp_path), TRITON_INTERPRET="1")
    path, fields, rows = results(tmp_path, "noise")
    assert set(fields) == {"variant", "size", "tokens", "k", "dtype", "x_floor", "peak_mib"} | TIMES | META
    assert {r["variant"] for r in rows} == {"gaussian_torch", "in_manifold_torch", "knn_search_per_step", "gather_qr",
                                            "gather_mgs_reference", "gather_projection_solve", "table_build_once",
                                            "bytes_floor"}
    assert {r["backends"] for r in rows} == {"torch"}
    assert_floor_multiples(rows, ("size",))
    assert_rendered(path, "| variant | 2000x128 float32 |")


@pytest.mark.parametrize("script,args", [("bench_stability.py", ()), ("bench_step.py", ("--methods", "ft"))])
def test_quick_runs_never_write_into_the_committed_results(script, args):
    """--quick without --results writes into a new temporary folder, never benchmarks/results/."""
    committed = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in committed.glob("*")}
    out = run(script, "--quick", *args)
    assert {p: p.stat().st_mtime_ns for p in committed.glob("*")} == before
    folder = Path(out.split("--quick: writing to ", 1)[1].split()[0])
    assert folder != committed and list(folder.glob(f"{script[6:-3]}_*.csv"))


def test_bench_stability_quick(tmp_path):
    run("bench_stability.py", "--quick", "--results", str(tmp_path))
    path, fields, rows = results(tmp_path, "stability")
    assert set(fields) == {"variant", "size", "batch", "seq", "dtype", "x_floor", "peak_mib"} | TIMES | META
    assert {r["variant"] for r in rows} == {"concat_torch", "split_torch", "mse_loss_loop", "bytes_floor"}
    assert_floor_multiples(rows, ("size", "dtype"))
    assert_rendered(path, "| variant | 4x96 float32 |")


def test_bench_step_quick_ratios_to_ft_of_the_same_run(tmp_path):
    from lnsr_fast.methods import METHODS

    run("bench_step.py", "--quick", "--results", str(tmp_path))
    path, fields, first = results(tmp_path, "step")
    expected = {(m, mode, dropout) for m in METHODS
                for mode, dropout in ([(a, b) for a in ("concat", "two_pass") for b in ("shared", "independent")]
                                      if m in ("lnsr", "lnsr_in_manifold") else [("", "")])}
    assert {(r["method"], r["mode"], r["dropout"]) for r in first} == expected
    assert set(fields) == {"method", "mode", "noise", "dropout", "fraction", "size", "batch", "seq", "amp", "peak_gib",
                           "note", "x_ft", "added_ops", "added_syncs"} | TIMES | META
    assert all(r["peak_gib"] == "" and r["amp"] == "none" and float(r["median_ms"]) > 0 for r in first)
    added = {(r["method"], r["mode"], r["dropout"]): (int(r["added_ops"]), int(r["added_syncs"])) for r in first}
    assert added[("ft", "", "")] == (0, 0) and added[("lnsr", "concat", "independent")][0] > 0
    assert all(syncs == 0 for (method, mode, _), (_, syncs) in added.items() if mode == "concat")   # LNSR's own

    # An earlier run's FT row (much slower, with fewer columns) must neither be used for the next run's
    # ratios nor be lost when that run appends its rows.
    stale = {"method": "ft", "size": "tiny", "batch": "4", "seq": "16", "amp": "none", "median_ms": "1e6", "run": "old"}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in fields if c != "note"], restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows([stale, *first])
    run("bench_step.py", "--quick", "--methods", "lnsr", "--modes", "concat", "--dropouts", "shared",
        "--fractions", "1,0.5", "--results", str(tmp_path))
    _, fields, rows = results(tmp_path, "step")
    assert set(fields) == {"method", "mode", "noise", "dropout", "fraction", "size", "batch", "seq", "amp", "peak_gib",
                           "note", "x_ft", "added_ops", "added_syncs"} | TIMES | META
    assert rows[0]["run"] == "old" and len(rows) == 1 + len(first) + 3
    second = rows[1 + len(first):]
    assert [(r["method"], r["mode"], r["dropout"], r["fraction"]) for r in second] == [
        ("ft", "", "", ""), ("lnsr", "concat", "shared", ""), ("lnsr", "concat", "shared", "0.5")]
    assert second[2]["added_syncs"] == "0" and 0 < int(second[2]["added_ops"])
    assert {r["run"] for r in second} != {first[0]["run"]}
    for run_rows in (first, second):
        ft = float(next(r["median_ms"] for r in run_rows if r["method"] == "ft"))
        for r in run_rows:
            assert math.isclose(float(r["x_ft"]), float(r["median_ms"]) / ft, rel_tol=1e-9), r

    # render.py on its own rebuilds the markdown and the plot from the folder: latest row of each case.
    for suffix in (".md", ".png"):
        path.with_suffix(suffix).unlink()
    run("render.py", str(tmp_path))
    assert_rendered(path, "| method mode dropout fraction | tiny 4 |")
    ft_cell = f"| ft | 1.00× ({float(second[0]['median_ms']):.4g} ms) |"
    assert ft_cell in path.with_suffix(".md").read_text()


@pytest.mark.timeout(120)
def test_pytest_benchmark_suite_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           str(ROOT / "benchmarks" / "test_bench_quick.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_plain_pytorch_baselines_compute_what_the_package_computes(monkeypatch):
    """A baseline that did less (or other) work than the package would make every speed-up meaningless."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_noise import IN_MANIFOLD_RATIO, noise_variants
    from bench_stability import forward_backward, mse_loss_loop, stability_inputs, stability_variants

    params, hidden, mask = stability_inputs(3, 40, batch=5, seq=9, dtype=torch.float32, device=torch.device("cpu"))
    # Concat layout: a layer's hidden state is a non-leaf [2B, T, d] computed from its parameter; some tokens
    # are padding.
    assert all(h.shape == (10, 9, 40) and h.grad_fn is not None for h in hidden) and not mask.all()
    package = stability_variants(["torch"])
    for name in ("concat_torch", "split_torch"):
        torch.testing.assert_close(mse_loss_loop(hidden, mask), package[name](hidden, mask))
        for got, want in zip(forward_backward(mse_loss_loop, params, hidden, mask),
                             forward_backward(package[name], params, hidden, mask)):
            torch.testing.assert_close(got, want)

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 32, generator=gen)
    ids = torch.randint(0, 300, (50,), generator=gen)
    x, k = weight[ids], 5
    table = lf.build_neighbor_table(weight, k, backend="torch")
    variants = noise_variants(weight, table, ids, x, k, ["torch"])
    knn = variants["knn_search_per_step"]().indices
    assert (knn[:, 0] == ids).all() and (knn[:, 1:].sort(1).values == table[ids].long().sort(1).values).all()
    diffs = (weight[table[ids].long()] - x[:, None]).double()  # [N, k, d]
    for name in ("gather_qr", "gather_mgs_reference", "gather_projection_solve", "in_manifold_torch"):
        eps = variants[name]()
        eps = (eps[0] if isinstance(eps, tuple) else eps).double()
        torch.testing.assert_close(eps.norm(dim=-1), IN_MANIFOLD_RATIO * x.double().norm(dim=-1), rtol=1e-5, atol=0)
        coef = torch.linalg.lstsq(diffs.transpose(1, 2), eps[..., None]).solution  # ε's best fit inside the span
        residual = (diffs.transpose(1, 2) @ coef).squeeze(-1) - eps
        assert (residual.norm(dim=-1) <= 1e-4 * eps.norm(dim=-1)).all(), name
