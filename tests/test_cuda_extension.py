"""The CUDA backend (lnsr_fast/csrc/, kernels/cuda.py): argument checks wherever it is built (`make
cuda-compile`), results against kernels/reference.py in float64 on a CUDA device; its refusal, with the
reason, where it is not built and cannot be compiled."""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import sys

import pytest
import torch


def _load_extension():
    """(lnsr_fast._C, None), or (None, why it is missing)."""
    build = os.environ.get("LNSR_FAST_CUDA_BUILD")
    if build:  # make cuda-compile's build dir, kept out of the package that the CPU venv imports
        paths = glob.glob(os.path.join(build, "lnsr_fast", "_C.*.so"))
        assert len(paths) == 1, f"expected one lnsr_fast/_C.*.so under LNSR_FAST_CUDA_BUILD={build}, found {paths}"
        spec = importlib.util.spec_from_file_location("lnsr_fast._C", paths[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["lnsr_fast._C"] = module  # where kernels/cuda.py imports it from
        return module, None
    try:
        import lnsr_fast._C as module
    except (ImportError, OSError) as e:
        return None, f"the CUDA extension lnsr_fast._C is not built here ({e}); `make cuda-compile` builds and tests it"
    return module, None


_C, _MISSING = _load_extension()

from lnsr_fast.kernels import cuda, reference  # noqa: E402  (after lnsr_fast._C is registered)

built = pytest.mark.skipif(_C is None, reason=str(_MISSING))
gpu = pytest.mark.skipif(_C is None or not torch.cuda.is_available(), reason=str(_MISSING or "needs a CUDA device"))
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.mark.skipif(_C is not None or torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_without_the_extension_the_backend_says_why_and_refuses():
    assert not cuda.is_available()
    assert cuda.unavailable_reason() == "torch sees no CUDA device"
    with pytest.raises(RuntimeError, match=r"lnsr_fast._C is not built .* cannot be compiled here: torch .* is a CPU "
                                           r"build"):
        cuda.stability_forward([torch.zeros(1, 2)], [torch.zeros(1, 2)], None, [1.0], "sum")


def test_the_build_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("LNSR_FAST_CUDA", "0")
    assert cuda._build_reason() == "LNSR_FAST_CUDA=0 turns the CUDA extension off"
    monkeypatch.delenv("LNSR_FAST_CUDA")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda._build_reason().endswith("is a CPU build")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", None)
    assert cuda._build_reason().startswith("no CUDA toolkit (nvcc) found")


# ------------------------------------------------------------------------------ argument checks (no GPU)

def noise_args(n=5, d=12, k=3, vocab=20, **changes):
    """Valid arguments of in_manifold_noise except for the device (CPU), with `changes` applied."""
    args = dict(x=torch.randn(n, d), ids=torch.randint(0, vocab, (n,)),
                table=torch.randint(0, vocab, (vocab, k), dtype=torch.int32), weight=torch.randn(vocab, d),
                ratio=0.1, rank_tol=1e-4, seed=0, real=None, embed_scale=1.0, z=None, fallback_z=None)
    args.update(changes)
    return args


NOISE_ERRORS = [
    (noise_args(), ValueError, r"x must be a CUDA tensor, got a tensor on cpu"),
    (noise_args(x=torch.randn(5, 12, dtype=F64)), TypeError, r"x must be float32, bfloat16 or float16, got float64"),
    (noise_args(x=torch.randn(60)), ValueError, r"x must be \[N, d\] with d > 0, got shape \[60\]"),
    (noise_args(ids=torch.zeros(5, dtype=torch.int32)), TypeError, r"ids must be int64, got int32"),
    (noise_args(ids=torch.zeros(4, dtype=torch.long)), ValueError, r"ids must have shape \[5\], got \[4\]"),
    (noise_args(table=torch.zeros(20, 3, dtype=torch.long)), TypeError, r"table must be int32, got int64"),
    (noise_args(table=torch.zeros(20, 33, dtype=torch.int32)), ValueError, r"table must have 1 to 32 neighbours per row, got k=33"),
    (noise_args(d=8193, k=32), ValueError, r"x has width d=8193 but the CUDA kernel takes d <= 8192"),
    (noise_args(weight=torch.randn(20, 11)), ValueError, r"weight must be \[V, 12\] \(x's width\), got shape \[20, 11\]"),
    (noise_args(weight=torch.zeros(20, 12, dtype=torch.long)), TypeError, r"weight must be float32, bfloat16 or float16, got int64"),
    (noise_args(weight=torch.randn(21, 12)), ValueError, r"table must have one row per row of weight \(21\), got 20"),
    (noise_args(real=torch.ones(5, dtype=torch.long)), TypeError, r"real must be bool, got int64"),
    (noise_args(real=torch.ones(6, dtype=torch.bool)), ValueError, r"real must have shape \[5\], got \[6\]"),
    (noise_args(z=torch.randn(5, 3)), ValueError, r"z and fallback_z must both be given or both be None, got z only"),
    (noise_args(fallback_z=torch.randn(5, 12)), ValueError, r"got fallback_z only"),
    (noise_args(z=torch.randn(5, 4), fallback_z=torch.randn(5, 12)), ValueError, r"z must have shape \[5, 3\], got \[5, 4\]"),
    (noise_args(z=torch.randn(5, 3), fallback_z=torch.randn(5, 12, dtype=F16)), TypeError, r"fallback_z must be float32, got float16"),
    (noise_args(ratio=0.0), ValueError, r"ratio must be finite and > 0, got 0"),
    (noise_args(ratio=math.nan), ValueError, r"ratio must be finite and > 0, got nan"),
    (noise_args(rank_tol=1.0), ValueError, r"rank_tol must be in \[0, 1\), got 1"),
    (noise_args(embed_scale=math.inf), ValueError, r"embed_scale must be finite, got inf"),
    (noise_args(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    (noise_args(x=torch.randn(12, 5).t()), ValueError, r"x must be contiguous"),
    (noise_args(weight=torch.randn(12, 20).t()), ValueError, r"weight must be contiguous"),
]


@built
@pytest.mark.parametrize("args,error,message", NOISE_ERRORS)
def test_in_manifold_noise_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.in_manifold_noise(**args)


def layers(widths=(12, 7), tokens=(2, 3), dtype=F32):
    clean = [torch.randn(*tokens, d, dtype=dtype) for d in widths]
    return clean, [h.clone() for h in clean]


def stability_errors():
    c, n = layers()
    real = torch.ones(2, 3, dtype=torch.bool)
    many = [torch.randn(2, 3, 4) for _ in range(65)]
    return [
        ((c, n, real, [1.0, 1.0], "sum"), ValueError, r"clean\[0\] must be a CUDA tensor, got a tensor on cpu"),
        (([], [], None, [], "sum"), ValueError, r"clean must hold at least one layer"),
        ((many, many, None, [1.0] * 65, "sum"), ValueError, r"clean has 65 layers; one launch takes at most 64"),
        ((c, n[:1], real, [1.0, 1.0], "sum"), ValueError, r"noisy must have as many layers as clean \(2\), got 1"),
        ((c, n, real, [1.0], "sum"), ValueError, r"weights must have one entry per layer \(2\), got 1"),
        ((c, n, real, [1.0, 1.0], "max"), ValueError, r"reduction must be 'sum' or 'mean', got 'max'"),
        ((c, n, real, [1.0, math.nan], "sum"), ValueError, r"weights\[1\] must be finite, got nan"),
        (([c[0], torch.randn(2, 4, 7)], n, real, [1.0, 1.0], "sum"), ValueError,
         r"clean\[1\] must be \[\.\.\., d\] with token shape \[2, 3\] \(clean\[0\]'s\), got shape \[2, 4, 7\]"),
        ((c, [n[0], torch.randn(2, 3, 8)], real, [1.0, 1.0], "sum"), ValueError,
         r"noisy\[1\] must have shape \[2, 3, 7\], got \[2, 3, 8\]"),
        (([c[0], c[1].long()], n, real, [1.0, 1.0], "sum"), TypeError, r"clean\[1\] must be float32, bfloat16 or float16, got int64"),
        ((c, n, real.long(), [1.0, 1.0], "sum"), TypeError, r"real must be bool, got int64"),
        ((c, n, real[:1], [1.0, 1.0], "sum"), ValueError, r"real must have shape \[2, 3\], got \[1, 3\]"),
        ((c, [n[0], torch.randn(2, 3, 14)[..., ::2]], real, [1.0, 1.0], "sum"), ValueError, r"noisy\[1\] must be contiguous"),
    ]


@built
@pytest.mark.parametrize("case", range(len(stability_errors())))
def test_stability_forward_and_backward_check_their_arguments(case):
    args, error, message = stability_errors()[case]
    with pytest.raises(error, match=message):
        _C.stability_forward(*args)
    with pytest.raises(error, match=message):
        _C.stability_backward(torch.tensor(1.0), *args, None, None)


GAUSSIAN_ERRORS = [
    (dict(x=torch.randn(5, 12)), ValueError, r"x must be a CUDA tensor, got a tensor on cpu"),
    (dict(x=torch.randn(5, 12, dtype=F64)), TypeError, r"x must be float32, bfloat16 or float16, got float64"),
    (dict(x=torch.randn(5, 8193)), ValueError, r"x has width d=8193 but the CUDA kernel takes d <= 8192"),
    (dict(real=torch.ones(4, dtype=torch.bool)), ValueError, r"real must have shape \[5\], got \[4\]"),
    (dict(z=torch.randn(5, 11)), ValueError, r"z must have shape \[5, 12\], got \[5, 11\]"),
    (dict(z=torch.randn(5, 12, dtype=F16)), TypeError, r"z must be float32, got float16"),
    (dict(ratio=-1.0), ValueError, r"ratio must be finite and > 0, got -1"),
    (dict(seed=-3), ValueError, r"seed must be in \[0, 2\*\*63\), got -3"),
]


@built
@pytest.mark.parametrize("changes,error,message", GAUSSIAN_ERRORS)
def test_gaussian_noise_checks_its_arguments(changes, error, message):
    args = dict(x=torch.randn(5, 12), ratio=0.1, seed=0, real=None, z=None)
    with pytest.raises(error, match=message):
        _C.gaussian_noise(**{**args, **changes})


@built
def test_stability_backward_checks_the_dtype_of_the_gradients_it_writes():
    c, n = layers()
    with pytest.raises(TypeError, match=r"grads_noisy\[1\] must be float32, got float64"):
        _C.stability_backward(torch.tensor(1.0), c, n, None, [1.0, 1.0], "sum", None, [n[0], n[1].double()])


@built
@pytest.mark.parametrize("grads,message", [
    (lambda c, n: ([c[0]], None), r"grads_clean must have one tensor per layer \(2\), got 1"),
    (lambda c, n: ([c[0][:1], c[1]], None), r"grads_clean\[0\] must hold whole rows of width 12, at least 6 of them"),
    (lambda c, n: ([torch.randn(3, 3, 12), c[1]], None), r"grads_clean\[1\] must have as many rows as grads_clean\[0\]"),
    (lambda c, n: (None, [n[0], torch.randn(2, 3, 8)]), r"grads_noisy\[1\] must have shape \[2, 3, 7\]"),
    (lambda c, n: (None, [n[0], torch.randn(2, 3, 14)[..., ::2]]), r"grads_noisy\[1\] must be contiguous"),
])
def test_stability_backward_checks_the_gradients_it_writes(grads, message):
    c, n = layers()
    with pytest.raises(ValueError, match=message):
        _C.stability_backward(torch.tensor(1.0), c, n, None, [1.0, 1.0], "sum", *grads(c, n))


@built
@pytest.mark.parametrize("grad,error,message", [
    (torch.tensor(1.0, dtype=F64), TypeError, r"grad must be float32, got float64"),
    (torch.ones(1), ValueError, r"grad must be a 0-dim tensor, got shape \[1\]"),
])
def test_stability_backward_checks_grad(grad, error, message):
    c, n = layers()
    with pytest.raises(error, match=message):
        _C.stability_backward(grad, c, n, None, [1.0, 1.0], "sum", None, None)


@built
def test_wrapper_module_loads_the_extension_and_passes_arguments_through():
    assert cuda.is_available() == torch.cuda.is_available()
    assert cuda.unavailable_reason() == ("" if torch.cuda.is_available() else "torch sees no CUDA device")
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor"):
        cuda.in_manifold_noise(**noise_args())
    c, n = layers()
    with pytest.raises(ValueError, match=r"clean\[0\] must be a CUDA tensor"):
        cuda.stability_forward(tuple(c), tuple(n), None, (1, 2), "sum")
    with pytest.raises(ValueError, match=r"clean\[0\] must be a CUDA tensor"):
        cuda.stability_backward(torch.tensor(1.0), tuple(c), tuple(n), None, (1, 2), "mean", None, tuple(n))
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor"):
        cuda.gaussian_noise(torch.randn(3, 4), 0.1, 0)


# ------------------------------------------------------------------------------ results (CUDA device)

# Max error of ε, relative to its row's scale, after rounding to each dtype.
TOL = {F32: 1e-4, BF16: 1e-2, F16: 2e-3}
# Gradients: relative error of one rounding to the dtype, plus fp16's subnormal spacing.
GRAD_RTOL = {F32: 1e-5, BF16: 8e-3, F16: 1e-3}
GRAD_ATOL = {F32: 0.0, BF16: 0.0, F16: 2.0 ** -24}


def noise_problem(n, d, k, x_dtype, w_dtype, embed_scale, seed=0, vocab=300):
    """Inputs on the GPU with padding (NaN/Inf at padded x), one token whose neighbours all equal it
    (fallback), one with duplicated neighbours (rank-deficient) and random neighbours elsewhere."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g)
    weight[0] = torch.randint(-8, 8, (d,), generator=g) / 4  # exact in every dtype, also times 2
    table = torch.randint(2, vocab, (vocab, k), generator=g, dtype=torch.int32)
    table[0] = 0
    table[1, 1::2] = table[1, 0]  # directions 1, 3, ... repeat direction 0
    ids = torch.randint(0, vocab, (n,), generator=g)
    ids[:2] = torch.tensor([0, 1])
    weight = weight.to(w_dtype)
    x = (embed_scale * weight[ids].float()).to(x_dtype)
    x[2:] += (0.1 * torch.randn(n - 2, d, generator=g)).to(x_dtype)
    real = torch.rand(n, generator=g) > 0.2
    real[:2] = True
    x[~real] = torch.where(torch.rand(d, generator=g) > 0.5, math.nan, math.inf).to(x_dtype)
    z = torch.randn(n, k, generator=g)
    fallback_z = torch.randn(n, d, generator=g)
    dev = "cuda"
    return dict(x=x.to(dev), ids=ids.to(dev), table=table.to(dev), weight=weight.to(dev), real=real.to(dev),
                z=z.to(dev), fallback_z=fallback_z.to(dev), embed_scale=embed_scale)


def reference_noise(p, ratio, rank_tol):
    rows = (p["embed_scale"] * p["weight"].double())[p["table"][p["ids"]].long()]
    return reference.in_manifold_noise(p["x"].double(), rows, p["z"].double(), p["fallback_z"].double(), ratio,
                                       p["real"], rank_tol)


def assert_rows_close(eps, expected, x, real, ratio, tol):
    scale = ratio * x.double().nan_to_num(0.0, 0.0, 0.0).norm(dim=-1).clamp_min(1e-30)
    err = (eps.double() - expected).norm(dim=-1) / scale
    assert bool((eps[~real] == 0).all()), "padding must get exactly 0"
    assert float(err[real].max()) <= tol, f"worst token {int(err.argmax())}: relative error {float(err.max()):.3g} > {tol}"


@gpu
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32)])
@pytest.mark.parametrize("n,d,k,embed_scale", [
    (37, 771, 10, 1.0), (64, 768, 10, 2.0), (19, 64, 1, 1.0), (11, 5, 8, 1.0), (23, 4096, 8, 1.0),
    (17, 2048, 16, 2.0), (13, 1024, 32, 1.0), (9, 130, 3, 1.0),
])
def test_in_manifold_noise_matches_reference(x_dtype, w_dtype, n, d, k, embed_scale):
    p = noise_problem(n, d, k, x_dtype, w_dtype, embed_scale)
    ratio, rank_tol = 0.1, 1e-4
    eps, fell_back = _C.in_manifold_noise(p["x"], p["ids"], p["table"], p["weight"], ratio, rank_tol, 5, p["real"],
                                          embed_scale, p["z"], p["fallback_z"])
    expected, expected_fell_back = reference_noise(p, ratio, rank_tol)
    assert eps.dtype == x_dtype and eps.shape == (n, d) and fell_back.dtype == torch.bool
    assert fell_back.tolist() == expected_fell_back.tolist()
    assert bool(fell_back[0]) and not bool(fell_back[1])
    assert_rows_close(eps, expected, p["x"], p["real"], ratio, TOL[x_dtype])


def assert_isotropic(eps):
    """Directions of Gaussian draws are uniform on the sphere: per axis mean 0 and second moment 1/d
    (bounds at about 5 standard errors)."""
    n, d = eps.shape
    u = eps.double() / eps.double().norm(dim=-1, keepdim=True)
    assert float(u.mean(0).abs().max()) < 5 / math.sqrt(d * n)
    torch.testing.assert_close(u.pow(2).mean(0), torch.full((d,), 1 / d, dtype=F64, device=eps.device), rtol=0.15, atol=0)


@gpu
@pytest.mark.parametrize("n,d,k", [(2000, 8, 8), (1500, 768, 10)])
def test_generated_noise_is_reproducible_gaussian_and_inside_the_span(n, d, k):
    g = torch.Generator().manual_seed(1)
    vocab = 50
    weight = torch.randn(vocab, d, generator=g).cuda()
    scores = torch.rand(vocab, vocab, generator=g).fill_diagonal_(2.0)  # k distinct neighbours, never the row itself
    table = scores.argsort(dim=1)[:, :k].int().cuda()
    ids = torch.randint(0, vocab, (n,), generator=g).cuda()
    x = weight[ids].clone()
    real = torch.ones(n, dtype=torch.bool, device="cuda")
    real[::7] = False
    run = lambda seed: _C.in_manifold_noise(x, ids, table, weight, 0.1, 1e-4, seed, real)  # noqa: E731
    eps, fell_back = run(123)
    again, _ = run(123)
    other, _ = run(124)
    assert torch.equal(eps, again), "the same seed must give the same bits"
    assert not torch.equal(eps, other)
    assert bool((eps[~real] == 0).all())
    norms = eps[real].double().norm(dim=-1)
    torch.testing.assert_close(norms, 0.1 * x[real].double().norm(dim=-1), rtol=1e-5, atol=0)
    # ε_t lies in span{e_nbr − x_t}: nothing is left after projecting it onto that span.
    diffs = (weight[table[ids].long()] - x[:, None, :]).double()
    q, _ = torch.linalg.qr(diffs.transpose(1, 2))
    e = eps.double()
    residual = e - (q @ (q.transpose(1, 2) @ e[..., None]))[..., 0]
    assert float((residual.norm(dim=-1)[real] / norms.clamp_min(1e-30)).max()) < 1e-4
    if d == k:  # the differences span R^d: ε_t = Q_t z_t is isotropic, its direction uniform on the sphere
        assert_isotropic(eps[real])


@gpu
def test_generated_fallback_noise_is_gaussian():
    n, d, k = 3000, 16, 4
    weight = torch.ones(1, d, device="cuda")
    table = torch.zeros(1, k, dtype=torch.int32, device="cuda")
    x = torch.ones(n, d, device="cuda")  # every neighbour equals x: no direction, Gaussian fallback
    eps, fell_back = _C.in_manifold_noise(x, torch.zeros(n, dtype=torch.long, device="cuda"), table, weight, 0.5, 1e-4, 3)
    assert bool(fell_back.all())
    torch.testing.assert_close(eps.norm(dim=-1), torch.full((n,), 0.5 * 4.0, device="cuda"), rtol=1e-5, atol=0)
    assert_isotropic(eps)


@gpu
def test_in_manifold_noise_checks_devices():
    p = noise_problem(5, 12, 3, F32, F32, 1.0)
    with pytest.raises(ValueError, match=r"ids must be on x's device cuda:\d, got cpu"):
        _C.in_manifold_noise(p["x"], p["ids"].cpu(), p["table"], p["weight"], 0.1, 1e-4, 0)


def stability_problem(widths, b, t, dtypes, mask, seed=0):
    """Concat-mode layers: clean/noisy are views h[:b], h[b:] of one [2b, t, d] tensor; padding holds NaN/Inf."""
    g = torch.Generator().manual_seed(seed)
    real = {"none": None, "some": torch.rand(b, t, generator=g) > 0.3, "all_padding": torch.zeros(b, t, dtype=torch.bool)}[mask]
    clean, noisy = [], []
    for d, dtype in zip(widths, dtypes):
        h = torch.randn(b, t, d, generator=g)
        h = torch.cat([h, h + 0.3 * torch.randn(b, t, d, generator=g)])
        if real is not None:
            pad = torch.cat([~real, ~real])
            h[pad] = torch.where(torch.rand(d, generator=g) > 0.5, math.nan, -math.inf)
        h = h.to(dtype).cuda()
        clean.append(h[:b])
        noisy.append(h[b:])
    return clean, noisy, None if real is None else real.cuda()


def expected_grads(grad, clean, noisy, real, weights, reduction):
    """The contract's formula in float64: 2·grad·w/(max(#real, 1) [·d]) · (h − h̃), 0 at padding."""
    n_real = clean[0].shape[:-1].numel() if real is None else int(real.sum())
    out = []
    for h, hn, w in zip(clean, noisy, weights):
        g = 2 * float(grad) * w / max(n_real, 1) * (h.double() - hn.double())
        g = g / h.shape[-1] if reduction == "mean" else g
        out.append(g if real is None else torch.where(real[..., None], g, 0.0))
    return out


@gpu
@pytest.mark.parametrize("mask", ["none", "some", "all_padding"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtypes", [(F32,) * 3, (BF16,) * 3, (F16,) * 3, (F32, BF16, F16)])
def test_stability_matches_reference_forward_and_backward(dtypes, reduction, mask):
    widths, weights = (771, 768, 64), [0.5, 1.0, 2.0]
    clean, noisy, real = stability_problem(widths, 3, 37, dtypes, mask)
    out = _C.stability_forward(clean, noisy, real, weights, reduction)
    expected = reference.layerwise_stability([h.double() for h in clean], [h.double() for h in noisy], real, weights,
                                             reduction)
    assert out.dtype == F32 and out.dim() == 0
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(out, _C.stability_forward(clean, noisy, real, weights, reduction))
    grad = torch.tensor(0.7, device="cuda")
    grads_clean, grads_noisy = [torch.full_like(h, math.nan) for h in clean], [torch.full_like(h, math.nan) for h in noisy]
    _C.stability_backward(grad, clean, noisy, real, weights, reduction, grads_clean, grads_noisy)
    for h, hn, gc, gn, want in zip(clean, noisy, grads_clean, grads_noisy,
                                   expected_grads(grad, clean, noisy, real, weights, reduction)):
        assert gc.dtype == h.dtype and gn.dtype == hn.dtype and gc.shape == h.shape
        tol = dict(rtol=GRAD_RTOL[h.dtype], atol=GRAD_ATOL[h.dtype] + 1e-6 * float(want.abs().max()))
        torch.testing.assert_close(gc.double(), want, **tol)
        torch.testing.assert_close(gn.double(), -want, **tol)


@gpu
def test_stability_is_bit_reproducible_over_many_blocks():
    clean, noisy, real = stability_problem((1024,) * 4, 16, 512, (BF16,) * 4, "some", seed=3)
    out = _C.stability_forward(clean, noisy, real, [1.0] * 4, "sum")
    for _ in range(3):
        assert torch.equal(out, _C.stability_forward(clean, noisy, real, [1.0] * 4, "sum"))
    expected = reference.layerwise_stability([h.double() for h in clean], [h.double() for h in noisy], real, [1.0] * 4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


@gpu
def test_stability_checks_devices():
    clean, noisy, real = stability_problem((8,), 2, 3, (F32,), "some")
    with pytest.raises(ValueError, match=r"real must be on clean\[0\]'s device cuda:\d, got cpu"):
        _C.stability_forward(clean, noisy, real.cpu(), [1.0], "sum")


@gpu
@pytest.mark.parametrize("rows,clean_zero", [(6, False), (8, True), (9, False)])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_concat_mode_backward_writes_one_gradient_per_layer(rows, clean_zero, dtype):
    """grads_clean from a concat-mode gradient's first row: the paired rows' gradient (or zeros), zeros in
    the rows between the blocks; grads_noisy its last rows; every element written (NaN-filled before)."""
    pairs, t, weights = 3, 37, [0.5, 2.0]
    g = torch.Generator().manual_seed(rows)
    real = (torch.rand(pairs, t, generator=g) > 0.2).cuda()
    hidden = [torch.randn(rows, t, d, generator=g).to(dtype).cuda() for d in (771, 64)]
    clean, noisy = [h[:pairs] for h in hidden], [h[rows - pairs:] for h in hidden]
    grads = [torch.full_like(h, math.nan) for h in hidden]
    grad = torch.tensor(1.3, device="cuda")
    _C.stability_backward(grad, clean, noisy, real, weights, "sum", [gr[:rows - pairs] for gr in grads],
                          [gr[rows - pairs:] for gr in grads], clean_zero)
    expected = reference.layerwise_stability_concat_backward(grad.double(), [h.double() for h in hidden], pairs, real,
                                                             weights, "sum", clean_zero)
    for got, want in zip(grads, expected):
        tol = dict(rtol=GRAD_RTOL[dtype], atol=1e-6 * float(want.abs().max()))
        torch.testing.assert_close(got.double(), want, **tol)
        assert bool((got[pairs:rows - pairs] == 0).all())


@gpu
@pytest.mark.parametrize("n,d", [(37, 771), (64, 768), (5, 8192), (9, 3)])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_gaussian_noise_matches_reference(n, d, dtype):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=g).to(dtype)
    real = torch.rand(n, generator=g) > 0.2
    x[~real] = math.nan
    z = torch.randn(n, d, generator=g)
    x, real, z = x.cuda(), real.cuda(), z.cuda()
    eps = _C.gaussian_noise(x, 0.05, 0, real, z)
    expected = reference.gaussian_noise(x.double(), z.double(), 0.05, real)
    assert eps.dtype == dtype and eps.shape == (n, d)
    assert_rows_close(eps, expected, x, real, 0.05, TOL[dtype])
    again = _C.gaussian_noise(x, 0.05, 11, real)
    assert torch.equal(again, _C.gaussian_noise(x, 0.05, 11, real)), "the same seed must give the same bits"
    assert not torch.equal(again, _C.gaussian_noise(x, 0.05, 12, real))
    torch.testing.assert_close(again[real].double().norm(dim=-1), 0.05 * x[real].double().norm(dim=-1), rtol=2e-2,
                               atol=0)


@gpu
def test_generated_gaussian_noise_is_gaussian():
    x = torch.ones(3000, 16, device="cuda")
    assert_isotropic(_C.gaussian_noise(x, 0.5, 3))
