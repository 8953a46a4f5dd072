"""Noise samplers (lnsr_fast/noise.py) and their reference ops (kernels/reference.py)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lnsr_fast import kernels, neighbors
from lnsr_fast import noise as noise_module
from lnsr_fast.kernels import reference
from lnsr_fast.noise import GaussianNoise, InManifoldNoise

V, D, K = 64, 16, 5
SAMPLERS = ["gaussian", "in_manifold"]


@pytest.fixture(autouse=True, params=kernels.available_backends("cpu"))
def backend(request, monkeypatch):
    """Every sampler test runs on every backend the CPU offers (Triton under its interpreter): here
    `backend="auto"` resolves to the backend under test; float64 stays with the reference."""
    resolve = noise_module.resolve_backend

    def resolve_under_test(backend, device, dtype=None, **op_and_sizes):
        return resolve(request.param if backend == "auto" and dtype != torch.float64 else backend, device, dtype,
                       **op_and_sizes)

    monkeypatch.setattr(noise_module, "resolve_backend", resolve_under_test)
    return request.param


@pytest.fixture(autouse=True)
def _no_table_cache():
    cache = getattr(neighbors, "_CACHE", None)
    if cache is not None:
        cache.clear()


def make_vocab(v=V, d=D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)


def make_batch(weight, b=3, t=7, seed=1, dtype=None, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (b, t), generator=g)
    x = weight[ids].to(dtype or weight.dtype)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[0, -3:] = 0
        mask[1, -1] = 0
    return ids, x, mask


def make_sampler(kind, weight=None, **kw):
    if kind == "gaussian":
        return GaussianNoise(**{"ratio": 0.05, "seed": 0, **kw})
    return InManifoldNoise(make_vocab() if weight is None else weight, **{"k": K, "ratio": 0.1, "seed": 0,
                                                                          "knn_backend": "torch", **kw})


def exact_knn(weight, k):
    """Brute-force float64 kNN with the row itself excluded (random rows: no ties, no duplicates)."""
    w = weight.double()
    d2 = ((w[:, None] - w[None]) ** 2).sum(-1)
    d2.fill_diagonal_(math.inf)
    return d2.argsort(dim=1)[:, :k]


def span_residual(eps, x, neighbor_rows):
    """‖ε − proj_span(e_nbr − x)(ε)‖ / ‖ε‖ per token, by float64 least squares.

    eps [N, d], x [N, d], neighbor_rows [N, k, d]."""
    a = (neighbor_rows.double() - x.double()[:, None]).transpose(1, 2)  # [N, d, k]
    e = eps.double()[..., None]
    coef = torch.linalg.lstsq(a, e, driver="gelsd").solution
    res = (a @ coef - e).squeeze(-1).norm(dim=-1)
    return res / eps.double().norm(dim=-1)


# --------------------------------------------------------------------------------------- output contract

@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_like_inputs_embeds(kind, dtype):
    w = make_vocab()
    noise = make_sampler(kind, w)
    ids, x, mask = make_batch(w, dtype=dtype)
    x = x.requires_grad_()
    eps = noise(ids, x, mask)
    assert eps.shape == x.shape and eps.dtype == x.dtype and eps.device == x.device
    assert not eps.requires_grad and eps.grad_fn is None
    assert torch.isfinite(eps).all()
    real = mask.bool()
    assert (eps[~real] == 0).all()
    assert (eps.float()[real].norm(dim=-1) > 0).all()
    ratio = noise.ratio
    rel = eps.double().norm(dim=-1)[real] / (ratio * x.detach().double().norm(dim=-1)[real])
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert torch.allclose(rel, torch.ones_like(rel), rtol=0, atol=tol), rel


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_exact_norm_ratio_and_zero_padding_fp32(kind, mask_dtype):
    w = make_vocab()
    noise = make_sampler(kind, w, ratio=0.37)
    ids, x, mask = make_batch(w, b=4, t=9)
    eps = noise(ids, x, mask.to(mask_dtype))
    real = mask.bool()
    assert torch.equal(eps[~real], torch.zeros_like(eps[~real]))
    ratio = eps.double().norm(dim=-1)[real] / x.double().norm(dim=-1)[real]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.37), rtol=2e-6, atol=0)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_no_mask_means_every_token_is_real(kind):
    w = make_vocab()
    ids, x, _ = make_batch(w)
    eps = make_sampler(kind, w)(ids, x)
    ratio = eps.double().norm(dim=-1) / x.double().norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.05 if kind == "gaussian" else 0.1), rtol=2e-6, atol=0)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_inputs_not_modified(kind):
    w = make_vocab()
    ids, x, mask = make_batch(w)
    before = (ids.clone(), x.clone(), mask.clone(), w.clone())
    make_sampler(kind, w)(ids, x, mask)
    for a, b in zip(before, (ids, x, mask, w)):
        assert torch.equal(a, b)


def test_gaussian_accepts_no_input_ids():
    x = make_vocab()[:12].view(3, 4, D)
    eps = GaussianNoise(ratio=0.05, seed=0)(None, x)
    assert eps.shape == x.shape


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch(kind, shape):
    w = make_vocab()
    noise = make_sampler(kind, w)
    ids = torch.zeros(shape, dtype=torch.long)
    x = torch.zeros(*shape, D)
    eps = noise(ids, x, torch.ones(shape, dtype=torch.long))
    assert eps.shape == x.shape and eps.dtype == x.dtype
    # and the sampler still works afterwards
    ids2, x2, mask2 = make_batch(w)
    assert noise(ids2, x2, mask2).shape == x2.shape


# --------------------------------------------------------------------------------------- in-manifold geometry

def test_in_manifold_noise_lies_in_span_of_exact_neighbours():
    w = make_vocab(v=97, d=24, seed=3)
    noise = InManifoldNoise(w, k=K, ratio=0.1, seed=5, knn_backend="torch")
    ids, x, mask = make_batch(w, b=4, t=11, seed=4)
    eps = noise(ids, x, mask)
    real = mask.bool().flatten()
    nbrs = exact_knn(w, K)  # independent of the library's table
    ids_f, x_f, eps_f = ids.flatten()[real], x.reshape(-1, 24)[real], eps.reshape(-1, 24)[real]
    res = span_residual(eps_f, x_f, w[nbrs[ids_f]])
    assert res.max() < 1e-5, res.max()
    # Control: the same noise is far from the span of the *wrong* neighbours (next k rows in distance).
    wrong = w.double()[torch.cdist(w.double(), w.double()).argsort(1)[:, K + 1:2 * K + 1][ids_f]]
    assert span_residual(eps_f, x_f, wrong).min() > 0.1


class _ScaledEmbedding(nn.Embedding):
    """Like BART's or Gemma's word embedding: the module's output is the row times a constant."""

    def forward(self, ids):
        return super().forward(ids) * 8.0


def test_in_manifold_noise_uses_the_embedding_modules_scale():
    emb = _ScaledEmbedding(97, 24)
    nn.init.normal_(emb.weight)
    noise = InManifoldNoise(emb, k=K, ratio=0.1, seed=5, knn_backend="torch")
    ids, _, mask = make_batch(emb.weight.detach(), b=4, t=11, seed=4)
    x = emb(ids).detach()
    eps = noise(ids, x, mask)
    real = mask.bool().flatten()
    nbrs = exact_knn(emb.weight.detach(), K)  # a scalar scale keeps the neighbours
    ids_f, x_f, eps_f = ids.flatten()[real], x.reshape(-1, 24)[real], eps.reshape(-1, 24)[real]
    assert span_residual(eps_f, x_f, 8.0 * emb.weight.detach()[nbrs[ids_f]]).max() < 1e-5
    # Control: with the unscaled rows the differences span another subspace.
    assert span_residual(eps_f, x_f, emb.weight.detach()[nbrs[ids_f]]).median() > 0.1


def test_gaussian_noise_is_not_confined_to_a_low_dim_span():
    w = make_vocab()
    tok = 7
    x = w[tok].expand(1, 4000, D).contiguous()
    ids = torch.full((1, 4000), tok)
    eps = GaussianNoise(ratio=0.05, seed=0)(ids, x).reshape(-1, D).double()
    # full rank, and isotropic in all of R^d
    cov = eps.T @ eps / eps.shape[0]
    ev = torch.linalg.eigvalsh(cov)
    assert ev.max() / ev.min() < 1.6, ev
    # far from the in-manifold span: the residual fraction is about sqrt((d - k) / d)
    nbrs = exact_knn(w, K)[ids.flatten()]
    res = span_residual(eps, x.reshape(-1, D), w[nbrs])
    assert res.mean() > 0.6


def _isotropy_setup():
    """A token whose 5 nearest rows are at very different distances in non-orthogonal directions."""
    g = torch.Generator().manual_seed(11)
    d = 8
    x0 = 3.0 * torch.ones(d, dtype=torch.float64)
    dirs = torch.randn(5, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dirs[1] = (dirs[0] + 0.3 * dirs[1]) / (dirs[0] + 0.3 * dirs[1]).norm()  # strongly non-orthogonal
    near = x0 + torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None] * dirs
    far = x0 + 40.0 * torch.randn(20, d, generator=g, dtype=torch.float64)
    w = torch.cat([x0[None], near, far]).float()
    assert torch.equal(exact_knn(w, 5)[0].sort().values, torch.arange(1, 6))
    return w


def _coefficient_spectrum(w, n=4000, seed=0):
    """Eigenvalues of the covariance of ε's coordinates in an orthonormal basis of token 0's span,
    normalised so that an isotropic distribution gives all ones."""
    noise = InManifoldNoise(w, k=5, ratio=0.2, seed=seed, knn_backend="torch")
    x = w[0].expand(1, n, w.shape[1]).contiguous()
    eps = noise(torch.zeros(1, n, dtype=torch.long), x).reshape(n, -1).double()
    diffs = (w[exact_knn(w, 5)[0]] - w[0]).double()  # [5, d]
    basis, _ = torch.linalg.qr(diffs.T)  # [d, 5], orthonormal basis of the span
    coef = eps @ basis
    assert ((eps - coef @ basis.T).norm(dim=-1) / eps.norm(dim=-1)).max() < 1e-5  # in the span
    r2 = (0.2 * w[0].double().norm()) ** 2
    return torch.linalg.eigvalsh(coef.T @ coef / n) / (r2 / 5)


def test_in_manifold_noise_is_isotropic_inside_the_span(backend):
    # For 4000 draws on the 5-sphere the eigenvalues lie within ~±0.1 of 1. The Triton interpreter runs
    # one token per program (slow on a CPU): 1000 draws, ~±0.2, still far inside the ≥3× spread of the
    # broken orthonormalisations below.
    n, tol = (4000, 0.2) if backend == "torch" or torch.cuda.is_available() else (1000, 0.25)
    ev = _coefficient_spectrum(_isotropy_setup(), n=n)
    assert ev.min() > 1 - tol and ev.max() < 1 + tol, ev


def _mgs_without_normalisation(diffs, rank_tol=reference.DEFAULT_RANK_TOL):
    q, kept = _REAL_MGS(diffs, rank_tol)
    res = (q * diffs.to(q.dtype)).sum(-1, keepdim=True)  # the component of d_j along q_j = its residual norm
    return q * res, kept


def _raw_differences(diffs, rank_tol=reference.DEFAULT_RANK_TOL):
    return diffs.clone(), torch.ones(diffs.shape[:2], dtype=torch.bool)


_REAL_MGS = reference.orthonormal_directions


@pytest.mark.parametrize("backend", ["torch"], indirect=True)  # it breaks the reference on purpose
@pytest.mark.parametrize("broken", [_mgs_without_normalisation, _raw_differences])
def test_isotropy_check_catches_broken_orthonormalisation(monkeypatch, broken):
    """The statistic of the test above has the power to see un-normalised or raw directions."""
    w = _isotropy_setup()
    monkeypatch.setattr(reference, "orthonormal_directions", broken)
    ev = _coefficient_spectrum(w)
    assert ev.max() / ev.min() > 3, ev
    assert not (ev.min() > 0.8 and ev.max() < 1.2)


def test_rank_deficient_neighbours_keep_fewer_directions():
    # Token 0's 5 neighbours differ from it by a, 2a, -a, b, a+b: rank 2. Integer rows: exact arithmetic.
    d = 6
    x0 = torch.tensor([2., 1., 0., 3., 1., 2.])
    a = torch.tensor([1., 0., 1., 0., 0., 0.])
    b = torch.tensor([0., 1., 0., 0., 1., 0.])
    near = torch.stack([x0 + a, x0 + 2 * a, x0 - a, x0 + b, x0 + a + b])
    far = torch.tensor([[50., 0., 0., 0., 0., 0.], [0., 50., 0., 0., 0., 0.], [0., 0., 50., 0., 0., 0.],
                        [0., 0., 0., 50., 0., 0.], [0., 0., 0., 0., 50., 0.], [0., 0., 0., 0., 0., 50.]])
    w = torch.cat([x0[None], near, far])
    assert torch.equal(exact_knn(w, 5)[0].sort().values, torch.arange(1, 6))
    noise = InManifoldNoise(w, k=5, ratio=0.1, seed=0, knn_backend="torch")

    diffs = (w[noise.table[0].long()] - x0)[None]
    q, kept = reference.orthonormal_directions(diffs)
    assert int(kept.sum()) == 2
    assert (q[~kept] == 0).all()

    n = 300
    eps = noise(torch.zeros(1, n, dtype=torch.long), x0.expand(1, n, d).contiguous())[0]
    assert int(noise.fallback_count) == 0
    span = torch.stack([a, b]).double()
    res = span_residual(eps, x0.expand(n, d), (x0 + span)[None].expand(n, 2, d))
    assert res.max() < 1e-6
    ratio = eps.double().norm(dim=-1) / (0.1 * x0.double().norm())
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=2e-6, atol=0)
    # Both kept directions are used (the draws fill the 2-D span, not a line).
    basis, _ = torch.linalg.qr(span.T)
    ev = torch.linalg.eigvalsh((eps.double() @ basis).T @ (eps.double() @ basis) / n)
    assert ev.min() / ev.max() > 0.6


def test_zero_rank_neighbour_differences_fall_back_to_gaussian():
    # With k=1, a token whose inputs_embeds equals its only neighbour's row has a zero difference.
    w = make_vocab(v=30, d=8)
    noise = InManifoldNoise(w, k=1, ratio=0.1, seed=0, knn_backend="torch")
    nbr = noise.table[:, 0].long()
    ids = torch.tensor([[3, 4, 5, 6], [3, 7, 8, 3]])
    x = w[ids].clone()
    x[0, 0] = w[nbr[3]]  # zero-rank, real
    x[1, 3] = w[nbr[3]]  # zero-rank, real
    x[1, 1] = w[nbr[7]]  # zero-rank, but padding: not counted
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])
    eps = noise(ids, x, mask)
    assert int(noise.fallback_count) == 2
    assert (eps[1, 1] == 0).all()
    for i, j in [(0, 0), (1, 3)]:
        torch.testing.assert_close(eps[i, j].norm(), 0.1 * x[i, j].norm(), rtol=2e-6, atol=0)
        # Gaussian fallback: not along the (zero) neighbour direction of the *real* token row either
        assert abs(torch.nn.functional.cosine_similarity(eps[i, j], w[nbr[3]] - w[3], dim=0)) < 0.99
    # The other tokens are ordinary in-manifold draws along their single direction.
    for i, j in [(0, 1), (0, 2), (0, 3), (1, 2)]:
        direction = w[nbr[ids[i, j]]] - w[ids[i, j]]
        assert abs(torch.nn.functional.cosine_similarity(eps[i, j], direction, dim=0)) > 1 - 1e-5
    noise(ids, x, mask)
    assert int(noise.fallback_count) == 4
    resumed = InManifoldNoise(w, k=1, ratio=0.1, seed=0, knn_backend="torch")
    resumed.load_state_dict(noise.state_dict())
    assert int(resumed.fallback_count) == 4
    # the reference reports which tokens fell back
    xf = x.reshape(-1, 8)
    _, fell_back = reference.in_manifold_noise(xf, w[noise.table[ids.flatten()].long()], torch.randn(8, 1),
                                               torch.randn(8, 8), 0.1, mask.flatten().bool())
    assert fell_back.tolist() == [True, False, False, False, False, False, False, True]


def test_refresh_every_rebuilds_after_embedding_changes():
    emb = nn.Embedding(V, D)
    with torch.no_grad():
        emb.weight.copy_(make_vocab(seed=0))
    noise = InManifoldNoise(emb, k=K, ratio=0.1, seed=0, refresh_every=2, knn_backend="torch")
    old = exact_knn(emb.weight.detach(), K)
    assert torch.equal(noise.table.long(), old)
    with torch.no_grad():
        emb.weight.copy_(make_vocab(seed=1))
    new = exact_knn(emb.weight.detach(), K)
    assert not torch.equal(old, new)
    ids, _, mask = make_batch(emb.weight.detach())
    noise(ids, emb(ids).detach(), mask)                      # step 0 -> 1: table from construction
    assert torch.equal(noise.table.long(), old)
    noise(ids, emb(ids).detach(), mask)                      # step 1 -> 2: 1 call since build, not yet
    assert torch.equal(noise.table.long(), old)
    x = emb(ids).detach()
    eps = noise(ids, x, mask)                                 # step 2: 2 calls since build -> rebuild
    assert torch.equal(noise.table.long(), new)
    real = mask.bool().flatten()
    res = span_residual(eps.reshape(-1, D)[real], x.reshape(-1, D)[real],
                        emb.weight.detach()[new[ids.flatten()[real]]])
    assert res.max() < 1e-5


def test_without_refresh_the_table_is_kept():
    w = make_vocab()
    noise = InManifoldNoise(w, k=K, seed=0, knn_backend="torch")
    table = noise.table.clone()
    w.copy_(make_vocab(seed=9))  # noise holds the tensor itself
    ids, x, mask = make_batch(w)
    for _ in range(3):
        noise(ids, x, mask)
    assert torch.equal(noise.table, table)
    noise.refresh()
    assert torch.equal(noise.table.long(), exact_knn(w, K))


# --------------------------------------------------------------------------------------- randomness

@pytest.mark.parametrize("kind", SAMPLERS)
def test_same_seed_same_sequence_different_seed_differs(kind):
    w = make_vocab()
    ids, x, mask = make_batch(w)
    a, b, c = make_sampler(kind, w, seed=3), make_sampler(kind, w, seed=3), make_sampler(kind, w, seed=4)
    seq_a = [a(ids, x, mask) for _ in range(3)]
    seq_b = [b(ids, x, mask) for _ in range(3)]
    seq_c = [c(ids, x, mask) for _ in range(3)]
    for ea, eb, ec in zip(seq_a, seq_b, seq_c):
        assert torch.equal(ea, eb)
        assert not torch.allclose(ea, ec)
    assert not torch.allclose(seq_a[0], seq_a[1]) and not torch.allclose(seq_a[1], seq_a[2])
    assert a.step == 3


@pytest.mark.parametrize("kind", SAMPLERS)
def test_ddp_ranks_draw_different_noise(kind, monkeypatch):
    import lnsr_fast.noise as noise_mod
    w = make_vocab()
    ids, x, mask = make_batch(w)
    e0 = make_sampler(kind, w)(ids, x, mask)
    monkeypatch.setattr(noise_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(noise_mod.dist, "get_rank", lambda *a, **kw: 1)
    e1 = make_sampler(kind, w)(ids, x, mask)
    assert not torch.allclose(e0, e1)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_resume_from_state_dict(kind):
    w = make_vocab()
    ids, x, mask = make_batch(w)
    a = make_sampler(kind, w, seed=7)
    for _ in range(3):
        a(ids, x, mask)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    # B has A's settings; it resumes A's sequence.
    b = make_sampler(kind, w, seed=7)
    b.load_state_dict(state)
    assert b.step == a.step and b.seed == a.seed and b.ratio == a.ratio
    if kind == "in_manifold":
        assert b.k == a.k and torch.equal(b.table, a.table) and b.table.dtype == torch.int32
        assert int(b.fallback_count) == int(a.fallback_count)
    for _ in range(2):
        assert torch.equal(a(ids, x, mask), b(ids, x, mask))


def test_resume_restores_a_table_that_differs_from_a_rebuild():
    # The checkpoint's table is what B uses, not one B rebuilds from its own embedding.
    w = make_vocab()
    ids, x, mask = make_batch(w)
    a = InManifoldNoise(w, k=K, seed=0, knn_backend="torch")
    a.table = a.table.flip(1).contiguous()  # another valid table: same neighbours, other order
    b = InManifoldNoise(w, k=K, seed=0, knn_backend="torch")
    assert not torch.equal(a(ids, x, mask), b(ids, x, mask))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(ids, x, mask), b(ids, x, mask))


def test_resume_restores_refresh_schedule():
    emb = nn.Embedding(V, D)
    a = InManifoldNoise(emb, k=K, seed=0, refresh_every=3, knn_backend="torch")
    ids, _, mask = make_batch(emb.weight.detach())
    for _ in range(4):  # rebuilt at step 3
        a(ids, emb(ids).detach(), mask)
    state = a.state_dict()
    assert state["table_step"] == 3
    b = InManifoldNoise(emb, k=K, seed=0, refresh_every=3, knn_backend="torch")
    b.load_state_dict(state)
    assert b._table_step == 3


# --------------------------------------------------------------------------------------- reference ops

def test_mgs_orthonormal_and_matches_qr_full_rank():
    g = torch.Generator().manual_seed(0)
    diffs = torch.randn(20, 6, 11, generator=g, dtype=torch.float64)
    q, kept = reference.orthonormal_directions(diffs)
    assert q.dtype == torch.float64 and kept.all()
    eye = torch.eye(6, dtype=torch.float64).expand(20, 6, 6)
    torch.testing.assert_close(q @ q.transpose(1, 2), eye, rtol=0, atol=1e-12)
    q_qr, r = torch.linalg.qr(diffs.transpose(1, 2))  # [N, d, k]; column j spans d_1..d_j as in Gram–Schmidt
    # Gram–Schmidt directions are the QR columns up to sign
    cos = (q * q_qr.transpose(1, 2)).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)


def test_mgs_rank_deficient_keeps_an_orthonormal_basis_of_the_span():
    g = torch.Generator().manual_seed(1)
    n, k, d = 30, 7, 12
    base = torch.randn(n, 3, d, generator=g, dtype=torch.float64)
    mix = torch.randn(n, k, 3, generator=g, dtype=torch.float64)
    diffs = mix @ base  # rank 3 everywhere
    diffs[:, 2] = 2.5 * diffs[:, 0]  # and an exactly collinear column
    diffs[:5, 4] = 0.0  # zero columns
    q, kept = reference.orthonormal_directions(diffs)
    assert (kept.sum(1) == 3).all()
    assert not kept[:, 2].any()
    assert not kept[:5, 4].any()
    assert (q[~kept] == 0).all()
    qk = [q[i][kept[i]] for i in range(n)]
    for i in range(n):
        torch.testing.assert_close(qk[i] @ qk[i].T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
        # same span as the QR of the kept original columns (a dropped column depends on earlier ones)
        q_qr, _ = torch.linalg.qr(diffs[i][kept[i]].T)
        torch.testing.assert_close(qk[i].T @ qk[i], q_qr @ q_qr.T, rtol=0, atol=1e-10)
        # every original column lies in that span
        proj = diffs[i] @ (q_qr @ q_qr.T)
        torch.testing.assert_close(proj, diffs[i], rtol=0, atol=1e-10)


def test_mgs_fp32_input_is_fp32_and_close_to_float64():
    g = torch.Generator().manual_seed(2)
    diffs = torch.randn(50, 5, 9, generator=g)
    q32, kept32 = reference.orthonormal_directions(diffs)
    q64, kept64 = reference.orthonormal_directions(diffs.double())
    assert q32.dtype == torch.float32 and torch.equal(kept32, kept64)
    torch.testing.assert_close(q32.double(), q64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", ["gaussian", "in_manifold"])
def test_reference_fp32_agrees_with_float64(op):
    g = torch.Generator().manual_seed(3)
    n, k, d = 40, 5, 13
    x = torch.randn(n, d, generator=g)
    z = torch.randn(n, k, generator=g)
    fz = torch.randn(n, d, generator=g)
    nbr = x[:, None] + 0.5 * torch.randn(n, k, d, generator=g)
    real = torch.rand(n, generator=g) > 0.2
    if op == "gaussian":
        e32 = reference.gaussian_noise(x, fz, 0.1, real)
        e64 = reference.gaussian_noise(x.double(), fz.double(), 0.1, real)
    else:
        e32, fb32 = reference.in_manifold_noise(x, nbr, z, fz, 0.1, real)
        e64, fb64 = reference.in_manifold_noise(x.double(), nbr.double(), z.double(), fz.double(), 0.1, real)
        assert torch.equal(fb32, fb64) and not fb32.any()
    assert e32.dtype == torch.float32 and e64.dtype == torch.float64
    torch.testing.assert_close(e32.double(), e64, rtol=1e-5, atol=1e-6)
    assert (e64[~real] == 0).all()


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("backend", ["torch"], indirect=True)  # float64 runs on the reference: same draws
def test_sampler_float64_agrees_with_fp32(kind):
    w = make_vocab()
    ids, x, mask = make_batch(w)
    e32 = make_sampler(kind, w)(ids, x, mask)
    e64 = make_sampler(kind, w)(ids, x.double(), mask)
    assert e64.dtype == torch.float64
    torch.testing.assert_close(e32.double(), e64, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind", SAMPLERS)
def test_bad_shapes(kind):
    w = make_vocab()
    noise = make_sampler(kind, w)
    ids, x, mask = make_batch(w)
    with pytest.raises(ValueError, match="input_ids"):
        noise(ids[:, :-1], x, mask)
    with pytest.raises(ValueError, match="input_ids"):
        noise(ids.flatten(), x, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        noise(ids, x, mask[:, :-1])
    with pytest.raises(ValueError, match="attention_mask"):
        noise(ids, x, mask[None])
    with pytest.raises(ValueError, match="inputs_embeds"):
        noise(ids[0, 0], x[0, 0], None)
    with pytest.raises(TypeError, match="attention_mask"):
        noise(ids, x, mask.tolist())


@pytest.mark.parametrize("kind", SAMPLERS)
def test_bad_dtypes(kind):
    w = make_vocab()
    noise = make_sampler(kind, w)
    ids, x, mask = make_batch(w)
    with pytest.raises(TypeError, match="inputs_embeds"):
        noise(ids, x.long(), mask)
    with pytest.raises(TypeError, match="inputs_embeds"):
        noise(ids, x.tolist(), mask)
    with pytest.raises(TypeError, match="input_ids"):
        noise(ids.float(), x, mask)
    with pytest.raises(TypeError, match="input_ids"):
        noise(ids.bool(), x, mask)
    with pytest.raises(TypeError, match="input_ids"):
        noise(ids.tolist(), x, mask)


@pytest.mark.parametrize("bad", [-1, V, V + 100])
def test_ids_outside_vocabulary(bad):
    w = make_vocab()
    noise = make_sampler("in_manifold", w)
    ids, x, mask = make_batch(w)
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\)"):
        noise(ids, x, mask)
    assert noise.step == 0  # a rejected call draws nothing


def test_ids_are_range_checked_once_per_unmodified_tensor(monkeypatch):
    """The check syncs with the device: LNSR's check before embedding covers the sampler's call with the same
    tensor, but an in-place change (or another tensor) is checked again."""
    calls = []
    out_of_range = noise_module._out_of_range
    monkeypatch.setattr(noise_module, "_out_of_range", lambda *a: calls.append(1) or out_of_range(*a))
    w = make_vocab()
    noise = make_sampler("in_manifold", w)
    ids, x, mask = make_batch(w)
    noise_module.check_token_ids(ids, V)
    noise(ids, x, mask)
    assert len(calls) == 1
    noise(ids.clone(), x, mask)
    assert len(calls) == 2
    ids[1, 2] = V
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\)"):
        noise(ids, x, mask)


def test_in_manifold_requires_input_ids():
    w = make_vocab()
    _, x, mask = make_batch(w)
    with pytest.raises(ValueError, match="input_ids"):
        make_sampler("in_manifold", w)(None, x, mask)


def test_width_mismatch():
    w = make_vocab()
    ids, x, mask = make_batch(w)
    with pytest.raises(ValueError, match=f"inputs_embeds has width {D + 1}.*{D}"):
        make_sampler("in_manifold", w)(ids, torch.randn(*ids.shape, D + 1), mask)


@pytest.mark.parametrize("k", [0, -2, V, V + 1])
def test_in_manifold_bad_k(k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        InManifoldNoise(make_vocab(), k=k, knn_backend="torch")


def test_in_manifold_k_not_int():
    with pytest.raises(TypeError, match=r"\bk\b"):
        InManifoldNoise(make_vocab(), k=2.5, knn_backend="torch")


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("ratio, exc", [(0.0, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), ("0.1", TypeError), (None, TypeError),
                                        (True, TypeError)])
def test_bad_ratio(kind, ratio, exc):
    with pytest.raises(exc, match="ratio"):
        make_sampler(kind, ratio=ratio)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_bad_seed(kind):
    with pytest.raises(TypeError, match="seed"):
        make_sampler(kind, seed=1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_embedding_at_construction(bad):
    w = make_vocab()
    w[10, 3] = bad
    with pytest.raises(ValueError, match="embedding"):
        InManifoldNoise(w, k=K, knn_backend="torch")
    emb = nn.Embedding(V, D)
    with torch.no_grad():
        emb.weight[5, 0] = bad
    with pytest.raises(ValueError, match="embedding"):
        InManifoldNoise(emb, k=K, knn_backend="torch")


@pytest.mark.parametrize("emb, exc", [(nn.Linear(3, 4, bias=False), TypeError), (nn.ReLU(), TypeError),
                                      ([[0.0, 1.0]], TypeError), (torch.zeros(V), ValueError),
                                      (torch.arange(12).view(4, 3), TypeError)])
def test_bad_embedding(emb, exc):
    # A Linear has a [4, 3] weight, but its forward is no row lookup: the kernels could not gather from it.
    with pytest.raises(exc, match="embedding"):
        InManifoldNoise(emb, k=2, knn_backend="torch")


@pytest.mark.parametrize("kw, match", [({"refresh_every": 0}, "refresh_every"),
                                       ({"refresh_every": 1.5}, "refresh_every"),
                                       ({"knn_backend": "annoy"}, "knn_backend"),
                                       ({"rank_tol": 1.0}, "rank_tol"), ({"rank_tol": -1e-3}, "rank_tol"),
                                       ({"rank_tol": math.nan}, "rank_tol")])
def test_bad_in_manifold_options(kw, match):
    with pytest.raises(ValueError, match=match):
        InManifoldNoise(make_vocab(), k=K, **{"knn_backend": "torch", **kw})


# ------------------------------------------------------------------------------------ saved sampler state

def _in_manifold_state(**changes):
    state = make_sampler("in_manifold").state_dict()
    state.update(changes)
    return state


def _refused(sampler, state, exc, match):
    """load_state_dict raises and leaves the sampler as it was."""
    before = sampler.state_dict()
    with pytest.raises(exc, match=match):
        sampler.load_state_dict(state)
    after = sampler.state_dict()
    assert before.keys() == after.keys() and all(
        torch.equal(a, after[k]) if isinstance(a, torch.Tensor) else a == after[k] for k, a in before.items())


@pytest.mark.parametrize("table, exc, match", [
    (torch.full((V, K), -1, dtype=torch.int32), ValueError, r"ids in \[-1, -1\], expected ids in \[0, 64\)"),
    (torch.full((V, K), V, dtype=torch.int32), ValueError, r"ids in \[64, 64\]"),
    (torch.zeros(V, K + 1, dtype=torch.int32), ValueError, r"shape \(64, 6\), expected \(64, 5\)"),
    (torch.zeros(V - 1, K, dtype=torch.int32), ValueError, "shape"),
    (torch.zeros(V * K, dtype=torch.int32), ValueError, "shape"),
    (torch.zeros(V, K, dtype=torch.float32), TypeError, "int32 or int64"),
    ([[0] * K] * V, TypeError, "int32 or int64")])
def test_load_state_dict_checks_the_table_against_the_embedding(table, exc, match):
    # A table of -1 made the Triton kernel read before the weight buffer, and the torch one use the last row.
    _refused(make_sampler("in_manifold"), _in_manifold_state(table=table), exc, match)


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("entry, value, exc, match", [
    ("ratio", math.nan, ValueError, r"state\['ratio'\] must be finite"), ("ratio", -1.0, ValueError, "ratio"),
    ("ratio", 1e38, ValueError, "ratio"), ("ratio", "0.1", TypeError, "ratio"),
    ("step", -1, ValueError, r"state\['step'\] must be >= 0"), ("step", 1.5, TypeError, "step"),
    ("seed", "0", TypeError, r"state\['seed'\]")])
def test_load_state_dict_checks_bounds(kind, entry, value, exc, match):
    sampler = make_sampler(kind)
    _refused(sampler, {**sampler.state_dict(), entry: value}, exc, match)


@pytest.mark.parametrize("entry, value, match", [("table_step", 3, "table_step.*after"),
                                                 ("table_step", -1, "table_step"),
                                                 ("fallback_count", -2, "fallback_count")])
def test_load_state_dict_checks_the_in_manifold_counters(entry, value, match):
    _refused(make_sampler("in_manifold"), _in_manifold_state(**{entry: value}), ValueError, match)


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("setting, other", [("seed", 1), ("ratio", 0.2), ("k", 3)])
def test_a_state_of_other_settings_is_an_error_naming_both(kind, setting, other):
    # The state's k / ratio / seed used to override the configured ones silently.
    if kind == "gaussian" and setting == "k":
        pytest.skip("GaussianNoise has no k")
    w = make_vocab()
    state = make_sampler(kind, w, **{setting: other}).state_dict()
    configured = make_sampler(kind, w).state_dict()[setting]
    _refused(make_sampler(kind, w), state, ValueError,
             rf"state\['{setting}'\] is {other!r} but this \w+Noise was built with {setting}={configured!r}")


def test_a_state_of_the_other_sampler_kind_is_a_clear_error():
    gaussian, in_manifold = make_sampler("gaussian"), make_sampler("in_manifold")
    # Used to be a bare KeyError: 'table'.
    _refused(in_manifold, gaussian.state_dict(), ValueError, "state of a GaussianNoise sampler")
    _refused(gaussian, in_manifold.state_dict(), ValueError, "state of an InManifoldNoise sampler")
    _refused(gaussian, [1, 2], TypeError, "dict")


def test_a_resized_vocabulary_needs_a_refresh():
    emb = nn.Embedding(V, D)
    noise = InManifoldNoise(emb, k=K, ratio=0.1, seed=0, knn_backend="torch")
    emb.weight = nn.Parameter(torch.randn(V + 8, D))   # resize_token_embeddings
    ids = torch.tensor([[1, V + 3]])
    with pytest.raises(ValueError, match=f"table has {V} rows but the embedding now has {V + 8}.*refresh"):
        noise(ids, emb(ids).detach())
    noise.refresh()
    assert noise(ids, emb(ids).detach()).shape == (1, 2, D)


# ------------------------------------------------------------------------------------------- bounds

@pytest.mark.parametrize("kind", SAMPLERS)
def test_ratio_has_a_documented_maximum(kind):
    assert make_sampler(kind, ratio=noise_module.MAX_RATIO).ratio == noise_module.MAX_RATIO
    for ratio in (noise_module.MAX_RATIO * 1.01, 1e38):   # 1e38 made ε inf
        with pytest.raises(ValueError, match=r"ratio must be finite and in \(0.0, 10.0\]"):
            make_sampler(kind, ratio=ratio)


@pytest.mark.parametrize("embedding, match", [
    (nn.Embedding(V, 0), r"shape \(64, 0\)"), (torch.zeros(V, 0), r"shape \(64, 0\)"),
    (torch.zeros(0, D), r"shape \(0, 16\)"), (nn.Embedding(V, D, device="meta"), "meta device"),
    (torch.empty(V, D, device="meta"), "meta device")])
def test_empty_and_meta_embeddings_are_refused_at_construction(embedding, match):
    # Used to fail inside torch.unique, .max() or .item().
    with pytest.raises(ValueError, match=rf"embedding .*{match}|{match}"):
        InManifoldNoise(embedding, k=2, knn_backend="torch")


@pytest.mark.parametrize("kind", SAMPLERS)
def test_the_class_passed_instead_of_an_instance_says_so(kind):
    """`LNSR(model, GaussianNoise)` calls the class with the batch: say that, not "ratio must be a float"."""
    cls = GaussianNoise if kind == "gaussian" else InManifoldNoise
    ids, x, mask = make_batch(make_vocab())
    for args in ((ids, x, mask), (ids, x)):
        with pytest.raises(TypeError, match=f"{cls.__name__} was given tensors.*the class itself.*instance"):
            cls(*args)
