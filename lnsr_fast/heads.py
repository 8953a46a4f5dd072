"""What a concat-mode pass needs to know about a model's head (docs/design.md §1): how its own loss can skip the
noisy half of the batch, and the few losses it cannot skip rows of.

A head whose loss ignores a label value (-100 for classification and language modelling, a position past the
sequence for extractive QA) computes the task loss of the clean half itself when the noisy half carries that
value. Regression and multi-label classification (MSE, BCE) and DeBERTa's soft labels ignore nothing: for them
the pass keeps the labels from the model and computes the same loss on the clean half here. Any other head
with labels runs in two passes, where the model computes its loss on the clean batch alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Positions clamp to the sequence length, which extractive QA heads ignore; any value past it will do.
IGNORED_POSITION = 2**31 - 1
KINDS = ("sequence_classification", "token_classification", "question_answering", "causal_lm", "seq2seq_lm")


def base_model(model):
    """The Hugging Face model under a PEFT wrapper, or `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _class_names(mapping) -> set[str]:
    names = set()
    for v in mapping.values():
        names.update(v if isinstance(v, (tuple, list)) else (v,))
    return names


def head_kind(model) -> str | None:
    """One of KINDS (a masked LM counts as token classification), or None for a head not known here."""
    from transformers.models.auto import modeling_auto as auto

    name = type(base_model(model)).__name__
    for kind, mapping in (
        ("sequence_classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("token_classification", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        # before the masked LMs, which list BART's conditional-generation model too
        ("seq2seq_lm", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("token_classification", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        ("question_answering", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
        ("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ):
        if name in _class_names(mapping):
            return kind
    return None


def label_entries(inputs: dict) -> dict:
    """The entries of a batch that are loss targets (labels, QA positions, and any other `*label*` entry)."""
    return {k: v for k, v in inputs.items()
            if v is not None and ("label" in k or k in ("start_positions", "end_positions"))}


def problem_type(config, labels: torch.Tensor) -> str:
    """A sequence-classification head's problem, as Hugging Face infers it when `config.problem_type` is unset."""
    n = config.num_labels
    if config.problem_type is not None:
        return config.problem_type
    if n == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def _soft_deberta(config, labels: torch.Tensor) -> bool:
    # DeBERTa's own loss for unset problem_type, num_labels > 1 and one label distribution per row.
    return (getattr(config, "model_type", None) in ("deberta", "deberta-v2") and config.problem_type is None
            and config.num_labels > 1 and labels.dim() > 1 and labels.shape[-1] != 1)


def noisy_labels(kind: str | None, config, labels: dict) -> dict | None:
    """The label entries for the noisy half that make the model's own loss ignore it, {} when the head's loss
    cannot ignore rows (the caller computes `explicit_loss` on the clean half), None when unknown."""
    if not labels:
        return {}
    if kind == "question_answering" and set(labels) == {"start_positions", "end_positions"}:
        return {k: torch.full_like(v, IGNORED_POSITION) for k, v in labels.items()}
    if set(labels) != {"labels"} or kind in (None, "question_answering"):
        return None
    y = labels["labels"]
    if kind == "sequence_classification" and (problem_type(config, y) != "single_label_classification"
                                              or _soft_deberta(config, y)):
        return {}
    return {"labels": torch.full_like(y, IGNORE_INDEX)}


def explicit_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sequence-classification loss the model computes for heads whose loss ignores no rows (regression,
    multi-label, DeBERTa's soft labels), on the clean half's logits."""
    n = config.num_labels
    if _soft_deberta(config, labels):
        return -(F.log_softmax(logits.float(), dim=-1) * labels).sum(-1).mean()
    problem = problem_type(config, labels)
    if problem == "regression":
        if n == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"the loss of problem_type {problem!r} ignores rows; the model computes it")


def item_count(kind: str | None, config, inputs: dict) -> torch.Tensor | None:
    """The number of loss items of this batch as the Hugging Face Trainer counts them for `num_items_in_batch`
    (labels other than -100; a causal LM's labels after the first position), or None without labels."""
    if inputs.get("shift_labels") is not None:
        return (inputs["shift_labels"] != IGNORE_INDEX).sum()
    y = inputs.get("labels")
    if y is None:
        return None
    if kind == "causal_lm" and not getattr(config, "is_encoder_decoder", False):
        y = y[..., 1:]
    return (y != IGNORE_INDEX).sum()
