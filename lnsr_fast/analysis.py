"""Analysis of a trained model: how input-embedding noise propagates through its layers (paper Fig. 1).

`noise_propagation` perturbs the word embeddings with the same kind of ε the LNSR step adds (DESIGN.md
§1) and measures, at every hidden state, how far the noisy representation moves relative to the clean
one. `plot_noise_propagation` and `write_noise_propagation_csv` turn profiles into a figure and a table.
"""
from __future__ import annotations

import csv
import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .checks import is_int
from .lnsr import position_ids_from_input_ids

Profile = Mapping[int, float]   # hidden-state index -> mean relative deviation


def _model_inputs(batch: Mapping) -> dict:
    """The batch entries a forward pass takes (labels and input_ids are handled by the caller)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "input_ids", "inputs_embeds")}


@torch.no_grad()
def noise_propagation(model: nn.Module, noise, batches: Iterable[Mapping[str, torch.Tensor]],
                      layers: Sequence[int] | None = None) -> dict[int, float]:
    """Mean relative deviation ‖h̃_r − h_r‖ / ‖h_r‖ of every hidden state r under input-embedding noise.

    model: a Hugging Face model that accepts `inputs_embeds` and `output_hidden_states`.
    noise: a sampler called as `noise(input_ids, inputs_embeds, attention_mask)` -> ε (GaussianNoise,
    InManifoldNoise, or any callable with that signature). It is drawn once per batch and added to the
    word-embedding output x, exactly where the LNSR step adds it: the clean pass sees x, the noisy x + ε.
    batches: dicts with `input_ids` and optionally `attention_mask`, `token_type_ids`, ... (labels are
    ignored); tensors are moved to the model's device.
    layers: indices into `hidden_states` (0 = embedding output, L = last layer); default 0..L.

    The model runs in eval mode (no dropout; its training flag is restored afterwards) without gradients,
    clean and noisy input as two separate passes, so that ε = 0 gives exactly 0. The deviation is
    computed **per token** — ‖h̃_{r,t} − h_{r,t}‖ / ‖h_{r,t}‖ — and **averaged over every real token of
    every batch** (padding excluded; a token whose clean state is 0 counts as 0). Returns
    {layer index: mean relative deviation}, in the order of `layers`.

    >>> profile = noise_propagation(model, GaussianNoise(ratio=0.05, seed=0), batches)   # {0: 0.04, 1: ...}
    """
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"model must have get_input_embeddings() (a Hugging Face model), got {type(model).__name__}")
    if not callable(noise):
        raise TypeError(f"noise must be a callable noise(input_ids, inputs_embeds, attention_mask), got {type(noise).__name__}")
    if layers is not None:
        layers = list(layers)
        if not layers or not all(is_int(r) for r in layers):
            raise ValueError(f"layers must be None or a non-empty sequence of ints, got {layers!r}")
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    position_ids = position_ids_from_input_ids(model)
    was_training = model.training
    model.eval()
    totals: torch.Tensor | None = None
    n_tokens = 0
    try:
        for i, batch in enumerate(batches):
            if "input_ids" not in batch:
                raise ValueError(f"batch {i} has no input_ids (keys: {sorted(batch)})")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            real = torch.ones(input_ids.shape, dtype=torch.bool, device=device) if mask is None else mask != 0
            x = embed(input_ids)
            eps = noise(input_ids, x, mask)
            if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
                raise ValueError(f"noise returned {getattr(eps, 'shape', type(eps).__name__)}, expected a tensor of shape {tuple(x.shape)}")
            extra = _model_inputs(batch)
            if position_ids is not None and extra.get("position_ids") is None:
                extra["position_ids"] = position_ids(input_ids)  # what the model would use given input_ids
            clean = model(inputs_embeds=x, output_hidden_states=True, return_dict=True, **extra).hidden_states
            noisy = model(inputs_embeds=x + eps.to(x.dtype), output_hidden_states=True, return_dict=True, **extra).hidden_states
            if clean is None:
                raise TypeError(f"{type(model).__name__} returned no hidden_states")
            chosen = list(range(len(clean))) if layers is None else layers
            bad = [r for r in chosen if not -len(clean) <= r < len(clean)]
            if bad:
                raise ValueError(f"layers {bad} out of range: the model has {len(clean)} hidden states (0 = embeddings)")
            if layers is None:
                layers = chosen
            per_layer = []
            for r in layers:
                h, h_noisy = clean[r].float(), noisy[r].float()
                norm = h.norm(dim=-1)
                rel = (h_noisy - h).norm(dim=-1) / norm.clamp_min(torch.finfo(torch.float32).tiny)
                rel = torch.where(norm > 0, rel, torch.zeros_like(rel))
                per_layer.append(rel[real].double().sum())
            sums = torch.stack(per_layer)
            totals = sums if totals is None else totals + sums
            n_tokens += int(real.sum())
    finally:
        model.train(was_training)
    if totals is None or n_tokens == 0:
        raise ValueError("batches held no real token: nothing to measure")
    return {int(r): float(v) / n_tokens for r, v in zip(layers, totals.tolist())}


def average_profiles(profiles: Sequence[Profile]) -> tuple[dict[int, float], dict[int, float]]:
    """Mean and standard deviation (ddof=0) per layer over several profiles (e.g. one per seed)."""
    if not profiles:
        raise ValueError("average_profiles needs at least one profile")
    keys = list(profiles[0])
    if any(list(p) != keys for p in profiles):
        raise ValueError("every profile must cover the same layers")
    mean = {r: sum(p[r] for p in profiles) / len(profiles) for r in keys}
    std = {r: math.sqrt(sum((p[r] - mean[r]) ** 2 for p in profiles) / len(profiles)) for r in keys}
    return mean, std


def profile_range(profiles: Sequence[Profile]) -> dict[int, tuple[float, float]]:
    """(min, max) per layer over several profiles: the band `plot_noise_propagation` shades."""
    if not profiles:
        raise ValueError("profile_range needs at least one profile")
    return {r: (min(p[r] for p in profiles), max(p[r] for p in profiles)) for r in profiles[0]}


def _as_panels(profiles) -> dict[str, dict[str, Profile]]:
    """Accept {method: profile} (one panel) or {panel: {method: profile}}."""
    if not profiles:
        raise ValueError("no profiles to plot")
    first = next(iter(profiles.values()))
    if not first:
        raise ValueError("empty profile")
    inner = next(iter(first.values()))
    if isinstance(inner, Mapping):
        return {str(k): dict(v) for k, v in profiles.items()}
    return {"": dict(profiles)}


def _columns(panels, spread):
    columns = []
    for panel, methods in panels.items():
        for method, profile in methods.items():
            name = f"{panel}/{method}" if panel else method
            s = None if spread is None else (spread.get(panel, {}) if panel else spread).get(method)
            columns.append((name, profile, s))
    return columns


def write_noise_propagation_csv(profiles, path, spread=None) -> None:
    """One row per layer: `layer`, then one column per (noise, method) — the mean relative deviation —
    and, when `spread` (same structure) is given, a `<column> std` column after each.

    profiles: {method: {layer: value}} or {noise: {method: {layer: value}}}.
    """
    panels = _as_panels(profiles)
    if spread is not None and "" not in panels:
        spread = {str(k): v for k, v in spread.items()}
    columns = _columns(panels, spread)
    layers = sorted({r for _, p, _ in columns for r in p})
    header = ["layer"]
    for name, _, s in columns:
        header += [name] + ([f"{name} std"] if s is not None else [])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in layers:
            row = [r]
            for _, p, s in columns:
                row.append(f"{p[r]:.6g}" if r in p else "")
                if s is not None:
                    row.append(f"{s[r]:.6g}" if r in s else "")
            w.writerow(row)


def plot_noise_propagation(profiles, path, band=None, title: str | None = None, note: str | None = None) -> None:
    """Write a PNG: layer on x (0 = embedding output), mean relative deviation ‖h̃−h‖/‖h‖ on y, one line
    per method, one panel per noise kind. The y axis is logarithmic when the values are positive and span ≥ 8×.

    profiles: {method: {layer: value}} (one panel) or {noise: {method: {layer: value}}} (a panel each,
    titled by the noise). band: same structure with (low, high) per layer, shaded around each line
    (e.g. `profile_range` over seeds).
    note: a line of small text under the title (e.g. the data and the number of seeds).
    """
    # The Agg canvas directly, without pyplot: no global backend switch, no GUI, works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _as_panels(profiles)
    if band is not None and "" in panels:
        band = {"": band}
    n = len(panels)
    fig = Figure(figsize=(5.2 * n + 0.6, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    values = [v for methods in panels.values() for p in methods.values() for v in p.values()]
    positive = all(v > 0 for v in values)
    log_y = positive and max(values) / min(values) >= 8   # log only when the values span an order of magnitude
    markers = "osD^vP*X"
    for ax, (panel, methods) in zip(axes, panels.items()):
        for i, (method, profile) in enumerate(methods.items()):
            xs = sorted(profile)
            ys = [profile[r] for r in xs]
            style = "--" if "pretrained" in method.lower() else "-"
            line, = ax.plot(xs, ys, style, marker=markers[i % len(markers)], ms=4, label=method)
            b = None if band is None else band.get(panel, {}).get(method)
            if b is not None:
                ax.fill_between(xs, [b[r][0] for r in xs], [b[r][1] for r in xs], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        if log_y:
            ax.set_yscale("log")
        all_layers = sorted({r for p in methods.values() for r in p})
        ax.set_xticks(all_layers)
        ax.set_xlabel("layer (0 = embedding output, then each transformer layer)")
        if panel:
            ax.set_title(panel, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean relative deviation ‖h̃ − h‖ / ‖h‖\n(per token, averaged over real tokens)")
    fig.suptitle(title or "Propagation of input-embedding noise through the layers")
    if note:
        fig.text(0.5, -0.01, note, ha="center", va="top", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
