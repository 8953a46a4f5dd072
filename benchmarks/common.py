"""What every benchmark of the LNSR step shares (docs/design.md §5–§6): timing (median and 20/80 percentiles:
wall clock per call, or on a GPU the kernels' own time with the launch queue kept busy), the copy
bandwidth behind the bytes floors, the kernel backends worth timing on a device, the results folder (a
temporary one for --quick runs) and rows appended to one CSV per card (benchmarks/render.py turns it into
markdown and plots)."""
from __future__ import annotations

import argparse
import csv
import platform
import re
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# One process is one run: every row it writes carries this, so ratios and comparisons can be read
# within a run (same card, same load) even when several runs share a CSV.
RUN = time.strftime("%Y-%m-%d %H:%M:%S")


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU's with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def device_tag(device: torch.device) -> str:
    """device_name as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int = 2, reps: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) of fn's wall-clock time in milliseconds over `reps` calls after `warmup` calls
    (on a GPU from CUDA events around the call, host included: a training step's time)."""
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
    return _quantiles(times)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    # "inclusive": interpolate between measured times; the default method extrapolates past them.
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


_SPIN_CYCLES_PER_MS: dict[torch.device, float] = {}


def _spin_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles per millisecond of torch.cuda._sleep, measured once per device."""
    if device not in _SPIN_CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # warm up
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        torch.cuda.synchronize(device)
        _SPIN_CYCLES_PER_MS[device] = 10**7 / start.elapsed_time(end)
    return _SPIN_CYCLES_PER_MS[device]


def measure_kernels(fn, device: torch.device, warmup: int = 2, reps: int = 10) -> dict:
    """median_ms, p20_ms, p80_ms of fn's time and peak_mib, the memory fn allocates beyond what is
    allocated before it (GPU; blank on the CPU, where wall clock is measured as by `measure`).

    On a GPU the time is the kernels' own, not Python's: before each call a spin kernel is queued, long
    enough (twice fn's host time) that fn's launches are all queued behind it before the start event is
    reached, so dispatch and launch latency fall outside the events. fn must not synchronise the host.
    """
    if device.type != "cuda":
        median, p20, p80 = measure(fn, device, warmup, reps)
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mib": ""}
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    host = time.perf_counter()
    fn()
    host_ms = (time.perf_counter() - host) * 1e3
    torch.cuda.synchronize(device)
    spin = int(max(2 * host_ms, 0.05) * _spin_cycles_per_ms(device))
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    median, p20, p80 = _quantiles(times)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mib": peak}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy (read + write): the rate the bytes floors assume."""
    src = torch.empty(64 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    median = measure_kernels(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * src.numel() * 4 / (median / 1e3)


def kernel_backends(device: torch.device) -> list[str]:
    """The backends that run natively on `device`, best first. On the CPU that is "torch" only: Triton
    there is its interpreter (TRITON_INTERPRET=1), a test vehicle whose speed means nothing."""
    from lnsr_fast.kernels import available_backends

    found = available_backends(device)
    return found if device.type == "cuda" else [b for b in found if b == "torch"]


def kernel_parser(doc: str, sizes: dict) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes: --quick, --device, --sizes (of `sizes`), --reps, --results."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape, few repetitions (CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help=f"comma-separated, of {sorted(sizes)} (default: all; tiny with --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 20; 3 with --quick)")
    p.add_argument("--results", default=None, help=f"folder for the CSV, markdown and PNG (default: {RESULTS}; a new "
                                                   "temporary folder with --quick)")
    return p


def results_folder(results: str | None, quick: bool) -> Path:
    """Where a benchmark writes: `results` if given, else a new temporary folder for a --quick run (its
    smoke-size rows must never reach the committed tables), else benchmarks/results/."""
    if results is not None:
        return Path(results)
    if quick:
        folder = Path(tempfile.mkdtemp(prefix="lnsr_fast_quick_"))
        print(f"--quick: writing to {folder}", flush=True)
        return folder
    return RESULTS


def kernel_setup(args, sizes: dict, quick_sizes: dict) -> tuple[torch.device, dict, int, list[str], float]:
    """(device, sizes, reps, backends, copy bandwidth) of a kernel benchmark's parsed options; says them."""
    device = torch.device(args.device)
    chosen = quick_sizes if args.quick else {s: sizes[s] for s in args.sizes.split(",")} if args.sizes else sizes
    backends, bandwidth = kernel_backends(device), copy_bandwidth(device)
    print(f"{device}: backends {backends}, copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    return device, chosen, args.reps or (3 if args.quick else 20), backends, bandwidth


def versions(device: torch.device) -> dict:
    """Card, software versions and kernel backends, recorded with every row."""
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return ""

    return {"device": device_name(device), "torch": torch.__version__, "transformers": version("transformers"),
            "triton": version("triton"), "lnsr_fast": version("lnsr_fast"),
            "backends": " ".join(kernel_backends(device))}


def write_results(name: str, rows: list[dict], device: torch.device, out_dir: Path = RESULTS) -> Path:
    """Append rows (with run, device and versions) to <out_dir>/<name>_<device>.csv; returns its path.

    A file written with other columns (an older version of the benchmark) is rewritten with the union of
    both, earlier rows left blank in the new columns, so one card keeps one file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device_tag(device)}.csv"
    meta = {"run": RUN, **versions(device)}
    rows = [{**r, **meta} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    old_rows, rewrite = [], False
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields = reader.fieldnames or []
            if not set(fields) <= set(old_fields):
                old_rows, rewrite = list(reader), True
            fields = list(dict.fromkeys([*old_fields, *fields]))
    header = rewrite or not path.exists()
    with path.open("w" if header else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if header:
            writer.writeheader()
        writer.writerows(old_rows + rows)
    return path
