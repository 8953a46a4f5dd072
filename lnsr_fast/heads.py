"""The model's own task loss, computed on the clean half of a concat-mode pass.

A concat-mode pass runs 2B rows, so the model cannot compute its loss itself (it would average the
noisy half in). These functions repeat the Hugging Face head conventions on the first B rows; the
tests check them against the model's own loss for every supported head and model family. Models
with another head run in two-pass mode, where the model computes its loss itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_KEYS = ("labels", "start_positions", "end_positions")


def _class_names(mapping) -> set[str]:
    names = set()
    for v in mapping.values():
        names.update(v if isinstance(v, (tuple, list)) else (v,))
    return names


def head_kind(model) -> str | None:
    """'sequence_classification' | 'token_classification' (also masked LM) | 'question_answering' |
    'causal_lm', or None for a head whose loss this module does not know."""
    from transformers.models.auto import modeling_auto as auto

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    name = type(base).__name__
    for kind, mapping in (
        ("sequence_classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("token_classification", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        ("token_classification", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        ("question_answering", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
        ("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ):
        if name in _class_names(mapping):
            return kind
    return None


def task_loss(kind: str, config, outputs, labels: dict, num_items_in_batch=None) -> torch.Tensor:
    """The loss the model would return for `labels` given its (clean-half) `outputs`, in fp32."""
    if kind == "question_answering":
        losses = []
        for logits, key in ((outputs.start_logits, "start_positions"), (outputs.end_logits, "end_positions")):
            pos = labels[key]
            pos = pos.squeeze(-1) if pos.dim() > 1 else pos
            ignored = logits.shape[1]  # positions outside the sequence are ignored, as in HF
            losses.append(F.cross_entropy(logits.float(), pos.clamp(0, ignored), ignore_index=ignored))
        return (losses[0] + losses[1]) / 2
    y, logits = labels["labels"], outputs.logits.float()
    if kind == "sequence_classification":
        n = config.num_labels
        if config.problem_type is None and n > 1 and getattr(config, "model_type", None) in ("deberta", "deberta-v2"):
            return _deberta_classification_loss(logits, y, n)
        problem = config.problem_type or (
            "regression" if n == 1 else
            "single_label_classification" if y.dtype in (torch.long, torch.int) else "multi_label_classification")
        if problem == "regression":
            return F.mse_loss(logits.squeeze(), y.float().squeeze()) if n == 1 else F.mse_loss(logits, y.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, n), y.view(-1))
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    if kind == "token_classification":
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    if kind == "causal_lm":
        target = F.pad(y, (0, 1), value=-100)[..., 1:]
        if num_items_in_batch is None:
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        total = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    raise ValueError(f"unknown head kind {kind!r}")


def _deberta_classification_loss(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """DeBERTa's own loss when problem_type is unset and num_labels > 1: hard labels (one per row) take a
    cross-entropy over the rows whose label is >= 0 (0 when there is none); a label distribution per row
    takes a soft-label cross-entropy, -Σ_c y_c log softmax(logits)_c, averaged over rows (not BCE)."""
    if y.dim() == 1 or y.shape[-1] == 1:
        y = y.reshape(-1).long()
        keep = y >= 0
        if not bool(keep.any()):
            return logits.new_zeros(())
        return F.cross_entropy(logits.view(-1, n)[keep], y[keep])
    return -(F.log_softmax(logits, dim=-1) * y).sum(-1).mean()
