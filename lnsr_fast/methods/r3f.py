"""R3F (`r3f`): a noisy copy of the batch (noise on the word embeddings) and the symmetric KL of the two copies'
outputs added to the task loss, with gradients through both.

Source: Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse" (ICLR 2021);
reference code: github.com/facebookresearch/fairseq, examples/rxf (criterion `sentence_prediction_r3f`).
Defaults are that code's: noise U(−ε, ε) (`--noise-type uniform`; "normal" draws N(0, ε²)) with ε = 1e-5,
λ = 1 (`--r3f-lambda`); the symmetric KL is summed over classes and averaged over the batch, in fp32. As there,
the noise goes on the word embeddings (fairseq's `embed_tokens` output, before positions and the embedding
LayerNorm), each copy draws its own dropout masks, and the noisy copy's word embeddings are a constant
(`token_embeddings.detach().clone() + noise`): the symmetric KL reaches the embedding weights through the clean
copy only, and the rest of the model through both; `detach_noisy=False` lets it through the noisy copy too.
Ours: both copies run as one doubled pass where the labels allow (the noisy copy carries the ignored label),
padding gets no noise (fairseq's reaches padding too, which the attention mask hides), and a regression head
takes the MSE of the two outputs (R3F defines only the KL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_choice, check_real
from ..regularize import Call, Method, MethodConfig, hyperparameter
from .base import is_regression, mse, real_tokens, symmetric_kl

NOISE_TYPES = ("uniform", "normal")


class R3F(Method):
    """task loss(f(x)) + weight · KLs(f(x), f(x + ε)); logs `task_loss` and `penalty`."""

    name = "r3f"

    def __init__(self, model: nn.Module, config: "R3FConfig"):
        super().__init__(model, config)
        self.regression = is_regression(model)

    def sample_noise(self, input_ids, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """ε for the noisy copy: U(−eps, eps) or N(0, eps²) per coordinate, 0 at padding."""
        eps = self.config.eps
        noise = torch.empty_like(x).uniform_(-eps, eps) if self.config.noise == "uniform" else torch.randn_like(x) * eps
        return noise * real_tokens(attention_mask, x)

    def divergence(self, clean: torch.Tensor, noisy: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """KL(clean ‖ noisy) + KL(noisy ‖ clean) with gradients through both, or MSE for a regression head."""
        return mse(noisy, clean) if self.regression else symmetric_kl(clean, noisy, attention_mask)

    def forward(self, call: Call):
        copies = call.clean_and_noisy(self.sample_noise, pair=False, detach_noisy=self.config.detach_noisy)
        if copies.noisy is None:
            clean_logits, noisy_logits = copies.out["logits"].chunk(2)
        else:
            clean_logits, noisy_logits = copies.out["logits"], copies.noisy["logits"]
        penalty = self.config.weight * self.divergence(clean_logits, noisy_logits, call.mask)
        return call.finish(copies.out, penalty, self.names, copies.half, copies.mode)


@dataclass
class R3FConfig(MethodConfig):
    """`r3f`: symmetric KL between the outputs of the clean and a slightly noisy copy."""

    method = R3F
    weight: float = hyperparameter("λ, the weight of the symmetric KL", 1.0)
    eps: float = hyperparameter("half-width of the uniform noise, or the standard deviation of the normal one", 1e-5)
    noise: str = hyperparameter("'uniform' or 'normal'", "uniform")
    detach_noisy: bool = hyperparameter("the noisy copy's word embeddings are a constant, as fairseq's (False: the "
                                        "penalty's gradient reaches the embedding weights through both copies)", True)

    def __post_init__(self):
        self.weight = check_real("R3FConfig.weight", self.weight)
        self.eps = check_real("R3FConfig.eps", self.eps, open_minimum=True)
        check_choice("R3FConfig.noise", self.noise, NOISE_TYPES)
        if not isinstance(self.detach_noisy, bool):
            raise TypeError(f"R3FConfig.detach_noisy must be a bool, got {self.detach_noisy!r}")
