"""LNSR on tiny random Hugging Face models (DESIGN.md §1–§2): the task loss, logits and hidden states of the
clean half against the model's own forward; concat against two_pass; shared and independent dropout; the
fallbacks; gradients; pass-through of batch entries; the choice of layers and weights; argument checks.

Every model is built from a config with random weights (hidden 32, 2 layers, 4 heads): nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

tr = pytest.importorskip("transformers")
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from lnsr_fast import GaussianNoise, InManifoldNoise, LNSR  # noqa: E402
from lnsr_fast.lnsr import MODES  # noqa: E402

tr.logging.set_verbosity_error()

V, B, T = 100, 3, 7
FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2", "electra", "gpt2")
HEAD_CLASSES = {
    "seq": tr.AutoModelForSequenceClassification,
    "tok": tr.AutoModelForTokenClassification,
    "qa": tr.AutoModelForQuestionAnswering,
    "clm": tr.AutoModelForCausalLM,
    "mlm": tr.AutoModelForMaskedLM,
}
# Every head each family has among these (DistilBERT and DeBERTa-v2 have no causal LM, GPT-2 no masked LM).
FAMILY_HEADS = {
    "bert": ("seq", "tok", "qa", "clm", "mlm"),
    "roberta": ("seq", "tok", "qa", "clm", "mlm"),
    "distilbert": ("seq", "tok", "qa", "mlm"),
    "deberta-v2": ("seq", "tok", "qa", "mlm"),
    "electra": ("seq", "tok", "qa", "clm", "mlm"),
    "gpt2": ("seq", "tok", "qa", "clm"),
}
# Sequence-classification variants: (label kind, num_labels, problem_type).
SEQ_VARIANTS = {
    "single": ("single", 3, None),
    "multi": ("multi", 3, None),
    "multi-set": ("multi", 3, "multi_label_classification"),
    "regression": ("regression", 1, None),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(family: str, dropout: float | None = None, attention_dropout: float | None = None, **overrides):
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64)
    if family == "bert":
        cfg = tr.BertConfig(**common)
    elif family == "roberta":
        cfg = tr.RobertaConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    elif family == "distilbert":
        cfg = tr.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    elif family == "deberta-v2":  # the DeBERTa-v3 layout: relative attention with position buckets
        cfg = tr.DebertaV2Config(**common, relative_attention=True, position_buckets=8, max_relative_positions=16,
                                 pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True)
    elif family == "deberta-v2-absolute":  # no relative attention (the DebertaV2Config default)
        cfg = tr.DebertaV2Config(**common)
    elif family == "electra":  # embedding_size != hidden_size: the noise goes on the 16-wide word embeddings
        cfg = tr.ElectraConfig(**common, embedding_size=16)
    elif family == "gpt2":
        cfg = tr.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, pad_token_id=0,
                            bos_token_id=2, eos_token_id=2)
    else:
        raise ValueError(family)
    names = {"distilbert": (("dropout",), ("attention_dropout",)),
             "gpt2": (("resid_pdrop", "embd_pdrop"), ("attn_pdrop",))}.get(
        family, (("hidden_dropout_prob",), ("attention_probs_dropout_prob",)))
    for value, keys in ((dropout, names[0]), (attention_dropout, names[1])):
        for key in keys if value is not None else ():
            setattr(cfg, key, value)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_model(family: str, head: str | None = None, num_labels: int = 3, problem_type=None, attn=None, **cfg_kw):
    cfg = make_config(family, **cfg_kw)
    cfg.num_labels = 2 if head == "qa" else num_labels
    cfg.problem_type = problem_type
    if head == "clm" and family != "gpt2":
        cfg.is_decoder = True
    torch.manual_seed(0)
    kw = {} if attn is None else {"attn_implementation": attn}
    cls = tr.AutoModel if head is None else HEAD_CLASSES[head]
    return cls.from_config(cfg, **kw).eval()


def make_mask(pad: str) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    if pad == "right":
        mask[1, 5:], mask[2, 3:] = 0, 0
    elif pad == "left":
        mask[1, :2], mask[2, :4] = 0, 0
    else:
        assert pad == "none"
    return mask


def make_batch(model, head: str | None = None, pad: str = "right", label_kind: str = "single", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(pad)
    pad_id = model.config.pad_token_id
    ids = torch.randint(3, V, (B, T), generator=g).masked_fill(mask == 0, pad_id)  # real tokens never equal pad_id
    batch = {"input_ids": ids, "attention_mask": mask}
    n = model.config.num_labels
    if head == "seq":
        batch["labels"] = {"single": torch.randint(0, n, (B,), generator=g),
                           "multi": torch.randint(0, 2, (B, n), generator=g).float(),
                           "regression": torch.randn(B, generator=g)}[label_kind]
    elif head == "tok":
        y = torch.randint(0, n, (B, T), generator=g).masked_fill(mask == 0, -100)
        y[0, 1] = -100  # an ignored real token too
        batch["labels"] = y
    elif head in ("mlm", "clm"):
        y = ids.masked_fill(mask == 0, -100)
        if head == "mlm":  # predict only some tokens, as a masked-LM collator does
            y = y.masked_fill(torch.rand(B, T, generator=g) < 0.5, -100)
            y[0, 0] = ids[0, 0]
        batch["labels"] = y
    elif head == "qa":  # 50 lies outside the sequence: HF ignores such positions
        assert pad == "right"
        batch["start_positions"] = torch.tensor([1, 4, 50])
        batch["end_positions"] = torch.tensor([2, 3, 1])
    return batch


def own(model, batch: dict, **kw):
    """The model's own forward on the clean batch; problem_type as it was (HF sets it on the first call)."""
    problem_type = model.config.problem_type
    try:
        with torch.no_grad():
            return model(**batch, output_hidden_states=True, **kw)
    finally:
        model.config.problem_type = problem_type


@contextlib.contextmanager
def passes(model):
    """Records the number of rows of every forward of `model` (2B: one concat pass; B, B: two passes)."""
    rows = []

    def hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        rows.append(int(x.shape[0]) if x is not None else int(args[0].shape[0]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def lnsr_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("LNSR")]


def run_quietly(lnsr, batch, grad=False):
    """lnsr(**batch), asserting it did not fall back to two passes."""
    with warnings.catch_warnings(record=True) as record, (contextlib.nullcontext() if grad else torch.no_grad()):
        warnings.simplefilter("always")
        out = lnsr(**batch)
    assert not lnsr_warnings(record), lnsr_warnings(record)
    return out


def logit_keys(head: str) -> tuple[str, ...]:
    return ("start_logits", "end_logits") if head == "qa" else ("logits",)


# ----------------------------------------------------------------------------------------------------
# 1. The clean half is the model's own forward: loss, logits, hidden states.

CASES = []
for _family in FAMILIES:
    for _head in FAMILY_HEADS[_family]:
        if _head != "seq":
            CASES.append(pytest.param(_family, _head, "single", "right", id=f"{_family}-{_head}"))
            continue
        # GPT-2 pools the last token that is not pad_token_id, which it finds in input_ids; LNSR passes
        # inputs_embeds, where it takes the last position. So no right padding for GPT-2 here (see the xfail
        # below): no padding, and left padding, where the last position is real.
        pads = ("none", "left") if _family == "gpt2" else ("right",)
        for _variant in SEQ_VARIANTS:
            for _pad in pads if _variant == "single" else pads[:1]:
                CASES.append(pytest.param(_family, _head, _variant, _pad, id=f"{_family}-{_head}-{_variant}-{_pad}"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,head,variant,pad", CASES)
def test_clean_half_equals_the_models_own_forward(family, head, variant, pad, mode):
    label_kind, num_labels, problem_type = SEQ_VARIANTS[variant] if head == "seq" else ("single", 3, None)
    model = make_model(family, head, num_labels=num_labels, problem_type=problem_type)
    batch = make_batch(model, head, pad=pad, label_kind=label_kind)
    ref = own(model, batch)
    assert model.config.problem_type == problem_type  # "unset" really is unset for LNSR
    lnsr = LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode)
    with passes(model) as rows:
        out, reg = run_quietly(lnsr, batch)
    assert rows == ([2 * B] if mode == "concat" else [B, B])
    model.config.problem_type = problem_type

    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert list(out.keys())[0] == "loss" and out[0] is out.loss  # outputs[0] is the loss, as in HF
    for key in logit_keys(head):
        got, want = out[key], ref[key]
        if family == "deberta-v2" and variant == "regression":  # DeBERTa reshapes its logits to [B] for the loss
            got = got.reshape(want.shape)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for h, h_ref in zip(out.hidden_states, ref.hidden_states):
        assert h.shape[0] == B
        torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(reg) and reg > 0


@pytest.mark.xfail(strict=True, reason="GPT2ForSequenceClassification finds the last non-pad token in input_ids; "
                                       "given inputs_embeds it pools the last position, a pad token under right padding")
@pytest.mark.parametrize("mode", MODES)
def test_gpt2_sequence_classification_with_right_padding_is_a_known_limitation(mode):
    model = make_model("gpt2", "seq")
    batch = make_batch(model, "seq", pad="right")
    out, _ = LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode)(**batch)
    torch.testing.assert_close(out.loss, own(model, batch).loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_roberta_positions_follow_input_ids_under_left_padding(mode):
    # RoBERTa numbers positions from input_ids (padding skipped); from inputs_embeds it would count every position.
    model = make_model("roberta", "tok")
    batch = make_batch(model, "tok", pad="left")
    ref = own(model, batch)
    out, _ = run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode), batch)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_causal_lm_loss_with_num_items_in_batch(family, mode):
    model = make_model(family, "clm")
    batch = make_batch(model, "clm")
    n = torch.tensor(11)  # e.g. the label count over gradient-accumulation steps
    ref = own(model, batch, num_items_in_batch=n)
    out, _ = run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode), {**batch, "num_items_in_batch": n})
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert not torch.allclose(ref.loss, own(model, batch).loss)  # the count mattered


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("labels", [[0, -1, 2], [-1, -1, -1]], ids=["one-ignored", "all-ignored"])
def test_deberta_single_label_ignores_negative_labels_like_the_model(labels, mode):
    model = make_model("deberta-v2", "seq")
    batch = {**make_batch(model, "seq"), "labels": torch.tensor(labels)}
    ref = own(model, batch)
    out, _ = run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode), batch)
    torch.testing.assert_close(out.loss.float(), ref.loss.float(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# 2. concat and two_pass compute the same thing in eval mode.

@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("noise_kind", ["gaussian", "in_manifold"])
@pytest.mark.parametrize("family,head", [("bert", "seq"), ("gpt2", "clm"), ("deberta-v2", "tok")])
def test_concat_and_two_pass_agree_in_eval_mode(family, head, noise_kind, reduction):
    model = make_model(family, head)
    batch = make_batch(model, head)

    def sampler():  # two samplers with one seed draw the same ε
        if noise_kind == "gaussian":
            return GaussianNoise(ratio=0.05, seed=7)
        return InManifoldNoise(model.get_input_embeddings(), k=4, ratio=0.1, seed=7)

    out_c, reg_c = run_quietly(LNSR(model, sampler(), mode="concat", reduction=reduction), batch)
    out_t, reg_t = run_quietly(LNSR(model, sampler(), mode="two_pass", reduction=reduction), batch)
    assert reg_c > 0
    torch.testing.assert_close(reg_c, reg_t, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(out_c.loss, out_t.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_c.logits, out_t.logits, atol=1e-6, rtol=1e-5)
    # a different draw gives a different penalty, so the agreement above is not vacuous
    _, reg_other = LNSR(model, GaussianNoise(ratio=0.05, seed=8), mode="two_pass", reduction=reduction)(**batch)
    assert not torch.allclose(reg_other, reg_t, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------
# 3. Dropout in train mode: shared masks leave only the noise in the penalty.

DROPOUT_MODELS = [  # (family, attention implementation, hidden dropout, padding side)
    pytest.param("bert", "sdpa", 0.1, "right", id="bert-sdpa"),
    pytest.param("bert", "sdpa", 0.1, "left", id="bert-sdpa-left-padded"),
    pytest.param("bert", "eager", 0.1, "right", id="bert-eager"),
    pytest.param("bert", "sdpa", 0.0, "right", id="bert-sdpa-attention-dropout-only"),  # sdpa's own dropout, paired
    pytest.param("gpt2", "sdpa", 0.1, "right", id="gpt2-sdpa"),
    # left-padded causal attention has query rows that see no key: they must stay finite (not NaN)
    pytest.param("gpt2", "sdpa", 0.1, "left", id="gpt2-sdpa-left-padded"),
    pytest.param("gpt2", "eager", 0.1, "left", id="gpt2-eager-left-padded"),
    pytest.param("distilbert", "sdpa", 0.1, "right", id="distilbert-sdpa"),
    pytest.param("deberta-v2-absolute", None, 0.1, "right", id="deberta-v2-absolute"),
]
TINY = 1e-6  # noise ratio: with shared masks the penalty is ~1e-11, with independent ones ~10


def _train_penalties(model, batch, mode):
    """Penalties with shared and with independent masks, and the rows of the shared run's forwards."""
    model.train()
    torch.manual_seed(0)
    with passes(model) as rows:
        _, shared = run_quietly(LNSR(model, GaussianNoise(ratio=TINY, seed=0), weight=1.0, mode=mode, dropout="shared"), batch)
    _, independent = run_quietly(LNSR(model, GaussianNoise(ratio=TINY, seed=0), weight=1.0, mode=mode, dropout="independent"), batch)
    return shared, independent, rows


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,attn,hidden_dropout,pad", DROPOUT_MODELS)
def test_shared_dropout_leaves_only_the_noise(family, attn, hidden_dropout, pad, mode):
    model = make_model(family, attn=attn, dropout=hidden_dropout, attention_dropout=0.1 if hidden_dropout else 0.3)
    batch = make_batch(model, pad=pad)
    shared, independent, rows = _train_penalties(model, batch, mode)
    assert rows == ([2 * B] if mode == "concat" else [B, B])  # no fallback: the masks were paired in one pass
    assert torch.isfinite(shared) and torch.isfinite(independent)  # left-padded causal rows stay finite
    assert independent > 1e-3, "dropout was not active"
    assert shared < 1e-8 * independent and shared < 1e-8


@pytest.mark.parametrize("mode", MODES)
def test_deberta_relative_attention_dropout_falls_back_once_and_stays_shared(mode):
    # DeBERTa drops out its relative-position table, a tensor with no batch rows: concat cannot pair it.
    model = make_model("deberta-v2", dropout=0.1, attention_dropout=0.1).train()
    batch = make_batch(model)
    lnsr = LNSR(model, GaussianNoise(ratio=TINY, seed=0), mode=mode)
    if mode == "concat":
        with pytest.warns(UserWarning, match="two_pass"), passes(model) as rows:
            _, reg = lnsr(**batch)
        assert rows == [2 * B, B, B]
    else:
        _, reg = run_quietly(lnsr, batch)
    assert reg < 1e-8
    with passes(model) as rows:
        _, reg = run_quietly(lnsr, batch)  # the warning comes once; the fallback stays
    assert rows == [B, B] and reg < 1e-8
    _, independent = LNSR(model, GaussianNoise(ratio=TINY, seed=0), weight=1.0, mode=mode, dropout="independent")(**batch)
    assert independent > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_shared_dropout_makes_concat_pass_reproducible_from_the_global_seed(mode):
    model = make_model("bert", "seq", dropout=0.1, attention_dropout=0.1).train()
    batch = make_batch(model, "seq")
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        results.append(run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode), batch))
    torch.testing.assert_close(results[0][0].loss, results[1][0].loss, rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# 4. Fallback to two passes.

class TinyModel(nn.Module):
    """A minimal HF-like model: embeddings, two tanh layers, hidden states; optionally extra randomness."""

    def __init__(self, draw: str | None = None, layers_in_config: bool = True):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 2} if layers_in_config else {})()
        self.embed = nn.Embedding(V, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.draw = draw

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False,
                return_dict=True):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        states = [h]
        for layer in self.layers:
            h = torch.tanh(layer(h))
            if self.training and self.draw == "rand":  # a random scale per row (stochastic-depth style)
                h = h * (0.5 + torch.rand(h.shape[0], 1, 1))
            elif self.training and self.draw == "bernoulli_":  # a hand-made dropout, not F.dropout
                h = h * torch.empty_like(h).bernoulli_(0.8) / 0.8
            states.append(h)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) if output_hidden_states else None)


@pytest.mark.parametrize("draw", ["rand", "bernoulli_"])
def test_unpairable_randomness_falls_back_to_two_pass_once(draw):
    model = TinyModel(draw).train()
    batch = {"input_ids": torch.randint(0, V, (B, T)), "attention_mask": make_mask("right")}
    lnsr = LNSR(model, GaussianNoise(ratio=TINY, seed=0), mode="concat", dropout="shared")
    with pytest.warns(UserWarning, match="two_pass.*cannot be shared"), passes(model) as rows:
        _, reg = lnsr(**batch)
    assert rows == [2 * B, B, B]  # the concat attempt, then two passes
    assert reg < 1e-8  # two_pass restored the RNG state: the same draws in both passes
    with passes(model) as rows:
        _, reg = run_quietly(lnsr, batch)  # no second warning
    assert rows == [B, B] and reg < 1e-8
    # independent randomness is what concat draws anyway: no fallback, and a clearly positive penalty
    lnsr = LNSR(model, GaussianNoise(ratio=TINY, seed=0), mode="concat", dropout="independent")
    with passes(model) as rows:
        _, reg = run_quietly(lnsr, batch)
    assert rows == [2 * B] and reg > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_unknown_head_with_labels_falls_back_and_keeps_the_models_loss(training):
    torch.manual_seed(0)
    model = tr.ElectraForPreTraining(make_config("electra")).train(training)  # its loss is not in heads.py
    batch = {**make_batch(model), "labels": torch.randint(0, 2, (B, T))}
    lnsr = LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode="concat")
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="two_pass.*task loss"), passes(model) as rows:
        out, reg = lnsr(**batch)
    assert rows == [B, B]
    torch.manual_seed(1)  # in train mode: the same dropout masks as the clean pass
    ref = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(reg) and reg > 0
    with passes(model) as rows:
        run_quietly(lnsr, batch)  # the warning comes once
    assert rows == [B, B]
    with passes(model) as rows:
        run_quietly(lnsr, {k: v for k, v in batch.items() if k != "labels"})
    assert rows == [2 * B]  # the fallback was for the labels: without them, concat runs again


def test_labels_of_an_unknown_kind_fall_back_even_for_a_known_head():
    # `next_sentence_label` is not split by heads.py: in one 2B pass the model would average both halves.
    model = tr.BertForPreTraining(make_config("bert")).eval()
    batch = {**make_batch(model), "next_sentence_label": torch.randint(0, 2, (B,))}
    lnsr = LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode="concat")
    with pytest.warns(UserWarning, match="next_sentence_label"), passes(model) as rows:
        out, _ = lnsr(**batch)
    assert rows == [B, B]
    torch.testing.assert_close(out.loss, model(**batch).loss, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# 5. Gradients.

@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_parameter_the_task_loss_reaches(mode):
    model = make_model("bert", "seq")
    batch = make_batch(model, "seq")
    model.zero_grad()
    model(**batch).loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad()
    out, reg = run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode), batch, grad=True)
    (out.loss + reg).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "bert.embeddings.word_embeddings.weight" in reached
    assert reached <= got
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the penalty alone reaches the embeddings and every transformer layer
    model.zero_grad()
    _, reg = run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode), batch, grad=True)
    reg.backward()
    emb = model.get_input_embeddings().weight.grad
    assert emb is not None and emb.abs().sum() > 0
    for i in range(2):
        assert model.bert.encoder.layer[i].output.dense.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("noise_kind", ["gaussian", "in_manifold"])
def test_noise_carries_no_gradient(noise_kind, mode):
    model = make_model("bert", "seq")
    base = (GaussianNoise(ratio=0.05, seed=0) if noise_kind == "gaussian"
            else InManifoldNoise(model.get_input_embeddings(), k=4, ratio=0.1, seed=0))
    drawn = []

    def noise(input_ids, inputs_embeds, attention_mask=None):
        assert inputs_embeds.requires_grad  # the embeddings it is computed from do carry gradient
        drawn.append(base(input_ids, inputs_embeds, attention_mask))
        return drawn[-1]

    out, reg = run_quietly(LNSR(model, noise, mode=mode), make_batch(model, "seq"), grad=True)
    (out.loss + reg).backward()
    assert len(drawn) == 1 and not drawn[0].requires_grad and drawn[0].grad_fn is None
    assert drawn[0].abs().sum() > 0


def _grad_of_penalty_wrt_input(model, batch, mode, detach_clean, seed=3):
    x = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    lnsr = LNSR(model, GaussianNoise(ratio=0.05, seed=seed), weight=1.0, mode=mode, detach_clean=detach_clean)
    _, reg = run_quietly(lnsr, {**rest, "inputs_embeds": x}, grad=True)
    return torch.autograd.grad(reg, x)[0]


@pytest.mark.parametrize("mode", MODES)
def test_detach_clean_stops_the_gradient_through_the_clean_half(mode):
    model = make_model("bert")
    batch = make_batch(model)
    mask = batch["attention_mask"]
    # by hand: clean pass detached, noisy pass differentiated
    x = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    eps = GaussianNoise(ratio=0.05, seed=3)(None, x, mask)
    clean = model(inputs_embeds=x.detach(), attention_mask=mask, output_hidden_states=True).hidden_states
    noisy = model(inputs_embeds=x + eps, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    by_hand = sum((c - n)[real].pow(2).sum(-1).mean() for c, n in zip(clean[1:], noisy[1:]))
    want = torch.autograd.grad(by_hand, x)[0]

    got = _grad_of_penalty_wrt_input(model, batch, mode, detach_clean=True)
    both = _grad_of_penalty_wrt_input(model, batch, mode, detach_clean=False)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-3)
    assert not torch.allclose(both, want, atol=1e-6, rtol=1e-2)  # through both halves it differs

    if mode == "concat":  # the clean rows of the one 2B pass get no gradient at all
        captured = []

        def hook(module, args, kwargs):
            kwargs["inputs_embeds"].retain_grad()
            captured.append(kwargs["inputs_embeds"])

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for detach_clean in (True, False):
                _, reg = LNSR(model, GaussianNoise(ratio=0.05, seed=3), detach_clean=detach_clean)(**batch)
                reg.backward()
                g = captured[-1].grad
                assert g[B:].abs().sum() > 0
                assert (g[:B].abs().sum() == 0) == detach_clean
        finally:
            handle.remove()


# ----------------------------------------------------------------------------------------------------
# 6. Other batch entries reach the model.

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["bert", "gpt2", "roberta"])
@pytest.mark.parametrize("entry", ["token_type_ids", "position_ids", "position_ids-broadcast"])
def test_batch_entries_are_passed_to_the_model(entry, family, mode):
    model = make_model(family, "tok", type_vocab_size=2)
    batch = make_batch(model, "tok")
    if entry == "token_type_ids":
        value = torch.zeros(B, T, dtype=torch.long)
        value[:, 4:] = 1
    elif entry == "position_ids":
        value = torch.arange(T).repeat(B, 1) + torch.arange(B)[:, None] + 2
    else:
        value = torch.arange(T)[None] + 5  # [1, T]: broadcast over the batch
    lnsr = LNSR(model, GaussianNoise(ratio=0.05, seed=0), mode=mode)
    with_entry, _ = run_quietly(lnsr, {**batch, entry.split("-")[0]: value})
    without, _ = run_quietly(lnsr, batch)
    ref = own(model, {**batch, entry.split("-")[0]: value})
    torch.testing.assert_close(with_entry.logits, ref.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_entry.loss, ref.loss, atol=1e-6, rtol=0)
    assert (with_entry.logits - without.logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# 7. Chosen layers and weights.

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers,weight,reduction", [
    ([0, 2], [0.3, 1.7], "sum"),
    ([-1], 2.0, "sum"),
    (None, [0.5, 2.0], "mean"),
    ([1], 1.0, "sum"),
])
def test_penalty_over_chosen_layers_matches_a_hand_computation(layers, weight, reduction, mode):
    model = make_model("bert")
    batch = make_batch(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _, reg = run_quietly(LNSR(model, GaussianNoise(ratio=0.05, seed=3), weight=weight, layers=layers, mode=mode,
                              reduction=reduction), batch)
    x = model.get_input_embeddings()(ids)
    eps = GaussianNoise(ratio=0.05, seed=3)(ids, x, mask)
    with torch.no_grad():
        clean = model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True).hidden_states
        noisy = model(inputs_embeds=x + eps, attention_mask=mask, output_hidden_states=True).hidden_states
    chosen = layers if layers is not None else [1, 2]
    weights = weight if isinstance(weight, list) else [weight] * len(chosen)
    real = mask.bool()
    want = 0.0
    for r, w in zip(chosen, weights):
        per_token = (clean[r] - noisy[r])[real].pow(2).sum(-1)
        want = want + w * (per_token / clean[r].shape[-1] if reduction == "mean" else per_token).mean()
    assert want > 0
    torch.testing.assert_close(reg, want, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("layers,weight,match", [
    ([3], 1.0, r"layers \[3\] out of range"),
    ([0, -4], 1.0, r"layers \[-4\] out of range"),
    (None, [1.0, 2.0, 3.0], "weight has 3 entries but there are 2 layers"),
    ([0, 1], [1.0], "weight has 1 entries but there are 2 layers"),
    ([], 1.0, "non-empty"),
    ([1.5], 1.0, "ints"),
    ([True], 1.0, "ints"),
])
def test_bad_layers_or_weights_fail_at_construction(layers, weight, match):
    with pytest.raises(ValueError, match=match):
        LNSR(make_model("bert"), GaussianNoise(), weight=weight, layers=layers)


def test_layer_out_of_range_without_a_layer_count_fails_at_the_call():
    model = TinyModel(layers_in_config=False).eval()
    lnsr = LNSR(model, GaussianNoise(), layers=[3])  # the count is unknown until hidden_states come back
    with pytest.raises(ValueError, match="out of range"):
        lnsr(input_ids=torch.randint(0, V, (B, T)))
    _, reg = LNSR(model, GaussianNoise(), layers=[-1])(input_ids=torch.randint(0, V, (B, T)))
    assert reg > 0


# ----------------------------------------------------------------------------------------------------
# 8. Argument checks.

class NoEmbedsModel(TinyModel):
    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False):
        return super().forward(input_ids, attention_mask, None, output_hidden_states)


class NoHiddenStatesModel(TinyModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        return super().forward(input_ids, attention_mask, inputs_embeds, False)


class SilentModel(TinyModel):
    """Takes output_hidden_states through **kwargs but returns none."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        return super().forward(input_ids, attention_mask, inputs_embeds, False)


@pytest.mark.parametrize("make,kwargs,error,match", [
    (lambda: nn.Linear(4, 4), {}, TypeError, "get_input_embeddings"),
    (NoEmbedsModel, {}, TypeError, "inputs_embeds"),
    (NoHiddenStatesModel, {}, TypeError, "output_hidden_states"),
    (TinyModel, {"mode": "one_pass"}, ValueError, "mode must be one of .* got 'one_pass'"),
    (TinyModel, {"dropout": "paired"}, ValueError, "dropout must be one of .* got 'paired'"),
    (TinyModel, {"reduction": "max"}, ValueError, "reduction must be one of .* got 'max'"),
    (TinyModel, {"noise": 0.05}, TypeError, "noise must be a sampler .* got float"),
])
def test_construction_errors_name_the_problem(make, kwargs, error, match):
    kwargs = {"noise": GaussianNoise(), **kwargs}
    with pytest.raises(error, match=match):
        LNSR(make(), **kwargs)


def test_a_model_that_returns_no_hidden_states_fails_at_the_call():
    lnsr = LNSR(SilentModel(), GaussianNoise())
    with pytest.raises(TypeError, match="returned no hidden_states"):
        lnsr(input_ids=torch.randint(0, V, (B, T)))


@pytest.mark.parametrize("batch,error,match", [
    ({"attention_mask": torch.ones(B, T)}, ValueError, "input_ids or inputs_embeds"),
    ({"input_ids": torch.full((B, T), V)}, ValueError, r"input_ids must lie in \[0, 100\)"),
    ({"input_ids": torch.full((B, T), -1)}, ValueError, r"input_ids must lie in \[0, 100\)"),
    ({"input_ids": torch.zeros(B, T)}, TypeError, "input_ids must be an integer tensor"),
    ({"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T + 1)}, ValueError,
     "attention_mask has shape"),
    ({"input_ids": torch.zeros(0, T, dtype=torch.long), "attention_mask": torch.ones(0, T)}, ValueError,
     "batch is empty"),
    ({"inputs_embeds": torch.zeros(0, T, 32)}, ValueError, "batch is empty"),
])
@pytest.mark.parametrize("mode", MODES)
def test_batch_errors_name_the_problem(batch, error, match, mode):
    lnsr = LNSR(make_model("bert", "seq"), GaussianNoise(), mode=mode)
    with pytest.raises(error, match=match):
        lnsr(**batch)


def test_in_manifold_noise_needs_input_ids():
    model = make_model("bert")
    lnsr = LNSR(model, InManifoldNoise(model.get_input_embeddings(), k=4))
    with pytest.raises(ValueError, match="input_ids is required"):
        lnsr(inputs_embeds=torch.randn(B, T, 32))
