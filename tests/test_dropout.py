"""paired_dropout (DESIGN.md §2): one dropout mask for the clean rows reused for the noisy rows, the spelled-out
attention that lets sdpa's dropout be paired, and the detection of randomness that cannot be paired."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnsr_fast.dropout import UnpairableRandomness, paired_dropout, rng_state, set_rng_state

CPU = torch.device("cpu")
HALF = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("via", ["functional", "module", "inplace"])
def test_one_mask_for_both_halves_with_the_right_keep_rate_and_scale(p, via):
    x = torch.ones(2 * HALF, 50, 20)
    torch.manual_seed(0)
    with paired_dropout(HALF, CPU):
        if via == "functional":
            y, y2 = F.dropout(x, p), F.dropout(x, p)
        elif via == "module":
            drop = nn.Dropout(p)
            y, y2 = drop(x), drop(x)
        else:
            y, y2 = F.dropout(x.clone(), p, inplace=True), F.dropout(x.clone(), p, inplace=True)
    assert torch.equal(y[:HALF], y[HALF:])
    kept = y[:HALF] != 0
    torch.testing.assert_close(y[:HALF][kept], torch.full_like(y[:HALF][kept], 1 / (1 - p)))
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # 5 sigma
    assert abs(y.mean().item() - 1) < 0.02  # unbiased
    assert not torch.equal(y[0], y[1])  # rows within a half get their own masks
    assert not torch.equal(y, y2)  # every call draws a new mask


def test_masks_follow_the_global_seed_and_leave_other_calls_alone():
    x = torch.randn(2 * 4, 10)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        with paired_dropout(4, CPU):
            outs.append(F.dropout(x, 0.5))
    assert torch.equal(outs[0], outs[1])
    with paired_dropout(4, CPU):
        torch.testing.assert_close(F.dropout(x, 0.5, training=False), x, rtol=0, atol=0)
        torch.testing.assert_close(F.dropout(x, 0.0), x, rtol=0, atol=0)
        assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))


def test_functions_are_restored_after_the_block_even_on_error():
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    with paired_dropout(2, CPU):
        assert F.dropout is not dropout and F.scaled_dot_product_attention is not sdpa
    assert F.dropout is dropout and F.scaled_dot_product_attention is sdpa
    with pytest.raises(KeyError):
        with paired_dropout(2, CPU):
            raise KeyError("boom")
    assert F.dropout is dropout and F.scaled_dot_product_attention is sdpa


@pytest.mark.parametrize("draw", [lambda: torch.rand(3), lambda: torch.empty(5).bernoulli_(0.5),
                                  lambda: torch.randn(2, 2), lambda: torch.randperm(4)],
                         ids=["rand", "bernoulli_", "randn", "randperm"])
def test_other_random_draws_are_reported(draw):
    with pytest.raises(UnpairableRandomness, match="outside F.dropout"):
        with paired_dropout(2, CPU):
            F.dropout(torch.ones(4, 3), 0.5)
            draw()


def test_a_dropout_input_without_the_batch_rows_is_reported():
    with pytest.raises(UnpairableRandomness, match="leading dimension 5"):
        with paired_dropout(2, CPU):
            F.dropout(torch.ones(5, 3), 0.5)


def test_rng_state_round_trip():
    state = rng_state(CPU)
    a = torch.rand(4)
    set_rng_state(state, CPU)
    assert torch.equal(a, torch.rand(4))


# The spelled-out attention used when dropout_p > 0 must be torch's attention: compared with
# F.scaled_dot_product_attention at dropout_p=0, with a dropout_p so small that no element is dropped
# (the mask's 1/(1-p) scale rounds to 1 in fp32).
NO_DROP = 1e-12


def _qkv(heads_q=4, heads_kv=4, lq=5, lk=6, d=8, half=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2 * half, heads_q, lq, d, generator=g)
    k = torch.randn(2 * half, heads_kv, lk, d, generator=g)
    v = torch.randn(2 * half, heads_kv, lk, d, generator=g)
    return q, k, v


def _masks(lq=5, lk=6, half=2):
    g = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(2 * half, 1, lq, lk, generator=g) > 0.3
    bool_mask[:, :, :, 0] = True
    bool_mask[0, 0, 2] = False  # a query that may attend to no key at all
    float_mask = torch.randn(2 * half, 1, lq, lk, generator=g)
    float_mask[1, 0, 3] = float("-inf")  # the same, as an additive mask
    float_mask[2, 0, 1, 2:] = float("-inf")
    return bool_mask, float_mask


CASES = {
    "plain": dict(),
    "bool-mask": dict(attn_mask="bool"),
    "float-mask": dict(attn_mask="float"),
    "causal": dict(is_causal=True, lk=5),
    "causal-longer-keys": dict(is_causal=True),
    "scale": dict(scale=0.3, attn_mask="bool"),
    "gqa": dict(heads_kv=2, enable_gqa=True, attn_mask="float"),
    "gqa-causal": dict(heads_kv=1, enable_gqa=True, is_causal=True, lk=5),
}


@pytest.mark.parametrize("case", CASES)
def test_spelled_out_attention_matches_sdpa_forward_and_backward(case):
    kw = dict(CASES[case])
    heads_kv, lk = kw.pop("heads_kv", 4), kw.pop("lk", 6)
    mask_kind = kw.pop("attn_mask", None)
    q, k, v = _qkv(heads_kv=heads_kv, lk=lk)
    if mask_kind is not None:
        kw["attn_mask"] = _masks(lk=lk)[0 if mask_kind == "bool" else 1]
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*inputs, dropout_p=0.0, **kw)
    want_grads = torch.autograd.grad(want.square().sum(), inputs)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with paired_dropout(2, CPU):
        got = F.scaled_dot_product_attention(*inputs, dropout_p=NO_DROP, **kw)
    got_grads = torch.autograd.grad(got.square().sum(), inputs)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_attention_dropout_is_paired_across_the_halves(enable_gqa):
    q, k, v = _qkv(heads_kv=2 if enable_gqa else 4)
    q, k, v = (torch.cat([t[:2], t[:2]]) for t in (q, k, v))  # identical halves
    bool_mask = _masks()[0]
    bool_mask = torch.cat([bool_mask[:2], bool_mask[:2]])
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, enable_gqa=enable_gqa)
    with paired_dropout(2, CPU):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=0.5, enable_gqa=enable_gqa)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], out[2:])
    assert (out - plain).abs().max() > 1e-2  # dropout was applied
