"""Cost of one whole training step (docs/design.md §1) for every method of lnsr_fast.methods, applied with
`lnsr_fast.apply`, as time per optimizer step ÷ plain fine-tuning (FT) measured in the same run, and peak memory;
and what the method adds outside the model's own work: the kernels it launches and the host syncs it makes per
step, counted as the operators dispatched beyond those of FT on the batch the method runs (2B rows for a doubled
pass; views excluded), and the scalar reads (`_local_scalar_dense`) beyond FT's.

BERT-base and BERT-large shapes with random weights (no downloads), sequence classification, AdamW,
bf16 autocast on a GPU, T = 128, B in {16, 32, 64, 128}; LNSR and in-manifold LNSR in both modes
(concat, two_pass) and both dropout settings (shared, independent), and in concat mode with a noisy copy of
only a fraction of the rows (`--fractions`, e.g. 1,0.5,0.25). Each case starts from a freshly
initialised model, so what a method leaves behind (Mixout's layers, L2-SP's anchor) never reaches the
next. Peak memory is torch.cuda.max_memory_allocated over the case (weights, optimizer state and
activations); it is left blank on the CPU, where no allocator statistic isolates one case. One progress
line per case; rows are appended as they are measured, so an interrupted run keeps what it measured.

    python benchmarks/bench_step.py [--quick] [--sizes bert-base] [--batches 32] [--methods ft,lnsr,smart]
                                    [--fractions 1,0.5,0.25]
"""
from __future__ import annotations

import argparse
import gc
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import RESULTS, measure, results_folder, write_results
from render import SPECS, label, render

# BertConfig arguments; the defaults are BERT-base's.
SIZES = {"bert-base": {}, "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                         "intermediate_size": 4096}}
QUICK_SIZES = {"tiny": {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 64}}
NOISE = {"lnsr": "gaussian", "lnsr_in_manifold": "in_manifold", "noise_only_gaussian": "gaussian",
         "noise_only_in_manifold": "in_manifold"}
LNSR_METHODS = ("lnsr", "lnsr_in_manifold")  # the methods measured in every mode × dropout setting
MODES, DROPOUTS = ("concat", "two_pass"), ("shared", "independent")


def method_cases(names, modes=MODES, dropouts=DROPOUTS, fractions=(1.0,)) -> list[dict]:
    """The cases to measure, FT first (the others are reported relative to it); a fraction below 1 only for the
    concat mode, whose doubled pass it shrinks."""
    cases = []
    for name in dict.fromkeys(["ft", *names]):
        settings = [("", "", "")]
        if name in LNSR_METHODS:
            settings = [(m, d, f) for m in modes for d in dropouts for f in fractions if f == 1 or m == "concat"]
        cases += [{"method": name, "mode": m, "noise": NOISE.get(name, ""), "dropout": d,
                   "fraction": "" if f in ("", 1) else f} for m, d, f in settings]
    return cases


def make_batch(config, batch: int, seq: int, device: torch.device) -> dict:
    """Random token ids, no padding, one label per sequence."""
    gen = torch.Generator(device=device).manual_seed(0)
    return {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
            "labels": torch.randint(0, config.num_labels, (batch,), device=device, generator=gen)}


def make_step(config, case: dict, batch: dict, device: torch.device, amp: bool):
    """(step, handle): a fresh model with the case's method applied, and one optimizer step on `batch`."""
    from transformers import BertForSequenceClassification

    import lnsr_fast
    from lnsr_fast.methods import config as method_config

    torch.manual_seed(0)
    with torch.device(device):
        model = BertForSequenceClassification(config).to(device).train()
    hparams = {k: case[k] for k in ("mode", "dropout", "fraction") if case.get(k)}
    handle = lnsr_fast.apply(model, method_config(case["method"], **hparams))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def backward(loss):
        with torch.autocast(device.type, enabled=False):   # autocast covers the forward only
            loss.backward()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            handle.training_step(batch, backward)
        handle.before_optimizer_step()
        optimizer.step()

    return step, handle


class _Dispatches(TorchDispatchMode):
    """Counts the operators a block dispatches (views and other aliases of their inputs left out: they launch
    nothing) and the scalar reads among them (host syncs on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        self.ops += not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def added_work(config, case: dict, batch: dict, device: torch.device, amp: bool) -> tuple[int, int]:
    """(operators, host syncs) of one step of the case beyond those of one FT step on the rows the case's model
    runs: the doubled batch of a one-pass method, the batch itself otherwise."""
    doubled = case["method"] in LNSR_METHODS + ("r3f",) and case["mode"] != "two_pass"
    pairs = math.ceil((case.get("fraction") or 1) * len(batch["labels"]))
    plain = {k: torch.cat([v, v[:pairs]]) for k, v in batch.items()} if doubled else batch
    counts = []
    for c, b in ((case, batch), ({"method": "ft"}, plain)):
        step, handle = make_step(config, c, b, device, amp)
        step()   # the first step may set things up
        with _Dispatches() as dispatches:
            step()
        handle.remove()
        counts.append((dispatches.ops, dispatches.syncs))
    return counts[0][0] - counts[1][0], counts[0][1] - counts[1][1]


def measure_case(config, case: dict, batch: dict, device: torch.device, amp: bool, warmup: int, reps: int) -> dict:
    """median_ms, p20_ms, p80_ms and peak_gib (GPU) of one case; a `note` instead where the card ran out of memory."""
    gc.collect()  # the previous case's model may sit in reference cycles: free it before counting
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    handle = None
    try:
        step, handle = make_step(config, case, batch, device, amp)
        median, p20, p80 = measure(step, device, warmup=warmup, reps=reps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else ""
        handle.remove()
        ops, syncs = added_work(config, case, batch, device, amp)
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_gib": peak, "added_ops": ops,
                "added_syncs": syncs, "note": ""}
    except torch.cuda.OutOfMemoryError:
        return {"median_ms": "", "p20_ms": "", "p80_ms": "", "peak_gib": "", "note": "out of memory"}
    finally:
        if handle is not None:
            handle.remove()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny BERT, T=16, B=4, 3 repetitions (CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=None, help="comma-separated names of lnsr_fast.methods.METHODS (default: all; "
                                                   "ft is always measured)")
    p.add_argument("--modes", default=",".join(MODES), help="LNSR modes (default: %(default)s)")
    p.add_argument("--dropouts", default=",".join(DROPOUTS), help="LNSR dropout settings (default: %(default)s)")
    p.add_argument("--fractions", default="1", help="LNSR's share of rows with a noisy copy, concat mode "
                                                    "(default: %(default)s; e.g. 1,0.5,0.25)")
    p.add_argument("--sizes", default=None, help=f"comma-separated, of {sorted(SIZES)} (default: all; tiny with --quick)")
    p.add_argument("--batches", default=None, help="comma-separated B (default 16,32,64,128; 4 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="T (default 128; 16 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per case (default 10; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on the GPU (the CPU never uses it)")
    p.add_argument("--results", default=None, help=f"folder for the CSV, markdown and PNG (default: {RESULTS}; a "
                                                   "temporary folder with --quick)")
    args = p.parse_args(argv)
    from transformers import BertConfig

    from lnsr_fast.methods import METHODS

    device = torch.device(args.device)
    names = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; expected names from {sorted(METHODS)}")
    fractions = [float(f) for f in args.fractions.split(",")]
    if not all(0 < f <= 1 for f in fractions):
        p.error(f"--fractions: every value must be in (0, 1], got {fractions}")
    cases = method_cases(names, args.modes.split(","), args.dropouts.split(","), fractions)
    sizes = QUICK_SIZES if args.quick else {s: SIZES[s] for s in args.sizes.split(",")} if args.sizes else SIZES
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "16,32,64,128")).split(",")]
    seq = args.seq or (16 if args.quick else 128)
    reps = args.reps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 3
    amp = device.type == "cuda" and not args.no_amp
    total, done, path = len(sizes) * len(batches) * len(cases), 0, None
    out = results_folder(args.results, args.quick)
    for size, overrides in sizes.items():
        config = BertConfig(**overrides)
        for b in batches:
            batch = make_batch(config, b, seq, device)
            ft_ms = None
            for case in cases:
                result = measure_case(config, case, batch, device, amp, warmup, reps)
                if case["method"] == "ft":
                    ft_ms = result["median_ms"] or None
                ratio = result["median_ms"] / ft_ms if ft_ms and result["median_ms"] else ""
                row = {**case, "size": size, "batch": b, "seq": seq, "amp": "bf16" if amp else "none", **result, "x_ft": ratio}
                path = write_results("step", [row], device, out)
                done += 1
                summary = result["note"] or f"{result['median_ms']:.4g} ms [{result['p20_ms']:.4g}–{result['p80_ms']:.4g}]"
                summary += f", {ratio:.2f}x FT" if ratio else ""
                summary += f", peak {result['peak_gib']:.2f} GiB" if result["peak_gib"] != "" else ""
                summary += f", +{result['added_ops']} ops, +{result['added_syncs']} syncs" if "added_ops" in result else ""
                print(f"[{done}/{total}] {size} B={b} {label(case, SPECS['step']['rows'])}: {summary}", flush=True)
    print(render(path).read_text())


if __name__ == "__main__":
    main()
