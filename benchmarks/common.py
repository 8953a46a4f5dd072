"""Timing and result files shared by the benchmarks: median and 20/80 percentiles of repeated runs
(CUDA events on a GPU), rows appended to one CSV per device, rendered to markdown and a PNG."""
from __future__ import annotations

import csv
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def device_tag(device: torch.device) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()


def measure(fn, device: torch.device, warmup: int = 2, reps: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) of fn's wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def write_results(name: str, rows: list[dict], device: torch.device, x: str, y: str = "median_ms",
                  out_dir: Path = RESULTS) -> Path:
    """Append rows to <out_dir>/<name>_<device>.csv; write the run's markdown table and a PNG plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}_{device_tag(device)}"
    versions = {"device": device_name(device), "torch": torch.__version__}
    rows = [{**r, **versions} for r in rows]
    fields = list(rows[0])
    csv_path = stem.with_suffix(".csv")
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in fields) + " |" for r in rows]
    stem.with_suffix(".md").write_text(f"# {name} on {device_name(device)}\n\n" + "\n".join(lines) + "\n")
    _plot(rows, stem.with_suffix(".png"), x, y, f"{name} on {device_name(device)}")
    return stem


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(rows, path: Path, x: str, y: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    xs = list(dict.fromkeys(str(r[x]) for r in rows))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = {str(r[x]): r[y] for r in rows if r["variant"] == v}
        ax.bar([j + i * width for j in range(len(xs))], [vals.get(s, 0) for s in xs], width, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{y} (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
