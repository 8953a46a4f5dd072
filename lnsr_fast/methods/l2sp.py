"""L2-SP (`l2sp`): the task loss plus ½α‖w − w⁰‖² over the pretrained weights (w⁰: their values when the
method is built) and ½β‖w‖² over the weights of the new head.

Source: Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks" (ICML 2018), eq. of L2-SP; defaults α = 0.1, β = 0.01 as in their experiments. Pretrained =
the parameters of the model's `base_model` (e.g. `model.bert`), head = every other trainable parameter
(e.g. `classifier`): for a `*For…` model loaded with `from_pretrained` these are the newly initialised
weights. The penalty is computed in fp32 from a frozen copy of w⁰ (no gradient). It replaces weight decay,
which an optimiser applies on top (set weight_decay = 0 for L2-SP alone).
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_real
from .base import Method


class L2SP(Method):
    """task loss + penalty_scale · (½α Σ‖w − w⁰‖² + ½β Σ‖w_head‖²); logs `task_loss` and `penalty`."""

    name = "l2sp"

    def __init__(self, model: nn.Module, alpha: float = 0.1, beta: float = 0.01):
        super().__init__(model)
        self.alpha = check_real("alpha", alpha)
        self.beta = check_real("beta", beta)
        base = getattr(model, "base_model", model)
        pretrained = {id(p) for p in base.parameters()} if base is not model else None
        self.anchors: list[tuple[nn.Parameter, torch.Tensor]] = []   # (w, w⁰)
        self.head: list[nn.Parameter] = []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if pretrained is None or id(p) in pretrained:
                self.anchors.append((p, p.detach().clone()))
            else:
                self.head.append(p)

    def penalty(self) -> torch.Tensor:
        """½α Σ‖w − w⁰‖² + ½β Σ‖w_head‖², a differentiable fp32 scalar."""
        terms = [self.alpha / 2 * (w.float() - w0.to(w.device).float()).square().sum() for w, w0 in self.anchors]
        terms += [self.beta / 2 * w.float().square().sum() for w in self.head]
        return torch.stack(terms).sum()

    def training_step(self, model, batch, backward, penalty_scale=1.0):
        task = model(**batch).loss
        penalty = penalty_scale * self.penalty()
        loss = task + penalty
        backward(loss)
        return loss.detach(), {"task_loss": task.detach(), "penalty": penalty.detach()}
