"""Hugging Face Trainer integration: one setting (`lnsr=LNSRConfig(...)`) turns the clean + noisy pass of
DESIGN.md §1 on inside `Trainer.compute_loss`; the model itself is not touched.

    trainer = LNSRTrainer(model=model, args=training_args, train_dataset=train, lnsr=LNSRConfig(noise="in_manifold"))
    trainer.train()             # logs `task_loss` and `lnsr_penalty` next to `loss`

`lnsr=None` is plain fine-tuning through the same class, so FT and LNSR runs share one code path.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Trainer

from .lnsr import DROPOUT_MODES, LNSR, MODES
from .neighbors import KNN_BACKENDS
from .noise import GaussianNoise, InManifoldNoise
from .stability import REDUCTIONS

logger = logging.getLogger(__name__)

NOISE_KINDS = ("gaussian", "in_manifold")
# DESIGN.md §2: standard LNSR 0.05, in-manifold 0.1.
DEFAULT_RATIOS = {"gaussian": 0.05, "in_manifold": 0.1}
# The sampler state saved inside every checkpoint folder, one file per process.
NOISE_STATE_NAME = "lnsr_noise_rank{rank}.pt"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LNSRConfig:
    """How LNSRTrainer regularises: the noise sampler and the LNSR penalty (DESIGN.md §2).

    noise: "gaussian" (standard LNSR) or "in_manifold". ratio: ‖ε_t‖ / ‖x_t‖ per token; None picks
    0.05 for gaussian and 0.1 for in_manifold. k: neighbours per token (in_manifold). weight: λ for
    every chosen layer, or one λ per layer. layers: indices into `hidden_states` (0 = embedding
    output); None = every transformer layer. reduction, mode, dropout: as in `LNSR`. seed: the noise
    seed; None uses `TrainingArguments.seed`. refresh_every: rebuild the neighbour table every that
    many optimizer steps (in_manifold; None = never). knn_backend: "auto" | "torch" | "faiss".

    >>> LNSRConfig(noise="gaussian", weight=0.5)
    """

    noise: str = "in_manifold"
    ratio: float | None = None
    k: int = 10
    weight: float | list[float] = 1.0
    layers: list[int] | None = None
    reduction: str = "sum"
    mode: str = "concat"
    dropout: str = "shared"
    seed: int | None = None
    refresh_every: int | None = None
    knn_backend: str = "auto"

    def __post_init__(self):
        for name, allowed in (("noise", NOISE_KINDS), ("reduction", REDUCTIONS), ("mode", MODES),
                              ("dropout", DROPOUT_MODES), ("knn_backend", KNN_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LNSRConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.ratio is not None:
            if not _is_real(self.ratio):
                raise TypeError(f"LNSRConfig.ratio must be a float or None, got {type(self.ratio).__name__}")
            if not math.isfinite(self.ratio) or self.ratio <= 0:
                raise ValueError(f"LNSRConfig.ratio must be finite and > 0, got {self.ratio}")
        if not _is_int(self.k):
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
        if not all(_is_real(w) for w in weights):
            raise TypeError(f"LNSRConfig.weight must be a float or a list of floats, got {self.weight!r}")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"LNSRConfig.weight must be finite and >= 0, got {self.weight!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(_is_int(r) for r in self.layers):
                raise TypeError(f"LNSRConfig.layers must be None or a list of ints, got {self.layers!r}")
            self.layers = list(self.layers)
            if not self.layers:
                raise ValueError("LNSRConfig.layers is an empty list; give None (every layer) or at least one index")
            if isinstance(self.weight, list) and len(self.weight) != len(self.layers):
                raise ValueError(f"LNSRConfig.weight has {len(self.weight)} entries but layers has {len(self.layers)}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"LNSRConfig.seed must be an int or None, got {type(self.seed).__name__}")
        if self.refresh_every is not None:
            if not _is_int(self.refresh_every):
                raise TypeError(f"LNSRConfig.refresh_every must be an int or None, got {type(self.refresh_every).__name__}")
            if self.refresh_every < 1:
                raise ValueError(f"LNSRConfig.refresh_every must be >= 1 optimizer steps, got {self.refresh_every}")
            if self.noise != "in_manifold":
                raise ValueError(f"LNSRConfig.refresh_every applies to in_manifold noise only, got noise={self.noise!r}")

    @property
    def noise_ratio(self) -> float:
        """The ratio in use: `ratio`, or the default for the noise kind."""
        return DEFAULT_RATIOS[self.noise] if self.ratio is None else float(self.ratio)

    def build(self, model: nn.Module, seed: int, gradient_accumulation_steps: int = 1) -> LNSR:
        """The sampler and the LNSR around `model` (the unwrapped model: embeddings and config come from it).

        seed: used when `self.seed` is None (LNSRTrainer passes `TrainingArguments.seed`).
        gradient_accumulation_steps: the sampler is called once per micro-batch, so `refresh_every`
        optimizer steps become `refresh_every × gradient_accumulation_steps` sampler calls.
        """
        if not _is_int(gradient_accumulation_steps) or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be a positive int, got {gradient_accumulation_steps!r}")
        seed = self.seed if self.seed is not None else seed
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if self.noise == "gaussian":
            noise = GaussianNoise(ratio=self.noise_ratio, seed=seed)
        else:
            if not callable(getattr(model, "get_input_embeddings", None)):
                raise TypeError(f"model must have get_input_embeddings() (a Hugging Face model), got {type(model).__name__}")
            refresh = None if self.refresh_every is None else self.refresh_every * gradient_accumulation_steps
            noise = InManifoldNoise(model.get_input_embeddings(), k=self.k, ratio=self.noise_ratio, seed=seed,
                                    refresh_every=refresh, knn_backend=self.knn_backend)
        return LNSR(model, noise, weight=self.weight, layers=self.layers, mode=self.mode, dropout=self.dropout,
                    reduction=self.reduction)


class _LNSRForward:
    """Stands in for the model inside `Trainer.compute_loss`: runs the LNSR pass and keeps the penalty.

    So the task loss is whatever the installed Trainer makes of the (clean-half) outputs: the
    `num_items_in_batch` it passes, label smoothing, `compute_loss_func`, averaging across devices.
    Attributes are looked up on the unwrapped model, as `Trainer.compute_loss` expects of a model.
    """

    def __init__(self, lnsr: LNSR, model: nn.Module):
        self._lnsr, self._model, self.reg = lnsr, model, None

    def __call__(self, **inputs):
        outputs, self.reg = self._lnsr.compute(inputs, model=self._model)
        return outputs

    def _get_name(self) -> str:
        # Trainer's label smoother asks for the name of the model under a PEFT wrapper (causal-LM check).
        base = self._lnsr.model
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        return base._get_name()

    def __getattr__(self, name):
        return getattr(self._lnsr.model, name)


class LNSRTrainer(Trainer):
    """`transformers.Trainer` that trains on task loss + LNSR penalty (DESIGN.md §1).

    lnsr: an `LNSRConfig`, or None for plain fine-tuning (then this is `Trainer` unchanged). In training
    mode `compute_loss` runs the clean and the noisy pass through the (possibly DDP-wrapped) model;
    evaluation and prediction use the plain loss. `self.lnsr` is the `LNSR` in use (None when off).

    - Loss scale: the task part is exactly what `Trainer.compute_loss` returns for the clean half. The
      penalty (a per-micro-batch mean over real tokens) is divided by the number of accumulated
      micro-batches once in every case, so its gradient is the same for 1 × batch 8 and 2 × batch 4,
      whether or not the Trainer treats the loss as already normalised by `num_items_in_batch`; across
      DDP ranks the gradient all-reduce averages it.
    - Logs: `task_loss` and `lnsr_penalty`, averaged over the optimizer steps since the last log and over
      processes, on the scale of `loss` (so `loss` = `task_loss` + `lnsr_penalty`).
    - Checkpoints: the sampler state goes into every checkpoint (`lnsr_noise_rank{r}.pt`, one per
      process; none with `save_only_model=True`, which saves no resumable state) and is restored by
      `train(resume_from_checkpoint=...)`, so a resumed run draws the noise an uninterrupted one would.
    - Transformers ≥ 5 (`loss_is_scaled_for_ga`, `current_gradient_accumulation_steps`); tested with 5.24.

    >>> trainer = LNSRTrainer(model=model, args=args, train_dataset=ds, lnsr=LNSRConfig(noise="gaussian"))
    """

    def __init__(self, *args, lnsr: LNSRConfig | None = None, **kwargs):
        if lnsr is not None and not isinstance(lnsr, LNSRConfig):
            raise TypeError(f"lnsr must be an LNSRConfig or None, got {type(lnsr).__name__}")
        super().__init__(*args, **kwargs)
        self.lnsr_config = lnsr
        self.lnsr: LNSR | None = None
        self._reset_lnsr_logs()
        if lnsr is not None and self.model is not None:
            self._ensure_lnsr()

    def _ensure_lnsr(self) -> LNSR:
        # `model_init` replaces self.model at the start of train(); the LNSR must follow it (fresh sampler).
        if self.lnsr is None or self.lnsr.model is not self.model:
            self.lnsr = self.lnsr_config.build(self.model, self.args.seed, self.args.gradient_accumulation_steps)
        return self.lnsr

    def _reset_lnsr_logs(self) -> None:
        self._lnsr_sums: torch.Tensor | None = None   # [task, penalty], detached, on the loss's device
        self._lnsr_logged_step = 0

    def train(self, *args, **kwargs):
        """`Trainer.train`; LNSR's log accumulators start afresh with every call."""
        self._reset_lnsr_logs()
        return super().train(*args, **kwargs)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: True when it will NOT divide the loss by the accumulation steps.
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss + LNSR penalty in training mode; `Trainer.compute_loss` otherwise.

        `num_items_in_batch` reaches the LNSR batch (and so the causal-LM loss, or the model in two-pass
        mode) exactly when plain `Trainer.compute_loss` would pass it to the model.
        """
        if self.lnsr_config is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        forward = _LNSRForward(self._ensure_lnsr(), model)
        task, outputs = super().compute_loss(forward, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        reg = forward.reg / steps if scaled else forward.reg
        loss = task + reg
        # What training_step adds to the logged loss: loss / steps unless already scaled.
        divisor = 1 if scaled else steps
        self._accumulate_lnsr_logs(task.detach() / divisor, reg.detach() / divisor)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_lnsr_logs(self, task: torch.Tensor, reg: torch.Tensor) -> None:
        # Detached device tensors only: no host sync per step (read once per log).
        if task.dim():
            task = task.mean()   # DataParallel returns one loss per GPU; training_step logs their mean
        step = torch.stack([task.float(), reg.float().to(task.device)])
        if self._lnsr_sums is None:
            self._lnsr_sums = step
            self._lnsr_logged_step = self.state.global_step
        else:
            self._lnsr_sums = self._lnsr_sums + step.to(self._lnsr_sums.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with `task_loss` and `lnsr_penalty` added to the training-loss logs.

        Both are averaged over the optimizer steps since the last log and over processes (every
        process calls `log` with the training loss, so the gather is collective).
        """
        if "loss" in logs and self._lnsr_sums is not None:
            n_steps = self.state.global_step - self._lnsr_logged_step
            if n_steps > 0:
                sums = self.accelerator.gather(self._lnsr_sums.detach().reshape(1, 2)).reshape(-1, 2).mean(0)
                task, reg = (v / n_steps for v in sums.tolist())
                logs["task_loss"], logs["lnsr_penalty"] = task, reg
                self._lnsr_sums = None
        super().log(logs, start_time)

    def _noise_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, NOISE_STATE_NAME.format(rank=self.args.process_index))

    def _save_rng_state(self, output_dir: str) -> None:
        # Called by every process for every checkpoint, next to the Trainer's own RNG state.
        super()._save_rng_state(output_dir)
        if self.lnsr is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.lnsr.noise.state_dict(), self._noise_state_path(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called by every process on resume, before the first training step.
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self.lnsr_config is None:
            return
        path = self._noise_state_path(checkpoint)
        if not os.path.isfile(path):
            logger.warning(f"LNSR: no sampler state {path}; the resumed run draws noise from a fresh sampler")
            return
        self._ensure_lnsr().noise.load_state_dict(torch.load(path, weights_only=True))
