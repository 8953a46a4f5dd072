"""Component-wise gradient norm clipping (`cwgnc`): after the last backward of an optimizer step, the gradient
of every component is clipped to the same norm, each on its own.

Source: Yang and Ma, "Improving Stability of Fine-Tuning Pretrained Language Models via Component-Wise
Gradient Norm Clipping" (EMNLP 2022); reference code: github.com/yangalan123/FineTuningStability
(CustomToolBox/GroupGradClip/GradClipTrainer.py). As there, a component is one parameter tensor (layer 3's
query weight, its query bias, key, value, ..., the classifier's weight) and each is clipped like
`clip_grad_norm_(param, max_norm)`. The authors sweep max_norm over 0.01–1e5 and disable the global clip;
no single default is published, so max_norm = 1.0 (the Hugging Face global default, applied per component)
is ours. Ours too: the clip runs once per optimizer step, after gradient accumulation (the reference clips
after every backward).
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_real
from .base import Method


class CWGNC(Method):
    """Clips each trainable parameter's gradient to ‖g‖ ≤ max_norm in `before_optimizer_step`.

    The objective is the plain task loss. LNSRTrainer calls `before_optimizer_step` after the Trainer's own
    global clip (`max_grad_norm`; the reference sets it to 0, which `lnsr-fast finetune` does for cwgnc).
    """

    name = "cwgnc"

    def __init__(self, model: nn.Module, max_norm: float = 1.0):
        super().__init__(model)
        self.max_norm = check_real("max_norm", max_norm, open_minimum=True)
        self._params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module) -> None:
        """g ← g · min(1, max_norm / (‖g‖ + 1e-6)) for every parameter's gradient g (as clip_grad_norm_)."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        scales = [(self.max_norm / (n + 1e-6)).clamp(max=1.0).to(g.dtype) for n, g in zip(norms, grads)]
        torch._foreach_mul_(grads, scales)
