"""Plain fine-tuning (`ft`): the model's own loss, no regulariser; the baseline every method is compared with.

Source: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
(NAACL 2019): the pretrained encoder and a new head trained together on the task loss. No hyperparameters.
"""
from __future__ import annotations

from torch import nn

from .base import Method


class FineTuning(Method):
    """`ft`: the task loss as the model computes it from the batch's labels; no hyperparameters."""

    name = "ft"

    def __init__(self, model: nn.Module):
        super().__init__(model)
