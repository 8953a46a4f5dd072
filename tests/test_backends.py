"""Backend dispatch (lnsr_fast/kernels/__init__.py) and the torch.library ops (kernels/ops.py): choice and
errors, opcheck, torch.compile without graph breaks, and the samplers / penalty agreeing on every
backend the machine offers (the Triton interpreter on the CPU, where tests/conftest.py enables it)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import lnsr_fast as lf
from lnsr_fast import kernels
from lnsr_fast.kernels import ops, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = kernels.available_backends(DEVICE)


def _inputs(n=11, d=24, v=40, k=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g).to(DEVICE, dtype)
    ids = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    table = lf.build_neighbor_table(weight.float(), k, backend="torch").to(DEVICE)
    real = (torch.rand(n, generator=g) > 0.3).to(DEVICE)
    return weight[ids].clone(), ids, table, weight, real


def _hidden(b=3, t=5, d=24, layers=3, seed=0, dtype=torch.float32):
    """Concat-mode hidden states: layer r is one [2B, T, d] tensor whose halves are clean and noisy."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(2 * b, t, d, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(layers)]
    mask = torch.ones(b, t, dtype=torch.long, device=DEVICE)
    mask[0, -2:] = 0
    return hs, mask


# ------------------------------------------------------------------------------------------ choosing

def test_torch_is_always_available_and_last():
    assert BACKENDS[-1] == "torch"
    assert kernels.available_backends("cpu")[-1] == "torch"


def test_auto_never_picks_the_interpreter_on_the_cpu():
    assert kernels.resolve_backend("auto", "cpu") == "torch"


def test_auto_takes_torch_for_float64():
    assert kernels.resolve_backend("auto", DEVICE, torch.float64) == "torch"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_named_backend_refuses_float64(backend):
    with pytest.raises(ValueError, match="float64"):
        kernels.resolve_backend(backend, DEVICE, torch.float64)


def test_unknown_backend_is_refused_everywhere():
    x, ids, table, weight, real = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("numba", "cpu")
    with pytest.raises(ValueError, match="backend"):
        lf.GaussianNoise(backend="numba")
    with pytest.raises(ValueError, match="backend"):
        lf.InManifoldNoise(weight, k=3, backend="numba")
    hs, mask = _hidden()
    with pytest.raises(ValueError, match="backend"):
        lf.layerwise_stability([hs[0][:3]], [hs[0][3:]], mask, backend="numba")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU machine the CUDA backend may be available")
def test_unavailable_backend_says_why():
    with pytest.raises(ValueError, match=r"backend='cuda' is not available on cpu: .*CUDA"):
        kernels.resolve_backend("cuda", "cpu")
    x, ids, table, weight, real = _inputs()
    noise = lf.InManifoldNoise(weight.cpu(), k=3, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        noise(ids.cpu()[None], x.cpu()[None])


# ------------------------------------------------------------------------------------------ the ops

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, ids, table, weight, real = _inputs()
    hs, mask = _hidden()
    real_bt = mask.bool()
    clean, noisy = [h[:3].detach().requires_grad_() for h in hs], [h[3:].detach().requires_grad_() for h in hs]
    checks = [
        (ops.gaussian_noise, (x, real, 0.05, 7, backend)),
        (ops.in_manifold_noise, (x, ids, table, weight, real, 0.1, 1e-4, 7, 1.0, backend)),
        (ops.layerwise_stability, (clean, noisy, real_bt, [1.0, 0.5, 2.0], "sum", backend)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_is_bit_identical_and_seed_matters(backend):
    x, ids, table, weight, real = _inputs()
    a = ops.in_manifold_noise(x, ids, table, weight, real, 0.1, 1e-4, 123, 1.0, backend)
    b = ops.in_manifold_noise(x, ids, table, weight, real, 0.1, 1e-4, 123, 1.0, backend)
    c = ops.in_manifold_noise(x, ids, table, weight, real, 0.1, 1e-4, 124, 1.0, backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g1, g2 = (ops.gaussian_noise(x, real, 0.05, s, backend) for s in (5, 5))
    assert torch.equal(g1, g2) and not torch.equal(g1, ops.gaussian_noise(x, real, 0.05, 6, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_penalty_forward_and_backward_match_float64_reference(backend, dtype):
    """The public function on every backend against autograd through the float64 reference."""
    hs, mask = _hidden(dtype=dtype, d=40)
    weights = [0.5, 1.0, 2.0]
    for reduction in ("sum", "mean"):
        reg = lf.layerwise_stability([h[:3] for h in hs], [h[3:] for h in hs], mask, weights, reduction,
                                     backend=backend)
        grads = torch.autograd.grad(reg * 3.0, hs)
        h64 = [h.detach().double().requires_grad_() for h in hs]
        ref = reference.layerwise_stability([h[:3] for h in h64], [h[3:] for h in h64], mask.bool(), weights,
                                            reduction)
        ref_grads = torch.autograd.grad(ref * 3.0, h64)
        assert reg.dtype == torch.float32
        torch.testing.assert_close(reg.double(), ref, rtol=1e-5, atol=1e-6)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())


# ------------------------------------------------------------------------------------------ torch.compile

def test_penalty_compiles_without_graph_breaks():
    hs, mask = _hidden()

    def penalty(hs, mask):
        return lf.layerwise_stability([h[:3] for h in hs], [h[3:] for h in hs], mask, [1.0, 0.5, 2.0], backend="torch")

    results = []
    for fn in (penalty, torch.compile(penalty, fullgraph=True, backend="aot_eager")):
        reg = fn(hs, mask)
        results.append((reg.detach(), torch.autograd.grad(reg, hs)))  # the backward of the compiled graph
    (reg, grads), (reg_c, grads_c) = results
    torch.testing.assert_close(reg_c, reg)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)


def test_noise_ops_compile_without_graph_breaks():
    x, ids, table, weight, real = _inputs()

    def noise(x, ids):
        eps, fell_back = ops.in_manifold_noise(x, ids, table, weight, real, 0.1, 1e-4, 3, 1.0, "torch")
        return x + eps + ops.gaussian_noise(x, real, 0.05, 3, "torch"), fell_back

    compiled = torch.compile(noise, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, ids), noise(x, ids)):
        torch.testing.assert_close(got, want)


def test_compiled_model_trains_through_lnsr():
    """torch.compile(model) of a model LNSR is applied to: the same loss, penalty and gradients as the eager model."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    model = BertForSequenceClassification(config).train()
    ids = torch.randint(1, 50, (3, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1])}
    results = []
    for wrap in (lambda m: m, lambda m: torch.compile(m, backend="aot_eager")):
        model.zero_grad()
        noise = lf.InManifoldNoise(model.get_input_embeddings(), k=3, seed=0, knn_backend="torch")
        handle = lf.apply(model, lf.LNSRConfig(noise=noise, weight=0.5))
        out = wrap(model)(**batch)
        out.loss.backward()
        lf.remove(model)
        results.append((out.loss.detach(), handle.last["lnsr_penalty"], [p.grad.clone() for p in model.parameters()]))
    (loss, reg, grads), (loss_c, reg_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(reg_c, reg)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
