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


def test_older_call_form_still_resolves():
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    assert kernels.resolve_backend("auto", "cpu", torch.float32) == "torch"


@pytest.fixture()
def gpu_with_every_backend(monkeypatch):
    """A CUDA device on which Triton and the CUDA extension run (dispatch only: nothing is launched)."""
    monkeypatch.setattr(kernels, "_runs_on", lambda backend, device: True)
    return torch.device("cuda")


def test_auto_takes_the_preferred_backend_that_has_the_op_and_takes_the_sizes(gpu_with_every_backend, monkeypatch):
    gpu = gpu_with_every_backend
    monkeypatch.setitem(kernels.AUTO_ORDER, "in_manifold_noise", ("cuda", "triton", "torch"))
    assert kernels.resolve_backend("auto", gpu, op="in_manifold_noise", d=768, k=10) == "cuda"
    assert kernels.resolve_backend("auto", gpu, op="gaussian_noise", d=768) == "triton"
    assert kernels.resolve_backend("auto", gpu, op="in_manifold_noise", d=768, k=kernels.MAX_K + 1) == "torch"
    assert kernels.resolve_backend("auto", gpu, op="layerwise_stability", d=kernels.MAX_WIDTH + 1) == "torch"
    monkeypatch.setitem(kernels.LIMITS, "cuda", {op: lim for op, lim in kernels.LIMITS["cuda"].items()
                                                 if op != "in_manifold_noise"})
    assert kernels.resolve_backend("auto", gpu, op="in_manifold_noise", d=768, k=10) == "triton"
    with pytest.raises(ValueError, match=r"backend='cuda' does not implement in_manifold_noise; backends that do: "
                                         r"\['triton', 'torch'\]"):
        kernels.resolve_backend("cuda", gpu, op="in_manifold_noise", d=768, k=10)
    with pytest.raises(ValueError, match="backend='cuda' does not implement in_manifold_noise"):
        ops._kernels("cuda", "in_manifold_noise")
    with pytest.raises(ValueError, match="does not implement"):  # op=None: the backend must have every op
        kernels.resolve_backend("cuda", gpu)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sizes_beyond_a_backend_are_refused_naming_size_limit_and_backend(backend, gpu_with_every_backend):
    with pytest.raises(ValueError, match=rf"k=33 is beyond the limit of backend='{backend}' for in_manifold_noise: "
                                         r"k <= 32; use backend='torch'"):
        kernels.resolve_backend(backend, gpu_with_every_backend, op="in_manifold_noise", d=64, k=33)
    with pytest.raises(ValueError, match=rf"d=8193 is beyond the limit of backend='{backend}' for gaussian_noise: d <= 8192"):
        kernels.check_supported("gaussian_noise", backend, "cpu", d=8193)
    kernels.check_supported("in_manifold_noise", backend, "cpu", d=8192, k=32)
    for fine in ("auto", "torch"):  # auto passes over a backend that cannot take the sizes
        kernels.check_supported("in_manifold_noise", fine, "cpu", d=10**5, k=10**3)
    with pytest.raises(ValueError, match="op must be one of"):
        kernels.check_supported("dropout", backend, "cpu", d=8)


def test_in_manifold_noise_refuses_k_beyond_the_backend_at_construction():
    weight = torch.randn(40, 8)
    with pytest.raises(ValueError, match=r"k=33 is beyond the limit of backend='triton'"):
        lf.InManifoldNoise(weight, k=33, backend="triton", knn_backend="torch")
    assert lf.InManifoldNoise(weight, k=33, backend="torch", knn_backend="torch").k == 33


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU machine the CUDA backend may be available")
def test_unavailable_backend_says_why():
    with pytest.raises(ValueError, match=r"backend='cuda' is not available on cpu: .*CUDA"):
        kernels.resolve_backend("cuda", "cpu")
    x, ids, table, weight, real = _inputs()
    noise = lf.InManifoldNoise(weight.cpu(), k=3, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        noise(ids.cpu()[None], x.cpu()[None])


def test_every_op_has_a_cuda_kernel():
    """The CUDA backend once had no Gaussian noise and failed with an AttributeError; now every op of
    LIMITS["cuda"] is a function of kernels/cuda.py (which says why it cannot run where it is not built)."""
    from lnsr_fast.kernels import cuda

    assert set(kernels.LIMITS["cuda"]) == set(kernels.OPS) == set(kernels.LIMITS["triton"])
    for name in ("gaussian_noise", "in_manifold_noise", "stability_forward", "stability_backward"):
        assert callable(getattr(cuda, name))
    if not cuda.is_available():
        x = torch.randn(3, 8)
        with pytest.raises(RuntimeError, match="lnsr_fast._C|torch sees no CUDA device"):
            ops.gaussian_noise(x, None, 0.05, 0, "cuda")


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


# ------------------------------------------------------------------------------------------ concat mode

def _concat_case(n_rows=7, pairs=3, t=5, widths=(40, 300), dtype=torch.float32, seed=0):
    """Concat-mode hidden states [n_rows, T, d] (rows [0, pairs) clean, [n_rows - pairs, n_rows) noisy, any
    rows between unpaired) with padding holding NaN, and the clean rows' mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(pairs, t, dtype=torch.long)
    mask[0, -2:] = 0
    mask[-1, 1] = 0
    hidden = []
    for d in widths:
        h = torch.randn(n_rows, t, d, generator=g)
        h[n_rows - pairs:] = h[:pairs] + 0.1 * torch.randn(pairs, t, d, generator=g)
        h[:pairs][mask == 0] = float("nan")
        h[n_rows - pairs:][mask == 0] = float("nan")
        hidden.append(h.to(DEVICE, dtype).requires_grad_())
    return hidden, mask.to(DEVICE)


def _concat_reference(hidden, pairs, mask, weights, reduction, grad_out, detach_clean):
    """Value and gradients through autograd of the float64 reference on slices (padding made finite)."""
    n = hidden[0].shape[0]
    real = mask.bool()
    leaves = []
    for h in hidden:
        h = h.detach().double().clone()
        h[:pairs][~real] = 0
        h[n - pairs:][~real] = 0
        leaves.append(h.requires_grad_())
    clean = [h[:pairs].detach() if detach_clean else h[:pairs] for h in leaves]
    value = reference.layerwise_stability(clean, [h[n - pairs:] for h in leaves], real, weights, reduction)
    return value.detach(), torch.autograd.grad(value * grad_out, leaves)


def _assert_close_to_reference(got, want, dtype, what):
    """|got − float64 reference| within one ulp of dtype at the largest value (one rounding; the Triton
    interpreter truncates rather than rounds), a tolerance far below the values, so that a wrong row or
    factor cannot pass."""
    scale = want.abs().max().item()
    tol = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype] * scale
    assert tol < 0.01 * scale, f"{what}: tolerance {tol:.3g} is no check against values up to {scale:.3g}"
    err = (got.double() - want).abs().max().item()
    assert err <= tol, f"{what}: max |error| {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_rows,detach_clean,reduction", [(6, False, "sum"), (7, True, "mean"), (8, False, "mean")])
def test_concat_penalty_matches_float64_reference(backend, dtype, n_rows, detach_clean, reduction):
    """One gradient per whole hidden state: the clean rows' (0 with detach_clean), exactly 0 in the unpaired
    rows and at padding (which holds NaN), the noisy rows'; forward and backward against the reference."""
    pairs, weights, grad_out = 3, [0.5, 2.0], -1.7
    hidden, mask = _concat_case(n_rows, pairs, dtype=dtype, seed=n_rows)
    reg = lf.stability.layerwise_stability_concat(hidden, pairs, mask, weights, reduction, backend, detach_clean)
    grads = torch.autograd.grad(reg * grad_out, hidden)
    value, ref_grads = _concat_reference(hidden, pairs, mask, weights, reduction, grad_out, detach_clean)
    assert reg.dtype == torch.float32 and reg.dim() == 0
    torch.testing.assert_close(reg.double(), value, rtol=1e-5, atol=0)
    pad = torch.cat([mask == 0, torch.zeros(n_rows - 2 * pairs, mask.shape[1], dtype=torch.bool, device=DEVICE),
                     mask == 0])
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == hidden[i].shape and g.is_contiguous()
        _assert_close_to_reference(g, r, dtype, f"gradient {i}")
        assert (g[pad] == 0).all() and (g[pairs:n_rows - pairs] == 0).all()
        if detach_clean:
            assert (g[:pairs] == 0).all()


def test_concat_tolerance_can_fail():
    hidden, mask = _concat_case()
    value, ref_grads = _concat_reference(hidden, 3, mask, [1.0, 1.0], "sum", 1.0, False)
    wrong = ref_grads[0].clone()
    wrong[0] *= 1.001  # one row off by 0.1%
    with pytest.raises(AssertionError, match="max"):
        _assert_close_to_reference(wrong, ref_grads[0], torch.float32, "perturbed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_gradient_is_one_node_no_slicing_glue(backend):
    """The autograd graph holds the penalty's own node and nothing between it and the hidden states (no
    slice_backward, zeros or add per layer); a layer that needs no gradient gets none."""
    hidden, mask = _concat_case()
    frozen = hidden[1].detach()
    reg = lf.stability.layerwise_stability_concat([hidden[0], frozen], 3, mask, backend=backend)
    node = reg.grad_fn
    assert [type(f).__name__ for f, _ in node.next_functions if f is not None] == ["AccumulateGrad"]
    reg.backward()
    assert hidden[0].grad is not None and frozen.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_op_check(backend):
    """opcheck: fake tensors (shapes, dtypes and strides of the real outputs, non-contiguous inputs
    included), the autograd registration, and tracing."""
    hidden, mask = _concat_case()
    transposed = hidden[1].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not transposed.is_contiguous()
    args = ([hidden[0], transposed], 3, mask.bool(), [1.0, 0.5], "sum", False, backend)
    torch.library.opcheck(ops.layerwise_stability_concat, args)
    backward_args = (torch.tensor(1.5, device=DEVICE), [h.detach() for h in args[0]], *args[1:])
    torch.library.opcheck(ops.layerwise_stability_concat_backward, backward_args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_match_the_reference(backend):
    """Double backward (the gradient of a gradient norm) on every backend, against float64 autograd."""
    hidden, mask = _concat_case()
    weights = [1.0, 0.5]
    grads = torch.autograd.grad(lf.stability.layerwise_stability_concat(hidden, 3, mask, weights, backend=backend),
                                hidden, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in grads), hidden)
    h64 = [h.detach().double().nan_to_num(0.0).requires_grad_() for h in hidden]
    ref = reference.layerwise_stability_concat(h64, 3, mask.bool(), weights)
    ref_grads = torch.autograd.grad(ref, h64, create_graph=True)
    ref_second = torch.autograd.grad(sum((g * g).sum() for g in ref_grads), h64)
    for got, want in zip(second, ref_second):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    split = lf.layerwise_stability([h[:3] for h in hidden], [h[4:] for h in hidden], mask, weights, backend=backend)
    grads = torch.autograd.grad(split, hidden, create_graph=True)
    for got, want in zip(torch.autograd.grad(sum((g * g).sum() for g in grads), hidden), ref_second):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)


def test_third_derivative_is_refused():
    """A differentiable second derivative (create_graph=True in the second backward) is refused, not cut."""
    hidden, mask = _concat_case()
    (g,) = torch.autograd.grad(lf.stability.layerwise_stability_concat(hidden[:1], 3, mask), hidden[:1],
                               create_graph=True)
    with pytest.raises(RuntimeError, match="not a third"):
        torch.autograd.grad((g * g).sum(), hidden[:1], create_graph=True)


def test_concat_arguments_are_checked():
    hidden, mask = _concat_case()
    concat = lf.stability.layerwise_stability_concat
    with pytest.raises(ValueError, match=r"pairs must be an int in \[1, 3\] for hidden states of 7 rows, got 4"):
        concat(hidden, 4, None)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected \(3, 5\)"):
        concat(hidden, 3, mask[:2])
    with pytest.raises(TypeError, match=r"hidden\[1\] must be a floating-point tensor"):
        concat([hidden[0], hidden[1].long()], 3)
    with pytest.raises(ValueError, match=r"hidden\[1\] has shape \(6, 5, 300\)"):
        concat([hidden[0], hidden[1][:6]], 3)
    with pytest.raises(TypeError, match="detach_clean must be a bool"):
        concat(hidden, 3, detach_clean=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_penalty_writes_only_the_gradients_required(backend):
    """Noisy halves detached: only the clean side is written (and reaches the layers), as the reference's."""
    hidden, mask = _concat_case(n_rows=6)
    reg = lf.layerwise_stability([h[:3] for h in hidden], [h[3:].detach() for h in hidden], mask, [1.0, 2.0],
                                 backend=backend)
    grads = torch.autograd.grad(reg, hidden)
    _, ref_grads = _concat_reference(hidden, 3, mask, [1.0, 2.0], "sum", 1.0, False)
    for g, r in zip(grads, ref_grads):
        _assert_close_to_reference(g[:3], r[:3], torch.float32, "clean side")
        assert (g[3:] == 0).all()


def test_torch_backend_generators_are_per_thread():
    """A sampler drawing in another thread has its own generator: it cannot reseed this thread's between
    its seeding and its draw (the same seed still gives the same noise there)."""
    import threading

    cpu, x = torch.device("cpu"), torch.randn(8, 16)
    mine, theirs = ops._generator(cpu, 0), []
    thread = threading.Thread(target=lambda: theirs.append((ops._generator(cpu, 0),
                                                             ops.gaussian_noise(x, None, 0.05, 3, "torch"))))
    thread.start()
    thread.join()
    assert theirs[0][0] is not mine and ops._generator(cpu, 0) is mine
    assert torch.equal(theirs[0][1], ops.gaussian_noise(x, None, 0.05, 3, "torch"))
