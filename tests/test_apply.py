"""`lnsr_fast.apply`: LNSR inside the model's own forward, on tiny random models of every family the package
supports (tests/families.py), one table of cases fed to one set of tests (docs/design.md §1–§2).

For every family and head: with dropout off and noise ratio 1e-6, the regularised forward returns the model's own
loss and logits (to 1e-5) from one pass of 2B rows, and a penalty of ~0; eval mode, `torch.no_grad()` and
`remove` give the plain model. Then the pieces: shared dropout, the fallbacks, gradients, batch entries, the
chosen layers, argument checks, threads, host syncs.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transformers as tr
from transformers.modeling_outputs import BaseModelOutput

import lnsr_fast as lf
from families import B, FAMILIES, T, V, make_batch, make_model
from lnsr_fast import pairing
from lnsr_fast.regularize import word_embeddings

tr.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = 1e-6   # noise ratio: with shared dropout masks the penalty is ~1e-11, with independent ones ~1


@contextlib.contextmanager
def passes(model):
    """The rows of every pass's word embeddings (2B: one doubled pass; B, B: two passes)."""
    rows = []
    hook = word_embeddings(model).register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    try:
        yield rows
    finally:
        hook.remove()


def fallbacks(record) -> list[str]:
    return [str(w.message) for w in record if "lnsr_fast: running two passes" in str(w.message)]


def quietly(model, batch):
    """model(**batch), asserting that lnsr_fast did not fall back to two passes."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model(**batch)
    assert not fallbacks(record), fallbacks(record)
    return out


def logit_keys(head: str) -> tuple[str, ...]:
    return ("start_logits", "end_logits") if head == "qa" else ("logits",)


# ----------------------------------------------------------------------------------------------------------
# 1. Every family and head: the model's own loss, from one doubled pass.

SEQ_VARIANTS = {"single": (3, None), "multi": (3, None), "regression": (1, None), "soft": (3, None)}
CASES = []
for _family, (_, _heads, _pads) in FAMILIES.items():
    for _head in _heads:
        pads = _pads if _head in ("seq", "clm") else ("right",)
        for _pad in pads:
            CASES.append(pytest.param(_family, _head, "single", _pad, id=f"{_family}-{_head}-{_pad}"))
for _family, _variant in (("bert", "multi"), ("bert", "regression"), ("llama", "multi"), ("gpt2", "regression"),
                          ("deberta-v2", "soft"), ("deberta-v2", "regression")):
    CASES.append(pytest.param(_family, "seq", _variant, "right", id=f"{_family}-seq-{_variant}"))
TWO_PASS = {"bert-seq-right", "gpt2-clm-left", "llama-seq-right", "t5-s2s-right", "bert-seq-regression"}


@pytest.mark.parametrize("family,head,variant,pad", CASES)
def test_the_loss_is_the_models_own_plus_the_penalty(family, head, variant, pad, request):
    num_labels, problem_type = SEQ_VARIANTS[variant]
    model = make_model(family, head, num_labels=num_labels, problem_type=problem_type)
    batch = make_batch(model, head, pad, label_kind=variant)
    ref = model(**batch)
    model.config.problem_type = problem_type   # Hugging Face sets it at the first call
    for mode in ("concat", "two_pass") if request.node.callspec.id in TWO_PASS else ("concat",):
        handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, mode=mode))
        with passes(model) as rows:
            out = quietly(model, batch)
        assert rows == ([2 * B] if mode == "concat" else [B, B])
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
        assert list(out.keys())[0] == "loss" and out[0] is out.loss   # as Hugging Face returns it
        for key in logit_keys(head):
            got, want = out[key], ref[key]
            if family == "deberta-v2" and variant == "regression":   # DeBERTa flattens its logits for its loss
                got = got.reshape(want.shape)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not any("hidden_states" in k for k in out.keys())   # recorded for the penalty, not returned
        torch.testing.assert_close(handle.last["task_loss"], ref.loss.detach(), atol=1e-5, rtol=0)
        assert 0 <= handle.last["lnsr_penalty"] < 1e-8
        assert lf.remove(model) is model and "forward" not in vars(model)
        model.config.problem_type = problem_type
        torch.testing.assert_close(model(**batch).loss, ref.loss, atol=0, rtol=0)
        model.config.problem_type = problem_type
    # In-manifold noise at its default ratio: a clearly positive penalty, the same task loss.
    handle = lf.apply(model, lf.LNSRConfig(noise="in_manifold", k=4, weight=1.0))
    out = quietly(model, batch)
    lf.remove(model)
    torch.testing.assert_close(handle.last["task_loss"], ref.loss.detach(), atol=1e-5, rtol=0)
    assert torch.isfinite(out.loss) and handle.last["lnsr_penalty"] > 1e-6


def test_eval_mode_no_grad_generation_and_remove_give_the_plain_model():
    model = make_model("gpt2", "clm", dropout=0.1)
    batch = make_batch(model, "clm", "left")
    model.eval()
    want = model(**batch).logits
    prompt = batch["input_ids"][:1, :4]
    model.train()
    torch.manual_seed(1)
    want_generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.eval()
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian"))
    with passes(model) as rows:
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)   # eval mode
        model.train()
        with torch.no_grad():
            model(**batch)                                                       # no gradients
        torch.manual_seed(1)                                                     # generating in training mode
        assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0), want_generated)
    assert rows[:2] == [B, B] and all(r == 1 for r in rows[3:])   # never doubled
    assert handle.last == {}
    with passes(model) as rows:
        model(**batch)
    assert rows == [2 * B]
    lf.remove(model)
    model.eval()
    torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# 2. Dropout: shared masks leave only the noise in the penalty, in one pass, attention kept fused.

DROPOUT_CASES = [   # (family, attention implementation, padding side)
    pytest.param("bert", "sdpa", "right", id="bert-sdpa"),
    pytest.param("bert", "eager", "left", id="bert-eager-left"),
    pytest.param("gpt2", "sdpa", "left", id="gpt2-sdpa-left"),
    pytest.param("gpt2", "eager", "left", id="gpt2-eager-left"),
    pytest.param("distilbert", "sdpa", "right", id="distilbert"),
    pytest.param("deberta-v2", None, "right", id="deberta-v2-relative"),   # drops out its unbatched position table
    pytest.param("albert", "sdpa", "right", id="albert"),
    pytest.param("modernbert", "sdpa", "right", id="modernbert"),
    pytest.param("llama", "sdpa", "left", id="llama-left"),
    pytest.param("bart", "sdpa", "right", id="bart"),
    pytest.param("t5", "sdpa", "right", id="t5"),
]


@pytest.mark.parametrize("family,attn,pad", DROPOUT_CASES)
def test_shared_dropout_leaves_only_the_noise(family, attn, pad):
    model = make_model(family, "seq", dropout=0.1, attn=attn)
    batch = make_batch(model, "seq", pad)
    penalties = {}
    for dropout in ("shared", "independent"):
        handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, dropout=dropout))
        with passes(model) as rows:
            out = quietly(model, batch)
        lf.remove(model)
        assert rows == [2 * B] and torch.isfinite(out.loss)
        penalties[dropout] = float(handle.last["lnsr_penalty"])
    assert penalties["independent"] > 1e-3, "dropout was not active"
    assert penalties["shared"] < 1e-8


def test_the_clean_half_draws_the_plain_models_dropout_masks():
    """With shared dropout the clean copy consumes the default generator as the plain model does: from one seed,
    its loss and logits are the plain training forward's (so LNSR adds nothing but the penalty to FT's run)."""
    model = make_model("bert", "seq", dropout=0.3)
    batch = make_batch(model, "seq")
    torch.manual_seed(7)
    ref = model(**batch)
    lf.apply(model, lf.LNSRConfig(noise="gaussian"))
    torch.manual_seed(7)
    out = model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.allclose(model(**batch).logits, ref.logits)   # the masks matter at this rate


def test_dropout_stays_paired_under_torch_compile():
    model = make_model("bert", "seq", dropout=0.1)
    penalties = {}
    for dropout in ("shared", "independent"):
        torch._dynamo.reset()
        handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, dropout=dropout))
        torch.compile(model, backend="aot_eager")(**make_batch(model, "seq")).loss.backward()
        lf.remove(model)
        penalties[dropout] = float(handle.last["lnsr_penalty"])
    assert penalties["shared"] < 1e-8 < 1e-3 < penalties["independent"]


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("family,head", [("bert", "seq"), ("llama", "seq"), ("bart", "s2s")])
def test_gradient_checkpointing_redraws_the_paired_masks(family, head, use_reentrant, monkeypatch):
    """Checkpointing recomputes each layer in backward, outside the pass: the penalty stays ~0 at ratio 1e-6 and
    the gradients equal those without checkpointing (same seed, dropout 0.1, ratio 0.05); left unpaired, the
    recomputation draws other masks (torch's non-reentrant checkpoint notices the different work, the reentrant
    one silently gives other gradients)."""
    def gradients(checkpointing: bool, ratio: float = 0.05):
        model = make_model(family, head, dropout=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=ratio, weight=1.0))
        torch.manual_seed(3)
        quietly(model, make_batch(model, head)).loss.backward()
        return handle.last["lnsr_penalty"], torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert gradients(True, TINY)[0] < 1e-8
    plain = gradients(False)[1]
    torch.testing.assert_close(gradients(True)[1], plain, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr("lnsr_fast.regularize.pair_checkpointing", lambda model: None)
    try:
        unpaired = gradients(True)[1]
    except torch.utils.checkpoint.CheckpointError:
        assert not use_reentrant
    else:
        assert (unpaired - plain).abs().max() > 1e-4


class TinyModel(nn.Module):
    """A minimal HF-like model: embeddings, two tanh layers; optionally randomness that cannot be paired."""

    def __init__(self, draw: str | None = None):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 2})()
        self.embed = nn.Embedding(V, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.draw = draw

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, return_dict=True):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            h = torch.tanh(layer(h))
            if self.training and self.draw == "rand":   # a random scale per row (stochastic-depth style)
                h = h * (0.5 + torch.rand(h.shape[0], 1, 1))
            elif self.training and self.draw == "bernoulli_":   # a hand-made dropout, not F.dropout
                h = h * torch.empty_like(h).bernoulli_(0.8) / 0.8
        return BaseModelOutput(last_hidden_state=h)


@pytest.mark.parametrize("draw", ["rand", "bernoulli_"])
def test_randomness_that_cannot_be_paired_falls_back_to_two_passes_once(draw):
    model = TinyModel(draw).train()
    batch = {"input_ids": torch.randint(0, V, (B, T))}
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0))
    with pytest.warns(UserWarning, match="two passes.*cannot be shared"), passes(model) as rows:
        out = model(**batch)
    assert rows == [2 * B, B, B]   # the doubled attempt, then two passes
    assert handle.last["lnsr_penalty"] < 1e-8 and out.loss is out["loss"]   # the noisy pass redrew the clean one's
    with passes(model) as rows:
        quietly(model, batch)   # no second warning
    assert rows == [B, B]
    lf.remove(model)
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, dropout="independent"))
    with passes(model) as rows:
        quietly(model, batch)   # independent randomness is what a doubled pass draws anyway
    assert rows == [2 * B] and handle.last["lnsr_penalty"] > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_an_unknown_head_with_labels_runs_two_passes_with_the_models_loss(training):
    torch.manual_seed(0)
    from families import make_config
    model = tr.ElectraForPreTraining(make_config("electra")).train()   # its loss reads attention_mask, not -100
    batch = {**make_batch(model), "labels": torch.randint(0, 2, (B, T))}
    ref = model(**batch).loss
    lf.apply(model, lf.LNSRConfig(noise="gaussian"))
    with pytest.warns(UserWarning, match="two passes.*task loss"), passes(model) as rows:
        out = model(**batch)
    assert rows == [B, B]
    torch.testing.assert_close(out.loss - model._lnsr_handle.last["lnsr_penalty"], ref, atol=1e-6, rtol=0)
    with passes(model) as rows:
        quietly(model, {k: v for k, v in batch.items() if k != "labels"})
    assert rows == [2 * B]   # without the labels one pass serves


# ----------------------------------------------------------------------------------------------------------
# 3. Gradients.

def test_gradients_reach_every_parameter_the_task_loss_reaches_and_the_noise_carries_none():
    model = make_model("bert", "seq")
    batch = make_batch(model, "seq")
    model(**batch).loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad()
    drawn = []
    noise = lf.GaussianNoise(ratio=0.05, seed=0)

    def sampler(input_ids, x, mask=None):
        assert not x.requires_grad   # ε is computed from detached embeddings
        drawn.append(noise(input_ids, x, mask))
        return drawn[-1]

    lf.apply(model, lf.LNSRConfig(noise=sampler, weight=1.0))
    model(**batch).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "bert.embeddings.word_embeddings.weight" in reached and reached <= got
    assert len(drawn) == 1 and drawn[0].grad_fn is None and not drawn[0].requires_grad and drawn[0].abs().sum() > 0


@pytest.mark.parametrize("detach_clean", [False, True])
def test_the_penalty_gradient_goes_through_both_copies_or_the_noisy_one(detach_clean):
    """Without labels the model's loss is the penalty alone: its gradient reaches the word embeddings of the noisy
    copy, of the clean copy unless detach_clean, and every layer."""
    model = make_model("bert", "seq")
    captured = []

    def keep(module, args, out):   # registered before apply: sees the doubled embeddings before the noise
        out.retain_grad()
        captured.append(out)

    word_embeddings(model).register_forward_hook(keep)
    lf.apply(model, lf.LNSRConfig(noise="gaussian", weight=1.0, detach_clean=detach_clean))
    batch = {k: v for k, v in make_batch(model, "seq").items() if k != "labels"}
    with pytest.warns(UserWarning, match="without labels"):
        out = model(**batch)
    out.loss.backward()
    g = captured[-1].grad
    assert g.shape[0] == 2 * B and g[B:].abs().sum() > 0
    assert (g[:B].abs().sum() == 0) == detach_clean
    for layer in model.bert.encoder.layer:
        assert layer.output.dense.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None or model.classifier.weight.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------
# 4. What the caller passes and gets.

@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
@pytest.mark.parametrize("entry", ["token_type_ids", "position_ids", "position_ids-broadcast"])
def test_other_batch_entries_reach_the_model(entry, family):
    model = make_model(family, "tok", type_vocab_size=2)
    batch = make_batch(model, "tok")
    if entry == "token_type_ids":
        value = torch.zeros(B, T, dtype=torch.long)
        value[:, 4:] = 1
    elif entry == "position_ids":
        value = torch.arange(T).repeat(B, 1) + torch.arange(B)[:, None] + 2
    else:
        value = torch.arange(T)[None] + 5   # [1, T]: broadcast over the batch
    batch[entry.split("-")[0]] = value
    ref = model(**batch)
    lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY))
    out = quietly(model, batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)


def test_positional_arguments_tuples_and_requested_hidden_states():
    model = make_model("bert", "seq")
    batch = make_batch(model, "seq")
    ref = model(**batch, output_hidden_states=True)
    lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY))
    out = quietly(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                          "labels": batch["labels"], "output_hidden_states": True})
    assert len(out.hidden_states) == 3 and all(h.shape[0] == B for h in out.hidden_states)
    for h, h_ref in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    loss, logits = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_dict=False)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)
    assert logits.shape == (B, 3)


@pytest.mark.parametrize("layers,weight,reduction,fraction", [
    ([0, 2], [0.3, 1.7], "sum", 1.0),
    ([-1], 2.0, "sum", 1.0),
    (None, [0.5, 2.0], "mean", 1.0),
    (1, 1.0, "sum", 1.0),
    (None, 0.5, "sequence", 1.0),
    (None, 1.0, "sum", 0.5),
    ([2], 1.0, "sequence", 0.25),
])
def test_the_penalty_over_chosen_layers_is_the_hand_computation(layers, weight, reduction, fraction):
    """BERT's recorded layer outputs are its hidden_states; the penalty is Σ_r λ_r · mean over real tokens of
    ‖h_r − h̃_r‖² (/ d for "mean"; a sum over each sequence's tokens averaged over the sequences for
    "sequence"), with ε drawn by the same seeded sampler, over the first ⌈fraction·B⌉ rows."""
    model = make_model("bert", "seq")
    batch = make_batch(model, "seq")
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", seed=3, weight=weight, layers=layers, reduction=reduction,
                                           fraction=fraction))
    with passes(model) as rows:
        quietly(model, batch)
    lf.remove(model)
    m = math.ceil(fraction * B)
    assert rows == [B + m]
    batch = {k: v[:m] for k, v in batch.items()}
    eps = lf.GaussianNoise(ratio=0.05, seed=3)
    x = model.get_input_embeddings()(batch["input_ids"])
    noisy_hook = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out + eps(a[0], out.detach(), batch["attention_mask"]))
    with torch.no_grad():
        noisy = model(**batch, output_hidden_states=True).hidden_states
        noisy_hook.remove()
        clean = model(**batch, output_hidden_states=True).hidden_states
    chosen = [layers] if isinstance(layers, int) else layers if layers is not None else [1, 2]
    weights = weight if isinstance(weight, list) else [weight] * len(chosen)
    real = batch["attention_mask"].bool()
    want = 0.0
    for r, w in zip(chosen, weights):
        per_token = (clean[r] - noisy[r])[real].pow(2).sum(-1)
        if reduction == "sequence":
            want = want + w * per_token.sum() / m
        else:
            want = want + w * (per_token / x.shape[-1] if reduction == "mean" else per_token).mean()
    assert want > 0
    torch.testing.assert_close(handle.last["lnsr_penalty"], want, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("family,pad", [("bert", "right"), ("llama", "left"), ("bart", "right")])
def test_a_fraction_of_noisy_rows_keeps_the_models_loss_and_the_paired_masks(family, pad):
    """fraction=0.25: the clean rows give the model's own loss and logits, the noisy copies of the first
    ⌈B/4⌉ rows ride in the same pass with their dropout masks, so only the noise moves them."""
    model = make_model(family, "seq")
    batch = make_batch(model, "seq", pad)
    ref = model(**batch)
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, fraction=0.25))
    with passes(model) as rows:
        out = quietly(model, batch)
    lf.remove(model)
    assert rows == [B + math.ceil(B / 4)]
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    model = make_model(family, "seq", dropout=0.1)
    penalties = {}
    for dropout in ("shared", "independent"):
        handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, fraction=0.25, dropout=dropout))
        quietly(model, batch).loss.backward()
        lf.remove(model)
        penalties[dropout] = float(handle.last["lnsr_penalty"])
    assert penalties["shared"] < 1e-8 < 1e-3 < penalties["independent"]


def test_the_decoder_stack_of_an_encoder_decoder_model():
    model = make_model("t5", "s2s")
    batch = make_batch(model, "s2s")
    encoder = lf.apply(model, lf.LNSRConfig(noise="gaussian", weight=1.0))
    model(**batch)
    lf.remove(model)
    decoder = lf.apply(model, lf.LNSRConfig(noise="gaussian", weight=1.0, stack="decoder"))
    model(**batch)
    assert len(decoder.method.stack_layers) == 2 and decoder.method.stack_layers[0] is model.decoder.block[0]
    assert encoder.method.stack_layers[0] is model.encoder.block[0]
    assert 0 < decoder.last["lnsr_penalty"] != encoder.last["lnsr_penalty"]


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_both_copies_decode_the_same_decoder_inputs(family):
    """The noisy copy's decoder inputs are derived from the clean labels, as the clean copy's are (BART's LM was
    once taken for a masked LM, whose ignored labels then became the noisy copy's decoder inputs)."""
    model = make_model(family, "s2s")
    assert lf.regularize.heads.head_kind(model) == "seq2seq_lm"
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0, stack="decoder"))
    quietly(model, make_batch(model, "s2s"))
    assert handle.last["lnsr_penalty"] < 1e-8


# ----------------------------------------------------------------------------------------------------------
# 5. Checks.

@pytest.mark.parametrize("make,config,error,match", [
    (lambda: nn.Linear(4, 4), None, TypeError, "get_input_embeddings"),
    (lambda: torch.compile(make_model("bert", "seq")), None, TypeError, "before wrapping it in OptimizedModule"),
    (lambda: make_model("bert", "seq"), {"noise": "gaussian"}, TypeError, "config must be an LNSRConfig"),
    (lambda: make_model("bert", "seq"), lf.LNSRConfig(layers=[3]), ValueError, r"layers \[3\] out of range"),
    (lambda: make_model("bert", "seq"), lf.LNSRConfig(layers=[0, -4]), ValueError, r"layers \[-4\] out of range"),
    (lambda: make_model("bert", "seq"), lf.LNSRConfig(weight=[1.0, 2.0, 3.0]), ValueError,
     "weight has 3 entries but there are 2 layers"),
    (lambda: make_model("bert", "seq"), lf.LNSRConfig(stack="decoder"), ValueError, "encoder–decoder models"),
])
def test_apply_refuses_what_it_cannot_do(make, config, error, match):
    with pytest.raises(error, match=match):
        lf.apply(make(), config)


def test_apply_twice_overrides_and_removal():
    model = make_model("bert", "seq")
    handle = lf.apply(model, lf.LNSRConfig(noise="gaussian"), weight=0.5, layers=2)
    assert handle.method.config.weight == 0.5 and handle.method.config.layers == [2]
    with pytest.raises(ValueError, match="already applied"):
        lf.apply(model)
    assert lf.handle_of(model) is handle and lf.handle_of(torch.compile(model)) is handle
    assert lf.remove(model) is model and lf.handle_of(model) is None and lf.remove(model) is model


@pytest.mark.parametrize("kwargs,error,field", [
    ({"noise": lf.GaussianNoise}, TypeError, "noise"),
    ({"noise": "uniform"}, ValueError, "noise"),
    ({"ratio": 0.0}, ValueError, "ratio"),
    ({"ratio": float("nan")}, ValueError, "ratio"),
    ({"ratio": "0.1"}, TypeError, "ratio"),
    ({"k": 0}, ValueError, "k"),
    ({"k": 2.5}, TypeError, "k"),
    ({"weight": -1.0}, ValueError, "weight"),
    ({"weight": []}, ValueError, "weight"),
    ({"weight": "1"}, TypeError, "weight"),
    ({"weight": [1.0, float("inf")]}, ValueError, "weight"),
    ({"layers": []}, ValueError, "layers"),
    ({"layers": [1.5]}, TypeError, "layers"),
    ({"weight": [1.0, 0.5], "layers": [1]}, ValueError, "weight"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"mode": "parallel"}, ValueError, "mode"),
    ({"dropout": "off"}, ValueError, "dropout"),
    ({"stack": "middle"}, ValueError, "stack"),
    ({"seed": 1.0}, TypeError, "seed"),
    ({"refresh_every": 0}, ValueError, "refresh_every"),
    ({"refresh_every": True}, TypeError, "refresh_every"),
    ({"noise": "gaussian", "refresh_every": 10}, ValueError, "refresh_every"),
    ({"knn_backend": "annoy"}, ValueError, "knn_backend"),
    ({"detach_clean": 1}, TypeError, "detach_clean"),
    ({"fraction": 0.0}, ValueError, "fraction"),
    ({"fraction": 1.5}, ValueError, "fraction"),
    ({"fraction": "half"}, TypeError, "fraction"),
    ({"fraction": 0.5, "mode": "two_pass"}, ValueError, "fraction"),
])
def test_config_rejects_bad_fields(kwargs, error, field):
    with pytest.raises(error, match=rf"LNSRConfig\.{field}\b"):
        lf.LNSRConfig(**kwargs)


def test_bad_batches_fail_as_the_model_fails():
    model = make_model("bert", "seq")
    lf.apply(model, lf.LNSRConfig(noise="gaussian"))
    with pytest.raises(ValueError, match="batch is empty"):
        model(input_ids=torch.zeros(0, T, dtype=torch.long))
    with pytest.raises(IndexError):   # the model's own embedding lookup checks the ids (no host sync of ours)
        model(input_ids=torch.full((B, T), V))


# ----------------------------------------------------------------------------------------------------------
# 6. Threads and host syncs.

def test_threads_each_pair_their_own_pass_and_leave_torch_alone():
    """Two LNSR models train in two threads at once while a third thread runs a plain model with dropout: each
    pass pairs its own masks, the plain forward is untouched, and torch.nn.functional is never reassigned."""
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    barrier, results, errors = threading.Barrier(3), {}, []

    def meet(module, args, output):   # the three forwards are inside their first layer at the same time
        barrier.wait(timeout=30)

    def lnsr_thread(name):
        try:
            model = make_model("bert", "seq", dropout=0.1, seed=len(name))
            handle = lf.apply(model, lf.LNSRConfig(noise="gaussian", ratio=TINY, weight=1.0))
            model.bert.encoder.layer[0].register_forward_hook(meet)
            model(**make_batch(model, "seq"))
            results[name] = float(handle.last["lnsr_penalty"])
        except Exception as e:   # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def plain_thread():
        try:
            model = make_model("bert", "seq", dropout=0.5)
            model.bert.encoder.layer[0].register_forward_hook(meet)
            out = model(**make_batch(model, "seq"))
            results["plain"] = tuple(out.logits.shape)
        except Exception as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=lnsr_thread, args=(n,)) for n in ("a", "bb")] + [threading.Thread(target=plain_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results["a"] < 1e-8 and results["bb"] < 1e-8 and results["plain"] == (B, 3)
    assert F.dropout is dropout and F.scaled_dot_product_attention is sdpa
    assert pairing.active_mode() is None


SYNCS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu")


@pytest.mark.parametrize("noise", ["gaussian", "in_manifold"])
def test_lnsr_adds_no_host_sync_to_the_step(noise, monkeypatch):
    """Counts the tensor methods that make the host wait for the device, in a plain and in an LNSR training
    step (forward and backward) of the same model: LNSR adds none (the token ids are checked by the model's own
    embedding lookup, not by the sampler)."""
    counts = {"n": 0, "depth": 0}

    def counting(method):
        def wrapper(self, *args, **kwargs):
            # once per call: a torch function mode (the dropout pairing) dispatches the same call to it again
            counts["n"] += counts["depth"] == 0
            counts["depth"] += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                counts["depth"] -= 1
        return wrapper

    steps = {}
    for name in ("plain", "lnsr"):
        model = make_model("bert", "seq", dropout=0.1)
        if name == "lnsr":
            lf.apply(model, lf.LNSRConfig(noise=noise, k=4))
        batch = make_batch(model, "seq")
        model(**batch).loss.backward()   # the first call may set things up
        with monkeypatch.context() as patch:
            for method in SYNCS:
                patch.setattr(torch.Tensor, method, counting(getattr(torch.Tensor, method)))
            counts["n"] = 0
            model(**{k: v.clone() for k, v in batch.items()}).loss.backward()
        steps[name] = counts["n"]
    assert steps["lnsr"] == steps["plain"], steps
