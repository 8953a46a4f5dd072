"""The statistics of an experiment (docs/design.md §7): which runs belong to a grid point, the choice of a
point on validation data, and the summary over seeds (mean, sample std, max, p-values against FT, step
time) as rows and markdown tables."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np

from .config import identity, resolve


def runs_of(records: list[dict], method: str, point: dict, seeds=None) -> list[dict]:
    """The records of `method` at grid point `point` (with the given seeds, or all)."""
    target = identity(resolve(method, point))
    return [r for r in records if r["method"] == method and identity(r["resolved"]) == target
            and (seeds is None or r["seed"] in seeds)]


def select(records: list[dict], method: str, points: list[dict], seeds: list[int]) -> dict:
    """The grid point of `method` with the highest mean validation accuracy over `seeds` (the first of
    `points` on a tie). Reads only `val_accuracy`: test metrics cannot influence the choice."""
    def score(point):
        vals = [r["val_accuracy"] for r in runs_of(records, method, point, seeds)]
        return statistics.fmean(vals) if vals else -math.inf
    return max(points, key=score)   # max keeps the first of equal scores


def welch_p_value(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) that means of `a` and `b` differ; NaN with
    fewer than 2 values on a side, 1.0 when both are constant and equal."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return float("nan")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_p_value(a: dict, b: dict) -> float:
    """Two-sided p-value of the paired t-test over the seeds both {seed: value} maps hold. A seed fixes the
    classifier's initialisation and the data order for every method, so runs of one seed are pairs; NaN
    with fewer than 2 pairs, 1.0 when every difference is 0."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    if d.size < 2:
        return float("nan")
    if np.ptp(d) == 0:
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def paired_interval(a: dict, b: dict, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over the keys both maps hold of a − b and its two-sided `level` t-interval;
    NaNs with fewer than 2 pairs."""
    from scipy import stats
    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys], dtype=float)
    if d.size < 2:
        return (float(d.mean()) if d.size else math.nan), math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given (NaN stays NaN and is not counted): the family-wise
    error over all the comparisons stays at the level any of them is read at."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def versus_baseline(a: dict, b: dict | None) -> dict:
    """The paired comparison of the accuracies `a` against the baseline's `b` ({pair key: accuracy}; b None: no
    comparison, NaNs): the mean difference with its 95% t-interval and the paired p-value."""
    mean, low, high = paired_interval(a, b) if b is not None else (math.nan,) * 3
    p = paired_p_value(a, b) if b is not None else math.nan
    return {"diff_vs_ft_mean": mean, "diff_vs_ft_low": low, "diff_vs_ft_high": high, "paired_p_value_vs_ft": p}


def _with_holm(rows: list[dict]) -> list[dict]:
    """The rows with their paired p-values Holm-adjusted over all of them."""
    for row, p in zip(rows, holm([r["paired_p_value_vs_ft"] for r in rows])):
        row["paired_p_value_vs_ft_holm"] = p
    return rows


def _median(values) -> float:
    # Step times are NaN for a run with no step after its warm-up.
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _mean_of(values) -> float:
    """The mean of the values that are not None (NaN if none is)."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def summarize(records: list[dict], chosen: dict[str, dict], split: str = "test", baseline: str = "ft") -> list[dict]:
    """One row per method over the runs of its chosen grid point: accuracy and macro-F1 on `split` ("test";
    "dev" for a fine-tuning run) mean, sample std (ddof 1; NaN for one run) and max; mean validation and train
    accuracy; gap = train − `split` accuracy (mean); the penalty's mean share of the loss at the start and the
    end of the runs; against `baseline`: the mean difference of the `split` accuracies paired by seed with its
    95% t-interval, the p-values (Welch's, the paper's, and paired by seed) and the paired one Holm-adjusted
    over every method compared; the median over runs of each run's median step time and its ratio to the
    baseline's."""
    rows = []
    runs = {m: runs_of(records, m, p) for m, p in chosen.items()}
    by_seed = lambda rs: {r["seed"]: r[f"{split}_accuracy"] for r in rs}
    base = runs.get(baseline, [])
    base_step = _median(r["step_time_ms"] for r in base)
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")
    for m, rs in runs.items():
        if not rs:
            continue
        acc = [r[f"{split}_accuracy"] for r in rs]
        f1 = [r[f"{split}_macro_f1"] for r in rs]
        step = _median(r["step_time_ms"] for r in rs)
        compared = m != baseline and bool(base)
        rows.append({
            "method": m, "hparams": json.dumps(chosen[m], sort_keys=True), "runs": len(rs),
            f"{split}_accuracy_mean": statistics.fmean(acc), f"{split}_accuracy_std": sd(acc),
            f"{split}_accuracy_max": max(acc),
            f"{split}_macro_f1_mean": statistics.fmean(f1), f"{split}_macro_f1_std": sd(f1),
            f"{split}_macro_f1_max": max(f1),
            "val_accuracy_mean": statistics.fmean(r.get("val_accuracy", math.nan) for r in rs),
            "train_accuracy_mean": statistics.fmean(r["train_accuracy"] for r in rs),
            "gap_mean": statistics.fmean(r["train_accuracy"] - r[f"{split}_accuracy"] for r in rs),
            "p_value_vs_ft": welch_p_value(acc, [r[f"{split}_accuracy"] for r in base]) if compared else math.nan,
            **versus_baseline(by_seed(rs), by_seed(base) if compared else None),
            "step_time_ms_median": step, "step_time_vs_ft": step / base_step,
            **{f"penalty_share_{end}_mean": _mean_of(r.get(f"penalty_share_{end}") for r in rs) for end in ("start", "end")},
        })
    return _with_holm(rows)


def point_label(hparams_json: str) -> str:
    """A grid point as "k=3, weight=0.1" ("defaults" when empty)."""
    return ", ".join(f"{k}={v}" for k, v in json.loads(hparams_json).items()) or "defaults"


def varied(records: list[dict]) -> dict[str, set[str]]:
    """Per method, the hyperparameters whose value differs among its `records` (a grid's or a study's axes, as
    against the settings it pins)."""
    values: dict[str, dict[str, set[str]]] = {}
    for r in records:
        for k, v in r["hparams"].items():
            values.setdefault(r["method"], {}).setdefault(k, set()).add(json.dumps(v))
    return {m: axes for m, keys in values.items() if (axes := {k for k, seen in keys.items() if len(seen) > 1})}


def _number(value, fmt: str = ".2f", scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else format(scale * value, fmt) + unit


def _share(value) -> str:
    """The penalty's share of the loss, in %."""
    return _number(value, ".1f", 100, "%")


def _difference(row: dict) -> str:
    """The paired difference to FT in points, with its sign, and its 95% interval."""
    signed = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:+.2f}"
    return f"{signed(row['diff_vs_ft_mean'])} [{signed(row['diff_vs_ft_low'])}, {signed(row['diff_vs_ft_high'])}]"


def markdown_summary(rows: list[dict], split: str = "test") -> str:
    """The summary rows as a markdown table (accuracies in %)."""
    pct = lambda v: _number(v, scale=100)
    head = (f"| method | hyperparameters | runs | {split} acc mean ± std | {split} acc max "
            f"| {split} macro-F1 mean ± std | val acc | train acc | gap (train − {split}) | p vs FT (Welch) "
            "| p vs FT (paired by seed) | Δ vs FT, paired (95% CI) | paired p, Holm | penalty share start → end "
            "| step (ms) | step × FT |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in rows:
        lines.append(
            f"| {s['method']} | {point_label(s['hparams'])} | {s['runs']} "
            f"| {pct(s[f'{split}_accuracy_mean'])} ± {pct(s[f'{split}_accuracy_std'])} "
            f"| {pct(s[f'{split}_accuracy_max'])} "
            f"| {pct(s[f'{split}_macro_f1_mean'])} ± {pct(s[f'{split}_macro_f1_std'])} "
            f"| {pct(s['val_accuracy_mean'])} | {pct(s['train_accuracy_mean'])} | {pct(s['gap_mean'])} "
            f"| {_number(s['p_value_vs_ft'], '.3g')} | {_number(s['paired_p_value_vs_ft'], '.3g')} "
            f"| {_difference(s)} | {_number(s['paired_p_value_vs_ft_holm'], '.3g')} "
            f"| {_share(s['penalty_share_start_mean'])} → {_share(s['penalty_share_end_mean'])} "
            f"| {_number(s['step_time_ms_median'], '.0f')} | {_number(s['step_time_vs_ft'], unit='×')} |")
    return "\n".join(lines)


def grid_table(records: list[dict], points: dict[str, list[dict]], chosen: dict[str, dict],
               selection: dict[str, list[int]]) -> list[dict]:
    """Every grid point's validation score (what the choice saw), one row each, the chosen one marked."""
    rows = []
    for m, pts in points.items():
        for p in pts:
            vals = [r["val_accuracy"] for r in runs_of(records, m, p, selection[m])]
            rows.append({"method": m, "hparams": json.dumps(p, sort_keys=True), "seeds": len(vals),
                         "val_accuracy_mean": statistics.fmean(vals) if vals else math.nan,
                         "val_accuracy_std": statistics.stdev(vals) if len(vals) > 1 else math.nan,
                         "chosen": p == chosen.get(m)})
    return rows


def markdown_grid(rows: list[dict]) -> str:
    """The grid table as markdown (validation accuracy in %; the chosen point in bold)."""
    lines = ["| method | grid point | seeds | val acc mean ± std | chosen |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {point_label(r['hparams'])} | {r['seeds']} "
                     f"| {_number(r['val_accuracy_mean'], scale=100)} ± {_number(r['val_accuracy_std'], scale=100)} "
                     f"| {'**yes**' if r['chosen'] else ''} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- a study of several experiments
def pooled_summary(experiments: list[dict], baseline: str = "ft", split: str = "test") -> list[dict]:
    """One row per corpus and distinct (method, chosen point) over `experiments` (each a dict with "corpus",
    "data_seed", "records" and "chosen", as `recording.read_experiment` returns): the point's runs pooled over
    the experiments on that corpus, a run identified by (data seed, seed). Per row: the runs and data splits;
    `split` accuracy mean and sample std; the train − `split` gap; the penalty's share of the loss at the
    start and the end; the noise propagation at the deepest profiled layer (mean); and against `baseline` on
    the same corpus, over the (data seed, seed) pairs both hold, the mean difference with its 95% t-interval
    and the paired p-value, Holm-adjusted over every row of every corpus."""
    groups: dict[tuple, dict] = {}
    for e in experiments:
        for m, point in e["chosen"].items():
            key = (e["corpus"], m, json.dumps(identity(resolve(m, point))))
            group = groups.setdefault(key, {"corpus": e["corpus"], "method": m, "point": point, "runs": {}})
            group["runs"].update({(e["data_seed"], r["seed"]): r for r in runs_of(e["records"], m, point)})
    accuracy = lambda runs: {k: r[f"{split}_accuracy"] for k, r in runs.items()}
    rows = []
    for g in groups.values():
        runs = g["runs"]
        if not runs:
            continue
        acc = list(accuracy(runs).values())
        base = [b["runs"] for b in groups.values() if b["corpus"] == g["corpus"] and b["method"] == baseline]
        compared = g["method"] != baseline and bool(base)
        deepest = lambda r: r["profile"][max(r["profile"], key=int)] if r.get("profile") else None
        rows.append({
            "corpus": g["corpus"], "method": g["method"], "hparams": json.dumps(g["point"], sort_keys=True),
            "runs": len(runs), "splits": len({k[0] for k in runs}),
            f"{split}_accuracy_mean": statistics.fmean(acc),
            f"{split}_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else math.nan,
            "gap_mean": statistics.fmean(r["train_accuracy"] - r[f"{split}_accuracy"] for r in runs.values()),
            **{f"penalty_share_{end}_mean": _mean_of(r.get(f"penalty_share_{end}") for r in runs.values())
               for end in ("start", "end")},
            "noise_at_last_layer_mean": _mean_of(deepest(r) for r in runs.values()),
            **versus_baseline(accuracy(runs), accuracy(base[0]) if compared else None),
        })
    return _with_holm(rows)


def markdown_pooled(rows: list[dict], split: str = "test") -> str:
    """The pooled rows as a markdown table (accuracies in %, differences in points)."""
    pct = lambda v: _number(v, scale=100)
    head = (f"| corpus | method | hyperparameters | runs (splits) | {split} acc mean ± std | Δ vs FT, paired (95% CI) "
            "| paired p | paired p, Holm | gap (train − test) | penalty share start → end | noise at the last layer |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in rows:
        lines.append(
            f"| {s['corpus']} | {s['method']} | {point_label(s['hparams'])} | {s['runs']} ({s['splits']}) "
            f"| {pct(s[f'{split}_accuracy_mean'])} ± {pct(s[f'{split}_accuracy_std'])} "
            f"| {_difference(s)} | {_number(s['paired_p_value_vs_ft'], '.3g')} "
            f"| {_number(s['paired_p_value_vs_ft_holm'], '.3g')} "
            f"| {pct(s['gap_mean'])} | {_share(s['penalty_share_start_mean'])} → {_share(s['penalty_share_end_mean'])} "
            f"| {_number(s['noise_at_last_layer_mean'], '.3g')} |")
    return "\n".join(lines)


def curve(records: list[dict], method: str, key: str = "weight") -> list[dict]:
    """`method`'s runs by the value of its hyperparameter `key`, ascending: the mean validation and test accuracy
    over the seeds that every value was run with (a grid's selection seeds), and those seeds."""
    by_value: dict[float, dict[int, dict]] = {}
    for r in records:
        if r["method"] == method and key in r["resolved"]:
            by_value.setdefault(r["resolved"][key], {})[r["seed"]] = r
    if not by_value:
        return []
    seeds = sorted(set.intersection(*(set(runs) for runs in by_value.values())))
    return [{key: value, "seeds": seeds,
             **{f"{s}_accuracy_mean": statistics.fmean(runs[i][f"{s}_accuracy"] for i in seeds) if seeds else math.nan
                for s in ("val", "test")}}
            for value, runs in sorted(by_value.items())]
