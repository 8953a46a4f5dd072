"""The two ablations of the LNSR paper's Table VI (`noise_only_gaussian`, `noise_only_in_manifold`): the
same noise as LNSR on the word embeddings during training, but no stability term.

Source: Hua et al., "Improving Pre-trained Language Model Fine-tuning with Noise Stability Regularization"
(IEEE TNNLS 2023, arXiv:2206.05658), Table VI. The noise and its defaults are LNSR's (`NoiseConfig`,
docs/design.md §2: ratio 0.05 Gaussian, 0.1 in-manifold, k = 10). Ours: the model trains on its own task loss
at x + ε in one pass (no clean pass), the noise-injection baseline against which the stability term is measured.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..lnsr import NoiseConfig, draw
from ..regularize import Call, Method


class NoiseOnly(Method):
    """Task loss on x + ε, ε drawn by the config's sampler (`self.noise`, checkpointed by LNSRCallback)."""

    def set_accumulation(self, steps: int) -> None:
        self.config.accumulate(self.noise, steps)

    def __init__(self, model: nn.Module, config: "NoiseOnlyConfig"):
        super().__init__(model, config)
        self.name = "noise_only_gaussian" if config.noise == "gaussian" else "noise_only_in_manifold"
        self.noise = config.make_noise(model)

    def forward(self, call: Call):
        return call.finish(call.run(call.inputs, call.everywhere(draw(self.noise)))[0], None, self.names)


@dataclass
class NoiseOnlyConfig(NoiseConfig):
    """`noise_only_gaussian` / `noise_only_in_manifold`: LNSR's noise on the word embeddings, no stability term."""

    method = NoiseOnly
