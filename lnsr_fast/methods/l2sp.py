"""L2-SP (`l2sp`): the task loss plus ½α‖w − w⁰‖² over the pretrained weights (w⁰: their values when the
method is applied) and ½β‖w‖² over the weights of the new head.

Source: Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks" (ICML 2018), eq. of L2-SP; defaults α = 0.1, β = 0.01 as in their experiments. Pretrained =
the parameters of the model's `base_model` (e.g. `model.bert`), head = every other trainable parameter
(e.g. `classifier`): for a `*For…` model loaded with `from_pretrained` these are the newly initialised
weights. The penalty is computed in fp32 from a frozen copy of w⁰ (no gradient). It replaces weight decay,
which an optimiser applies on top (set weight_decay = 0 for L2-SP alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_real
from ..regularize import Call, Method, MethodConfig
from .base import hyperparameter


class L2SP(Method):
    """task loss + ½α Σ‖w − w⁰‖² + ½β Σ‖w_head‖²; logs `task_loss` and `penalty`."""

    name = "l2sp"

    def __init__(self, model: nn.Module, config: "L2SPConfig"):
        super().__init__(model, config)
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
        alpha, beta = self.config.alpha, self.config.beta
        terms = [alpha / 2 * (w.float() - w0.to(w.device).float()).square().sum() for w, w0 in self.anchors]
        terms += [beta / 2 * w.float().square().sum() for w in self.head]
        return torch.stack(terms).sum()

    def forward(self, call: Call):
        mode = call.watcher(None, pair=False)
        out, _ = call.run(call.inputs, mode=mode)
        return call.finish(out, self.penalty(), self.names, mode=mode)


@dataclass
class L2SPConfig(MethodConfig):
    """`l2sp`: pull the pretrained weights towards their starting values and the head towards 0."""

    method = L2SP
    alpha: float = hyperparameter("α, the weight of ½‖w − w⁰‖² over the pretrained weights", 0.1)
    beta: float = hyperparameter("β, the weight of ½‖w‖² over the new head's weights", 0.01)

    def __post_init__(self):
        self.alpha = check_real("L2SPConfig.alpha", self.alpha)
        self.beta = check_real("L2SPConfig.beta", self.beta)
