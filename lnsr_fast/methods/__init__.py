"""LNSR, the peer methods its paper compares with, and its ablations, by name (docs/design.md §3): each is a config
(every hyperparameter, its default and its check in one dataclass) that `lnsr_fast.apply` puts inside the model's
forward; one file per method, with its source and defaults in its docstring.

    from lnsr_fast import apply
    from lnsr_fast.methods import METHODS, config, defaults
    handle = apply(model, config("smart", steps=2))   # defaults("smart") lists the hyperparameters
    model(**batch).loss.backward()                    # task loss + SMART's term
"""
from __future__ import annotations

import dataclasses

from ..lnsr import DEFAULT_RATIOS, DEFAULT_WEIGHTS, LNSRConfig
from ..regularize import MethodConfig
from .cwgnc import CWGNCConfig
from .freelb import FreeLBConfig
from .ft import FTConfig
from .l2sp import L2SPConfig
from .mixout import MixoutConfig
from .noise_only import NoiseOnlyConfig
from .r3f import R3FConfig
from .smart import SMARTConfig

_IN_MANIFOLD_ONLY = ("k", "knn_backend", "refresh_every")


def _noise(kind: str) -> dict:
    # The noise is the method's identity (not a hyperparameter); its ratio is a hyperparameter defaulting per kind.
    return {"noise": kind, "ratio": DEFAULT_RATIOS[kind]}


def _lnsr(kind: str) -> dict:
    return {**_noise(kind), "weight": DEFAULT_WEIGHTS[kind]}


# name -> (config class, the defaults the name sets, the config's fields the name does not use)
_REGISTRY = {
    "ft": (FTConfig, {}, ()),
    "lnsr": (LNSRConfig, _lnsr("gaussian"), _IN_MANIFOLD_ONLY),
    "lnsr_in_manifold": (LNSRConfig, _lnsr("in_manifold"), ()),
    "smart": (SMARTConfig, {}, ()),
    "freelb": (FreeLBConfig, {}, ()),
    "r3f": (R3FConfig, {}, ()),
    "l2sp": (L2SPConfig, {}, ()),
    "mixout": (MixoutConfig, {}, ()),
    "cwgnc": (CWGNCConfig, {}, ()),
    "noise_only_gaussian": (NoiseOnlyConfig, _noise("gaussian"), _IN_MANIFOLD_ONLY),
    "noise_only_in_manifold": (NoiseOnlyConfig, _noise("in_manifold"), ()),
}
METHODS = tuple(_REGISTRY)

__all__ = ["METHODS", "config", "config_class", "defaults", "help_texts"]


def _entry(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    return _REGISTRY[name]


def config_class(name: str) -> type[MethodConfig]:
    """The config class of method `name`; ValueError naming it and listing METHODS if unknown."""
    return _entry(name)[0]


def _hyperparameters(name: str) -> list[dataclasses.Field]:
    cls, preset, unused = _entry(name)
    fixed = {"noise"} & set(preset)   # the noise kind is the method's identity, not a hyperparameter
    return [f for f in dataclasses.fields(cls) if f.name not in unused and f.name not in fixed]


def defaults(name: str) -> dict:
    """Method `name`'s hyperparameters and their defaults, e.g. defaults("r3f") == {"weight": 1.0, ...}."""
    preset = _entry(name)[1]
    return {f.name: preset.get(f.name, f.default) for f in _hyperparameters(name)}


def help_texts(name: str) -> dict[str, str]:
    """{hyperparameter: its help text} of method `name`."""
    return {f.name: f.metadata.get("help", "") for f in _hyperparameters(name)}


def config(name: str, **hyperparameters) -> MethodConfig:
    """The config of method `name` with `hyperparameters` overriding its defaults, checked.

    ValueError for an unknown method; TypeError naming unknown hyperparameters; the config's own
    TypeError/ValueError naming a hyperparameter with a bad value.
    """
    allowed = defaults(name)
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {unknown} for method {name!r}; its hyperparameters are "
                        f"{sorted(allowed) or 'none'}")
    cls, preset, _ = _entry(name)
    return cls(**{**preset, **hyperparameters})
