"""LNSR as a method (`lnsr`, `lnsr_in_manifold`): its configuration and a thin adapter over `lnsr_fast.LNSR`,
which runs the clean + noisy pass of DESIGN.md §1.

Source: Hua et al., "Improving Pre-trained Language Model Fine-tuning with Noise Stability Regularization"
(IEEE TNNLS 2023, arXiv:2206.05658; standard and in-manifold noise). Defaults: λ = 0.02 for every layer
(chosen on validation data in docs/reproduction/; the paper's range is 0.2–1.0), reduction "sum", shared
dropout masks, ratio 0.05 for Gaussian and 0.1 for in-manifold noise, k = 10 neighbours (DESIGN.md §2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..lnsr import DEFAULT_WEIGHT, DROPOUT_MODES, LNSR, MODES
from ..kernels import BACKENDS
from ..neighbors import KNN_BACKENDS
from ..noise import GaussianNoise, InManifoldNoise
from ..stability import REDUCTIONS
from ..checks import check_choice, is_int, is_real
from .base import Method

NOISE_KINDS = ("gaussian", "in_manifold")
# DESIGN.md §2: standard LNSR 0.05, in-manifold 0.1.
DEFAULT_RATIOS = {"gaussian": 0.05, "in_manifold": 0.1}


@dataclass
class LNSRConfig:
    """How LNSRTrainer regularises: the noise sampler and the LNSR penalty (DESIGN.md §2).

    noise: "gaussian" (standard LNSR) or "in_manifold". ratio: ‖ε_t‖ / ‖x_t‖ per token; None picks
    0.05 for gaussian and 0.1 for in_manifold. k: neighbours per token (in_manifold). weight: λ for
    every chosen layer (0.02, chosen on validation in docs/reproduction/), or one λ per layer. layers: indices into `hidden_states` (0 = embedding
    output); None = every transformer layer. reduction, mode, dropout, detach_clean: as in `LNSR`. seed:
    the noise seed; None uses `TrainingArguments.seed`. refresh_every: rebuild the neighbour table every that
    many optimizer steps (in_manifold; None = never). knn_backend: "auto" | "torch" | "faiss". backend: the
    kernels of the noise and the penalty, "auto" | "cuda" | "triton" | "torch" (see lnsr_fast.kernels).

    >>> LNSRConfig(noise="gaussian", weight=0.5)
    """

    noise: str = "in_manifold"
    ratio: float | None = None
    k: int = 10
    weight: float | list[float] = DEFAULT_WEIGHT
    layers: list[int] | None = None
    reduction: str = "sum"
    mode: str = "concat"
    dropout: str = "shared"
    seed: int | None = None
    refresh_every: int | None = None
    knn_backend: str = "auto"
    detach_clean: bool = False
    backend: str = "auto"

    def __post_init__(self):
        for name, allowed in (("noise", NOISE_KINDS), ("reduction", REDUCTIONS), ("mode", MODES),
                              ("dropout", DROPOUT_MODES), ("knn_backend", KNN_BACKENDS), ("backend", BACKENDS)):
            check_choice(f"LNSRConfig.{name}", getattr(self, name), allowed)
        if self.ratio is not None:
            if not is_real(self.ratio):
                raise TypeError(f"LNSRConfig.ratio must be a float or None, got {type(self.ratio).__name__}")
            if not math.isfinite(self.ratio) or self.ratio <= 0:
                raise ValueError(f"LNSRConfig.ratio must be finite and > 0, got {self.ratio}")
        if not is_int(self.k):
            raise TypeError(f"LNSRConfig.k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"LNSRConfig.k must be >= 1, got {self.k}")
        if isinstance(self.weight, (list, tuple)):
            self.weight = list(self.weight)
            if not self.weight:
                raise ValueError("LNSRConfig.weight is an empty list; give a float or one float per layer")
            weights = self.weight
        else:
            weights = [self.weight]
        if not all(is_real(w) for w in weights):
            raise TypeError(f"LNSRConfig.weight must be a float or a list of floats, got {self.weight!r}")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"LNSRConfig.weight must be finite and >= 0, got {self.weight!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(is_int(r) for r in self.layers):
                raise TypeError(f"LNSRConfig.layers must be None or a list of ints, got {self.layers!r}")
            self.layers = list(self.layers)
            if not self.layers:
                raise ValueError("LNSRConfig.layers is an empty list; give None (every layer) or at least one index")
            if isinstance(self.weight, list) and len(self.weight) != len(self.layers):
                raise ValueError(f"LNSRConfig.weight has {len(self.weight)} entries but layers has {len(self.layers)}")
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"LNSRConfig.seed must be an int or None, got {type(self.seed).__name__}")
        if self.refresh_every is not None:
            if not is_int(self.refresh_every):
                raise TypeError(f"LNSRConfig.refresh_every must be an int or None, got {type(self.refresh_every).__name__}")
            if self.refresh_every < 1:
                raise ValueError(f"LNSRConfig.refresh_every must be >= 1 optimizer steps, got {self.refresh_every}")
            if self.noise != "in_manifold":
                raise ValueError(f"LNSRConfig.refresh_every applies to in_manifold noise only, got noise={self.noise!r}")
        if not isinstance(self.detach_clean, bool):
            raise TypeError(f"LNSRConfig.detach_clean must be a bool, got {self.detach_clean!r}")

    @property
    def noise_ratio(self) -> float:
        """The ratio in use: `ratio`, or the default for the noise kind."""
        return DEFAULT_RATIOS[self.noise] if self.ratio is None else float(self.ratio)

    def make_noise(self, model: nn.Module, seed: int, gradient_accumulation_steps: int = 1):
        """The noise sampler (GaussianNoise or InManifoldNoise over `model`'s input embedding).

        seed: used when `self.seed` is None (LNSRTrainer passes `TrainingArguments.seed`).
        gradient_accumulation_steps: the sampler is called once per micro-batch, so `refresh_every`
        optimizer steps become `refresh_every × gradient_accumulation_steps` sampler calls.
        """
        if not is_int(gradient_accumulation_steps) or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be a positive int, got {gradient_accumulation_steps!r}")
        seed = self.seed if self.seed is not None else seed
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if self.noise == "gaussian":
            return GaussianNoise(ratio=self.noise_ratio, seed=seed, backend=self.backend)
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise TypeError(f"model must have get_input_embeddings() (a Hugging Face model), got {type(model).__name__}")
        refresh = None if self.refresh_every is None else self.refresh_every * gradient_accumulation_steps
        return InManifoldNoise(model.get_input_embeddings(), k=self.k, ratio=self.noise_ratio, seed=seed,
                               refresh_every=refresh, knn_backend=self.knn_backend, backend=self.backend)

    def build(self, model: nn.Module, seed: int, gradient_accumulation_steps: int = 1) -> LNSR:
        """The sampler and the LNSR around `model` (the unwrapped model: embeddings and config come from it);
        seed and gradient_accumulation_steps as in `make_noise`."""
        return LNSR(model, self.make_noise(model, seed, gradient_accumulation_steps), weight=self.weight,
                    layers=self.layers, mode=self.mode, dropout=self.dropout, reduction=self.reduction,
                    detach_clean=self.detach_clean, backend=self.backend)


class LNSRMethod(Method):
    """An `LNSRConfig` as a method: task loss of the clean half + penalty, one backward.

    seed: the noise seed when `config.seed` is None. Logs `task_loss` and `penalty`. `self.lnsr` is the
    `LNSR` in use and `self.noise` its sampler.
    """

    def __init__(self, model: nn.Module, config: LNSRConfig, seed: int = 0, gradient_accumulation_steps: int = 1):
        super().__init__(model)
        if not isinstance(config, LNSRConfig):
            raise TypeError(f"config must be an LNSRConfig, got {type(config).__name__}")
        self.name = "lnsr" if config.noise == "gaussian" else "lnsr_in_manifold"
        self.config = config
        self.lnsr = config.build(model, seed, gradient_accumulation_steps)

    @property
    def noise(self):
        return self.lnsr.noise

    def training_step(self, model, batch, backward, penalty_scale=1.0):
        outputs, reg = self.lnsr.compute(batch, model=model)
        penalty = reg * penalty_scale
        loss = outputs.loss + penalty
        backward(loss)
        return loss.detach(), {"task_loss": outputs.loss.detach(), "penalty": penalty.detach()}


class StandardLNSR(LNSRMethod):
    """`lnsr`: LNSR with Gaussian noise, ‖ε_t‖ = ratio·‖x_t‖. Hyperparameters as in `LNSRConfig` / `LNSR`."""

    name = "lnsr"

    def __init__(self, model: nn.Module, weight=DEFAULT_WEIGHT, layers=None, reduction: str = "sum", mode: str = "concat",
                 dropout: str = "shared", ratio: float = 0.05, seed: int = 0, detach_clean: bool = False,
                 backend: str = "auto"):
        super().__init__(model, LNSRConfig(noise="gaussian", ratio=ratio, weight=weight, layers=layers,
                                           reduction=reduction, mode=mode, dropout=dropout, seed=seed,
                                           detach_clean=detach_clean, backend=backend))


class InManifoldLNSR(LNSRMethod):
    """`lnsr_in_manifold`: LNSR with noise inside the span of each token's k nearest vocabulary embeddings.

    refresh_every: optimizer steps between neighbour-table rebuilds (None: never); with gradient
    accumulation give `gradient_accumulation_steps`, since the sampler is called per micro-batch.
    """

    name = "lnsr_in_manifold"

    def __init__(self, model: nn.Module, weight=DEFAULT_WEIGHT, layers=None, reduction: str = "sum", mode: str = "concat",
                 dropout: str = "shared", ratio: float = 0.1, k: int = 10, knn_backend: str = "auto",
                 refresh_every: int | None = None, seed: int = 0, detach_clean: bool = False,
                 gradient_accumulation_steps: int = 1, backend: str = "auto"):
        super().__init__(model, LNSRConfig(noise="in_manifold", ratio=ratio, k=k, weight=weight, layers=layers,
                                           reduction=reduction, mode=mode, dropout=dropout, seed=seed,
                                           refresh_every=refresh_every, knn_backend=knn_backend,
                                           detach_clean=detach_clean, backend=backend),
                         gradient_accumulation_steps=gradient_accumulation_steps)
