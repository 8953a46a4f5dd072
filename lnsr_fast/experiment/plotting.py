"""The figures of an experiment (docs/design.md §7): test accuracy over seeds per method, and every method's
noise-propagation profile (the paper's Figs. 4 and 1); the measurements themselves are lnsr_fast.analysis'."""
from __future__ import annotations

import numpy as np

from .. import analysis
from .recording import file_errors
from .statistics import runs_of


def plot_box(records: list[dict], chosen: dict[str, dict], path: str, title: str, note: str | None = None) -> None:
    """Box plot of the test accuracy over seeds per method (its chosen grid point), every run as a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
