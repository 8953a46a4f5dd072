"""Peer methods and ablations of LNSR behind one interface (`Method`), selected by name in LNSRTrainer and the
CLI: one file per method, each with its source and defaults in its docstring.

    from lnsr_fast.methods import METHODS, build
    method = build("smart", model, steps=1)            # hyperparameters as keywords; defaults(name) lists them
    loss, logs = method.training_step(model, batch, lambda l: l.backward())
    method.before_optimizer_step(model); optimizer.step()
"""
from __future__ import annotations

import inspect

from torch import nn

from .base import Method
from .cwgnc import CWGNC
from .freelb import FreeLB
from .ft import FineTuning
from .l2sp import L2SP
from .lnsr import InManifoldLNSR, LNSRConfig, LNSRMethod, StandardLNSR
from .mixout import Mixout
from .noise_only import NoiseOnlyGaussian, NoiseOnlyInManifold
from .r3f import R3F
from .smart import SMART

_CLASSES = (FineTuning, StandardLNSR, InManifoldLNSR, SMART, FreeLB, R3F, L2SP, Mixout, CWGNC,
            NoiseOnlyGaussian, NoiseOnlyInManifold)
METHODS = tuple(c.name for c in _CLASSES)
_BY_NAME = {c.name: c for c in _CLASSES}

__all__ = ["METHODS", "Method", "LNSRConfig", "LNSRMethod", "build", "defaults", "method_class"]


def method_class(name: str) -> type[Method]:
    """The class of method `name`; ValueError naming it and listing METHODS if unknown."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    return _BY_NAME[name]


def defaults(name: str) -> dict:
    """Method `name`'s hyperparameters and their defaults, e.g. defaults("r3f") == {"weight": 1.0, ...}."""
    params = list(inspect.signature(method_class(name).__init__).parameters.values())[2:]   # after self, model
    return {p.name: p.default for p in params}


def build(name: str, model: nn.Module, **hparams) -> Method:
    """Method `name` on `model` (the unwrapped Hugging Face model), with `hparams` overriding its defaults.

    ValueError for an unknown method; TypeError naming unknown hyperparameters; the method's own
    TypeError/ValueError naming a hyperparameter with a bad value.
    """
    allowed = defaults(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {unknown} for method {name!r}; its hyperparameters are "
                        f"{sorted(allowed) or 'none'}")
    return method_class(name)(model, **hparams)
