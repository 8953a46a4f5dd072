"""lnsr_fast.methods: the registry of configs, each peer method's defining property inside the model's forward, and
a few training steps of every method through LNSRTrainer and through `lnsr-fast finetune`.

Tiny random-init BERT (vocab 100, hidden 32, 2 layers, 2 heads), and tests/families.py's tiny models where a
property depends on the architecture (where SMART perturbs); dropout off where a property needs deterministic
passes.
"""
from __future__ import annotations

import csv
import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, TrainerCallback,
                          TrainingArguments)

import families
import lnsr_fast as lf
from lnsr_fast import LNSRTrainer, cli, experiment
from lnsr_fast.lnsr import DEFAULT_WEIGHTS, transformer_layers
from lnsr_fast.methods import METHODS, config, config_class, defaults, help_texts
from lnsr_fast.methods.base import kl_divergence, symmetric_kl
from lnsr_fast.methods.smart import embedding_layer
from lnsr_fast.regularize import word_embeddings
from lnsr_fast.trainer import NOISE_STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH = 100, 9
WITH_PENALTY = ("lnsr", "lnsr_in_manifold", "smart", "r3f", "l2sp")


def tiny_bert(seed: int = 0, dropout: float = 0.0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout)).train()


def make_batch(n: int = 4, seed: int = 0, regression: bool = False) -> dict:
    """n rows of LENGTH tokens, row i with LENGTH - i real tokens (0-padding after them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    mask = (torch.arange(LENGTH) < (LENGTH - torch.arange(n))[:, None]).long()
    labels = torch.randn(n, generator=g) if regression else torch.arange(n) % 2
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def capture_logits(model) -> list[torch.Tensor]:
    """The classifier's output of every pass, in order, with `.grad` after a backward that reaches it."""
    seen: list[torch.Tensor] = []

    def keep(module, args, out):
        if out.requires_grad:
            out.retain_grad()
        seen.append(out)
    model.classifier.register_forward_hook(keep)
    return seen


def capture_word_embeddings(model) -> list[torch.Tensor]:
    """The word embeddings of every pass as the model goes on with them (after the method's perturbation: register
    after `apply`), detached."""
    seen: list[torch.Tensor] = []
    word_embeddings(model).register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()) and None)
    return seen


def capture_first_layer_inputs(model) -> list[torch.Tensor]:
    """What the first transformer layer receives in every pass, detached."""
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    transformer_layers(model)[0].register_forward_pre_hook(keep, with_kwargs=True)
    return seen


def apply(model, name: str, **hyperparameters):
    return lf.apply(model, config(name, **hyperparameters))


# ---- registry -----------------------------------------------------------------------------------------

def test_registry_names_order_and_documented_defaults():
    assert METHODS == ("ft", "lnsr", "lnsr_in_manifold", "smart", "freelb", "r3f", "l2sp", "mixout", "cwgnc",
                       "noise_only_gaussian", "noise_only_in_manifold")
    assert defaults("smart") == {"weight": 1.0, "steps": 1, "step_size": 1e-3, "noise_var": 1e-5, "epsilon": 1e-6,
                                 "norm": "inf"}
    # FreeLB: the RTE row of zhuchen03/FreeLB's huggingface-transformers/launch/run_glue.sh; CWGNC: the value
    # yangalan123/FineTuningStability's compute_variance.py analyses (see the methods' docstrings).
    assert defaults("freelb") == {"steps": 3, "step_size": 0.1, "init_mag": 0.0, "max_norm": 0.0}
    assert defaults("cwgnc") == {"max_norm": 0.05} and defaults("mixout")["p"] == 0.9
    assert defaults("r3f") == {"weight": 1.0, "eps": 1e-5, "noise": "uniform", "detach_noisy": True}
    assert defaults("ft") == {}
    assert defaults("lnsr")["ratio"] == 0.05 and defaults("lnsr_in_manifold")["ratio"] == 0.1
    assert "k" not in defaults("lnsr") and defaults("lnsr_in_manifold")["k"] == 10 and "noise" not in defaults("lnsr")
    for name in METHODS:   # every file says where its method and defaults come from; every field has its help
        cls = config_class(name)
        assert isinstance(config(name), cls)
        assert {k: getattr(config(name), k) for k in defaults(name)} == defaults(name)
        assert "Source" in inspect.getmodule(cls).__doc__, name
        assert all(help_texts(name).values()) and set(help_texts(name)) == set(defaults(name)), name


def test_lnsr_weight_defaults_per_noise():
    # in-manifold noise at ratio 0.1 makes a ~4× larger penalty per unit of λ than Gaussian at 0.05: each its own λ
    assert defaults("lnsr")["weight"] == DEFAULT_WEIGHTS["gaussian"] > DEFAULT_WEIGHTS["in_manifold"]
    assert defaults("lnsr_in_manifold")["weight"] == DEFAULT_WEIGHTS["in_manifold"]
    assert lf.LNSRConfig().weight == DEFAULT_WEIGHTS["in_manifold"]   # the default noise
    assert lf.LNSRConfig(noise="gaussian").weight == DEFAULT_WEIGHTS["gaussian"]
    assert lf.LNSRConfig(noise=lf.GaussianNoise()).weight == DEFAULT_WEIGHTS["gaussian"]
    in_manifold = lf.InManifoldNoise(nn.Embedding(20, 8), k=3)
    assert lf.LNSRConfig(noise=in_manifold).weight == DEFAULT_WEIGHTS["in_manifold"]
    assert lf.LNSRConfig(noise="in_manifold", weight=0.5).weight == 0.5


def test_config_rejects_unknown_methods_and_hyperparameters():
    with pytest.raises(ValueError, match=r"'sam'.*'smart'"):
        config("sam")
    with pytest.raises(TypeError, match=r"\['stepz'\].*'smart'.*step_size"):
        config("smart", stepz=2)
    with pytest.raises(TypeError, match="'alpha'.*'ft'"):
        config("ft", alpha=1.0)
    with pytest.raises(TypeError, match=r"\['k'\].*'lnsr'"):
        config("lnsr", k=4)


@pytest.mark.parametrize("name, hparams, error, field", [
    ("smart", {"steps": 0}, ValueError, "steps"),
    ("smart", {"step_size": -1.0}, ValueError, "step_size"),
    ("smart", {"norm": "l1"}, ValueError, "norm"),
    ("freelb", {"steps": 1.5}, TypeError, "steps"),
    ("freelb", {"max_norm": float("nan")}, ValueError, "max_norm"),
    ("r3f", {"noise": "gauss"}, ValueError, "noise"),
    ("r3f", {"eps": 0.0}, ValueError, "eps"),
    ("r3f", {"detach_noisy": 1}, TypeError, "detach_noisy"),
    ("l2sp", {"alpha": -0.1}, ValueError, "alpha"),
    ("l2sp", {"beta": "1"}, TypeError, "beta"),
    ("mixout", {"p": 1.5}, ValueError, "p"),
    ("mixout", {"zero_dropout": 1}, TypeError, "zero_dropout"),
    ("cwgnc", {"max_norm": 0.0}, ValueError, "max_norm"),
    ("lnsr", {"ratio": 0.0}, ValueError, "ratio"),
    ("lnsr", {"mode": "parallel"}, ValueError, "mode"),
    ("lnsr_in_manifold", {"k": 0}, ValueError, "k"),
    ("noise_only_in_manifold", {"k": 2.5}, TypeError, "k"),
    ("noise_only_gaussian", {"ratio": -1.0}, ValueError, "ratio"),
])
def test_bad_hyperparameter_values_name_the_hyperparameter(name, hparams, error, field):
    with pytest.raises(error, match=rf"\b{field}\b"):
        config(name, **hparams)


# ---- divergences ----------------------------------------------------------------------------------------

def test_symmetric_kl_against_float64_and_detached_targets():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    want = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    torch.testing.assert_close(symmetric_kl(a, b).double(), want, rtol=1e-5, atol=1e-7)
    # SMART's variant: each direction's target is a constant, so grad_a is that of KL(b ‖ a) alone.
    (ga,) = torch.autograd.grad(symmetric_kl(a, b, detach_targets=True), a)
    (want_ga,) = torch.autograd.grad(kl_divergence(b.detach(), a), a)
    torch.testing.assert_close(ga, want_ga)
    # Token-level logits average over real tokens only.
    logits = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    other = logits.clone()
    other[0, 2:] += 5.0   # changes at padding do not count
    assert kl_divergence(logits, other, mask) == 0


# ---- L2-SP --------------------------------------------------------------------------------------------

def test_l2sp_gradient_is_alpha_times_the_distance_to_the_start_and_beta_times_the_head():
    model = tiny_bert()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    l2sp = apply(model, "l2sp", alpha=0.3, beta=0.02).method
    assert {id(p) for p in l2sp.head} == {id(model.classifier.weight), id(model.classifier.bias)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.zero_grad()
    l2sp.penalty().backward()
    for name, p in model.named_parameters():
        want = 0.02 * p.detach() if name.startswith("classifier") else 0.3 * (p.detach() - start[name])
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7, msg=name)
    encoder = [n for n, _ in model.named_parameters() if not n.startswith("classifier")]
    for (p, anchor), name in zip(l2sp.anchors, encoder):
        assert not anchor.requires_grad and torch.equal(anchor, start[name])   # w⁰ is frozen and untouched
    batch = make_batch()   # inside the forward: task loss + penalty
    handle = lf.handle_of(model)
    out = model(**batch)
    torch.testing.assert_close(handle.last["penalty"], l2sp.penalty().detach())
    torch.testing.assert_close(out.loss, handle.last["task_loss"] + handle.last["penalty"])


# ---- Mixout -------------------------------------------------------------------------------------------

def test_mixout_with_p0_is_the_plain_layer():
    model, plain = tiny_bert(dropout=0.1), tiny_bert(dropout=0.1)
    apply(model, "mixout", p=0.0, zero_dropout=False)
    batch = {k: v for k, v in make_batch().items() if k != "labels"}
    torch.manual_seed(1)
    got = model(**batch).logits
    torch.manual_seed(1)
    assert torch.equal(got, plain(**batch).logits)


def test_mixout_mixes_whole_input_columns_and_is_exact_in_expectation():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    target = layer.weight.detach().clone()
    mixout = config("mixout", p=0.7).build(nn.Sequential(layer))
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))   # fine-tuned away from the target
    w = layer.weight.detach()
    layer.train()
    # On the identity input the output rows are the columns of the mixed weight (+ bias): each column is
    # either the target's or target + (w - target) / (1 - p), whole.
    mixed_in = target + (w - target) / 0.3
    counts = torch.zeros(2)
    for _ in range(20):
        with torch.no_grad():
            mixed = (layer(torch.eye(6)) - layer.bias).T
        kept = (mixed - target).abs().amax(0) > 1e-3
        torch.testing.assert_close(mixed[:, kept], mixed_in[:, kept], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[:, ~kept], target[:, ~kept], rtol=1e-5, atol=1e-6)
        counts += torch.tensor([int(kept.sum()), int((~kept).sum())])
    assert counts[0] / counts.sum() == pytest.approx(0.3, abs=0.1)   # a column keeps w with probability 1 - p
    # The average output over many draws is the plain layer's output, within 6 standard errors.
    x = torch.randn(3, 6)
    with torch.no_grad():
        draws = torch.stack([layer(x) for _ in range(4000)])
    plain = F.linear(x, w, layer.bias)
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert draws.std(0).min() > 0
    assert ((draws.mean(0) - plain).abs() <= 6 * stderr).all()
    layer.eval()
    assert torch.equal(layer(x), plain)   # evaluation runs the plain layer
    mixout.remove()


def test_mixout_is_reversible_and_keeps_the_plain_state_dict():
    model, fresh = tiny_bert(dropout=0.1), tiny_bert(dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    apply(model, "mixout")
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 6 + 2 and all("forward" in vars(m) for m in linears)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    lf.remove(model)
    assert list(model.modules()) == modules   # the same module objects, nothing replaced
    assert all("forward" not in vars(m) for m in linears) and all(m.p == 0.1 for m in dropouts)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    batch = {k: v for k, v in make_batch().items() if k != "labels"}
    torch.manual_seed(2)
    got = model(**batch).logits
    torch.manual_seed(2)
    assert torch.equal(got, fresh(**batch).logits)   # dropout and layers behave as before


# ---- CWGNC --------------------------------------------------------------------------------------------

def test_cwgnc_clips_each_component_and_leaves_small_ones_untouched():
    model = tiny_bert()
    handle = apply(model, "cwgnc", max_norm=0.5)
    torch.manual_seed(0)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn_like(p) * (0.01 if i % 2 else 10.0)   # half far below, half far above
    before = grads(model)
    handle.before_optimizer_step()
    clipped = untouched = 0
    for name, g in grads(model).items():
        norm = before[name].norm()
        assert g.norm() <= 0.5 * (1 + 1e-5), name
        if norm <= 0.5:
            assert torch.equal(g, before[name]), name
            untouched += 1
        else:
            torch.testing.assert_close(g, before[name] * (0.5 / norm), rtol=1e-4, atol=0)   # same direction
            clipped += 1
    assert clipped and untouched


class _GradNorms(TrainerCallback):
    """Each parameter's gradient norm when the optimizer steps (the gradients are zeroed afterwards)."""

    def __init__(self, model):
        self.model, self.max_norms = model, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.max_norms.append(max(float(p.grad.norm()) for p in self.model.parameters() if p.grad is not None))


def test_cwgnc_clips_after_gradient_accumulation_in_the_trainer(tmp_path):
    model = tiny_bert(dropout=0.1)
    probe = _GradNorms(model)
    trainer = LNSRTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.0),
                          train_dataset=rows(), method="cwgnc", method_args={"max_norm": 1e-3}, callbacks=[probe])
    trainer.train()
    # Clipping each micro-batch would leave up to 2 × 1e-3 after accumulation.
    assert len(probe.max_norms) == 3 and max(probe.max_norms) <= 1e-3 * (1 + 1e-5)


# ---- SMART --------------------------------------------------------------------------------------------

def test_smart_ascent_raises_the_kl_more_than_random_directions():
    """With a step where the gradient dominates the initial noise, the ascent direction (unit ∞-norm per token,
    added to what the first layer receives) moves the output distribution more than random directions of the
    same ∞-norm. (The KL's gradient there is ~1e-6 of δ: η = 1e8 makes it dominate.)"""
    model = tiny_bert(num_labels=3)
    apply(model, "smart", step_size=1e8, noise_var=1e-3)
    inputs, logits = capture_first_layer_inputs(model), capture_logits(model)
    batch = make_batch(6)
    torch.manual_seed(0)
    model(**batch)
    assert len(inputs) == 3   # the clean pass, one ascent step, the perturbed pass
    delta = inputs[-1] - inputs[0]
    clean, adversarial = logits[0].detach(), logits[-1].detach()
    real = batch["attention_mask"].bool()
    # ‖δ_t‖_∞ = m / (m + ε) ≈ 1 (m: the ∞-norm before the projection, ε = 1e-6)
    torch.testing.assert_close(delta.abs().amax(-1)[real], torch.ones(int(real.sum())), rtol=1e-2, atol=0)
    assert (delta[~real] == 0).all()
    lf.remove(model)
    random = []
    for _ in range(8):
        r = torch.randn_like(delta)
        r = r / r.abs().amax(-1, keepdim=True) * real[..., None]
        hook = model.bert.embeddings.register_forward_hook(lambda m, a, out, r=r: out + r)
        with torch.no_grad():
            random.append(kl_divergence(clean, model(**batch).logits))
        hook.remove()
    assert kl_divergence(clean, adversarial) > torch.stack(random).mean()


@pytest.mark.parametrize("family, layer", [
    ("bert", "bert.embeddings"), ("deberta-v2", "deberta.embeddings"), ("modernbert", "model.embeddings"),
    ("bart", "model.encoder.layernorm_embedding"), ("gpt2", None), ("llama", None), ("t5", None)])
def test_smart_perturbs_what_the_first_layer_receives(family, layer):
    """mt-dnn adds δ to the embedding layer's output (after the LayerNorm), which the first layer receives: the
    perturbed pass's first-layer input is the clean one's + δ, δ of ∞-norm 1 per real token and 0 at padding.
    On the raw word embeddings (before positions and the LayerNorm) the difference would be LayerNorm-scaled.
    Decoders and T5 have no such layer: their first layer receives the word embeddings (+ GPT-2's positions)."""
    model = families.make_model(family, "seq")
    named = dict(model.named_modules())
    assert embedding_layer(model) is (named[layer] if layer else None)
    handle = apply(model, "smart", step_size=1e3, noise_var=1e-3)
    inputs = capture_first_layer_inputs(model)
    batch = families.make_batch(model, "seq")
    model(**batch).loss.backward()
    assert len(inputs) == 3 and handle.last["penalty"] > 0
    delta, real = inputs[-1] - inputs[0], batch["attention_mask"].bool()
    torch.testing.assert_close(delta.abs().amax(-1)[real], torch.ones(int(real.sum())), rtol=1e-3, atol=0)
    assert (delta[~real] == 0).all()
    lf.remove(model)
    assert layer is None or not named[layer]._forward_hooks   # remove() takes SMART's hook out


def test_smart_under_gradient_checkpointing():
    """Checkpointed layers are recomputed in backward, outside the pass; the perturbation is added by the embedding
    layer, which is not checkpointed: the same penalty and gradients as without checkpointing (dropout 0.1, same
    seed). (torch's reentrant checkpoint refuses the ascent's torch.autograd.grad, so SMART needs the
    non-reentrant one.)"""
    def run(checkpointing: bool):
        model = tiny_bert(dropout=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        handle = apply(model, "smart")
        torch.manual_seed(5)
        model(**make_batch()).loss.backward()
        return handle.last["penalty"], grads(model)

    (penalty, plain), (checkpointed_penalty, checkpointed) = run(False), run(True)
    assert penalty > 0
    torch.testing.assert_close(checkpointed_penalty, penalty)
    for k, g in checkpointed.items():
        torch.testing.assert_close(g, plain[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("regression", [False, True])
def test_smart_penalty_is_symmetric_kl_or_mse_between_clean_and_perturbed_outputs(regression):
    model = tiny_bert(num_labels=1 if regression else 3)
    handle = apply(model, "smart", weight=0.7, steps=2)
    assert handle.method.regression == regression
    seen = capture_logits(model)
    batch = make_batch(regression=regression)
    out = model(**batch)
    out.loss.backward()
    logs = handle.last
    assert len(seen) == 1 + 2 + 1   # clean, two ascent passes, the perturbed pass
    clean, perturbed = seen[0].detach(), seen[-1].detach()
    want = F.mse_loss(perturbed, clean) if regression else symmetric_kl(clean, perturbed)
    torch.testing.assert_close(logs["penalty"], 0.7 * want)
    task = F.mse_loss(clean.squeeze(), batch["labels"]) if regression else F.cross_entropy(clean, batch["labels"])
    torch.testing.assert_close(logs["task_loss"], task)
    torch.testing.assert_close(out.loss.detach(), logs["task_loss"] + logs["penalty"])
    assert logs["penalty"] > 0
    # The gradients reaching both passes: MSE through both outputs, or mt-dnn's symmetric KL whose two
    # directions each treat their target as a constant.
    c, p = clean.requires_grad_(), perturbed.requires_grad_()
    task = F.mse_loss(c.squeeze(), batch["labels"]) if regression else F.cross_entropy(c, batch["labels"])
    penalty = F.mse_loss(p, c) if regression else symmetric_kl(c, p, detach_targets=True)
    want_clean, want_perturbed = torch.autograd.grad(task + 0.7 * penalty, (c, p))
    torch.testing.assert_close(seen[0].grad, want_clean)
    torch.testing.assert_close(seen[-1].grad, want_perturbed)


# ---- FreeLB -------------------------------------------------------------------------------------------

def backward(loss):
    loss.backward()


def test_freelb_with_one_step_and_zero_init_is_plain_fine_tuning():
    plain, model = tiny_bert(dropout=0.1), tiny_bert(dropout=0.1)
    batch = make_batch()
    torch.manual_seed(3)
    plain(**batch).loss.backward()
    handle = apply(model, "freelb", steps=1, init_mag=0.0)
    torch.manual_seed(3)
    handle.training_step(batch, backward)
    want = grads(plain)
    assert grads(model).keys() == want.keys()
    for k, g in grads(model).items():
        torch.testing.assert_close(g, want[k], rtol=1e-5, atol=1e-7, msg=k)
    with pytest.raises(ValueError, match="FreeLB runs K forward and backward passes"):
        model(**batch)   # a plain training forward cannot run its steps


def test_freelb_ascends_accumulates_and_keeps_dropout_masks():
    model = tiny_bert(dropout=0.1)
    handle = apply(model, "freelb", steps=3, step_size=0.3, init_mag=0.0)
    seen, embeds = capture_logits(model), capture_word_embeddings(model)
    batch = make_batch()
    calls = []
    loss = handle.training_step(batch, lambda l: (calls.append(l.detach()), l.backward()))
    losses = [F.cross_entropy(z.detach(), batch["labels"]) for z in seen]
    assert len(calls) == 3 and losses[1] > losses[0] and losses[2] > losses[1]   # each step raises the loss
    torch.testing.assert_close(loss, sum(losses) / 3)   # the mean of the three passes' losses
    torch.testing.assert_close(torch.stack(calls), torch.stack(losses) / 3)
    # The step is α·g/‖g‖ per example: each δ_t - δ_{t-1} has norm α, and padding stays clean.
    pad = ~batch["attention_mask"].bool()
    for before, after in zip(embeds, embeds[1:]):
        step = after - before
        torch.testing.assert_close(step.flatten(1).norm(dim=1), torch.full((4,), 0.3), rtol=1e-4, atol=0)
        assert (step[pad] == 0).all()
    # With α = 0 the passes see the same input, and the same dropout masks give the same outputs.
    lf.remove(model)
    handle = apply(model, "freelb", steps=2, step_size=0.0)
    seen.clear()
    handle.training_step(batch, backward)
    assert torch.equal(seen[0], seen[1])


def test_freelb_initial_noise_and_norm_bound():
    model = tiny_bert()
    handle = apply(model, "freelb", init_mag=0.5, max_norm=0.2, step_size=10.0)
    batch = make_batch()
    x = model.get_input_embeddings()(batch["input_ids"])
    delta = handle.method.initial_delta(x, batch["attention_mask"])
    lengths = batch["attention_mask"].sum(1)
    bound = (0.5 / (lengths * 32).sqrt())[:, None, None]
    assert (delta.abs() <= bound).all() and (delta[~batch["attention_mask"].bool()] == 0).all()
    assert (delta.abs() > bound / 2).any()
    embeds = capture_word_embeddings(model)
    handle.training_step(batch, backward)
    for e in embeds[1:]:   # every ascended δ is bounded per example
        assert ((e - x.detach()).flatten(1).norm(dim=1) <= 0.2 * (1 + 1e-5)).all()


# ---- R3F ----------------------------------------------------------------------------------------------

def test_r3f_symmetric_kl_of_the_noisy_copy_with_gradients_through_both():
    model = tiny_bert(num_labels=3)
    handle = apply(model, "r3f", weight=2.0, eps=1e-2)
    seen = capture_logits(model)
    batch = make_batch()
    out = model(**batch)
    out.loss.backward()
    (both,) = seen   # one doubled pass: rows [0, 4) clean, [4, 8) noisy
    clean, noisy = both.detach().chunk(2)
    torch.testing.assert_close(handle.last["penalty"], 2.0 * symmetric_kl(clean, noisy))
    assert handle.last["penalty"] > 0
    # Both copies get the full derivative of λ·(KL(p‖q) + KL(q‖p)): each KL term through both arguments.
    c, n = clean.requires_grad_(), noisy.requires_grad_()
    want_clean, want_noisy = torch.autograd.grad(2.0 * symmetric_kl(c, n) + F.cross_entropy(c, batch["labels"]), (c, n))
    assert want_noisy.abs().sum() > 0
    torch.testing.assert_close(both.grad, torch.cat([want_clean, want_noisy]))


@pytest.mark.parametrize("detach_noisy", [True, False])
def test_r3f_noisy_copy_reaches_the_word_embeddings_only_when_not_detached(detach_noisy):
    """fairseq adds the noise to `token_embeddings.detach().clone()`: the word-embedding weights get the gradient
    that reaches the clean copy's rows only (the noisy rows' own gradient, from the penalty, stops there);
    `detach_noisy=False` passes it on. The noisy rows are the clean ones + U(−eps, eps), 0 at padding."""
    model = tiny_bert(num_labels=3)
    apply(model, "r3f", eps=1e-2, detach_noisy=detach_noisy)
    seen = []

    def keep(module, args, out):   # the doubled pass's word embeddings, as perturbed: rows [0, 4) clean, [4, 8) noisy
        out.retain_grad()
        seen.append(out)
    word_embeddings(model).register_forward_hook(keep)
    batch = make_batch()
    model(**batch).loss.backward()
    (x,) = seen
    clean, noisy = x.detach().chunk(2)
    real = batch["attention_mask"].bool()
    assert (noisy - clean).abs().max() <= 1e-2 and (noisy - clean)[real].abs().max() > 0.9e-2
    assert ((noisy - clean)[~real] == 0).all()
    rows = x.grad if not detach_noisy else torch.cat([x.grad[:4], torch.zeros_like(x.grad[4:])])
    assert x.grad[4:].abs().sum() > 0   # the penalty's gradient reaches the noisy rows either way
    ids = batch["input_ids"].repeat(2, 1)
    want = torch.zeros_like(model.bert.embeddings.word_embeddings.weight).index_add_(0, ids.flatten(), rows.flatten(0, 1))
    want[model.config.pad_token_id] = 0   # nn.Embedding's padding_idx gets no gradient
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight.grad, want, rtol=1e-5, atol=1e-8)


def test_r3f_noise_scale():
    method = config("r3f", eps=1e-3).build(tiny_bert())
    x = torch.randn(64, 9, 32)
    mask = torch.ones(64, 9, dtype=torch.long)
    mask[:, 6:] = 0
    torch.manual_seed(0)
    uniform = method.sample_noise(None, x, mask)
    assert uniform.abs().max() <= 1e-3 and uniform[:, :6].abs().max() > 0.9e-3 and (uniform[:, 6:] == 0).all()
    normal = config("r3f", eps=1e-3, noise="normal").build(tiny_bert()).sample_noise(None, x, mask)
    assert normal[:, :6].std() == pytest.approx(1e-3, rel=0.05) and (normal[:, 6:] == 0).all()


# ---- noise-only ablations -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ratio", [("noise_only_gaussian", 0.05), ("noise_only_in_manifold", 0.1)])
def test_noise_only_trains_on_noisy_embeddings_without_a_stability_term(name, ratio):
    model = tiny_bert()
    handle = apply(model, name, **({"k": 4} if "manifold" in name else {}))
    seen, embeds = capture_logits(model), capture_word_embeddings(model)
    batch = make_batch()
    loss = model(**batch).loss
    assert set(handle.last) == {"task_loss"} and len(seen) == 1   # one pass, no clean pass, no penalty
    x = model.get_input_embeddings()(batch["input_ids"]).detach()
    eps = embeds[0] - x
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(eps[real].norm(dim=-1) / x[real].norm(dim=-1), torch.full((int(real.sum()),), ratio),
                               rtol=1e-4, atol=0)
    assert (eps[~real] == 0).all()
    torch.testing.assert_close(loss, F.cross_entropy(seen[0], batch["labels"]))
    assert handle.noise.step == 1


# ---- through LNSRTrainer ------------------------------------------------------------------------------

def rows(n: int = 12) -> list[dict]:
    batch = make_batch(n)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    defaults_ = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                     max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                     save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults_, **kwargs})


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_through_the_trainer(tmp_path, name):
    model = tiny_bert(dropout=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    hparams = {"k": 4} if "manifold" in name else {}
    trainer = LNSRTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=2),
                          train_dataset=rows(), method=name, method_args=hparams)
    if name != "ft":
        assert trainer.method.name == name and trainer.method.model is model
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(math.isfinite(e["loss"]) for e in logs)
    moved = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 2, moved
    if name in WITH_PENALTY:
        penalty = "lnsr_penalty" if name.startswith("lnsr") else "penalty"
        for e in logs:   # logged on the loss's scale
            assert e[penalty] > 0 and e["task_loss"] + e[penalty] == pytest.approx(e["loss"], rel=1e-5)
    lf.remove(model)
    assert "forward" not in vars(model)


def test_noise_only_sampler_state_goes_into_checkpoints(tmp_path):
    trainer = LNSRTrainer(model=tiny_bert(), args=training_args(tmp_path, save_strategy="steps", save_steps=2),
                          train_dataset=rows(), method="noise_only_gaussian")
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-2" / NOISE_STATE_NAME.format(rank=0), weights_only=True)
    assert state["step"] == 2 and trainer.method.noise.step == 3


@pytest.mark.parametrize("method", ["lnsr", "noise_only_in_manifold"])
def test_an_unset_noise_seed_is_the_training_seed(tmp_path, method):
    args = training_args(tmp_path, seed=3)
    assert LNSRTrainer(model=tiny_bert(), args=args, method=method).method.noise.seed == 3
    assert LNSRTrainer(model=tiny_bert(), args=args, method=method, method_args={"seed": 11}).method.noise.seed == 11


def test_trainer_rejects_bad_method_settings(tmp_path):
    common = dict(model=tiny_bert(), args=training_args(tmp_path))
    with pytest.raises(ValueError, match="smart.*'sam'"):
        LNSRTrainer(**common, method="sam")
    with pytest.raises(ValueError, match="not both"):
        LNSRTrainer(**common, method="smart", lnsr=lf.LNSRConfig())
    with pytest.raises(ValueError, match="method_args needs method"):
        LNSRTrainer(**common, method_args={"steps": 1})
    with pytest.raises(TypeError, match=r"\['stepz'\]"):
        LNSRTrainer(**common, method="smart", method_args={"stepz": 1})
    trainer = LNSRTrainer(model=tiny_bert(), args=training_args(tmp_path, label_smoothing_factor=0.1),
                          train_dataset=rows(), method="freelb")
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        trainer.train()


# ---- through the CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT and a WordPiece tokenizer over a few words, saved as a model folder."""
    root = tmp_path_factory.mktemp("tiny_bert")
    words = "good great fine bad awful poor movie plot film the".split()
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=32)).save_pretrained(root)
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(root)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(16):
            w.writerow([f"{words[i % 6]} {words[6 + i % 4]} the", "pos" if i % 6 < 3 else "neg"])
    return root


def finetune(root, out, *extra):
    return cli.main(["finetune", "--model", str(root), "--train", str(root / "train.csv"), "--text-column", "text",
                     "--label-column", "label", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                     "--dev-fraction", "0", "--max-length", "8", "--k", "4", "--output", str(out), "--no-progress",
                     *extra])


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_through_the_cli(tiny_model_dir, tmp_path, name, capsys):
    code = finetune(tiny_model_dir, tmp_path, "--method", name)
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "metrics.json").read_text())["run"]
    assert run["method"] == name and run["steps"] == 2 and math.isfinite(run["final_loss"])


def test_cli_method_args_are_parsed_checked_and_recorded(tiny_model_dir, tmp_path, capsys):
    assert experiment.parse_value("2") == 2 and experiment.parse_value("1e-3") == 1e-3 and experiment.parse_value("True") is True
    assert experiment.parse_value("none") is None and experiment.parse_value("1,2") == [1, 2] and experiment.parse_value("3,") == [3]
    assert experiment.parse_value("l2") == "l2"
    code = finetune(tiny_model_dir, tmp_path, "--method", "smart", "--method-arg", "steps=2", "--method-arg", "norm=l2",
                    "--weight", "0.3")   # an LNSR option: SMART's weight stays its own
    assert code == 0, capsys.readouterr().err
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert settings["method_args"] == {"steps": 2, "norm": "l2"}
    assert cli.method_args("lnsr_in_manifold", cli.build_parser().parse_args(
        ["finetune", "--model", "m", "--train", "t.csv", "--text-column", "t", "--label-column", "l",
         "--method", "lnsr_in_manifold", "--method-arg", "layers=1,2"]))["layers"] == [1, 2]
    capsys.readouterr()
    code = finetune(tiny_model_dir, tmp_path, "--method", "smart", "--method-arg", "stepz=2")
    err = capsys.readouterr().err
    assert code == 2 and "'stepz'" in err and "step_size" in err and "Traceback" not in err
    code = finetune(tiny_model_dir, tmp_path, "--method", "smart", "--method-arg", "steps=0")
    err = capsys.readouterr().err
    assert code == 2 and "steps" in err and "Traceback" not in err
    code = finetune(tiny_model_dir, tmp_path, "--method", "mixout", "--method-arg", "p")
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_readme_peer_methods_example_runs_as_written(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Peer methods.*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)
    assert all("penalty" in line for line in lines if line.split()[0] in WITH_PENALTY)
