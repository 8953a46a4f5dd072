"""Component-wise gradient norm clipping (`cwgnc`): after the last backward of an optimizer step, the gradient
of every component is clipped to the same norm, each on its own.

Source: Yang and Ma, "Improving Stability of Fine-Tuning Pretrained Language Models via Component-Wise
Gradient Norm Clipping" (EMNLP 2022); reference code: github.com/yangalan123/FineTuningStability
(CustomToolBox/GroupGradClip/GradClipTrainer.py). As there, a component is one parameter tensor (layer 3's
query weight, its query bias, key, value, ..., the classifier's weight) and each is clipped like
`clip_grad_norm_(param, max_norm)`; the reference turns the global clip off (its run_glue.py sets
max_grad_norm = -1), as `lnsr-fast finetune` does (with a Trainer of your own, set max_grad_norm = 0).

Default: run.sh sweeps max_norm over 0.01, 0.05, 0.1, 0.5, 1, 5 and 1e5 (BERT, GLUE, lr 2e-5, batch 16,
3 epochs; as published, a missing line continuation drops --max_clip_value from the command), and the
authors' analysis script compute_variance.py compares 0.05 with 1e5 (no clipping) for bert-large-uncased on
RTE and CoLA: max_norm = 0.05 is that value. Ours: the clip runs once per optimizer step, after gradient
accumulation (the reference clips after every backward; its runs accumulate nothing, where the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_real
from ..regularize import Method, MethodConfig, hyperparameter


class CWGNC(Method):
    """Clips each trainable parameter's gradient to ‖g‖ ≤ max_norm in `before_optimizer_step`, which
    LNSRCallback calls from `on_pre_optimizer_step` (after the Trainer's own global clip, `max_grad_norm`, which
    the reference turns off and `lnsr-fast finetune` sets to 0 for cwgnc); in a hand-written loop call
    `handle.before_optimizer_step()` before `optimizer.step()`. The objective is the plain task loss."""

    name = "cwgnc"

    def __init__(self, model: nn.Module, config: "CWGNCConfig"):
        super().__init__(model, config)
        self._params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module) -> None:
        """g ← g · min(1, max_norm / (‖g‖ + 1e-6)) for every parameter's gradient g (as clip_grad_norm_)."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        scales = [(self.config.max_norm / (n + 1e-6)).clamp(max=1.0).to(g.dtype) for n, g in zip(norms, grads)]
        torch._foreach_mul_(grads, scales)


@dataclass
class CWGNCConfig(MethodConfig):
    """`cwgnc`: clip every parameter's gradient to max_norm on its own."""

    method = CWGNC
    max_norm: float = hyperparameter("the bound on each parameter tensor's gradient norm", 0.05)

    def __post_init__(self):
        self.max_norm = check_real("CWGNCConfig.max_norm", self.max_norm, open_minimum=True)
