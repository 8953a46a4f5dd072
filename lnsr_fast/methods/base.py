"""What several methods share: the helper that declares a config field with its help text, and the divergences
between two passes' outputs (docs/design.md §3)."""
from __future__ import annotations

from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn

from .. import heads


def hyperparameter(text: str, default=None):
    """A config field with its default and help text (the CLI's help reads it)."""
    return field(default=default, metadata={"help": text})


def real_tokens(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[..., T, 1] 1.0 at real tokens and 0.0 at padding, in the dtype of `like` ([..., T, d])."""
    if attention_mask is None:
        return torch.ones(like.shape[:-1] + (1,), dtype=like.dtype, device=like.device)
    return (attention_mask != 0).unsqueeze(-1).to(like.dtype)


def is_regression(model: nn.Module) -> bool:
    """A sequence-regression head (problem_type "regression", or unset with num_labels == 1)."""
    config = getattr(heads.base_model(model), "config", None)
    problem = getattr(config, "problem_type", None)
    if problem is not None:
        return problem == "regression"
    return heads.head_kind(model) == "sequence_classification" and getattr(config, "num_labels", None) == 1


def _row_mean(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # Token-level logits ([B, T, C]) average over real tokens; others over every row.
    if attention_mask is not None and values.shape == attention_mask.shape:
        real = (attention_mask != 0).to(values.dtype)
        return (values * real).sum() / real.sum().clamp_min(1)
    return values.mean()


def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """KL(softmax(target_logits) ‖ softmax(logits)) in fp32: summed over classes, averaged over rows."""
    log_p, log_q = F.log_softmax(target_logits.float(), -1), F.log_softmax(logits.float(), -1)
    return _row_mean((log_p.exp() * (log_p - log_q)).sum(-1), attention_mask)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, attention_mask=None, detach_targets: bool = False) -> torch.Tensor:
    """KL(a ‖ b) + KL(b ‖ a) of two logits tensors, in fp32. `detach_targets`: each direction's gradient
    flows through its second argument only (SMART's symmetric KL); else through both (R3F's)."""
    if detach_targets:
        return kl_divergence(a.detach(), b, attention_mask) + kl_divergence(b.detach(), a, attention_mask)
    return kl_divergence(a, b, attention_mask) + kl_divergence(b, a, attention_mask)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two outputs in fp32 (the divergence of regression heads)."""
    return F.mse_loss(a.float(), b.float())
