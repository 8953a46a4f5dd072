"""The Triton backend of the LNSR ops (docs/design.md §1) against the float64 reference, forward and backward.
Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py); the same tests run on a GPU."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from lnsr_fast.kernels import MAX_K, MAX_WIDTH, reference  # noqa: E402
from lnsr_fast.kernels.triton.gaussian_noise import gaussian_noise  # noqa: E402
from lnsr_fast.kernels.triton.in_manifold_noise import in_manifold_noise  # noqa: E402
from lnsr_fast.kernels.triton.launch import in_manifold_config  # noqa: E402
from lnsr_fast.kernels.triton.layerwise_stability import stability_backward, stability_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RATIO = 0.1
TOL = reference.DEFAULT_RANK_TOL

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(out, ref64, ref_low, what):
    """Flash-attention style: max |kernel − float64 reference| ≤ 2 · the same error of the reference
    computed in the inputs' dtype, plus a small floor; that tolerance must itself be small next to the
    values, or the check could not fail."""
    scale = ref64.abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_low.double() - ref64).abs().max().item()
    tol = 2 * ref_err + 1e-6 * scale
    if out.dtype == torch.bfloat16 and DEVICE == "cpu":
        tol += 2**-7 * scale  # the interpreter truncates fp32 to bfloat16 (a GPU rounds): one more ulp
    assert tol <= 0.02 * scale, f"{what}: tolerance {tol:.3g} is no check against values up to {scale:.3g}"
    assert err <= tol, (f"{what}: max |kernel − float64 reference| = {err:.3g} > {tol:.3g} "
                        f"(reference in the input dtype is off by {ref_err:.3g})")


def _padding(n: int) -> torch.Tensor:
    """Real-token mask with padding at a few tokens (never 0–3, the rank-deficient ones, when n > 4)."""
    real = torch.ones(n, dtype=torch.bool)
    real[[t for t in (4, 9, 13) if t < n] or [n - 1]] = False
    return real


def _manifold_case(n, d, k, dtype, weight_dtype, embed_scale, seed):
    """x [n, d], ids, table [V, k], weight, real for in-manifold noise; padding rows of x hold NaN.

    Tokens 0–3 have rank-deficient neighbour sets: 0 a duplicated neighbour (k ≥ 2), 1 itself among
    its neighbours, 2 only itself (falls back to Gaussian noise), 3 one other row k times (a single
    direction).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = 40
    # Multiples of 1/64 in (-4, 4): exact in every dtype, so x can equal its scaled row exactly.
    weight = (torch.randn(vocab, d, generator=g).clamp(-3.9, 3.9) * 64).round() / 64
    ids = torch.randperm(vocab, generator=g)[:n]
    table = torch.randint(0, vocab, (vocab, k), generator=g, dtype=torch.int32)
    x = embed_scale * weight[ids] + 0.3 * torch.randn(n, d, generator=g)
    if k >= 2:
        table[ids[0], 1] = table[ids[0], 0]
    table[ids[1], 0] = ids[1]
    table[ids[2]] = ids[2]
    table[ids[3]] = (ids[3] + 1) % vocab
    x[1:3] = embed_scale * weight[ids[1:3]]
    real = _padding(n)
    x[~real] = float("nan")
    return (x.to(DEVICE, dtype), ids.to(DEVICE), table.to(DEVICE), weight.to(DEVICE, weight_dtype or dtype),
            real.to(DEVICE))


def _neighbor_rows(weight, table, ids, embed_scale):
    return embed_scale * weight[table[ids].long()]


# ---------------------------------------------------------------------------------------------- noise

@pytest.mark.parametrize("d", [384, 768, 1000, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_noise_matches_reference(dtype, d):
    g = torch.Generator().manual_seed(d)
    n = 15 if d < 4096 else 4
    real = _padding(n)
    x = torch.randn(n, d, generator=g)
    x[~real] = float("nan")
    x, real = x.to(DEVICE, dtype), real.to(DEVICE)
    z = torch.randn(n, d, generator=g).to(DEVICE)
    eps = gaussian_noise(x, RATIO, 0, real, z)
    assert eps.dtype == dtype and eps.shape == x.shape
    ref64 = reference.gaussian_noise(x.double(), z.double(), RATIO, real)
    assert_close(eps, ref64, reference.gaussian_noise(x, z, RATIO, real).to(dtype), f"ε {dtype} d={d}")
    assert (eps[~real] == 0).all()


@pytest.mark.parametrize("d,k,embed_scale,weight_dtype", [
    (384, 1, 1.0, None), (768, 3, 2.0, torch.float32), (1000, 10, 1.0, None), (1024, 16, 2.0, None),
    (4096, 3, 1.0, torch.bfloat16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_manifold_noise_matches_reference(dtype, d, k, embed_scale, weight_dtype):
    n = 15 if d < 4096 else 4
    x, ids, table, weight, real = _manifold_case(n, d, k, dtype, weight_dtype, embed_scale, seed=d + k)
    g = torch.Generator().manual_seed(k)
    z = torch.randn(n, k, generator=g).to(DEVICE)
    fallback_z = torch.randn(n, d, generator=g).to(DEVICE)
    eps, fell_back = in_manifold_noise(x, ids, table, weight, RATIO, TOL, 0, real, embed_scale, z, fallback_z)
    assert eps.dtype == dtype and eps.shape == x.shape and fell_back.dtype == torch.bool

    rows = _neighbor_rows(weight, table, ids, embed_scale)
    ref64, fell64 = reference.in_manifold_noise(x.double(), rows.double(), z, fallback_z, RATIO, real, TOL)
    ref_low, _ = reference.in_manifold_noise(x, rows, z, fallback_z, RATIO, real, TOL)
    assert_close(eps, ref64, ref_low.to(dtype), f"ε {dtype} d={d} k={k}")
    assert torch.equal(fell_back, fell64) and fell_back[2] and not fell_back[~real].any()
    assert (eps[~real] == 0).all()


def _orthonormal_basis(x, ids, table, weight, embed_scale):
    diffs = _neighbor_rows(weight, table, ids, embed_scale).double() - x.double()[:, None, :]
    return reference.orthonormal_directions(diffs, TOL)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_manifold_noise_generated_draws(dtype):
    """z=None: same seed, same bits; ε in the span of the differences, ‖ε_t‖ = ratio·‖x_t‖, 0 at padding,
    full-width Gaussian noise for the token that fell back."""
    n, d, k, embed_scale = 15, 48, 5, 2.0
    x, ids, table, weight, real = _manifold_case(n, d, k, dtype, None, embed_scale, seed=1)
    args = (x, ids, table, weight, RATIO, TOL)
    eps, fell_back = in_manifold_noise(*args, 123, real, embed_scale)
    again, fell_again = in_manifold_noise(*args, 123, real, embed_scale)
    assert torch.equal(eps, again) and torch.equal(fell_back, fell_again)
    q = _orthonormal_basis(x, ids, table, weight, embed_scale)
    random = real & ((q != 0).any(-1).sum(1) != 1)  # one direction leaves only a sign to draw
    for seed in (124, 2**63 - 1):
        other, _ = in_manifold_noise(*args, seed, real, embed_scale)
        assert (other[random] != eps[random]).any(dim=1).all()

    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    e = eps.double()
    assert (e[~real] == 0).all()
    torch.testing.assert_close(e[real].norm(dim=1), RATIO * x[real].double().norm(dim=1), rtol=rtol, atol=0)
    in_span = torch.einsum("nkd,nk->nd", q, torch.einsum("nkd,nd->nk", q, e))
    kept = real & ~fell_back
    assert ((e - in_span)[kept].norm(dim=1) <= rtol * 10 * e[kept].norm(dim=1)).all()
    assert fell_back.tolist() == [t == 2 for t in range(n)]
    assert (e[2] != 0).all()


def _moments(eps: torch.Tensor):
    """Mean and fourth moment of the entries of ε [N, d] with each row scaled to unit mean square."""
    u = eps.double() / eps.double().pow(2).mean(dim=1, keepdim=True).sqrt()
    return u.mean().item(), u.pow(4).mean().item()


def test_generated_draws_look_standard_normal():
    """The rescaling cancels the draws' scale, so what is checked is what it leaves: centred, Gaussian
    shape (fourth moment 3, where a uniform draw gives 1.8), no correlation across tokens, elements and
    coefficients. A few thousand draws for each stream."""
    g = torch.Generator().manual_seed(0)
    # Gaussian noise: element draws.
    x = torch.randn(8, 512, generator=g).to(DEVICE)
    eps = gaussian_noise(x, RATIO, 7).double()
    mean, m4 = _moments(eps)
    assert abs(mean) < 0.08 and abs(m4 - 3) < 0.6
    u = eps / eps.norm(dim=1, keepdim=True)
    assert (u[:, 1:] * u[:, :-1]).sum(1).abs().max() < 0.2            # neighbouring elements
    assert (u @ u.T - torch.eye(8, dtype=u.dtype, device=u.device)).abs().max() < 0.2  # tokens

    # In-manifold fallback: every token is its own only neighbour, so all fall back to full-width noise.
    n, d = 8, 512
    weight = torch.randn(n, d, generator=g).to(DEVICE)
    ids = torch.arange(n, device=DEVICE)
    table = ids[:, None].repeat(1, 2).int()
    eps, fell_back = in_manifold_noise(weight.clone(), ids, table, weight, RATIO, TOL, 7)
    assert fell_back.all()
    eps = eps.double()
    mean, m4 = _moments(eps)
    assert abs(mean) < 0.08 and abs(m4 - 3) < 0.6
    u = eps / eps.norm(dim=1, keepdim=True)
    assert (u @ u.T - torch.eye(n, dtype=u.dtype, device=u.device)).abs().max() < 0.2

    # In-manifold coefficients: c_t = Q_t ε_t / ‖ε_t‖ is z_t/‖z_t‖, uniform on the sphere of R^k.
    n, d, k, vocab = 48, 16, 8, 60
    weight = torch.randn(vocab, d, generator=g).to(DEVICE)
    ids = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    table = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(vocab)]).int().to(DEVICE)
    x = weight[ids] + 0.1 * torch.randn(n, d, generator=g).to(DEVICE)
    eps, fell_back = in_manifold_noise(x, ids, table, weight, RATIO, TOL, 7)
    assert not fell_back.any()
    c = torch.einsum("nkd,nd->nk", _orthonormal_basis(x, ids, table, weight, 1.0), eps.double())
    c = c / c.norm(dim=1, keepdim=True)
    assert c.mean(0).norm() < 0.5                         # E‖mean‖² = 1/n: not one draw shared by all tokens
    assert c.sum(1).pow(2).mean() < 3                     # E = 1: not one draw shared by all coefficients
    assert (math.sqrt(k) * c).mean().abs() < 0.25
    assert ((k * c.pow(2)).mean(0) - 1).abs().max() < 0.8  # every coefficient drawn with the same spread


# ----------------------------------------------------------------------------------------- stability

def _hidden_states(widths, dtype, seed, b=3, t=5):
    """Clean and noisy halves as views h[:B], h[B:] of one [2B, T, d] tensor per layer (concat mode);
    padding rows hold NaN in both halves."""
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(b, t, generator=g) > 0.3
    real[0, 0], real[-1, -1] = True, False
    layers = []
    for d in widths:
        h = torch.randn(b, t, d, generator=g)
        h = torch.cat([h, h + 0.1 * torch.randn(b, t, d, generator=g)])
        h[torch.cat([~real, ~real])] = float("nan")
        layers.append(h.to(DEVICE, dtype))
    return [h[:b] for h in layers], [h[b:] for h in layers], real.to(DEVICE)


def _reference_with_grads(clean, noisy, real, weights, reduction, grad):
    """reference.layerwise_stability and its autograd gradients; padding rows are made finite first
    (the reference ignores them, but NaN · 0 would still poison the gradient)."""
    leaves = [torch.where(real[..., None], h, 0).detach().requires_grad_() for h in (*clean, *noisy)]
    value = reference.layerwise_stability(leaves[:len(clean)], leaves[len(clean):], real, weights, reduction)
    value.backward(grad)
    return value.detach(), [h.grad for h in leaves]


def _backward(grad, clean, noisy, real, weights, reduction):
    """stability_backward into fresh (NaN-filled, so that a row left unwritten shows) gradients."""
    grads = [[torch.full_like(h, math.nan) for h in side] for side in (clean, noisy)]
    stability_backward(grad, clean, noisy, real, weights, reduction, *grads)
    return grads


@pytest.mark.parametrize("widths", [(384, 1000, 768), (1024, 1024), (4096,)], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stability_matches_reference(dtype, reduction, widths):
    clean, noisy, real = _hidden_states(widths, dtype, seed=sum(widths))
    weights = [0.3, 1.0, 2.5][:len(widths)]
    grad = torch.tensor(-0.37, device=DEVICE)
    value = stability_forward(clean, noisy, real, weights, reduction)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert torch.equal(value, stability_forward(clean, noisy, real, weights, reduction))  # reproducible
    grads_clean, grads_noisy = _backward(grad, clean, noisy, real, weights, reduction)

    ref64, grads64 = _reference_with_grads([h.double() for h in clean], [h.double() for h in noisy], real, weights,
                                           reduction, grad.double())
    ref_low, grads_low = _reference_with_grads(clean, noisy, real, weights, reduction, grad)
    assert_close(value, ref64, ref_low, f"forward {dtype} {reduction} {widths}")
    for i, g in enumerate((*grads_clean, *grads_noisy)):
        assert g.dtype == dtype and g.shape == (clean + noisy)[i].shape
        assert_close(g, grads64[i], grads_low[i], f"gradient {i} {dtype} {reduction} {widths}")
        assert (g[~real] == 0).all()


def test_stability_without_mask_or_real_tokens():
    clean, noisy, real = _hidden_states((384, 1000), torch.float32, seed=5)
    clean, noisy = [torch.nan_to_num(h) for h in clean], [torch.nan_to_num(h) for h in noisy]
    weights = [1.0, 0.5]
    for mask in (None, torch.zeros_like(real)):
        grad = torch.tensor(2.0, device=DEVICE)
        ref, ref_grads = _reference_with_grads([h.double() for h in clean], [h.double() for h in noisy],
                                               torch.ones_like(real) if mask is None else mask, weights, "sum",
                                               grad.double())
        value = stability_forward(clean, noisy, mask, weights, "sum")
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0)
        for g, r in zip(sum(_backward(grad, clean, noisy, mask, weights, "sum"), []), ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-9)
    assert value == 0


# ------------------------------------------------------------------------------ layout and limits

def test_non_contiguous_inputs_match_contiguous():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(15, 1200, generator=g).to(DEVICE)
    x = wide[:, 100:1100]
    assert not x.is_contiguous()
    z = torch.randn(15, 1000, generator=g).to(DEVICE)
    assert torch.equal(gaussian_noise(x, RATIO, 0, None, z), gaussian_noise(x.contiguous(), RATIO, 0, None, z))
    _, ids, table, weight, real = _manifold_case(15, 1000, 3, torch.float32, None, 1.0, seed=3)
    got = in_manifold_noise(x, ids, table, weight, RATIO, TOL, 9, real)
    want = in_manifold_noise(x.contiguous(), ids, table, weight, RATIO, TOL, 9, real)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    h = torch.randn(5, 3, 2, 64, generator=g).to(DEVICE).transpose(0, 1)  # [3, 5, 2, 64]: not contiguous
    clean, noisy = [h[:, :, 0]], [h[:, :, 1]]
    ref = reference.layerwise_stability(clean, noisy, None, [1.0], "mean")
    torch.testing.assert_close(stability_forward(clean, noisy, None, [1.0], "mean"), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("d,k", [(MAX_WIDTH, 2), (64, MAX_K)])
def test_largest_sizes(d, k):
    x, ids, table, weight, real = _manifold_case(4, d, k, torch.float32, None, 1.0, seed=d)
    eps, fell_back = in_manifold_noise(x, ids, table, weight, RATIO, TOL, 1, real)
    rows = _neighbor_rows(weight, table, ids, 1.0)
    q = reference.orthonormal_directions(rows.double() - x.double()[:, None], TOL)[0]
    e = eps.double()[real & ~fell_back]
    in_span = torch.einsum("nkd,nk->nd", q[real & ~fell_back], torch.einsum("nkd,nd->nk", q[real & ~fell_back], e))
    assert ((e - in_span).norm(dim=1) <= 1e-4 * e.norm(dim=1)).all()
    clean, noisy, real = _hidden_states((d,), torch.bfloat16, seed=d, b=1, t=3)
    assert torch.isfinite(stability_forward(clean, noisy, real, [1.0], "sum"))


def test_sizes_beyond_the_limits_raise():
    assert in_manifold_config(MAX_WIDTH, MAX_K).block_k == MAX_K
    with pytest.raises(ValueError, match=rf"x.shape\[1\] must be in \[1, {MAX_WIDTH}\].*got {MAX_WIDTH + 1}"):
        gaussian_noise(torch.zeros(2, MAX_WIDTH + 1, device=DEVICE), RATIO, 0)
    x = torch.zeros(2, 8, device=DEVICE)
    table = torch.zeros(4, MAX_K + 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=rf"k \(neighbours per token\) must be in \[1, {MAX_K}\].*got {MAX_K + 1}"):
        in_manifold_noise(x, torch.zeros(2, dtype=torch.long, device=DEVICE), table, x, RATIO, TOL, 0)
    with pytest.raises(ValueError, match="hidden width"):
        wide = torch.zeros(2, 1, MAX_WIDTH + 1, device=DEVICE)
        stability_forward([wide], [wide], None, [1.0], "sum")
    with pytest.raises(ValueError, match="one dtype.*bfloat16.*float32"):
        stability_forward([x, x], [x, x.bfloat16()], None, [1.0, 1.0], "sum")
    with pytest.raises(ValueError, match="z and fallback_z"):
        in_manifold_noise(x, torch.zeros(2, dtype=torch.long, device=DEVICE), table[:, :2], x, RATIO, TOL, 0,
                          z=torch.zeros(2, 2, device=DEVICE))


def test_stability_launches_build_no_host_tensor(monkeypatch):
    """The layers' addresses, widths and weights travel as kernel arguments: no table is built on the host
    and copied to the device at each call (which a CUDA graph could not capture either)."""
    clean, noisy, real = _hidden_states((384, 1000), torch.float32, seed=2)
    grad = torch.tensor(1.0, device=DEVICE)
    grads = [[torch.empty_like(h) for h in side] for side in (clean, noisy)]

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was built from host data during a launch")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse)
    stability_forward(clean, noisy, real, [1.0, 2.0], "sum")
    stability_backward(grad, clean, noisy, real, [1.0, 2.0], "sum", *grads)
