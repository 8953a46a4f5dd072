"""PairingMode (docs/design.md §2): one dropout mask for the clean rows reused for the noisy rows, drawn from the
default generator; attention dropout paired by two fused half-batch calls from one generator state (or spelled
out under torch.compile); unbatched dropout left as is; randomness that cannot be paired reported."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnsr_fast import pairing
from lnsr_fast.pairing import PairingMode, UnpairableRandomness, _attention_probs, active_mode, rng_state, set_rng_state

CPU = torch.device("cpu")
HALF = 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("via", ["functional", "module", "inplace", "torch.dropout"])
def test_one_mask_for_both_halves_with_the_right_keep_rate_and_scale(p, via):
    x = torch.ones(2 * HALF, 50, 20)
    torch.manual_seed(0)
    with PairingMode(HALF):
        if via == "functional":
            y, y2 = F.dropout(x, p), F.dropout(x, p)
        elif via == "module":
            drop = nn.Dropout(p)
            y, y2 = drop(x), drop(x)
        elif via == "inplace":
            y, y2 = F.dropout(x.clone(), p, inplace=True), F.dropout(x.clone(), p, inplace=True)
        else:
            y, y2 = torch.dropout(x, p, True), torch.dropout(x, p, True)
    assert torch.equal(y[:HALF], y[HALF:])
    kept = y[:HALF] != 0
    torch.testing.assert_close(y[:HALF][kept], torch.full_like(y[:HALF][kept], 1 / (1 - p)))
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)   # 5 sigma
    assert abs(y.mean().item() - 1) < 0.02   # unbiased
    assert not torch.equal(y[0], y[1])       # rows within a half get their own masks
    assert not torch.equal(y, y2)            # every call draws a new mask


@pytest.mark.parametrize("via", ["functional", "inplace"])
def test_a_noisy_block_of_the_first_rows_takes_their_masks(via):
    """fraction < 1: rows [clean, clean + m) are copies of rows [0, m) and get their masks; the clean rows draw
    what plain dropout of them draws."""
    clean, m = 5, 2
    x = torch.randn(clean, 40, 6)
    x = torch.cat([x, x[:m]])
    torch.manual_seed(3)
    plain = F.dropout(x[:clean], 0.4)
    torch.manual_seed(3)
    with PairingMode(clean, noisy=m):
        y = F.dropout(x, 0.4) if via == "functional" else F.dropout(x.clone(), 0.4, inplace=True)
    assert y.shape == x.shape and torch.equal(y[:clean], plain)
    assert torch.equal(y[clean:], y[:m])
    assert PairingMode(clean, noisy=m).replay().noisy == m


def test_the_clean_half_draws_what_plain_dropout_of_the_clean_rows_draws():
    """The mask of the first half comes from the default generator as a plain dropout of those rows would: a
    checkpoint's replay of the generator state redraws it."""
    x = torch.randn(2 * 4, 10)
    torch.manual_seed(5)
    plain = F.dropout(x[:4], 0.5)
    torch.manual_seed(5)
    with PairingMode(4):
        paired = F.dropout(x, 0.5)
    assert torch.equal(paired[:4], plain)
    with PairingMode(4):
        torch.testing.assert_close(F.dropout(x, 0.5, training=False), x, rtol=0, atol=0)
        torch.testing.assert_close(F.dropout(x, 0.0), x, rtol=0, atol=0)
        assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))


def test_unbatched_dropout_runs_as_is_and_the_mode_is_per_thread_and_nested():
    table = torch.ones(5, 3)   # e.g. DeBERTa's relative-position embeddings: the same for every row
    torch.manual_seed(1)
    want = F.dropout(table, 0.5)
    torch.manual_seed(1)
    with PairingMode(2) as outer:
        assert torch.equal(F.dropout(table, 0.5), want)
        assert active_mode() is outer
        with PairingMode(3) as inner:
            assert active_mode() is inner
        assert active_mode() is outer
    assert active_mode() is None


@pytest.mark.parametrize("draw", [lambda: torch.rand(4, 3), lambda: torch.empty(4, 5).bernoulli_(0.5),
                                  lambda: torch.randn(2, 4), lambda: torch.randperm(4),
                                  lambda: F.dropout1d(torch.ones(4, 3, 2), 0.5)],
                         ids=["rand", "bernoulli_", "randn-batch-second", "randperm", "dropout1d"])
def test_batched_random_draws_are_reported(draw):
    with pytest.raises(UnpairableRandomness, match="batch rows"):
        with PairingMode(2):
            draw()


def test_a_dropout_with_the_batch_in_another_dimension_is_reported_and_unbatched_draws_pass():
    with pytest.raises(UnpairableRandomness, match="dimension other than the first"):
        with PairingMode(2):
            F.dropout(torch.ones(5, 4, 3), 0.5)   # [T, 2B, d] layout
    with PairingMode(2):
        torch.rand(())                             # e.g. BART's layerdrop draw, shared by both halves
        torch.randn(3, 5)


def test_watching_a_tensor():
    n = torch.tensor(7.0)
    with PairingMode(2, pair=False, watch=n) as mode:
        torch.ones(3).sum()
        assert not mode.watched
        torch.ones(3).sum() / n.to(torch.float32)
    assert mode.watched


def test_rng_state_round_trip():
    state = rng_state(CPU)
    a = torch.rand(4)
    set_rng_state(state, CPU)
    assert torch.equal(a, torch.rand(4))


# Paired attention must be torch's attention: compared with F.scaled_dot_product_attention at dropout_p=0, with
# a dropout_p so small that no element is dropped (the mask's 1/(1-p) scale rounds to 1 in fp32).
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
    bool_mask[0, 0, 2] = False   # a query that may attend to no key at all
    float_mask = torch.randn(2 * half, 1, lq, lk, generator=g)
    float_mask[1, 0, 3] = float("-inf")
    float_mask[2, 0, 1, 2:] = float("-inf")
    return bool_mask, float_mask


CASES = {
    "plain": dict(),
    "bool-mask": dict(attn_mask="bool"),
    "float-mask": dict(attn_mask="float"),
    "broadcast-mask": dict(attn_mask="broadcast"),
    "causal": dict(is_causal=True, lk=5),
    "scale": dict(scale=0.3, attn_mask="bool"),
    "gqa": dict(heads_kv=2, enable_gqa=True, attn_mask="float"),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-halves", "spelled-out"])
@pytest.mark.parametrize("case", CASES)
def test_paired_attention_matches_sdpa_forward_and_backward(case, fused, monkeypatch):
    kw = dict(CASES[case])
    heads_kv, lk = kw.pop("heads_kv", 4), kw.pop("lk", 6)
    mask_kind = kw.pop("attn_mask", None)
    q, k, v = _qkv(heads_kv=heads_kv, lk=lk)
    if mask_kind is not None:
        kw["attn_mask"] = _masks(lk=lk)[1 if mask_kind == "float" else 0]
        if mask_kind == "broadcast":
            kw["attn_mask"] = kw["attn_mask"][:1]
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*inputs, dropout_p=0.0, **kw)
    want_grads = torch.autograd.grad(want.square().sum(), inputs)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    monkeypatch.setattr(pairing, "fused_halves", lambda q: fused)
    with PairingMode(2):
        got = F.scaled_dot_product_attention(*inputs, dropout_p=NO_DROP, **kw)
    got_grads = torch.autograd.grad(got.square().sum(), inputs)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-calls", "spelled-out"])
def test_attention_dropout_pairs_a_noisy_block_of_the_first_rows(fused, monkeypatch):
    q, k, v = _qkv(half=3)   # 6 rows: 4 clean, then copies of the first 2
    q, k, v = (torch.cat([t[:4], t[:2]]) for t in (q, k, v))
    mask = _masks(half=3)[0]
    mask = torch.cat([mask[:4], mask[:2]])
    monkeypatch.setattr(pairing, "fused_halves", lambda q: fused)
    torch.manual_seed(4)
    with PairingMode(4, noisy=2):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5)
    assert out.shape == q.shape[:-1] + v.shape[-1:] and torch.isfinite(out).all()
    assert torch.equal(out[4:], out[:2])
    plain = F.scaled_dot_product_attention(q[:4], k[:4], v[:4], attn_mask=mask[:4])
    assert (out[:4] - plain).abs().max() > 1e-2   # dropout was applied


@pytest.mark.parametrize("fused", [True, False], ids=["fused-halves", "spelled-out"])
@pytest.mark.parametrize("enable_gqa", [False, True])
def test_attention_dropout_is_paired_across_the_halves(enable_gqa, fused, monkeypatch):
    q, k, v = _qkv(heads_kv=2 if enable_gqa else 4)
    q, k, v = (torch.cat([t[:2], t[:2]]) for t in (q, k, v))   # identical halves
    bool_mask = _masks()[0]
    bool_mask = torch.cat([bool_mask[:2], bool_mask[:2]])
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, enable_gqa=enable_gqa)
    monkeypatch.setattr(pairing, "fused_halves", lambda q: fused)
    torch.manual_seed(4)
    with PairingMode(2):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=0.5, enable_gqa=enable_gqa)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], out[2:])
    assert (out - plain).abs().max() > 1e-2   # dropout was applied
    torch.manual_seed(4)   # and its clean half is what attention with dropout draws for those rows
    want = F.scaled_dot_product_attention(q[:2], k[:2], v[:2], attn_mask=bool_mask[:2], dropout_p=0.5,
                                          enable_gqa=enable_gqa)
    torch.testing.assert_close(out[:2], want, rtol=1e-5, atol=1e-6)


def test_spelled_out_probabilities_are_zero_for_a_query_that_sees_no_key():
    q, k, _ = _qkv()
    mask = torch.zeros(4, 1, 5, 6, dtype=torch.bool)
    probs = _attention_probs(q, k, (mask[:2], mask[2:]), {"scale": None, "is_causal": False, "enable_gqa": False})
    assert torch.equal(probs, torch.zeros_like(probs))
