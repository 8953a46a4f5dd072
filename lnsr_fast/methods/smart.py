"""SMART's smoothness-inducing adversarial regulariser (`smart`): a perturbation of the word embeddings found
by K projected ascent steps on the divergence of the outputs, and that divergence added to the task loss.

Source: Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models
through Principled Regularized Optimization" (ACL 2020); reference code: github.com/namisan/mt-dnn
(mt_dnn/perturbation.py, SmartPerturbation, and mt_dnn/loss.py). Defaults are that code's: K = 1 ascent
step (adv_k), initial noise σ·N(0, 1) with σ = 1e-5 (its `noise_var`), step size η = 1e-3, ε = 1e-6 in the
normalisation, ∞-norm per token, weight 1 (adv_alpha). As there, each ascent step sets
δ ← (δ + η·g) / (‖δ + η·g‖_∞ + ε) per token, so that δ has ∞-norm ≈ 1 per token after the first step;
the term added is the symmetric KL of the clean and perturbed logits with each direction's target
detached (SymKlCriterion), in fp32; a regression head takes the MSE instead. Ours: the ascent divergence
is the plain KL(p_clean ‖ p_adv) (mt-dnn's later code uses a numerically "stable" variant of it), a
non-finite ascent gradient is set to 0 (mt-dnn skips the term), padding gets no noise, and the paper's
Bregman proximal-point optimiser (not in mt-dnn's adversarial training either) is not included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_choice, check_int, check_real
from ..regularize import Call, Method, MethodConfig
from .base import hyperparameter, is_regression, kl_divergence, mse, real_tokens, symmetric_kl

NORMS = ("inf", "l2")


class SMART(Method):
    """task loss + weight · D_s(f(x), f(x + δ_adv)); logs `task_loss` and `penalty`. The ascent and the
    perturbed passes run inside the model's forward, after the clean one."""

    name = "smart"

    def __init__(self, model: nn.Module, config: "SMARTConfig"):
        super().__init__(model, config)
        self.regression = is_regression(model)

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """The regulariser D_s: symmetric KL of the logits (targets detached), or MSE for a regression head."""
        if self.regression:
            return mse(perturbed, clean)
        return symmetric_kl(clean, perturbed, attention_mask, detach_targets=True)

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        size = v.abs().amax(-1, keepdim=True) if self.config.norm == "inf" else v.norm(dim=-1, keepdim=True)
        return v / (size + self.config.epsilon)

    def adversarial_noise(self, call: Call, x: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
        """δ after `steps` ascent steps from σ·N(0, 1), detached (only δ's gradient is taken, so no parameter
        gradient is accumulated)."""
        config, target, inputs = self.config, clean_logits.detach(), call.model_inputs()
        real = real_tokens(call.mask, x)
        delta = torch.randn_like(x) * config.noise_var * real
        for _ in range(config.steps):
            delta.requires_grad_(True)
            logits = call.run(inputs, lambda ids, emb: emb.detach() + delta)[0]["logits"]
            ascent = mse(logits, target) if self.regression else kl_divergence(target, logits, call.mask)
            with torch.autocast(x.device.type, enabled=False):   # autocast covers forward passes only
                (grad,) = torch.autograd.grad(ascent, delta)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            delta = self._project(delta.detach() + config.step_size * grad) * real
        return delta.detach()

    def forward(self, call: Call):
        seen = {}

        def keep(input_ids, x):
            seen["x"] = x.detach()
            return x

        mode = call.watcher(None, pair=False)
        clean, _ = call.run(call.inputs, keep, mode)
        delta = self.adversarial_noise(call, seen["x"], clean["logits"])
        perturbed = call.run(call.model_inputs(), lambda ids, x: x + delta)[0]["logits"]
        penalty = self.config.weight * self.divergence(clean["logits"], perturbed, call.mask)
        return call.finish(clean, penalty, self.names, mode=mode)


@dataclass
class SMARTConfig(MethodConfig):
    """`smart`: adversarial smoothness term on the word embeddings."""

    method = SMART
    weight: float = hyperparameter("weight of the smoothness term (mt-dnn's adv_alpha)", 1.0)
    steps: int = hyperparameter("ascent steps K (adv_k)", 1)
    step_size: float = hyperparameter("ascent step size η", 1e-3)
    noise_var: float = hyperparameter("σ of the initial noise", 1e-5)
    epsilon: float = hyperparameter("added to the norm in the projection", 1e-6)
    norm: str = hyperparameter("per-token norm of the projection: 'inf' (mt-dnn's default) or 'l2'", "inf")

    def __post_init__(self):
        self.weight = check_real("SMARTConfig.weight", self.weight)
        self.steps = check_int("SMARTConfig.steps", self.steps, 1)
        self.step_size = check_real("SMARTConfig.step_size", self.step_size, open_minimum=True)
        self.noise_var = check_real("SMARTConfig.noise_var", self.noise_var, open_minimum=True)
        self.epsilon = check_real("SMARTConfig.epsilon", self.epsilon, open_minimum=True)
        check_choice("SMARTConfig.norm", self.norm, NORMS)
