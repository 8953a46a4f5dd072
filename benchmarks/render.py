"""Turn the benchmark CSVs (one per benchmark and card, benchmarks/common.py) into a markdown table and a
PNG plot each, showing the latest measurement of every case. Each benchmark calls it at its end.

    python benchmarks/render.py [results folder or CSV files...]
    python benchmarks/render.py --targets [results folder or CSV files...]   # docs/design.md §6, printed
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from common import RESULTS

# Per benchmark: the columns that name a case (a later row of the same case replaces an earlier one)
# and those that label the markdown's rows and columns (and the plot's series and x axis).
SPECS = {
    "noise": {"case": ("variant", "size", "tokens", "k", "dtype"), "rows": ("variant",), "cols": ("size", "dtype")},
    "stability": {"case": ("variant", "size", "batch", "seq", "dtype"), "rows": ("variant",), "cols": ("size", "dtype")},
    "step": {"case": ("method", "mode", "noise", "dropout", "fraction", "size", "batch", "seq", "amp"),
             "rows": ("method", "mode", "dropout", "fraction"), "cols": ("size", "batch")},
}
VERSIONS = ("torch", "transformers", "triton", "lnsr_fast", "backends")


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def latest_rows(path: Path) -> tuple[str, list[dict]]:
    """(benchmark name, the last row of every case in the CSV, in order of first appearance)."""
    name = path.stem.split("_")[0]
    if name not in SPECS:
        raise ValueError(f"{path}: unknown benchmark {name!r}; expected a file named one of {sorted(SPECS)}_<device>.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[tuple(r.get(c, "") for c in SPECS[name]["case"])] = r
    return name, list(latest.values())


def label(row: dict, cols) -> str:
    """The row's values in the columns `cols`, the blank ones left out."""
    return " ".join(str(row.get(c)) for c in cols if row.get(c)) or "-"


def _cell(name: str, row: dict) -> str:
    median, p20, p80 = (_number(row.get(c)) for c in ("median_ms", "p20_ms", "p80_ms"))
    if median is None:
        return row.get("note") or "-"
    if name == "step":
        ratio, peak = _number(row.get("x_ft")), _number(row.get("peak_gib"))
        text = f"{median:.4g} ms"
        if ratio is not None:
            text = f"{ratio:.2f}× ({text})"
        return text + (f", {peak:.2f} GiB" if peak is not None else "")
    text = f"{median:.4g} ms"
    if p20 is not None and p80 is not None and p20 != p80:
        text += f" [{p20:.3g}–{p80:.3g}]"
    floor = _number(row.get("x_floor"))
    text += f", {floor:.3g}× floor" if floor is not None and row.get("variant") != "bytes_floor" else ""
    peak = _number(row.get("peak_mib"))
    return text + (f", {peak:.4g} MiB" if peak is not None else "")


def markdown(name: str, rows: list[dict]) -> str:
    """The rows as one table: a line per variant (method), a column per size (and batch or dtype)."""
    spec = SPECS[name]
    row_labels = list(dict.fromkeys(label(r, spec["rows"]) for r in rows))
    col_labels = list(dict.fromkeys(label(r, spec["cols"]) for r in rows))
    cells = {(label(r, spec["rows"]), label(r, spec["cols"])): _cell(name, r) for r in rows}
    devices = sorted({r.get("device", "") for r in rows})
    runs = sorted({r.get("run", "") for r in rows})
    software = "; ".join(f"{v} {', '.join(sorted({r.get(v) or '-' for r in rows}))}" for v in VERSIONS)
    what = {"step": "time per optimizer step ÷ plain fine-tuning (FT) of the same run, median time, peak "
                    "memory allocated (GPU only; blank on the CPU)",
            "noise": "noise for one batch, median [p20–p80] GPU time, multiple of the bytes floor and memory "
                     "allocated (GPU only)",
            "stability": "stability penalty over all layers, forward + backward as a concat-mode step uses it, "
                         "median [p20–p80] GPU time, multiple of the bytes floor and memory allocated (GPU only)"}[name]
    lines = [f"# {name} on {', '.join(devices)}", "", f"{what}. Latest measurement of each case; "
             f"runs {runs[0]} to {runs[-1]}; {software}.", "",
             "| " + " | ".join([" ".join(spec["rows"]), *col_labels]) + " |", "|---" * (len(col_labels) + 1) + "|"]
    lines += ["| " + " | ".join([r, *(cells.get((r, c), "") for c in col_labels)]) + " |" for r in row_labels]
    return "\n".join(lines) + "\n"


def plot(name: str, rows: list[dict], path: Path) -> None:
    """Grouped bars of median time per size (kernels), or ratio to FT and peak memory against batch (step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = SPECS[name]
    title = f"{name} on {', '.join(sorted({r.get('device', '') for r in rows}))}"
    if name == "step":
        sizes = list(dict.fromkeys(r["size"] for r in rows))
        batches = sorted({int(r["batch"]) for r in rows})
        panels = [("x_ft", "time ÷ FT")]
        if any(_number(r.get("peak_gib")) is not None for r in rows):
            panels.append(("peak_gib", "peak memory (GiB)"))
        fig, axes = plt.subplots(len(panels), len(sizes), figsize=(5 * len(sizes) + 3, 3.5 * len(panels)), squeeze=False)
        for j, size in enumerate(sizes):
            for i, (y, ylabel) in enumerate(panels):
                ax = axes[i][j]
                for n, line in enumerate(dict.fromkeys(label(r, spec["rows"]) for r in rows)):
                    pts = sorted((int(r["batch"]), _number(r.get(y))) for r in rows
                                 if r["size"] == size and label(r, spec["rows"]) == line and _number(r.get(y)) is not None)
                    if pts:  # up to 20 distinct colours; two-pass dashed, independent dropout square markers
                        ax.plot(*zip(*pts), color=plt.cm.tab20(n % 20), label=line,
                                linestyle="--" if "two_pass" in line else "-", marker="s" if "independent" in line else "o")
                ax.set_xscale("log", base=2)
                ax.set_xticks(batches, [str(b) for b in batches], minor=False)
                ax.minorticks_off()
                ax.set_xlabel("batch")
                ax.set_ylabel(ylabel)
                ax.set_title(size)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    else:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        xs = list(dict.fromkeys(label(r, spec["cols"]) for r in rows))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            by_x = {label(r, spec["cols"]): r for r in rows if r["variant"] == v}
            pos = [j + i * width for j, x in enumerate(xs) if _number(by_x.get(x, {}).get("median_ms"))]
            vals = [by_x[x] for x in xs if _number(by_x.get(x, {}).get("median_ms"))]
            med = [_number(r["median_ms"]) for r in vals]
            err = [[m - (_number(r.get("p20_ms")) or m) for m, r in zip(med, vals)],
                   [(_number(r.get("p80_ms")) or m) - m for m, r in zip(med, vals)]]
            ax.bar(pos, med, width, yerr=err, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log scale; bars: p20–p80)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(csv_path: Path) -> Path:
    """Write <csv>.md and <csv>.png next to a benchmark CSV; returns the markdown's path."""
    csv_path = Path(csv_path)
    name, rows = latest_rows(csv_path)
    md = csv_path.with_suffix(".md")
    md.write_text(markdown(name, rows))
    plot(name, rows, csv_path.with_suffix(".png"))
    return md


def _fastest_kernel(rows: list[dict], prefix: str, **match) -> dict | None:
    """The fastest `<prefix><backend>` row of a compiled backend matching `match`, else the torch one."""
    found = [r for r in rows if r["variant"].startswith(prefix) and all(r.get(k) == v for k, v in match.items())
             and _number(r.get("median_ms")) is not None]
    compiled = [r for r in found if not r["variant"].endswith("_torch")]
    return min(compiled or found, key=lambda r: _number(r["median_ms"]), default=None)


def targets(paths) -> str:
    """docs/design.md §6's performance targets against the latest measurements, as a markdown table."""
    by_name: dict[str, list[dict]] = {}
    for path in paths:
        name, rows = latest_rows(Path(path))
        by_name.setdefault(name, []).extend(rows)
    lines = ["| target (docs/design.md §6) | case | measured | goal |", "|---|---|---|---|"]
    for r in by_name.get("noise", []):
        if r["variant"] != "bytes_floor":
            continue
        case = {"size": r["size"], "tokens": r["tokens"], "dtype": r["dtype"]}
        best = _fastest_kernel(by_name["noise"], "in_manifold_", **case)
        mgs = next((x for x in by_name["noise"] if x["variant"] == "gather_mgs_reference"
                    and all(x.get(k) == v for k, v in case.items())), None)
        if best:
            lines.append(f"| {best['variant']} ÷ bytes floor | {r['size']}, N={r['tokens']} | "
                         f"{_number(best['x_floor']):.2f}× ({_number(best['median_ms']):.3g} ms) | ≤ 2× |")
            if mgs:
                speedup = _number(mgs["median_ms"]) / _number(best["median_ms"])
                lines.append(f"| gather + MGS loop ÷ {best['variant']} | {r['size']}, N={r['tokens']} | {speedup:.1f}× | ≥ 25× |")
    for r in by_name.get("stability", []):
        if r["variant"] != "bytes_floor":
            continue
        case = {"size": r["size"], "batch": r["batch"], "seq": r["seq"], "dtype": r["dtype"]}
        best = _fastest_kernel(by_name["stability"], "concat_", **case)
        loop = next((x for x in by_name["stability"] if x["variant"] == "mse_loss_loop"
                     and all(x.get(k) == v for k, v in case.items())), None)
        if best:
            extra = f"; mse_loss loop ÷ it: {_number(loop['median_ms']) / _number(best['median_ms']):.1f}×" if loop else ""
            lines.append(f"| {best['variant']} fwd+bwd ÷ bytes floor | {r['size']} {r['dtype']}, B={r['batch']} | "
                         f"{_number(best['x_floor']):.2f}×{extra} | ≤ 1.5×; loop ÷ it > 1× |")
    steps = by_name.get("step", [])
    for r in steps:
        if r["method"] != "lnsr_in_manifold":
            continue
        same = {k: r.get(k) for k in ("mode", "dropout", "fraction", "size", "batch", "seq", "amp")}
        standard = next((x for x in steps if x["method"] == "lnsr" and all(x.get(k) == v for k, v in same.items())), None)
        case = f"{r['size']} B={r['batch']} {r['mode']} {r['dropout']}"
        if standard and _number(standard.get("median_ms")) and _number(r.get("median_ms")):
            lines.append(f"| in-manifold LNSR step ÷ standard LNSR step | {case} | "
                         f"{_number(r['median_ms']) / _number(standard['median_ms']):.3f}× | ≤ 1.02× |")
        for x in (standard, r):
            if x and _number(x.get("x_ft")) is not None:
                goal = "≤ 1.25× (base), ≤ 1.45× (large) at B=32 concat"
                lines.append(f"| {x['method']} step ÷ FT | {case} | {_number(x['x_ft']):.2f}× | {goal} |")
    return "\n".join(lines) + "\n"


def _csv_paths(args_paths) -> list[Path]:
    paths = [f for p in map(Path, args_paths) for f in (sorted(p.glob("*.csv")) if p.is_dir() else [p])]
    if not paths:
        sys.exit(f"no benchmark CSV in {args_paths}")
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=[str(RESULTS)], help="CSV files or folders of them (default: %(default)s)")
    p.add_argument("--targets", action="store_true", help="print docs/design.md §6's targets against the latest rows")
    args = p.parse_args(argv)
    paths = _csv_paths(args.paths)
    if args.targets:
        print(targets(paths))
        return
    for path in paths:
        print(f"wrote {render(path)} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
