"""The layer-wise stability penalty (lnsr_fast/stability.py) against a direct float64 formula."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lnsr_fast.kernels import reference
from lnsr_fast.stability import layerwise_stability, layerwise_stability_concat


def direct(clean, noisy, mask, weights, reduction):
    """Eq. 11 written out: Σ_r w_r · (1/#real) Σ_{real (b,t)} Σ_f (h − h̃)² [/ d for "mean"; 1/b instead of
    1/#real for "sequence"], float64 loops."""
    b, t, d = clean[0].shape
    real = [[True] * t for _ in range(b)] if mask is None else (mask != 0).tolist()
    n_real = sum(sum(row) for row in real)
    total = 0.0
    for h, hn, w in zip(clean, noisy, weights):
        h, hn = h.detach().double(), hn.detach().double()
        for i in range(b):
            for j in range(t):
                if real[i][j]:
                    sq = float(((h[i, j] - hn[i, j]) ** 2).sum())
                    total += w * (sq / d if reduction == "mean" else sq)
    if reduction == "sequence":
        return total / b
    return total / n_real if n_real else 0.0


def direct_grads(clean, noisy, mask, weights, reduction, grad_out=1.0):
    """d/dh of the direct formula: 2 w (h − h̃) · real / #real [/ d] (/ b for "sequence"); the noisy side gets
    the negative."""
    b, t, d = clean[0].shape
    real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask != 0
    n = b if reduction == "sequence" else max(int(real.sum()), 1)
    out = []
    for h, hn, w in zip(clean, noisy, weights):
        g = 2 * w * grad_out * (h.detach().double() - hn.detach().double()) * real[..., None] / n
        out.append(g / d if reduction == "mean" else g)
    return out


def rand_layers(n_layers, shape, seed, dtype=torch.float64, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_layers)]
    noisy = [h + scale * torch.randn(shape, generator=g, dtype=torch.float64) for h in clean]
    return ([h.to(dtype).requires_grad_() for h in clean], [h.to(dtype).requires_grad_() for h in noisy])


def rand_mask(b, t, seed, p=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, t, generator=g) < p).long()


# ----------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("reduction", ["sum", "mean", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_direct_formula_with_masks_and_weights(reduction, dtype):
    b, t, d = 4, 6, 5
    clean, noisy = rand_layers(3, (b, t, d), seed=0, dtype=dtype)
    mask = rand_mask(b, t, seed=1)
    mask[2] = 0  # a sample with no real token at all
    mask[0, 0] = 1
    weights = [0.2, 1.0, 0.7]
    out = layerwise_stability(clean, noisy, mask, weights, reduction)
    assert out.dim() == 0 and out.dtype == dtype
    exp = direct(clean, noisy, mask, weights, reduction)
    assert math.isclose(out.item(), exp, rel_tol=1e-6 if dtype == torch.float32 else 1e-12)
    out.backward()
    for h, g in zip(clean, direct_grads(clean, noisy, mask, weights, reduction)):
        torch.testing.assert_close(h.grad.double(), g, rtol=1e-5, atol=1e-7)
    for h, g in zip(noisy, direct_grads(clean, noisy, mask, weights, reduction)):
        torch.testing.assert_close(h.grad.double(), -g, rtol=1e-5, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(1, 4), d=st.integers(1, 5), n_layers=st.integers(1, 3),
    reduction=st.sampled_from(["sum", "mean", "sequence"]), mask_bits=st.integers(0, 2**12 - 1),
    use_mask=st.booleans(), scalar_weight=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_matches_direct_formula_property(b, t, d, n_layers, reduction, mask_bits, use_mask, scalar_weight, seed):
    clean, noisy = rand_layers(n_layers, (b, t, d), seed=seed)
    mask = torch.tensor([(mask_bits >> i) & 1 for i in range(b * t)]).view(b, t) if use_mask else None
    g = torch.Generator().manual_seed(seed + 1)
    weights = 0.5 if scalar_weight else torch.rand(n_layers, generator=g, dtype=torch.float64).tolist()
    w_list = [weights] * n_layers if scalar_weight else weights
    out = layerwise_stability(clean, noisy, mask, weights, reduction)
    assert math.isclose(out.item(), direct(clean, noisy, mask, w_list, reduction), rel_tol=1e-12, abs_tol=1e-15)
    out.backward()
    for h, gr in zip(clean, direct_grads(clean, noisy, mask, w_list, reduction)):
        torch.testing.assert_close(h.grad, gr, rtol=1e-12, atol=1e-15)


def test_no_real_token_gives_zero_and_zero_grads():
    clean, noisy = rand_layers(2, (3, 4, 5), seed=2, dtype=torch.float32)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for reduction in ("sum", "mean"):
        out = layerwise_stability(clean, noisy, mask, [1.0, 0.5], reduction)
        assert out.item() == 0.0 and not torch.isnan(out)
        grads = torch.autograd.grad(out, clean + noisy)
        for gr in grads:
            assert torch.equal(gr, torch.zeros_like(gr))


def test_padding_values_never_matter_even_nan():
    clean, noisy = rand_layers(2, (3, 4, 5), seed=3)
    mask = rand_mask(3, 4, seed=4)
    mask[1] = 0
    out = layerwise_stability(clean, noisy, mask, [1.0, 2.0])
    pad = mask == 0
    clean2 = [h.detach().clone() for h in clean]
    noisy2 = [h.detach().clone() for h in noisy]
    clean2[0][pad] = math.nan
    noisy2[1][pad] = math.inf
    clean2 = [h.requires_grad_() for h in clean2]
    noisy2 = [h.requires_grad_() for h in noisy2]
    out2 = layerwise_stability(clean2, noisy2, mask, [1.0, 2.0])
    assert torch.equal(out, out2)
    out2.backward()
    for h in clean2 + noisy2:
        assert torch.isfinite(h.grad).all()
        assert (h.grad[pad] == 0).all()


def test_no_mask_averages_over_every_token():
    clean, noisy = rand_layers(2, (2, 3, 4), seed=5)
    out = layerwise_stability(clean, noisy, None, [1.0, 3.0])
    assert math.isclose(out.item(), direct(clean, noisy, None, [1.0, 3.0], "sum"), rel_tol=1e-12)
    ones = layerwise_stability(clean, noisy, torch.ones(2, 3), [1.0, 3.0])
    assert math.isclose(out.item(), ones.item(), rel_tol=1e-12)


def test_mean_is_sum_divided_by_width():
    clean, noisy = rand_layers(2, (2, 3, 7), seed=6)
    mask = rand_mask(2, 3, seed=7)
    s = layerwise_stability(clean, noisy, mask, reduction="sum")
    m = layerwise_stability(clean, noisy, mask, reduction="mean")
    assert math.isclose(m.item(), s.item() / 7, rel_tol=1e-12)


def test_weight_forms_agree():
    clean, noisy = rand_layers(3, (2, 3, 4), seed=8)
    mask = rand_mask(2, 3, seed=9)
    a = layerwise_stability(clean, noisy, mask, 0.4)
    b = layerwise_stability(clean, noisy, mask, [0.4, 0.4, 0.4])
    c = layerwise_stability(clean, noisy, mask, torch.tensor([0.4, 0.4, 0.4], dtype=torch.float64))
    d = layerwise_stability(clean, noisy, mask, (0.4, 0.4, 0.4))
    assert a.item() == b.item() == c.item() == d.item()
    zero = layerwise_stability(clean, noisy, mask, [0.0, 1.0, 0.0])
    only_middle = layerwise_stability(clean[1:2], noisy[1:2], mask, 1.0)
    assert math.isclose(zero.item(), only_middle.item(), rel_tol=1e-12)


@pytest.mark.parametrize("weights", [-1.0, [0.5, -0.1], float("nan"), [1.0, float("inf")]])
def test_negative_or_non_finite_weights_are_refused(weights):
    clean, noisy = rand_layers(2, (2, 3, 4), seed=8)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        layerwise_stability(clean, noisy, None, weights)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        layerwise_stability_concat([torch.cat([clean[0], noisy[0]])] * 2, 2, None, weights)


def test_bool_and_float_masks_agree():
    clean, noisy = rand_layers(1, (3, 5, 4), seed=10)
    mask = rand_mask(3, 5, seed=11)
    ref = layerwise_stability(clean, noisy, mask)
    assert layerwise_stability(clean, noisy, mask.bool()).item() == ref.item()
    assert layerwise_stability(clean, noisy, mask.float()).item() == ref.item()


def test_other_leading_shapes():
    clean, noisy = rand_layers(2, (7, 4), seed=12)  # [N, d] with a [N] mask
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    out = layerwise_stability(clean, noisy, mask)
    exp = sum(float(((h - hn).detach()[mask.bool()] ** 2).sum()) for h, hn in zip(clean, noisy)) / 5
    assert math.isclose(out.item(), exp, rel_tol=1e-12)


# ----------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("reduction", ["sum", "mean", "sequence"])
def test_gradcheck(reduction):
    clean, noisy = rand_layers(2, (2, 3, 4), seed=13)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    weights = [0.3, 1.7]

    def f(*hs):
        return layerwise_stability(hs[:2], hs[2:], mask, weights, reduction)

    assert torch.autograd.gradcheck(f, (*clean, *noisy), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("grad_out", [1.0, -2.5, 0.0])
def test_backward_equals_autograd_of_reference(reduction, grad_out):
    clean, noisy = rand_layers(3, (3, 5, 6), seed=14)
    mask = rand_mask(3, 5, seed=15)
    mask[1] = 0
    weights = [0.5, 1.0, 2.0]
    c2 = [h.detach().clone().requires_grad_() for h in clean]
    n2 = [h.detach().clone().requires_grad_() for h in noisy]
    out = layerwise_stability(clean, noisy, mask, weights, reduction)
    ref = reference.layerwise_stability(c2, n2, mask.bool(), weights, reduction)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    go = torch.tensor(grad_out, dtype=torch.float64)
    got = torch.autograd.grad(out, clean + noisy, go)
    exp = torch.autograd.grad(ref, c2 + n2, go)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(got, direct_grads(clean, noisy, mask, weights, reduction, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_grad_only_where_required():
    clean, noisy = rand_layers(2, (2, 3, 4), seed=16)
    noisy = [h.detach() for h in noisy]  # e.g. detach_clean on the other side
    out = layerwise_stability(clean, noisy, None, [1.0, 2.0])
    out.backward()
    for h, g in zip(clean, direct_grads(clean, noisy, None, [1.0, 2.0], "sum")):
        torch.testing.assert_close(h.grad, g)
    assert all(h.grad is None for h in noisy)


def test_views_into_one_concatenated_batch():
    b, t, d = 3, 4, 5
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2 * b, t, d, generator=g, dtype=torch.float64)
    w1 = torch.randn(d, d, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(d, d, generator=g, dtype=torch.float64, requires_grad=True)
    h1 = torch.tanh(x @ w1)  # two "layers" of one pass over 2B rows
    h2 = torch.tanh(h1 @ w2)
    hs = [h1, h2]
    for h in hs:
        h.retain_grad()
    mask = rand_mask(b, t, seed=18)
    out = layerwise_stability([h[:b] for h in hs], [h[b:] for h in hs], mask, [1.0, 0.5], "mean")
    assert math.isclose(out.item(), direct([h[:b] for h in hs], [h[b:] for h in hs], mask, [1.0, 0.5], "mean"),
                        rel_tol=1e-12)
    out.backward()
    assert w1.grad is not None and w1.grad.abs().sum() > 0 and w2.grad.abs().sum() > 0
    # the gradient reaching h2 is [g; −g] (h1 also gets the path through layer 2, so check h2 only)
    g2 = direct_grads([h2[:b]], [h2[b:]], mask, [0.5], "mean")[0]
    torch.testing.assert_close(h2.grad, torch.cat([g2, -g2]), rtol=1e-12, atol=1e-15)
    # and the parameter gradients equal those of the autograd reference
    w1r, w2r = w1.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    r1 = torch.tanh(x @ w1r)
    r2 = torch.tanh(r1 @ w2r)
    ref = reference.layerwise_stability([r1[:b], r2[:b]], [r1[b:], r2[b:]], mask.bool(), [1.0, 0.5], "mean")
    ref.backward()
    torch.testing.assert_close(w1.grad, w1r.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(w2.grad, w2r.grad, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------- low precision

def _low_precision_baseline(clean, noisy, mask, weights, reduction):
    """The same computation done naively in the inputs' own low precision (STYLE.md: the reference's error)."""
    real = (mask != 0).to(clean[0].dtype)
    total = torch.zeros((), dtype=clean[0].dtype)
    for h, hn, w in zip(clean, noisy, weights):
        per = (h - hn).pow(2).sum(-1)
        if reduction == "mean":
            per = per / h.shape[-1]
        total = total + w * (per * real).sum()
    return total / real.sum().clamp_min(1)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_fp32_output(dtype, reduction):
    b, t, d = 4, 33, 96
    clean, noisy = rand_layers(3, (b, t, d), seed=19, dtype=dtype, scale=0.1)
    mask = rand_mask(b, t, seed=20, p=0.8)
    weights = [0.5, 1.0, 0.25]
    out = layerwise_stability(clean, noisy, mask, weights, reduction)
    assert out.dtype == torch.float32
    exact = direct(clean, noisy, mask, weights, reduction)  # float64 on the same rounded inputs
    err = abs(out.item() - exact)
    with torch.no_grad():
        base = _low_precision_baseline(clean, noisy, mask, weights, reduction)
    base_err = abs(base.double().item() - exact)
    assert err <= 2 * base_err, (err, base_err)  # flash-attention rule (STYLE.md)
    # and the design's stronger claim, accumulation in fp32: fp32-level error, far below the baseline's
    assert err <= 1e-5 * exact and base_err > 10 * err

    out.backward()
    grads64 = direct_grads(clean, noisy, mask, weights, reduction)
    c_lo = [h.detach().clone().requires_grad_() for h in clean]
    n_lo = [h.detach().clone().requires_grad_() for h in noisy]
    base_grads = torch.autograd.grad(_low_precision_baseline(c_lo, n_lo, mask, weights, reduction), c_lo)
    for h, g64, gb in zip(clean, grads64, base_grads):
        assert h.grad.dtype == dtype
        g_err = (h.grad.double() - g64).abs().max().item()
        gb_err = (gb.double() - g64).abs().max().item()
        assert g_err <= 2 * gb_err, (g_err, gb_err)
        # one rounding of an fp32 gradient: at most half an ulp of the target dtype (subnormals included)
        fi = torch.finfo(dtype)
        torch.testing.assert_close(h.grad.double(), g64, rtol=fi.eps, atol=fi.tiny * fi.eps)


# ----------------------------------------------------------------------------------------------- errors

def _layers(n=2, shape=(2, 3, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(n)]


def test_unequal_layer_counts():
    with pytest.raises(ValueError, match="clean_hidden has 2 layers but noisy_hidden has 1"):
        layerwise_stability(_layers(2), _layers(1))


def test_empty():
    with pytest.raises(ValueError, match="clean_hidden is empty"):
        layerwise_stability([], [])


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], []])
def test_weights_wrong_length(weights):
    with pytest.raises(ValueError, match=rf"weights has {len(weights)} entries but there are 2 layers"):
        layerwise_stability(_layers(2), _layers(2), weights=weights)


@pytest.mark.parametrize("weights, exc", [([1.0, math.nan], ValueError), (math.inf, ValueError),
                                          ("1.0", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_weights(weights, exc):
    with pytest.raises(exc, match="weights"):
        layerwise_stability(_layers(2), _layers(2), weights=weights)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction.*'max'"):
        layerwise_stability(_layers(2), _layers(2), reduction="max")


def test_shape_mismatch_between_clean_and_noisy():
    with pytest.raises(ValueError, match=r"clean_hidden\[0\].*noisy_hidden\[0\]"):
        layerwise_stability(_layers(1, (2, 3, 4)), _layers(1, (2, 3, 5)))


def test_token_shape_mismatch_between_layers():
    with pytest.raises(ValueError, match=r"clean_hidden\[1\]"):
        layerwise_stability([torch.randn(2, 3, 4), torch.randn(2, 4, 4)], _layers(2))
    with pytest.raises(ValueError, match=r"noisy_hidden\[0\]"):
        layerwise_stability(_layers(1), [torch.randn(3, 3, 4)])
    with pytest.raises(ValueError, match=r"clean_hidden\[0\]"):
        layerwise_stability([torch.randn(4)], [torch.randn(4)])


def test_non_float_hidden_states():
    with pytest.raises(TypeError, match=r"clean_hidden\[0\].*floating"):
        layerwise_stability([torch.ones(2, 3, 4, dtype=torch.long)], _layers(1))
    with pytest.raises(TypeError, match=r"noisy_hidden\[1\].*floating"):
        layerwise_stability(_layers(2), [torch.randn(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.int32)])
    with pytest.raises(TypeError, match=r"clean_hidden\[0\]"):
        layerwise_stability([[[0.0]]], [[[0.0]]])


@pytest.mark.parametrize("mask", [torch.ones(2, 4), torch.ones(3, 3), torch.ones(2, 3, 1), torch.ones(6)])
def test_mask_wrong_shape(mask):
    with pytest.raises(ValueError, match="attention_mask"):
        layerwise_stability(_layers(2), _layers(2), mask)


def test_mask_not_a_tensor():
    with pytest.raises(TypeError, match="attention_mask"):
        layerwise_stability(_layers(2), _layers(2), [[1, 1, 1], [1, 1, 0]])
