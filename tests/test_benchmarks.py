"""The benchmarks still run (in their quick CPU mode) and write their CSV, markdown and plot."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_noise_quick(tmp_path):
    subprocess.run([sys.executable, "bench_noise.py", "--quick", "--results", str(tmp_path)],
                   cwd=ROOT / "benchmarks", check=True, capture_output=True, timeout=300)
    (csv_path,) = tmp_path.glob("noise_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["variant"] for r in rows} == {"gaussian", "in_manifold_reference", "knn_search_per_step",
                                            "table_build_once", "bytes_floor"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| variant |" in csv_path.with_suffix(".md").read_text()
