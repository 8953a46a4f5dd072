"""The interface every fine-tuning method shares (plain fine-tuning by default), and what several need: the
batch split into word embeddings + the rest (DESIGN.md §1), divergences between two passes' logits, checks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import heads
from ..lnsr import position_ids_from_input_ids, split_inputs


class Method:
    """One way to fine-tune: plain fine-tuning here; subclasses change the objective, the model or the gradients.

    `model` is the Hugging Face model the method is built for (unwrapped); `training_step` may receive a
    wrapper around the same model (e.g. DDP) and runs its passes through that wrapper.

    - `training_step(model, batch, backward, penalty_scale=1.0)` computes the method's whole objective on one
      (micro-)batch, calls `backward(loss)` (once, or once per ascent step for FreeLB) and returns the
      detached loss and a dict of detached 0-dim logs on the loss's scale (`task_loss`, `penalty`, ...).
      `penalty_scale` multiplies the regulariser (never the task loss): LNSRTrainer passes 1/accumulation
      steps when the task loss is already normalised over the whole accumulated batch.
    - `before_optimizer_step(model)`: after the last backward, before the optimizer step (CWGNC clips here).
    - `remove()`: undo what the method changed on the model (Mixout).
    - `noise`: a sampler whose state belongs in checkpoints (LNSR, noise-only ablations), else None.
    """

    name = "ft"
    noise = None

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
        self.model = model

    def training_step(self, model: nn.Module, batch: dict, backward: Callable[[torch.Tensor], None],
                      penalty_scale: float = 1.0) -> tuple[torch.Tensor, dict]:
        """The model's own loss on `batch` (which carries the labels), back-propagated once."""
        loss = model(**batch).loss
        backward(loss)
        return loss.detach(), {}

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called once per optimizer step, after every backward of the step; nothing by default."""

    def remove(self) -> None:
        """Undo the method's changes to the model; nothing by default."""

    @property
    def has_own_objective(self) -> bool:
        """Whether `training_step` is not the plain loss (LNSRTrainer runs `Trainer.training_step` otherwise)."""
        return type(self).training_step is not Method.training_step

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class EmbeddingMethod(Method):
    """A method that runs the model on (perturbed) word embeddings, passed as `inputs_embeds`."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise TypeError(f"model must have get_input_embeddings() (a Hugging Face model), got {type(model).__name__}")
        self._position_ids = position_ids_from_input_ids(model)
        self.regression = is_regression(model)

    def split(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, dict, dict]:
        """(input_ids, given inputs_embeds or None, model inputs, loss targets) of a batch.

        The model inputs gain the position ids a RoBERTa-style model derives from input_ids (it counts every
        position when it sees inputs_embeds instead); the targets are the labels and `num_items_in_batch`.
        """
        input_ids, given, batch = split_inputs(self.model, batch, self._position_ids)
        targets = {k: batch.pop(k) for k in (*heads.LABEL_KEYS, "num_items_in_batch") if k in batch}
        return input_ids, given, batch, targets

    def embed(self, input_ids: torch.Tensor | None, given: torch.Tensor | None) -> torch.Tensor:
        """The word embeddings of the batch, with their graph to the embedding matrix."""
        return given if given is not None else self.model.get_input_embeddings()(input_ids)


def real_tokens(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[..., T, 1] 1.0 at real tokens and 0.0 at padding, in the dtype of `like` ([..., T, d])."""
    if attention_mask is None:
        return torch.ones(like.shape[:-1] + (1,), dtype=like.dtype, device=like.device)
    return (attention_mask != 0).unsqueeze(-1).to(like.dtype)


def is_regression(model: nn.Module) -> bool:
    """A sequence-regression head (problem_type "regression", or unset with num_labels == 1)."""
    config = getattr(model, "config", None)
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
