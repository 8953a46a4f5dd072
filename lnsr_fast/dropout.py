"""Shared dropout masks for the two halves of a concat-mode LNSR pass (DESIGN.md §2).

Inside `paired_dropout(b)`, every `F.dropout` and every `F.scaled_dot_product_attention` with
dropout_p > 0 (which covers `nn.Dropout`, hidden and attention dropout of Hugging Face models) draws one
mask for the first b rows and applies it to the last b rows too. The masks come from a private
generator, so any *other* random draw during the pass shows up as a change of the default generators'
state: `paired_dropout` then reports the pass as unpairable and the caller falls back to two passes.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


class UnpairableRandomness(RuntimeError):
    """A pass drew randomness that cannot be shared between the clean and the noisy half."""


def _paired_dropout_mask(x: torch.Tensor, p: float, half: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] != 2 * half:
        raise UnpairableRandomness(f"a dropout input has leading dimension {x.shape[0]}, not the batch 2×{half}")
    keep = torch.empty((half, *x.shape[1:]), dtype=x.dtype, device=x.device)
    keep.bernoulli_(1 - p, generator=gen)
    return keep.mul_(0.0 if p >= 1 else 1 / (1 - p))


@contextlib.contextmanager
def paired_dropout(half: int, device: torch.device):
    """Pair the dropout masks of rows [0, half) and [half, 2·half) of every dropout in the block.

    Raises UnpairableRandomness on exit if anything else drew from the default CPU/CUDA generators.
    """
    gen = torch.Generator(device=device)
    # Seeded from the default generator, so `torch.manual_seed` still makes a run reproducible.
    gen.manual_seed(int(torch.randint(0, 2**62, (1,))))
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def _dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return dropout(input, p, training, inplace)
        mask = _paired_dropout_mask(input, p, half, gen)
        return (input.view(2, half, *input.shape[1:]) * mask).view_as(input)

    def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p == 0:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        # The fused kernels draw their own mask; spell attention out so its dropout can be paired.
        if enable_gqa:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        scores = (query @ key.transpose(-2, -1)) * (1 / math.sqrt(query.shape[-1]) if scale is None else scale)
        if is_causal:
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        # As torch's own math path (_safe_softmax): a query row with every key masked gets zeros, not NaN, and
        # no NaN gradient (left-padded causal models have such rows; a NaN would spread through the sequence).
        dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
        probs = scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)
        return _dropout(probs, dropout_p) @ value

    before = rng_state(device)
    F.dropout, F.scaled_dot_product_attention = _dropout, _sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa
    if any(not torch.equal(a, b) for a, b in zip(before, rng_state(device))):
        raise UnpairableRandomness("the model drew random numbers outside F.dropout / scaled_dot_product_attention")


def rng_state(device: torch.device) -> tuple:
    """The default generators' state (CPU, and CUDA for a CUDA device), for `set_rng_state`."""
    cpu = torch.random.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu,)


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Two-pass mode restores the state before the noisy pass, so both passes draw identical masks."""
    torch.random.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
