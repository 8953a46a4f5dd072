"""Shared dropout masks for the clean and the noisy half of a concat-mode pass (docs/design.md §2).

While `PairingMode(clean, noisy=m)` is active in a thread, every dropout of a tensor whose leading dimension is
the doubled batch (clean + m rows: the clean copy, then a noisy copy of its first m rows; m = clean by default)
draws one mask for the clean rows from the default generator and applies its first m rows to the noisy rows
too; `scaled_dot_product_attention` with dropout runs the first m clean rows and the noisy rows as two calls of
the same shape from the same generator state, so the fused kernels draw identical masks. A dropout of a tensor with no
batch dimension (e.g. DeBERTa's relative-position table) is one mask for both halves already and runs as is.
Any other random draw with batch rows (a hand-made mask, stochastic depth per row) cannot be paired: it
raises `UnpairableRandomness`, and the caller falls back to two passes.

The mode is a `TorchFunctionMode`, so it is per thread (a plain forward in another thread is untouched) and
nothing of torch is reassigned. Activation checkpointing recomputes a layer outside any mode entered around
the model's forward; `pair_checkpointing` wraps the model's checkpoint functions so that the recomputation
runs under the pass's pairing and, with the generator state the checkpoint restores, redraws the same masks.
"""
from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class UnpairableRandomness(RuntimeError):
    """A pass drew randomness that cannot be shared between the clean and the noisy half."""


_DROPOUT = {F.dropout: ("input", "p", "training", "inplace"), torch.dropout: ("input", "p", "train")}
_DROPOUT_DEFAULTS = {"p": 0.5, "training": True, "train": True, "inplace": False}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# Draws that give each batch row its own values; harmless when their output has no batch dimension.
_RANDOM = {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like, torch.randperm,
    torch.bernoulli, torch.normal, torch.poisson, torch.multinomial, torch.rrelu, torch.alpha_dropout,
    torch.feature_dropout, torch.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, F.rrelu, F.gumbel_softmax, F.multi_head_attention_forward,
    torch.Tensor.bernoulli_, torch.Tensor.bernoulli, torch.Tensor.uniform_, torch.Tensor.normal_,
    torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_,
    torch.Tensor.log_normal_, torch.Tensor.multinomial,
}

_local = threading.local()
_GENERATOR_TURNS = threading.Lock()   # paired attention restores the process-wide generator: one thread at a time


def active_mode() -> "PairingMode | None":
    """The innermost PairingMode active in this thread, or None."""
    stack = getattr(_local, "modes", None)
    return stack[-1] if stack else None


def _bind(names: tuple, args: tuple, kwargs: dict, defaults: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return {name: bound.get(name, defaults.get(name)) for name in names}


def rng_state(device: torch.device) -> tuple:
    """The default generators' state that draws on `device` use (the CPU one, and the device's own)."""
    cpu = torch.random.get_rng_state()
    if device.type == "cpu":
        return (cpu,)
    return cpu, torch.get_device_module(device.type).get_rng_state(device)


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Restore a state of `rng_state(device)`."""
    torch.random.set_rng_state(state[0])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(state[1], device)


class PairingMode(TorchFunctionMode):
    """Pairs the dropout masks of rows [0, noisy) and [clean, clean + noisy) of every dropout while active (see
    the module docstring; `noisy` defaults to `clean`). `watch`: a tensor whose use by any torch function sets
    `watched` (the caller learns whether the model's loss used `num_items_in_batch`). `pair=False` only watches."""

    def __init__(self, clean: int, pair: bool = True, watch: torch.Tensor | None = None, noisy: int | None = None):
        super().__init__()
        self.clean = clean
        self.noisy = clean if noisy is None else noisy
        self.rows, self.pair = clean + self.noisy, pair
        self.watch, self.watched = watch, False

    def replay(self) -> "PairingMode":
        """A mode that pairs like this one, for the recomputation of a checkpointed layer."""
        return PairingMode(self.clean, self.pair, noisy=self.noisy)

    def __enter__(self):
        _local.modes = [*getattr(_local, "modes", ()), self]
        return super().__enter__()

    def __exit__(self, *exc):
        _local.modes = _local.modes[:-1]
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch is not None and not self.watched:
            self.watched = any(a is self.watch for a in args) or any(v is self.watch for v in kwargs.values())
        if self.pair:
            if func in _DROPOUT:
                return self._dropout(func, args, kwargs)
            if func is F.scaled_dot_product_attention:
                return self._attention(func, args, kwargs)
            if func in _RANDOM:
                out = func(*args, **kwargs)
                drawn = out[0] if isinstance(out, tuple) else out
                if isinstance(drawn, torch.Tensor) and self.rows in drawn.shape:
                    raise UnpairableRandomness(f"{getattr(func, '__qualname__', func)} drew a random tensor of shape "
                                               f"{tuple(drawn.shape)} with the {self.rows} batch rows")
                return out
        return func(*args, **kwargs)

    def _batch_rows(self, x: torch.Tensor, what: str) -> bool:
        """Whether `x` has the batch rows in front (to pair); False for a tensor without batch rows."""
        if x.dim() and x.shape[0] == self.rows:
            return True
        if self.rows in x.shape:
            raise UnpairableRandomness(f"{what} of shape {tuple(x.shape)} has the {self.rows} batch rows in a "
                                       "dimension other than the first")
        return False

    def _dropout(self, func, args, kwargs):
        a = _bind(_DROPOUT[func], args, kwargs, _DROPOUT_DEFAULTS)
        x, p = a["input"], a["p"]
        if not a.get("training", a.get("train")) or p == 0 or not self._batch_rows(x, "a dropout input"):
            return func(*args, **kwargs)
        # The clean rows' mask comes from the default generator, so a checkpoint's replay redraws it.
        keep = x.new_empty((self.clean, *x.shape[1:])).bernoulli_(1 - p)
        keep = keep.mul_(1 / (1 - p)) if p < 1 else keep.zero_()
        if self.noisy == self.clean:   # both halves against one mask, without a copy of it
            shaped = x.unflatten(0, (2, self.clean))
        else:
            shaped, keep = x, torch.cat([keep, keep[:self.noisy]])
        if a.get("inplace"):
            shaped.mul_(keep)
            return x
        return (shaped * keep).view(x.shape)

    def _attention(self, func, args, kwargs):
        a = _bind(_SDPA_ARGS, args, kwargs, {"dropout_p": 0.0, "is_causal": False, "enable_gqa": False})
        q, k, v, mask = a.pop("query"), a.pop("key"), a.pop("value"), a.pop("attn_mask")
        batched = [self._batch_rows(t, "an attention input") for t in (q, k, v)]
        if a["dropout_p"] == 0 or not any(batched):
            return func(*args, **kwargs)
        if not all(batched):
            raise UnpairableRandomness(f"attention with dropout mixes batched and unbatched inputs "
                                       f"{[tuple(t.shape) for t in (q, k, v)]}")
        masks = (mask, mask)
        if mask is not None and mask.dim() and mask.shape[0] == self.rows:
            masks = mask.split([self.clean, self.noisy])
        if not fused_halves(q):
            probs = _attention_probs(q, k, masks, a)
            return self._dropout(F.dropout, (probs, a["dropout_p"]), {}) @ _grouped(v, q, a["enable_gqa"])
        # The fused kernels draw their own mask: the paired clean rows and the noisy rows run as calls of one
        # shape from one generator state, the other clean rows after them. The state is the process's, so LNSR's
        # threads take turns (a thread drawing random numbers on this device meanwhile would still change the
        # noisy rows' mask).
        m, b, batched = self.noisy, self.clean, masks[0] is not masks[1]

        def call(start, stop):
            attn_mask = mask[start:stop] if batched else mask
            return func(*(t[start:stop] for t in (q, k, v)), attn_mask=attn_mask, **a)

        with _GENERATOR_TURNS:
            state = rng_state(q.device)
            paired = call(0, m)
            set_rng_state(state, q.device)
            noisy = call(b, b + m)
            rest = [call(m, b)] if m < b else []
            return torch.cat([paired, *rest, noisy])


def fused_halves(query: torch.Tensor) -> bool:
    """Whether paired attention dropout runs as fused calls of the paired rows from one generator state (on a GPU),
    rather than spelled out with one mask for both halves: on the CPU, whose attention with dropout takes that
    math path anyway (and draws the same mask for the clean half), and under torch.compile, which cannot trace
    generator states."""
    return query.device.type != "cpu" and not torch.compiler.is_compiling()


def _grouped(t: torch.Tensor, query: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    return t.repeat_interleave(query.shape[-3] // t.shape[-3], dim=-3) if enable_gqa else t


def _attention_probs(q, k, masks, a) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) as scaled_dot_product_attention's math path computes it, with a query row
    that sees no key giving zeros (not NaN), as torch's own safe softmax does."""
    mask = masks[0] if masks[0] is None or masks[0] is masks[1] else torch.cat(masks)
    k = _grouped(k, q, a["enable_gqa"])
    scale = 1 / math.sqrt(q.shape[-1]) if a["scale"] is None else a["scale"]
    scores = (q @ k.transpose(-2, -1)) * scale
    if a["is_causal"]:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    return scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)


class _PairedCheckpoint:
    """A layer's checkpoint function whose recomputation runs under the pairing of the pass that ran it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        mode = active_mode()
        if mode is None:
            return self.inner(function, *args, **kwargs)
        return self.inner(functools.partial(_replayed, mode.replay(), function), *args, **kwargs)


def _replayed(mode: PairingMode, function, *args, **kwargs):
    if active_mode() is not None:   # the forward itself, already paired
        return function(*args, **kwargs)
    with mode:                      # the recomputation during backward
        return function(*args, **kwargs)


def pair_checkpointing(model: torch.nn.Module) -> None:
    """Wrap the checkpoint function of every layer that has Hugging Face gradient checkpointing on (idempotent;
    `gradient_checkpointing_enable` may replace them at any time, so a pass calls this before it runs)."""
    for module in model.modules():
        inner = module.__dict__.get("_gradient_checkpointing_func")
        if inner is not None and not isinstance(inner, _PairedCheckpoint):
            module._gradient_checkpointing_func = _PairedCheckpoint(inner)


def unpair_checkpointing(model: torch.nn.Module) -> None:
    """Undo `pair_checkpointing`."""
    for module in model.modules():
        inner = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(inner, _PairedCheckpoint):
            module._gradient_checkpointing_func = inner.inner


def checkpoint_wrappers(model: torch.nn.Module) -> list[str]:
    """Modules wrapped by torch.distributed's `checkpoint_wrapper`: their recomputation cannot be paired."""
    return [name for name, m in model.named_modules() if hasattr(m, "_checkpoint_wrapped_module")]
