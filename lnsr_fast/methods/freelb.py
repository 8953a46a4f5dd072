"""FreeLB (`freelb`): K ascent steps on a perturbation of the word embeddings, each with a forward and a
backward pass whose parameter gradients are accumulated, so the update is the average gradient over the
K perturbed inputs ("free" large-batch adversarial training).

Source: Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural Language Understanding" (ICLR 2020);
reference code: github.com/zhuchen03/FreeLB (huggingface-transformers/examples/run_glue_freelb.py). As there
(l2 norm type): δ₀ ~ U(−1, 1) at real tokens, scaled by init_mag / sqrt(L·d) (L = the example's real tokens,
d = width); each step's loss is divided by K; δ ← δ + α·g/‖g‖ per example (Frobenius norm, floored at
1e-8), then rescaled to ‖δ‖ ≤ max_norm when max_norm > 0; the embeddings are recomputed for every step.
Defaults: K = 3 (the paper's GLUE runs use 2–3); the repository publishes per-task values only (its launch
scripts use α 4e-2–2e-1, init_mag 8e-2–1, max_norm 0–0.7), so α = 0.1, init_mag = 0.1 and max_norm = 0
(unbounded) are mid-range choices of ours. Like the reference (which reuses its dropout masks), every step
draws the same dropout masks: the default generators are restored before each pass.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dropout import rng_state, set_rng_state
from ..checks import check_int, check_real
from .base import EmbeddingMethod, real_tokens


class FreeLB(EmbeddingMethod):
    """Σ_t loss(x + δ_t) / K, back-propagated once per step; no separate penalty (logs nothing extra).

    steps: K (1 with init_mag = 0 is plain fine-tuning). step_size: α. init_mag: scale of δ₀ (0: start at
    δ₀ = 0). max_norm: bound on each example's ‖δ‖ (0: none).
    """

    name = "freelb"

    def __init__(self, model: nn.Module, steps: int = 3, step_size: float = 0.1, init_mag: float = 0.1,
                 max_norm: float = 0.0):
        super().__init__(model)
        self.steps = check_int("steps", steps, 1)
        self.step_size = check_real("step_size", step_size)
        self.init_mag = check_real("init_mag", init_mag)
        self.max_norm = check_real("max_norm", max_norm)

    def initial_delta(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """δ₀: uniform in [−1, 1] at real tokens, times init_mag / sqrt(real tokens × width) per example."""
        x = x.detach()
        real = real_tokens(attention_mask, x)
        if self.init_mag == 0:
            return torch.zeros_like(x)
        dims = real.flatten(1).sum(1).clamp_min(1) * x.shape[-1]
        scale = (self.init_mag / dims.sqrt()).view(-1, *([1] * (x.dim() - 1)))
        return torch.empty_like(x).uniform_(-1, 1) * real * scale

    def ascend(self, delta: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """One step along δ's accumulated gradient, normalised per example, then bounded by max_norm."""
        if delta.grad is None:
            raise RuntimeError("backward(loss) left no gradient on the perturbation; it must back-propagate the loss")
        # A GradScaler or accumulation factor in the gradient cancels in the normalisation; an overflow is dropped.
        grad = torch.nan_to_num(delta.grad, nan=0.0, posinf=0.0, neginf=0.0)
        shape = (-1, *([1] * (grad.dim() - 1)))
        grad_norm = grad.flatten(1).float().norm(dim=1).clamp_min(1e-8).view(shape)
        delta = (delta.detach() + self.step_size * grad / grad_norm.to(grad.dtype)) * real
        if self.max_norm > 0:
            norm = delta.flatten(1).float().norm(dim=1).view(shape)
            delta = delta * (self.max_norm / norm).clamp(max=1.0).to(delta.dtype)
        return delta

    def training_step(self, model, batch, backward, penalty_scale=1.0):
        input_ids, given, inputs, targets = self.split(batch)
        x = self.embed(input_ids, given)
        real = real_tokens(inputs.get("attention_mask"), x)
        delta = self.initial_delta(x, inputs.get("attention_mask"))
        state = rng_state(x.device)
        total = torch.zeros((), device=x.device)
        for step in range(self.steps):
            if step:
                set_rng_state(state, x.device)   # the same dropout masks in every step
                x = self.embed(input_ids, given)   # the previous backward freed its graph
            delta.requires_grad_(True)
            loss = model(inputs_embeds=x + delta, **inputs, **targets).loss / self.steps
            backward(loss)
            total = total + loss.detach().float()
            if step < self.steps - 1:
                delta = self.ascend(delta, real)
        return total, {}
