"""The table of tiny random model families the tests run LNSR on (nothing is downloaded): each family's config,
its heads, how to switch its dropout, and batches with left or right padding and every head's labels.

Every model has hidden size 32 and 2 layers; V = 100 tokens; batches are B = 3 rows of T = 7 tokens.
"""
from __future__ import annotations

import torch
import transformers as tr

V, B, T = 100, 3, 7
HEADS = {
    "seq": tr.AutoModelForSequenceClassification,
    "tok": tr.AutoModelForTokenClassification,
    "qa": tr.AutoModelForQuestionAnswering,
    "clm": tr.AutoModelForCausalLM,
    "mlm": tr.AutoModelForMaskedLM,
    "s2s": tr.AutoModelForSeq2SeqLM,
    None: tr.AutoModel,
}
_BERTLIKE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
_DECODER = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
_ENCODER_HEADS = ("seq", "tok", "qa", "mlm")
# family: (config factory, heads, padding sides its sequence classification is tested with)
FAMILIES = {
    "bert": (lambda: tr.BertConfig(**_BERTLIKE), _ENCODER_HEADS + ("clm",), ("right",)),
    "roberta": (lambda: tr.RobertaConfig(**_BERTLIKE, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                _ENCODER_HEADS + ("clm",), ("right", "left")),
    "xlm-roberta": (lambda: tr.XLMRobertaConfig(**_BERTLIKE, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                    _ENCODER_HEADS, ("right",)),
    "albert": (lambda: tr.AlbertConfig(**_BERTLIKE, embedding_size=16), _ENCODER_HEADS, ("right",)),
    "distilbert": (lambda: tr.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=64), _ENCODER_HEADS, ("right",)),
    # the DeBERTa-v3 layout: relative attention with position buckets
    "deberta-v2": (lambda: tr.DebertaV2Config(**_BERTLIKE, relative_attention=True, position_buckets=8,
                                              max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                                              norm_rel_ebd="layer_norm", share_att_key=True),
                   _ENCODER_HEADS, ("right",)),
    # embedding_size != hidden_size: the noise goes on the 16-wide word embeddings
    "electra": (lambda: tr.ElectraConfig(**_BERTLIKE, embedding_size=16), _ENCODER_HEADS + ("clm",), ("right",)),
    "modernbert": (lambda: tr.ModernBertConfig(**_BERTLIKE, pad_token_id=0, global_attn_every_n_layers=1),
                   _ENCODER_HEADS, ("right",)),
    "mpnet": (lambda: tr.MPNetConfig(**_BERTLIKE, pad_token_id=1), _ENCODER_HEADS, ("right", "left")),
    "gpt2": (lambda: tr.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                                   pad_token_id=0, bos_token_id=2, eos_token_id=2), ("seq", "tok", "qa", "clm"),
             ("right", "left")),
    "llama": (lambda: tr.LlamaConfig(**_DECODER), ("seq", "clm"), ("right", "left")),
    "qwen2": (lambda: tr.Qwen2Config(**_DECODER), ("seq", "clm"), ("right", "left")),
    "mistral": (lambda: tr.MistralConfig(**_DECODER), ("seq", "clm"), ("right", "left")),
    "gemma": (lambda: tr.GemmaConfig(**_DECODER, head_dim=8), ("seq", "clm"), ("right", "left")),
    "bart": (lambda: tr.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                   eos_token_id=2, decoder_start_token_id=2), ("seq", "s2s"), ("right",)),
    "t5": (lambda: tr.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                               num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
           ("seq", "s2s"), ("right",)),
}
# The config fields of every kind of dropout these families have.
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                   "activation_dropout", "classifier_dropout_prob", "dropout_rate", "resid_pdrop", "embd_pdrop",
                   "attn_pdrop", "summary_first_dropout", "embedding_dropout", "mlp_dropout", "classifier_dropout",
                   "qa_dropout", "seq_classif_dropout")


def make_config(family: str, dropout: float = 0.0, num_labels: int = 3, problem_type=None, **overrides):
    """The family's tiny config with every dropout at `dropout`."""
    config = FAMILIES[family][0]()
    for key in _DROPOUT_FIELDS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, dropout)
    config.classifier_dropout = dropout   # unset, some heads default to 0.1 whatever the rest says
    config.num_labels, config.problem_type = num_labels, problem_type
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_model(family: str, head: str | None = None, dropout: float = 0.0, num_labels: int = 3, problem_type=None,
               attn: str | None = None, seed: int = 0, **overrides):
    """A random-init model of the family with `head` (None: the bare model), in training mode."""
    config = make_config(family, dropout, 2 if head == "qa" else num_labels, problem_type, **overrides)
    if head == "clm" and not family.startswith(("gpt2", "llama", "qwen2", "mistral", "gemma")):
        config.is_decoder = True
    torch.manual_seed(seed)
    kwargs = {} if attn is None else {"attn_implementation": attn}
    return HEADS[head].from_config(config, **kwargs).train()


def make_mask(pad: str, b: int = B, t: int = T) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.long)
    if pad == "right":
        mask[1, 5:], mask[2, 3:] = 0, 0
    elif pad == "left":
        mask[1, :2], mask[2, :4] = 0, 0
    else:
        assert pad == "none", pad
    return mask


def make_batch(model, head: str | None = None, pad: str = "right", label_kind: str = "single", seed: int = 0) -> dict:
    """input_ids (real tokens never the pad id; encoder–decoder rows end in their eos token), attention_mask, and
    the head's labels: label_kind "single" | "multi" | "regression" | "soft" for sequence classification."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    mask = make_mask(pad)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(3, V, (B, T), generator=g).masked_fill(mask == 0, pad_id)
    if config.is_encoder_decoder:   # their classifiers pool the (one) eos token of every row
        for row in range(B):
            ids[row, int(mask[row].nonzero().max())] = config.eos_token_id
    batch = {"input_ids": ids, "attention_mask": mask}
    n = config.num_labels
    if head == "seq":
        batch["labels"] = {"single": torch.randint(0, n, (B,), generator=g),
                           "multi": torch.randint(0, 2, (B, n), generator=g).float(),
                           "soft": torch.softmax(torch.randn(B, n, generator=g), -1),
                           "regression": torch.randn(B, generator=g)}[label_kind]
    elif head == "tok":
        y = torch.randint(0, n, (B, T), generator=g).masked_fill(mask == 0, -100)
        y[0, 1] = -100   # an ignored real token too
        batch["labels"] = y
    elif head in ("mlm", "clm"):
        y = ids.masked_fill(mask == 0, -100)
        if head == "mlm":   # predict only some tokens, as a masked-LM collator does
            y = y.masked_fill(torch.rand(B, T, generator=g) < 0.5, -100)
            y[0, 0] = ids[0, 0]
        batch["labels"] = y
    elif head == "s2s":
        y = torch.randint(3, V, (B, 5), generator=g)
        y[1, 3:] = -100
        batch["labels"] = y
    elif head == "qa":   # 50 lies outside the sequence: Hugging Face ignores such positions
        batch["start_positions"] = torch.tensor([1, 4, 50])
        batch["end_positions"] = torch.tensor([2, 3, 1])
    return batch


class TokenwiseNoise:
    """A deterministic sampler for tests that compare batchings: ε_t depends on x_t only (0.1·x_t with its
    features rolled by one). The real samplers draw per call from a generator seeded by (seed, rank, call
    count), so 2 calls on [4, T, d] and 1 call on [8, T, d] draw different noise; this one gives both the same ε.
    """

    def __init__(self):
        self.step = 0

    def __call__(self, input_ids, inputs_embeds, attention_mask=None):
        self.step += 1
        return 0.1 * inputs_embeds.detach().roll(1, dims=-1)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]
