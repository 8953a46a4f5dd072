"""Hugging Face Trainer integration: one setting turns a method on — `lnsr=LNSRConfig(...)` runs the clean +
noisy pass of DESIGN.md §1 inside `Trainer.compute_loss`; `method="smart"` (any of `lnsr_fast.methods.METHODS`)
runs that method's training step; the model itself is not forked.

    trainer = LNSRTrainer(model=model, args=training_args, train_dataset=train, lnsr=LNSRConfig(noise="in_manifold"))
    trainer = LNSRTrainer(model=model, args=training_args, train_dataset=train, method="r3f", method_args={"weight": 0.5})
    trainer.train()             # logs `task_loss` and `lnsr_penalty` (LNSR) or the method's logs next to `loss`

With neither it is plain fine-tuning through the same class, so FT and every method share one code path.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .checks import check_choice
from .lnsr import LNSR
from .methods import METHODS, Method, build, defaults
from .methods.lnsr import LNSRConfig, LNSRMethod

logger = logging.getLogger(__name__)

__all__ = ["LNSRConfig", "LNSRTrainer", "NOISE_STATE_NAME"]

# The sampler state saved inside every checkpoint folder, one file per process.
NOISE_STATE_NAME = "lnsr_noise_rank{rank}.pt"


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


class _MethodHooks(TrainerCallback):
    """Runs the method's `before_optimizer_step` once per optimizer step: after every backward of the step and
    after the Trainer's own gradient clipping (which unscales fp16 gradients), just before `optimizer.step()`."""

    def __init__(self, trainer: "LNSRTrainer"):
        self._trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._trainer.method is not None:
            self._trainer.method.before_optimizer_step(self._trainer.model_wrapped)


class LNSRTrainer(Trainer):
    """`transformers.Trainer` that trains with LNSR (DESIGN.md §1) or another method of `lnsr_fast.methods`.

    lnsr: an `LNSRConfig`. method: a name from `lnsr_fast.methods.METHODS`, with `method_args` its
    hyperparameters (`lnsr_fast.methods.defaults(name)`; `seed` defaults to `TrainingArguments.seed`);
    "lnsr" / "lnsr_in_manifold" take the same path as `lnsr=`. Neither (or method="ft"): plain fine-tuning,
    `Trainer` unchanged. `self.method` is the `Method` in use (None when off), `self.lnsr` the `LNSR` of an
    LNSR method (else None). Evaluation and prediction always use the plain loss.

    - LNSR runs inside `compute_loss`: the task part is exactly what `Trainer.compute_loss` returns for the
      clean half. The penalty (a per-micro-batch mean over real tokens) is divided by the number of
      accumulated micro-batches once in every case, so its gradient is the same for 1 × batch 8 and
      2 × batch 4, whether or not the Trainer treats the loss as already normalised by `num_items_in_batch`;
      across DDP ranks the gradient all-reduce averages it.
    - smart, freelb, r3f, l2sp and the noise_only ablations run their own `training_step` in place of
      `Trainer.training_step`: the task loss is the model's own, given the `num_items_in_batch` that plain
      Trainer would give it, scaled for accumulation and across processes as `Trainer` scales it, and the
      regulariser like the LNSR penalty. Label smoothing, `compute_loss_func` and DataParallel do not apply
      to them (ValueError). ft, mixout and cwgnc go through `Trainer.training_step` unchanged.
    - `before_optimizer_step` (CWGNC's clip) runs from `on_pre_optimizer_step`: after the last micro-batch's
      backward and the Trainer's global clip (`max_grad_norm`; 0 turns it off), before `optimizer.step()`.
    - Mixout stays on the model after `train()`, so a second `train()` mixes with the same targets; it changes
      no parameter and no state_dict key, so checkpoints and `save_model` hold the plain weights, and
      evaluation runs the plain layers. `trainer.method.remove()` restores the layers and dropout rates.
    - L2-SP's w⁰ and Mixout's targets are the weights when the method is built: in `__init__`, or with
      `model_init` before a checkpoint is loaded. They are not saved: a resumed run rebuilds them from the
      pretrained model it is given.
    - Logs: `task_loss` and `lnsr_penalty` (LNSR) or the method's logs (`task_loss`, `penalty`), averaged over
      the optimizer steps since the last log and over processes, on the scale of `loss` (so `loss` =
      `task_loss` + penalty).
    - Checkpoints: the noise sampler's state (LNSR, noise_only) goes into every checkpoint
      (`lnsr_noise_rank{r}.pt`, one per process; none with `save_only_model=True`, which saves no resumable
      state) and is restored by `train(resume_from_checkpoint=...)`, so a resumed run draws the noise an
      uninterrupted one would.
    - Transformers ≥ 5 (`loss_is_scaled_for_ga`, `current_gradient_accumulation_steps`); tested with 5.24.

    >>> trainer = LNSRTrainer(model=model, args=args, train_dataset=ds, lnsr=LNSRConfig(noise="gaussian"))
    >>> trainer = LNSRTrainer(model=model, args=args, train_dataset=ds, method="smart", method_args={"steps": 2})
    """

    def __init__(self, *args, lnsr: LNSRConfig | None = None, method: str | None = None,
                 method_args: dict | None = None, **kwargs):
        if lnsr is not None and not isinstance(lnsr, LNSRConfig):
            raise TypeError(f"lnsr must be an LNSRConfig or None, got {type(lnsr).__name__}")
        if method is not None:
            if lnsr is not None:
                raise ValueError(f"give lnsr=LNSRConfig(...) or method={method!r}, not both")
            check_choice("method", method, METHODS)
        if method_args is not None:
            if method is None:
                raise ValueError("method_args needs method=... (a name from lnsr_fast.methods.METHODS)")
            if not isinstance(method_args, dict):
                raise TypeError(f"method_args must be a dict of hyperparameters, got {type(method_args).__name__}")
            unknown = sorted(set(method_args) - set(defaults(method)))
            if unknown:
                raise TypeError(f"method_args has unknown hyperparameter(s) {unknown} for method {method!r}; "
                                f"its hyperparameters are {sorted(defaults(method)) or 'none'}")
        super().__init__(*args, **kwargs)
        self.lnsr_config, self.method_name, self.method_args = lnsr, method, dict(method_args or {})
        self.method: Method | None = None
        self._reset_method_logs()
        if self._has_method:
            self.add_callback(_MethodHooks(self))
            if self.model is not None:
                self._ensure_method()

    @property
    def _has_method(self) -> bool:
        return self.lnsr_config is not None or self.method_name is not None

    @property
    def lnsr(self) -> LNSR | None:
        """The `LNSR` of an LNSR method (its sampler is `.noise`), else None."""
        return self.method.lnsr if isinstance(self.method, LNSRMethod) else None

    def _ensure_method(self) -> Method:
        # `model_init` replaces self.model at the start of train(); the method must follow it (fresh sampler).
        if self.method is None or self.method.model is not self.model:
            if self.method is not None:
                self.method.remove()
            if self.lnsr_config is not None:
                method = LNSRMethod(self.model, self.lnsr_config, self.args.seed, self.args.gradient_accumulation_steps)
            else:
                allowed = defaults(self.method_name)
                context = {"seed": self.args.seed, "gradient_accumulation_steps": self.args.gradient_accumulation_steps}
                # method_args win over the TrainingArguments (e.g. a noise seed of its own).
                method = build(self.method_name, self.model,
                               **{**{k: v for k, v in context.items() if k in allowed}, **self.method_args})
            if self._runs_own_step(method):
                if self.args.label_smoothing_factor or self.compute_loss_func is not None:
                    raise ValueError(f"method {method.name!r} computes its own objective from the model's loss; "
                                     "label_smoothing_factor and compute_loss_func do not apply to it")
                if self.args.n_gpu > 1:
                    raise ValueError(f"method {method.name!r} does not run under DataParallel "
                                     f"({self.args.n_gpu} GPUs in one process); launch with torchrun (DDP)")
            self.method = method
        return self.method

    @staticmethod
    def _runs_own_step(method: Method | None) -> bool:
        return method is not None and method.has_own_objective and not isinstance(method, LNSRMethod)

    def _reset_method_logs(self) -> None:
        self._log_names: tuple[str, ...] = ()
        self._log_sums: torch.Tensor | None = None   # detached, on the loss's device
        self._logged_step = 0

    def train(self, *args, **kwargs):
        """`Trainer.train`; the method's log accumulators start afresh with every call."""
        self._reset_method_logs()
        return super().train(*args, **kwargs)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: True when it will NOT divide the loss by the accumulation steps.
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss + LNSR penalty for an LNSR method in training mode; `Trainer.compute_loss` otherwise.

        `num_items_in_batch` reaches the LNSR batch (and so the causal-LM loss, or the model in two-pass
        mode) exactly when plain `Trainer.compute_loss` would pass it to the model.
        """
        method = self._ensure_method() if self._has_method else None
        if not isinstance(method, LNSRMethod) or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        forward = _LNSRForward(method.lnsr, model)
        task, outputs = super().compute_loss(forward, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        steps = self._accumulation_steps()
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        reg = forward.reg / steps if scaled else forward.reg
        loss = task + reg
        # What training_step adds to the logged loss: loss / steps unless already scaled.
        divisor = 1 if scaled else steps
        self._accumulate_logs({"task_loss": task.detach() / divisor, "lnsr_penalty": reg.detach() / divisor})
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step`, or the method's own step (one or several backward passes) for a method
        with its own objective, with the scaling `Trainer.training_step` and `compute_loss` apply."""
        method = self._ensure_method() if self._has_method else None
        if not self._runs_own_step(method):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        steps = self._accumulation_steps()
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        divisor = 1 if scaled else steps
        task_scale = 1
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
            if self.args.average_tokens_across_devices:
                # As Trainer.compute_loss: the model divides by the items of every process and DDP averages.
                task_scale = self.accelerator.num_processes // self.get_tp_size()
        scale = task_scale / divisor

        def backward(loss: torch.Tensor) -> None:
            self.accelerator.backward(loss * scale)

        with self.compute_loss_context_manager():
            loss, logs = method.training_step(model, inputs, backward,
                                              penalty_scale=(1 / steps if scaled else 1.0) / task_scale)
        self._accumulate_logs({k: v * scale for k, v in logs.items()})
        return loss.detach() * scale

    def _accumulate_logs(self, logs: dict[str, torch.Tensor]) -> None:
        # Detached device tensors only: no host sync per step (read once per log). A value with a dimension
        # (DataParallel's one loss per GPU) counts as its mean, as training_step logs it.
        if not logs:
            return
        values = list(logs.values())
        step = torch.stack([v.detach().float().mean().to(values[0].device) for v in values])
        if self._log_sums is None:
            self._log_names, self._log_sums, self._logged_step = tuple(logs), step, self.state.global_step
        else:
            self._log_sums = self._log_sums + step.to(self._log_sums.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the method's logs (`task_loss` and `lnsr_penalty` for LNSR) added to the
        training-loss logs, averaged over the optimizer steps since the last log and over processes (every
        process calls `log` with the training loss, so the gather is collective)."""
        if "loss" in logs and self._log_sums is not None:
            n_steps = self.state.global_step - self._logged_step
            if n_steps > 0:
                n = len(self._log_names)
                sums = self.accelerator.gather(self._log_sums.detach().reshape(1, n)).reshape(-1, n).mean(0)
                logs.update({name: v / n_steps for name, v in zip(self._log_names, sums.tolist())})
                self._log_sums = None
        super().log(logs, start_time)

    def _noise_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, NOISE_STATE_NAME.format(rank=self.args.process_index))

    def _save_rng_state(self, output_dir: str) -> None:
        # Called by every process for every checkpoint, next to the Trainer's own RNG state.
        super()._save_rng_state(output_dir)
        if self.method is not None and self.method.noise is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.method.noise.state_dict(), self._noise_state_path(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # The method is built on the pretrained weights (L2-SP's w⁰, Mixout's targets) before the checkpoint's.
        if self._has_method:
            self._ensure_method()
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called by every process on resume, before the first training step.
        super()._load_rng_state(checkpoint)
        if checkpoint is None or not self._has_method or self._ensure_method().noise is None:
            return
        path = self._noise_state_path(checkpoint)
        if not os.path.isfile(path):
            logger.warning(f"LNSR: no sampler state {path}; the resumed run draws noise from a fresh sampler")
            return
        self.method.noise.load_state_dict(torch.load(path, weights_only=True))
