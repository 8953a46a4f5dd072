"""The figures of an experiment (docs/design.md §7): test accuracy over seeds per method, and every method's
noise-propagation profile (the paper's Figs. 4 and 1); the measurements themselves are lnsr_fast.analysis'."""
from __future__ import annotations

import numpy as np

from .. import analysis
from .recording import file_errors
from .statistics import runs_of


def plot_box(groups: dict[str, list[float]], path: str, title: str, note: str | None = None) -> None:
    """Box plot of the test accuracy (%) of each group's runs (a method at its chosen point), every run as a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = {label: acc for label, acc in groups.items() if acc}
    fig = Figure(figsize=(1.6 * len(groups) + 2.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.boxplot(list(groups.values()), showmeans=True, meanprops={"marker": "^", "markersize": 6})
    ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=20)
    rng = np.random.default_rng(0)
    for i, acc in enumerate(groups.values(), 1):
        ax.plot(i + rng.uniform(-0.08, 0.08, len(acc)), acc, ".", color="0.3", alpha=0.7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    analysis.add_note(fig, note)
    with file_errors(path):
        fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_lambda(panels: dict[str, dict], path: str, note: str | None = None) -> None:
    """Accuracy against λ, one panel per corpus: `panels[corpus]` holds "curves" ({method: `statistics.curve`
    rows}), "ft" (FT's mean validation and test accuracy on the same seeds, or None) and "paper" ({reading: (low,
    high)}: the paper's λ range 0.2–1.0 converted to the curves' units, shaded)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (corpus, panel) in zip(axes, panels.items()):
        for (reading, (low, high)), color in zip(panel["paper"].items(), ("tab:orange", "tab:purple")):
            ax.axvspan(low, high, color=color, alpha=0.12, label=f"paper's 0.2–1.0, {reading}")
        for (method, rows), color in zip(panel["curves"].items(), ("tab:blue", "tab:green")):
            x = [r["weight"] for r in rows]
            ax.plot(x, [100 * r["val_accuracy_mean"] for r in rows], "o-", color=color, label=f"{method}, validation")
            ax.plot(x, [100 * r["test_accuracy_mean"] for r in rows], "s--", color=color, alpha=0.6,
                    label=f"{method}, test")
        if panel.get("ft"):
            ax.axhline(100 * panel["ft"]["val"], color="0.3", lw=1, label="FT, validation")
            ax.axhline(100 * panel["ft"]["test"], color="0.3", lw=1, ls="--", label="FT, test")
        ax.set_xscale("log")
        ax.set_xlabel("λ per layer (reduction \"sum\")")
        ax.set_ylabel("accuracy (%), mean over the selection seeds")
        ax.set_title(corpus, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    analysis.add_note(fig, note)
    with file_errors(path):
        fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_profiles(records: list[dict], chosen: dict[str, dict], pretrained: dict, png: str, csv: str,
                  note: str) -> None:
    """The noise-propagation figure and table: the pretrained model's profile, and per method the mean over
    seeds of its chosen point's models (shaded: min–max)."""
    means, bands = {"pretrained (no fine-tuning)": pretrained}, {}
    for m, point in chosen.items():
        profiles = [{int(r): v for r, v in rec["profile"].items()} for rec in runs_of(records, m, point)]
        if profiles:
            means[m] = analysis.average_profiles(profiles)[0]
            bands[m] = analysis.profile_range(profiles)
    with file_errors(png):
        analysis.plot_noise_propagation(means, png, band=bands, note=note,
                                        title="How far input-embedding noise moves each layer's output")
    with file_errors(csv):
        analysis.write_noise_propagation_csv(means, csv)
