"""Mixout (`mixout`): in training, every `nn.Linear` uses a weight whose input columns are, with probability p,
swapped for the pretrained ones, rescaled so that the expected weight is the current one; dropout is off.

Source: Lee, Cho and Kang, "Mixout: Effective Regularization to Finetune Large-scale Pretrained Language
Models" (ICLR 2020); reference code: github.com/bloodwass/mixout (mixout.py, MixLinear). As there: the
target u is each layer's weight when the method is applied, the mask M ~ Bernoulli(1 − p) is drawn per input
column (one mask row shared by all output rows), the weight is u + M ⊙ (w − u) / (1 − p) (E = w), every
`nn.Linear` mixes (the new head with its initial weights) and every `nn.Dropout` gets p = 0; default
p = 0.9. Ours: the gradient is that formula's (the reference's hand-written backward leaves out the
1 / (1 − p) factor), and no module is replaced: each layer's forward is overridden in place, so the
parameters, the state_dict and a saved model are the plain ones, evaluation runs the plain layers, and
`remove()` restores the forwards and dropout rates.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_real
from ..regularize import Method, MethodConfig
from .base import hyperparameter


def mixout_linear(module: nn.Linear, target: torch.Tensor, p: float, input: torch.Tensor) -> torch.Tensor:
    """`module(input)` with its weight mixed with `target` (in training mode; the plain layer otherwise)."""
    weight = module.weight
    if module.training and p > 0:
        target = target.to(device=weight.device, dtype=weight.dtype)
        if p == 1:
            weight = target
        else:
            keep = torch.empty((1, weight.shape[1]), device=weight.device, dtype=weight.dtype).bernoulli_(1 - p)
            weight = target + keep * (weight - target) / (1 - p)
    return F.linear(input, weight, module.bias)


class Mixout(Method):
    """Mixout(p) on every `nn.Linear` of the model; with zero_dropout every `nn.Dropout` gets p = 0. The
    objective is the plain task loss; the layers mix until the method is removed."""

    name = "mixout"

    def __init__(self, model: nn.Module, config: "MixoutConfig"):
        super().__init__(model, config)
        self._linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if any("forward" in vars(m) for m in self._linears):
            raise ValueError("the model's linear layers already have their forward overridden (Mixout applied twice?)")
        for m in self._linears:
            m.forward = functools.partial(mixout_linear, m, m.weight.detach().clone(), config.p)
        self._dropout_rates = ({m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
                               if config.zero_dropout else {})
        for m in self._dropout_rates:
            m.p = 0.0

    def remove(self) -> None:
        """Give every linear layer its own forward back and every dropout its rate (the weights stay as trained)."""
        for m in self._linears:
            vars(m).pop("forward", None)
        for m, rate in self._dropout_rates.items():
            m.p = rate
        self._linears, self._dropout_rates = [], {}


@dataclass
class MixoutConfig(MethodConfig):
    """`mixout`: mix every linear layer's weight with its pretrained value."""

    method = Mixout
    p: float = hyperparameter("the probability of taking a pretrained input column", 0.9)
    zero_dropout: bool = hyperparameter("set every nn.Dropout's rate to 0, as the reference does", True)

    def __post_init__(self):
        self.p = check_real("MixoutConfig.p", self.p, maximum=1.0)
        if not isinstance(self.zero_dropout, bool):
            raise TypeError(f"MixoutConfig.zero_dropout must be a bool, got {self.zero_dropout!r}")
