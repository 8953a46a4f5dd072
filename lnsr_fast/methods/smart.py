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

import torch
from torch import nn

from ..checks import check_choice, check_int, check_real
from .base import EmbeddingMethod, kl_divergence, mse, real_tokens, symmetric_kl

NORMS = ("inf", "l2")


class SMART(EmbeddingMethod):
    """task loss + weight · D_s(f(x), f(x + δ_adv)); logs `task_loss` and `penalty`.

    steps: ascent steps K. step_size: η. noise_var: σ of the initial noise. epsilon: added to the norm in
    the projection. norm: "inf" (per token ‖·‖_∞, mt-dnn's default) or "l2" (per token ‖·‖_2).
    """

    name = "smart"

    def __init__(self, model: nn.Module, weight: float = 1.0, steps: int = 1, step_size: float = 1e-3,
                 noise_var: float = 1e-5, epsilon: float = 1e-6, norm: str = "inf"):
        super().__init__(model)
        self.weight = check_real("weight", weight)
        self.steps = check_int("steps", steps, 1)
        self.step_size = check_real("step_size", step_size, open_minimum=True)
        self.noise_var = check_real("noise_var", noise_var, open_minimum=True)
        self.epsilon = check_real("epsilon", epsilon, open_minimum=True)
        self.norm = check_choice("norm", norm, NORMS)

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """The regulariser D_s: symmetric KL of the logits (targets detached), or MSE for a regression head."""
        if self.regression:
            return mse(perturbed, clean)
        return symmetric_kl(clean, perturbed, attention_mask, detach_targets=True)

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        size = v.abs().amax(-1, keepdim=True) if self.norm == "inf" else v.norm(dim=-1, keepdim=True)
        return v / (size + self.epsilon)

    def adversarial_noise(self, x: torch.Tensor, clean_logits: torch.Tensor, inputs: dict) -> torch.Tensor:
        """δ after `steps` ascent steps from σ·N(0, 1), detached (the passes run on the unwrapped model; only
        δ's gradient is taken, so no parameter gradient is accumulated)."""
        x, target = x.detach(), clean_logits.detach()
        mask = inputs.get("attention_mask")
        real = real_tokens(mask, x)
        delta = torch.randn_like(x) * self.noise_var * real
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(inputs_embeds=x + delta, **inputs).logits
                ascent = mse(logits, target) if self.regression else kl_divergence(target, logits, mask)
                with torch.autocast(x.device.type, enabled=False):   # autocast covers forward passes only
                    (grad,) = torch.autograd.grad(ascent, delta)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            delta = self._project(delta.detach() + self.step_size * grad) * real
        return delta.detach()

    def training_step(self, model, batch, backward, penalty_scale=1.0):
        input_ids, given, inputs, targets = self.split(batch)
        x = self.embed(input_ids, given)
        clean = model(inputs_embeds=x, **inputs, **targets)
        delta = self.adversarial_noise(x, clean.logits, inputs)
        perturbed = model(inputs_embeds=x + delta, **inputs).logits
        penalty = self.weight * penalty_scale * self.divergence(clean.logits, perturbed, inputs.get("attention_mask"))
        loss = clean.loss + penalty
        backward(loss)
        return loss.detach(), {"task_loss": clean.loss.detach(), "penalty": penalty.detach()}
