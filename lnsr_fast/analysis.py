"""Analysis of a trained model: how noise propagates through its layers (paper Fig. 1), and the PCA
spectrum of the noises themselves (paper Fig. 6).

`noise_propagation` perturbs the word embeddings (or any hidden state, `inject_at`) with the same kind of
ε the LNSR step adds (docs/design.md §1) and measures, at every hidden state, how far the noisy representation
moves relative to the clean one; `injection_profiles` does it for several injection positions.
`plot_noise_propagation` and `write_noise_propagation_csv` turn profiles into a figure and a table.
`noise_spectrum`, `plot_spectrum` and `write_spectrum_csv` do the same for the noises' spectra.
"""
from __future__ import annotations

import csv
import math
import textwrap
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .checks import check_int, is_int
from .lnsr import num_layers, transformer_layers
from .noise import InManifoldNoise

Profile = Mapping[int, float]   # hidden-state index -> mean relative deviation


def _draw(noise, input_ids, x, mask) -> torch.Tensor:
    eps = noise(input_ids, x, mask)
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        raise ValueError(f"noise returned {getattr(eps, 'shape', type(eps).__name__)}, expected a tensor of shape {tuple(x.shape)}")
    return eps.to(x.dtype)


@torch.no_grad()
def noise_propagation(model: nn.Module, noise, batches: Iterable[Mapping[str, torch.Tensor]],
                      layers: Sequence[int] | None = None, inject_at: int = 0) -> dict[int, float]:
    """Mean relative deviation ‖h̃_r − h_r‖ / ‖h_r‖ of every hidden state r under noise added at hidden state `inject_at`.

    model: a Hugging Face model that returns `hidden_states`.
    noise: a sampler called as `noise(input_ids, inputs_embeds, attention_mask)` -> ε (GaussianNoise,
    InManifoldNoise, or any callable with that signature). It is drawn once per batch and added to the
    word-embedding output x (through a forward hook on the model's input embedding, removed afterwards),
    exactly where the LNSR step adds it: the clean pass sees x, the noisy x + ε; the model embeds input_ids
    itself in both.
    batches: dicts with `input_ids` and optionally `attention_mask`, `token_type_ids`, ... (labels are
    ignored); tensors are moved to the model's device.
    layers: indices into `hidden_states` (0 = embedding output, L = last layer); default inject_at..L.
    inject_at: b = 0 (default) adds ε to the word embeddings as above. 1 ≤ b ≤ L adds it instead to
    hidden state b (the output of transformer layer b, the input of layer b+1), through a forward hook on
    the model's own layer (removed afterwards): the sampler is called as `noise(input_ids, h_b,
    attention_mask)`, so GaussianNoise gives ‖ε_t‖ = ratio·‖h_{b,t}‖ per real token. Hidden states r < b
    then show exactly 0, r = b the injected relative size (the ratio), r > b what the layers make of it.
    InManifoldNoise is refused for b ≥ 1: its neighbours are vocabulary embeddings.

    The model runs in eval mode (no dropout; its training flag is restored afterwards) without gradients,
    clean and noisy input as two separate passes, so that ε = 0 gives exactly 0. The deviation is
    computed **per token** — ‖h̃_{r,t} − h_{r,t}‖ / ‖h_{r,t}‖ — and **averaged over every real token of
    every batch** (padding excluded; a token whose clean state is 0 counts as 0). Returns
    {layer index: mean relative deviation}, in the order of `layers`.

    >>> profile = noise_propagation(model, GaussianNoise(ratio=0.05, seed=0), batches)   # {0: 0.04, 1: ...}
    >>> noise_propagation(model, GaussianNoise(0.05), batches, inject_at=6)             # {6: 0.05, 7: ...}
    """
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"model must have get_input_embeddings() (a Hugging Face model), got {type(model).__name__}")
    if not callable(noise):
        raise TypeError(f"noise must be a callable noise(input_ids, inputs_embeds, attention_mask), got {type(noise).__name__}")
    if layers is not None:
        layers = list(layers)
        if not layers or not all(is_int(r) for r in layers):
            raise ValueError(f"layers must be None or a non-empty sequence of ints, got {layers!r}")
    if not is_int(inject_at) or inject_at < 0:
        raise ValueError(f"inject_at must be an int in [0, L] (0 = embedding output), got {inject_at!r}")
    target = model.get_input_embeddings()
    if inject_at > 0:
        if isinstance(noise, InManifoldNoise):
            raise ValueError(f"inject_at={inject_at}: InManifoldNoise only applies at the embeddings (inject_at=0), "
                             "its neighbours are vocabulary embeddings; use GaussianNoise for hidden states")
        stack, n = transformer_layers(model), num_layers(model)
        if len(stack) != n:
            raise ValueError(f"inject_at={inject_at}: {type(model).__name__} has {len(stack)} transformer layer module(s) "
                             f"for its config's {n} layers (shared layers?), so no module's output is hidden state "
                             f"{inject_at} alone")
        if inject_at > len(stack):
            raise ValueError(f"inject_at must be in [0, {len(stack)}] (the model has {len(stack)} layers), got {inject_at}")
        target = stack[inject_at - 1]
    device = next(model.parameters()).device
    pending: dict = {}   # "batch": the noisy pass's (input_ids, mask), consumed by the hook; absent in the clean pass

    def inject(module, args, output):
        if "batch" not in pending:
            return None
        input_ids, mask = pending.pop("batch")
        h = output[0] if isinstance(output, tuple) else output
        pending["injected"] = h_noisy = h + _draw(noise, input_ids, h, mask)
        return (h_noisy, *output[1:]) if isinstance(output, tuple) else h_noisy

    # prepend: Transformers 5.x records hidden_states with its own forward hooks on these layers, installed
    # lazily at the first call; running first makes hidden_states[b] the noisy state whatever the order.
    handle = target.register_forward_hook(inject, prepend=True)
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
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            clean = model(**inputs, output_hidden_states=True, return_dict=True).hidden_states
            pending.clear()
            pending["batch"] = (input_ids, mask)
            noisy = model(**inputs, output_hidden_states=True, return_dict=True).hidden_states
            if clean is None:
                raise TypeError(f"{type(model).__name__} returned no hidden_states")
            if inject_at > 0 and not ("injected" in pending and torch.equal(noisy[inject_at], pending["injected"])):
                raise RuntimeError(f"{type(model).__name__}'s hidden_states[{inject_at}] is not the output of its layer "
                                   f"{inject_at} that the noise was added to: inject_at={inject_at} is not supported for it")
            chosen = list(range(inject_at, len(clean))) if layers is None else layers
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
        handle.remove()
        model.train(was_training)
    if totals is None or n_tokens == 0:
        raise ValueError("batches held no real token: nothing to measure")
    return {int(r): float(v) / n_tokens for r, v in zip(layers, totals.tolist())}


def injection_profiles(model: nn.Module, make_noise, batches: Iterable[Mapping[str, torch.Tensor]],
                       positions: Sequence[int]) -> dict[int, dict[int, float]]:
    """One model, one noise-propagation profile per injection position: {b: noise_propagation(..., inject_at=b)}.

    make_noise: called with no argument, once per position, for a fresh sampler, so that every position
    sees the same draws (e.g. `lambda: GaussianNoise(0.05, seed=0)`). Each profile covers hidden states
    b..L (mean relative deviation, as in noise_propagation); the result plots with plot_noise_propagation.

    >>> profiles = injection_profiles(model, lambda: GaussianNoise(0.05, seed=0), batches, [0, 4, 8])
    """
    if not callable(make_noise):
        raise TypeError(f"make_noise must be a callable returning a fresh noise sampler, got {type(make_noise).__name__}")
    positions = list(positions)
    if not positions:
        raise ValueError("positions must hold at least one injection position")
    batches = list(batches)   # read once per position
    return {b: noise_propagation(model, make_noise(), batches, inject_at=b) for b in positions}


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


def add_note(fig, note: str | None) -> None:
    """A small note under a figure, wrapped so that a long one does not widen the figure."""
    if note:
        fig.text(0.5, -0.01, textwrap.fill(note, 130), ha="center", va="top", fontsize=8)


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
    add_note(fig, note)
    fig.savefig(path, dpi=120, bbox_inches="tight")


@torch.no_grad()
def noise_spectrum(noise, input_ids, inputs_embeds, attention_mask=None, draws: int = 256) -> torch.Tensor:
    """PCA spectrum of a noise: the share of ε's variance along each principal direction, per token.

    For every real token, `draws` independent ε are drawn (the sampler is called `draws` times on the
    whole batch, each call with fresh randomness); the eigenvalues of the **centred** covariance of that
    token's draws are sorted descending and normalised to sum 1; the result is their mean over real tokens
    (a token whose draws do not vary, e.g. x = 0, is left out). Returns a float64 tensor of length d whose
    entries are fractions of the total variance (sum 1). In-manifold noise with k neighbours puts all its
    variance in ≤ k components; Gaussian noise spreads it over min(d, draws − 1).
    Memory: draws × tokens × d values, so pass a few sentences, not a data set.

    >>> noise_spectrum(InManifoldNoise(embed, k=10, ratio=0.1), ids, embed(ids), mask)[:12].sum()   # ≈ 1.0
    """
    if not callable(noise):
        raise TypeError(f"noise must be a callable noise(input_ids, inputs_embeds, attention_mask), got {type(noise).__name__}")
    draws = check_int("draws", draws, 2)
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() < 2:
        raise ValueError(f"inputs_embeds must be a [..., d] tensor, got {getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}")
    d = inputs_embeds.shape[-1]
    real = (torch.ones(inputs_embeds.shape[:-1], dtype=torch.bool, device=inputs_embeds.device)
            if attention_mask is None else attention_mask != 0)
    if not bool(real.any()):
        raise ValueError("no real token: nothing to measure")
    eps = torch.stack([_draw(noise, input_ids, inputs_embeds, attention_mask)[real] for _ in range(draws)], dim=1)
    total = torch.zeros(d, dtype=torch.float64)
    n = 0
    for chunk in eps.split(64):   # [tokens, draws, d]: bound the float64 copy
        e = chunk.double()
        e = e - e.mean(dim=1, keepdim=True)
        var = torch.linalg.svdvals(e).pow(2) / (draws - 1)   # eigenvalues of the covariance, descending
        sums = var.sum(dim=1, keepdim=True)
        keep = sums[:, 0] > 0
        total[:var.shape[1]] += (var[keep] / sums[keep]).sum(dim=0).cpu()
        n += int(keep.sum())
    if n == 0:
        raise ValueError("the noise did not vary at any real token: no spectrum")
    return total / n


def write_spectrum_csv(spectra: Mapping[str, torch.Tensor], path) -> None:
    """One row per principal component (`component` = 1, 2, ...): for each noise, its share of the
    variance (`<name>`) and the cumulative share up to that component (`<name> cumulative`).

    >>> write_spectrum_csv({"Gaussian": g, "in-manifold k=10": m}, "spectrum.csv")
    """
    if not spectra:
        raise ValueError("no spectra to write")
    values = {str(k): [float(v) for v in torch.as_tensor(s).double().flatten()] for k, s in spectra.items()}
    cumulative = {k: torch.tensor(v, dtype=torch.float64).cumsum(0).tolist() for k, v in values.items()}
    header = ["component"]
    for name in values:
        header += [name, f"{name} cumulative"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(max(len(v) for v in values.values())):
            row = [i + 1]
            for name, v in values.items():
                row += [f"{v[i]:.6g}", f"{cumulative[name][i]:.6g}"] if i < len(v) else ["", ""]
            w.writerow(row)


def plot_spectrum(spectra: Mapping[str, torch.Tensor], path, title: str | None = None, note: str | None = None,
                  components: int | None = None) -> None:
    """Write a PNG of noise spectra (`noise_spectrum`): left, each principal component's share of the
    variance (log y; shares below 1e-10, numerically zero, are not drawn); right, the cumulative share.
    One line per noise; x = component index 1.. (sorted by variance), the first `components` (default all).
    note: a line of small text under the figure (e.g. the model, k, the number of draws).

    >>> plot_spectrum({"Gaussian": g, "in-manifold k=10": m}, "spectrum.png", components=64)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not spectra:
        raise ValueError("no spectra to plot")
    if components is not None:
        check_int("components", components, 1)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    share_ax, cum_ax = fig.subplots(1, 2)
    for name, s in spectra.items():
        s = torch.as_tensor(s).double().flatten()[:components]
        xs = list(range(1, len(s) + 1))
        # a log axis cannot show 0, and float round-off leaves ~1e-17 where in-manifold noise has nothing
        shown = torch.where(s >= 1e-10, s, torch.full_like(s, math.nan))
        line, = share_ax.plot(xs, shown.tolist(), "-", marker="o" if len(s) <= 64 else None, ms=3, label=str(name))
        cum_ax.plot(xs, s.cumsum(0).tolist(), "-", color=line.get_color(), label=str(name))
    share_ax.set_yscale("log")
    share_ax.set_ylabel("share of the variance (normalised eigenvalue)")
    share_ax.set_title("eigenvalues of the noise covariance (shares < 1e-10 not drawn)", fontsize=10)
    cum_ax.set_ylabel("cumulative explained variance")
    cum_ax.set_ylim(0, 1.02)
    cum_ax.set_title("cumulative explained variance", fontsize=10)
    for ax in (share_ax, cum_ax):
        ax.set_xlabel("principal component (sorted by variance)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "PCA spectrum of the noise ε per token (mean over real tokens)")
    add_note(fig, note)
    fig.savefig(path, dpi=120, bbox_inches="tight")
