"""R3F (`r3f`): a second pass on noisy word embeddings and the symmetric KL of the two passes' outputs added
to the task loss, with gradients through both passes.

Source: Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse" (ICLR 2021);
reference code: github.com/facebookresearch/fairseq, examples/rxf (criterion `sentence_prediction_r3f`).
Defaults are that code's: noise U(−ε, ε) (`--noise-type uniform`; "normal" draws N(0, ε²)) with ε = 1e-5,
λ = 1 (`--r3f-lambda`); the symmetric KL is summed over classes and averaged over the batch, in fp32. Ours:
padding gets no noise, and a regression head takes the MSE of the two outputs (R3F defines only the KL).
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_choice, check_real
from .base import EmbeddingMethod, mse, real_tokens, symmetric_kl

NOISE_TYPES = ("uniform", "normal")


class R3F(EmbeddingMethod):
    """task loss(f(x)) + weight · KLs(f(x), f(x + ε)); logs `task_loss` and `penalty`.

    weight: λ. eps: the half-width of the uniform noise, or the standard deviation of the normal one.
    noise: "uniform" or "normal". Each pass draws its own dropout masks, as in the reference.
    """

    name = "r3f"

    def __init__(self, model: nn.Module, weight: float = 1.0, eps: float = 1e-5, noise: str = "uniform"):
        super().__init__(model)
        self.weight = check_real("weight", weight)
        self.eps = check_real("eps", eps, open_minimum=True)
        self.noise_type = check_choice("noise", noise, NOISE_TYPES)

    def sample_noise(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """ε for the noisy pass: U(−eps, eps) or N(0, eps²) per coordinate, 0 at padding."""
        x = x.detach()
        if self.noise_type == "uniform":
            eps = torch.empty_like(x).uniform_(-self.eps, self.eps)
        else:
            eps = torch.randn_like(x) * self.eps
        return eps * real_tokens(attention_mask, x)

    def divergence(self, clean: torch.Tensor, noisy: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """KL(clean ‖ noisy) + KL(noisy ‖ clean) with gradients through both, or MSE for a regression head."""
        return mse(noisy, clean) if self.regression else symmetric_kl(clean, noisy, attention_mask)

    def training_step(self, model, batch, backward, penalty_scale=1.0):
        input_ids, given, inputs, targets = self.split(batch)
        mask = inputs.get("attention_mask")
        x = self.embed(input_ids, given)
        clean = model(inputs_embeds=x, **inputs, **targets)
        noisy = model(inputs_embeds=x + self.sample_noise(x, mask), **inputs).logits
        penalty = self.weight * penalty_scale * self.divergence(clean.logits, noisy, mask)
        loss = clean.loss + penalty
        backward(loss)
        return loss.detach(), {"task_loss": clean.loss.detach(), "penalty": penalty.detach()}
