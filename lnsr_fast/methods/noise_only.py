"""The two ablations of the LNSR paper's Table VI (`noise_only_gaussian`, `noise_only_in_manifold`): the
same noise as LNSR on the word embeddings during training, but no stability term.

Source: Hua et al., "Improving Pre-trained Language Model Fine-tuning with Noise Stability Regularization"
(IEEE TNNLS 2023, arXiv:2206.05658), Table VI. The noise and its defaults are LNSR's (DESIGN.md §2: ratio
0.05 Gaussian, 0.1 in-manifold, k = 10). Ours: the model trains on its own task loss at x + ε in one pass
(no clean pass), the noise-injection baseline against which the stability term is measured.
"""
from __future__ import annotations

from torch import nn

from .base import EmbeddingMethod
from .lnsr import LNSRConfig


class NoiseOnly(EmbeddingMethod):
    """Task loss on x + ε, ε drawn by `config`'s sampler (`self.noise`, checkpointed by LNSRTrainer)."""

    def __init__(self, model: nn.Module, config: LNSRConfig, gradient_accumulation_steps: int = 1):
        super().__init__(model)
        self.noise = config.make_noise(model, config.seed, gradient_accumulation_steps)

    def training_step(self, model, batch, backward, penalty_scale=1.0):
        input_ids, given, inputs, targets = self.split(batch)
        x = self.embed(input_ids, given)
        eps = self.noise(input_ids, x, inputs.get("attention_mask"))
        loss = model(inputs_embeds=x + eps, **inputs, **targets).loss
        backward(loss)
        return loss.detach(), {}


class NoiseOnlyGaussian(NoiseOnly):
    """`noise_only_gaussian`: standard LNSR's Gaussian noise (‖ε_t‖ = ratio·‖x_t‖), no stability term."""

    name = "noise_only_gaussian"

    def __init__(self, model: nn.Module, ratio: float = 0.05, seed: int = 0, backend: str = "auto"):
        super().__init__(model, LNSRConfig(noise="gaussian", ratio=ratio, seed=seed, backend=backend))


class NoiseOnlyInManifold(NoiseOnly):
    """`noise_only_in_manifold`: in-manifold LNSR's noise, no stability term (refresh_every in optimizer steps)."""

    name = "noise_only_in_manifold"

    def __init__(self, model: nn.Module, ratio: float = 0.1, k: int = 10, knn_backend: str = "auto",
                 refresh_every: int | None = None, seed: int = 0, gradient_accumulation_steps: int = 1,
                 backend: str = "auto"):
        super().__init__(model, LNSRConfig(noise="in_manifold", ratio=ratio, k=k, knn_backend=knn_backend,
                                           refresh_every=refresh_every, seed=seed, backend=backend),
                         gradient_accumulation_steps)
