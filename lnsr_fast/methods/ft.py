"""Plain fine-tuning (`ft`): the model's own loss, no regulariser; the baseline every method is compared with.

Source: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
(NAACL 2019): the pretrained encoder and a new head trained together on the task loss. No hyperparameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..regularize import MethodConfig


@dataclass
class FTConfig(MethodConfig):
    """`ft`: the task loss as the model computes it; no hyperparameters. Applied, the model runs unchanged."""
