"""Registers, spills, shared memory and SASS instruction count of every kernel configuration dispatch can
choose (docs/design.md §6: no spills up to d = 8192, k = 32), without a GPU. Exit status 1 on any spill.

    python benchmarks/kernel_resources.py triton [--archs 80,90] [--results DIR]
    python benchmarks/kernel_resources.py cuda BUILD_LOG EXTENSION.so [--results DIR]

`triton`: runs the Triton launchers (kernels/triton/) on CPU tensors over the sizes dispatch takes, with
the launch replaced by recording its arguments, and compiles each distinct configuration for each
architecture with Triton's own compiler and bundled ptxas, as a launch on such a GPU would (fp32 data, a
padding mask and in-kernel draws: the most registers). `cuda`: reads the `ptxas -v` report in the log of
`make cuda-compile` (registers, stack, spills, shared memory per kernel and architecture) and counts the
instructions of the built extension with cuobjdump. Rows go to <results>/kernel_resources_<backend>.csv
and .md, tagged with the code's git revision, so a change that bloats a kernel shows.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from common import RESULTS, RUN

FIELDS = ["backend", "kernel", "config", "arch", "registers", "stack_bytes", "spill_bytes", "shared_bytes",
          "instructions", "code", "run"]


def _tool(name: str) -> str | None:
    """A CUDA binary tool bundled with the triton wheel (cuobjdump, nvdisasm, ptxas), if present."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _sass_counts(binary: str) -> dict[tuple[str, str], int]:
    """{(mangled function, 'sm_XX'): instructions} of a cubin or shared library, via cuobjdump -sass."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    text = subprocess.run([tool, "-sass", binary], capture_output=True, text=True, check=True).stdout
    counts, arch, function = {}, "", None
    for line in text.splitlines():
        if m := re.match(r"\s*code for (sm_\d+a?)", line):
            arch = m.group(1).rstrip("a")
        elif m := re.match(r"\s*Function : (\S+)", line):
            function = m.group(1)
            counts[(function, arch)] = 0
        elif function and re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line):
            counts[(function, arch)] += 1
    return counts


def _code_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "lnsr_fast"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return rev + ("+changes" if dirty else "")


# ------------------------------------------------------------------------------------------------ Triton

def _recorded_launches() -> list:
    """(kernel, args, kwargs) of every launch the Triton launchers make over the sizes dispatch takes."""
    import torch
    from triton.runtime.jit import JITFunction

    from lnsr_fast.kernels import MAX_K, MAX_WIDTH
    from lnsr_fast.kernels.triton import gaussian_noise, in_manifold_noise, layerwise_stability

    launches = []
    original = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        g = torch.Generator().manual_seed(0)
        for d in (64, 768, MAX_WIDTH):  # a narrow tile (d <= 64) and the wide one
            x = torch.randn(5, d, generator=g)
            real = torch.ones(5, dtype=torch.bool)
            gaussian_noise.gaussian_noise(x, 0.1, 0, real)
            for k in (1, 10, 17, MAX_K):
                table = torch.zeros(8, k, dtype=torch.int32)
                in_manifold_noise.in_manifold_noise(x, torch.zeros(5, dtype=torch.long), table, torch.randn(8, d), 0.1,
                                                    1e-4, 0, real)
            hidden = [torch.randn(6, 3, d, generator=g) for _ in range(3)]
            clean, noisy = [h[:2] for h in hidden], [h[4:] for h in hidden]
            mask = torch.ones(2, 3, dtype=torch.bool)
            layerwise_stability.stability_forward(clean, noisy, mask, [1.0] * 3, "sum")
            grads = [torch.empty_like(h) for h in hidden]
            layerwise_stability.stability_backward(torch.tensor(1.0), clean, noisy, mask, [1.0] * 3, "sum",
                                                   [gr[:4] for gr in grads], [gr[4:] for gr in grads])
    finally:
        JITFunction.run = original
    return launches


def triton_rows(archs: list[int]) -> list[dict]:
    import contextlib
    import io
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    # Compile even where the cache holds the kernel, and print ptxas -v's report: its spill counts.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True

    compiled, rows = set(), []
    for kernel, args, kwargs in _recorded_launches():
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            key = (kernel.fn.__name__, arch, str(specialization), str(options))
            if key in compiled:
                continue
            compiled.add(key)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                result = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            (report,) = _ptxas_report(log.getvalue())
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(result.asm["cubin"])
                f.flush()
                report["instructions"] = sum(_sass_counts(f.name).values())
            names = {kernel.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
            config = " ".join(f"{n}={names[n]}" for n in ("BLOCK_K", "BLOCK_D", "ROWS", "G", "VEC") if n in names)
            report.update(backend="triton", kernel=kernel.fn.__name__.strip("_"),
                          config=f"{config} warps={options.num_warps}", shared_bytes=result.metadata.shared)
            rows.append(report)
    return rows


def _ptxas_report(text: str) -> list[dict]:
    """One dict per compiled function of a `ptxas -v` report: function (mangled), arch, registers,
    stack_bytes, spill_bytes (stores), shared_bytes."""
    rows, current = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)a?'", line):
            current = {"function": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)):
            current.update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return rows


# ------------------------------------------------------------------------------------------------ CUDA

def _kernel_name(mangled: str) -> tuple[str, str]:
    """(kernel, template arguments) of a mangled lnsr kernel name."""
    m = re.search(r"\d+([a-z][a-z_]*_kernel)(I(?:Li\d+E)+E)?", mangled)
    return m.group(1), ",".join(re.findall(r"Li(\d+)E", m.group(2) or ""))


def cuda_rows(log: str, library: str) -> list[dict]:
    counts = _sass_counts(library) if library else {}
    rows = _ptxas_report(Path(log).read_text())
    for r in rows:
        kernel, template = _kernel_name(r["function"])
        r.update(backend="cuda", kernel=kernel, config=f"<{template}>" if template else "",
                 instructions=counts.get((r["function"], r["arch"]), ""))
    return rows


def write(rows: list[dict], backend: str, out_dir: Path) -> Path:
    """Appends the rows to <out_dir>/kernel_resources_<backend>.csv and rewrites its markdown table
    (the rows of the latest run of each code revision)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernel_resources_{backend}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows({**r, "code": _code_revision(), "run": RUN} for r in rows)
    with path.open(newline="") as f:
        every = list(csv.DictReader(f))
    latest = {}
    for r in every:
        latest.setdefault(r["code"], {})[(r["kernel"], r["config"], r["arch"])] = r
    lines = [f"# Kernel resources ({backend})", "",
             "Registers, stack and spill bytes, static shared memory and SASS instructions per configuration "
             "(benchmarks/kernel_resources.py); one table per code revision.", ""]
    for code, cases in latest.items():
        lines += [f"## code {code or '?'}", "", "| kernel | config | arch | registers | stack B | spill B | shared B | "
                  "instructions |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['config']} | {r['arch']} | {r['registers']} | {r['stack_bytes']} | "
                  f"{r['spill_bytes']} | {r['shared_bytes']} | {r['instructions']} |" for r in cases.values()]
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backend", choices=["triton", "cuda"])
    p.add_argument("log", nargs="?", help="cuda: the build log holding ptxas -v's report")
    p.add_argument("library", nargs="?", help="cuda: the built extension (.so), for instruction counts")
    p.add_argument("--archs", default="80,90", help="triton: compute capabilities (default: %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the CSV and markdown (default: %(default)s)")
    args = p.parse_args(argv)
    if args.backend == "triton":
        if os.environ.get("TRITON_INTERPRET") == "1":
            p.error("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled")
        rows = triton_rows([int(a) for a in args.archs.split(",")])
    else:
        if not args.log:
            p.error("cuda needs the build log of `make cuda-compile`")
        rows = cuda_rows(args.log, args.library)
        if not rows:
            p.error(f"{args.log} holds no ptxas -v report (was the extension rebuilt with -Xptxas -v?)")
    path = write(rows, args.backend, Path(args.results))
    spilled = [r for r in rows if r.get("spill_bytes")]
    for r in rows:
        print(f"{r['backend']} {r['kernel']} {r['config']} {r['arch']}: {r['registers']} registers, stack "
              f"{r['stack_bytes']} B, spills {r['spill_bytes']} B, {r['instructions']} instructions")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if spilled:
        print(f"SPILLS in {len(spilled)} configuration(s): " + "; ".join(
            f"{r['kernel']} {r['config']} {r['arch']}" for r in spilled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
