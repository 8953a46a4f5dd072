"""FreeLB (`freelb`): K ascent steps on a perturbation of the word embeddings, each with a forward and a
backward pass whose parameter gradients are accumulated, so the update is the average gradient over the
K perturbed inputs ("free" large-batch adversarial training).

Source: Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural Language Understanding" (ICLR 2020);
reference code: github.com/zhuchen03/FreeLB (huggingface-transformers/examples/run_glue_freelb.py). As there
(l2 norm type): δ₀ ~ U(−1, 1) at real tokens, scaled by init_mag / sqrt(L·d) (L = the example's real tokens,
d = width); each step's loss is divided by K; δ ← δ + α·g/‖g‖ per example (Frobenius norm, floored at
1e-8), then rescaled to ‖δ‖ ≤ max_norm when max_norm > 0; the embeddings are recomputed for every step. Like
the reference (which reuses its dropout masks), every step draws the same dropout masks: the default
generators are restored before each pass.

Defaults: the repository publishes per-task values only. Its Hugging Face launch script
(huggingface-transformers/launch/run_glue.sh, ALBERT-xxlarge-v2) sets (α = adv-lr, init_mag = adv-init-mag,
max_norm = adv-max-norm, K = adv-steps): SST-2 0.1, 0.6, 0, 2; MRPC 0.03, 0, 0, 4; CoLA 0.04, 0.05, 0, 3;
STS-B 0.1, 0.2, 0, 3; MNLI 0.04, 0.08, 0, 3; QQP 0.2, 0.32, 0.7, 3; RTE 0.1, 0, 0, 3; QNLI 0.05, 0.1, 0, 3.
Ours are RTE's — the smallest of these classification tasks (2.5k examples), and each value the most common
one in its column: α = 0.1, init_mag = 0 (δ₀ = 0), max_norm = 0 (unbounded), K = 3. Its RoBERTa-large
scripts (fairseq-RoBERTa/launch/FreeLB/*.sh, whose --adv-steps counts the steps after the first pass, so
K = adv-steps + 1) use α 0.025–0.2, init_mag 0.1–1, max_norm 0.15–0.7, K 3–4; their active RTE lines are
plain fine-tuning (all 0).

Ours: δ stays 0 at padding in every step (the reference masks δ₀ only; its gradient there is 0 where the
attention mask hides padding), and a non-finite ascent gradient is set to 0 (under fp16 the reference's δ
would take the overflow).

FreeLB is the one method with its own training step (K backward passes per batch): LNSRTrainer runs it, or
call `handle.training_step(batch, backward)`; a plain training forward of the model refuses to run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_int, check_real
from ..pairing import rng_state, set_rng_state
from ..regularize import Call, Method, MethodConfig, hyperparameter, word_embeddings
from .base import real_tokens


class FreeLB(Method):
    """Σ_t loss(x + δ_t) / K, back-propagated once per step; no separate penalty."""

    name = "freelb"
    own_step = True

    def __init__(self, model: nn.Module, config: "FreeLBConfig"):
        super().__init__(model, config)
        self._delta: torch.Tensor | None = None   # δ of the ascent step in progress
        self._in_step = False

    def initial_delta(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """δ₀: uniform in [−1, 1] at real tokens, times init_mag / sqrt(real tokens × width) per example."""
        x = x.detach()
        if self.config.init_mag == 0:
            return torch.zeros_like(x)
        real = real_tokens(attention_mask, x)
        dims = real.flatten(1).sum(1).clamp_min(1) * x.shape[-1]
        scale = (self.config.init_mag / dims.sqrt()).view(-1, *([1] * (x.dim() - 1)))
        return torch.empty_like(x).uniform_(-1, 1) * real * scale

    def ascend(self, delta: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """One step along δ's accumulated gradient, normalised per example, then bounded by max_norm."""
        if delta.grad is None:
            raise RuntimeError("backward(loss) left no gradient on the perturbation; it must back-propagate the loss")
        # A GradScaler or accumulation factor in the gradient cancels in the normalisation; an overflow is dropped.
        grad = torch.nan_to_num(delta.grad, nan=0.0, posinf=0.0, neginf=0.0)
        shape = (-1, *([1] * (grad.dim() - 1)))
        grad_norm = grad.flatten(1).float().norm(dim=1).clamp_min(1e-8).view(shape)
        delta = (delta.detach() + self.config.step_size * grad / grad_norm.to(grad.dtype)) * real
        if self.config.max_norm > 0:
            norm = delta.flatten(1).float().norm(dim=1).view(shape)
            delta = delta * (self.config.max_norm / norm).clamp(max=1.0).to(delta.dtype)
        return delta

    def forward(self, call: Call):
        if not self._in_step:
            raise ValueError("FreeLB runs K forward and backward passes per batch: train with lnsr_fast.LNSRTrainer, "
                             "or call handle.training_step(batch, backward) instead of model(**batch)")

        return call.run(call.inputs, lambda input_ids, x: x + self._delta)[0]

    def training_step(self, model: nn.Module, batch: dict, backward) -> torch.Tensor:
        steps = self.config.steps
        x = batch.get("inputs_embeds")
        if x is None:   # the word embeddings' shape: δ₀ is drawn before the passes, whose dropout masks then repeat
            weight = word_embeddings(self.model).weight
            x = weight.new_empty((*batch["input_ids"].shape, weight.shape[-1]), device=batch["input_ids"].device)
        self._in_step, self._delta = True, self.initial_delta(x, batch.get("attention_mask")).requires_grad_(True)
        try:
            state, total = rng_state(x.device), None
            for step in range(steps):
                set_rng_state(state, x.device)   # the same dropout masks in every step
                loss = model(**batch).loss / steps
                backward(loss)
                total = loss.detach().float() if total is None else total + loss.detach().float()
                if step < steps - 1:
                    real = real_tokens(batch.get("attention_mask"), self._delta)
                    self._delta = self.ascend(self._delta, real).requires_grad_(True)
        finally:
            self._in_step, self._delta = False, None
        return total


@dataclass
class FreeLBConfig(MethodConfig):
    """`freelb`: the task loss averaged over K adversarial ascent steps on the word embeddings."""

    method = FreeLB
    steps: int = hyperparameter("ascent steps K (1 with init_mag 0 is plain fine-tuning)", 3)
    step_size: float = hyperparameter("ascent step size α", 0.1)
    init_mag: float = hyperparameter("scale of δ₀ (0: start at δ₀ = 0)", 0.0)
    max_norm: float = hyperparameter("bound on each example's ‖δ‖ (0: none)", 0.0)

    def __post_init__(self):
        self.steps = check_int("FreeLBConfig.steps", self.steps, 1)
        self.step_size = check_real("FreeLBConfig.step_size", self.step_size)
        self.init_mag = check_real("FreeLBConfig.init_mag", self.init_mag)
        self.max_norm = check_real("FreeLBConfig.max_norm", self.max_norm)
