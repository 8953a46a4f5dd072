"""The Hugging Face Trainer and a method applied with `lnsr_fast.apply` (docs/design.md §1): the model computes the
regularised loss itself, so any Trainer trains with it; `LNSRCallback` adds what the model cannot do alone —
the task loss and the penalty in the logs, the noise sampler's state in checkpoints, CWGNC's clip before the
optimizer step — and `LNSRTrainer` is a thin convenience that applies a method by name and adds the callback.

    lnsr_fast.apply(model, LNSRConfig(noise="in_manifold"))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[LNSRCallback()])
    trainer = LNSRTrainer(model=model, args=args, train_dataset=train, lnsr=LNSRConfig(noise="in_manifold"))
    trainer = LNSRTrainer(model=model, args=args, train_dataset=train, method="r3f", method_args={"weight": 0.5})
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checks import check_choice
from .lnsr import LNSRConfig
from .methods import METHODS, config as method_config
from .regularize import Handle, Method, MethodConfig, apply, handle_of, with_penalty

logger = logging.getLogger(__name__)

__all__ = ["LNSRCallback", "LNSRTrainer", "NOISE_STATE_NAME"]

# The sampler state saved inside every checkpoint folder, one file per process.
NOISE_STATE_NAME = "lnsr_noise_rank{rank}.pt"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LNSRCallback(TrainerCallback):
    """What a Trainer needs beside a model with a method applied (`lnsr_fast.apply`); without one it does nothing.

    - Logs the method's values (`task_loss` and `lnsr_penalty` for LNSR, `task_loss` and `penalty` for SMART,
      R3F, L2-SP) next to `loss`, on its scale (`loss` = task_loss + penalty) and averaged over the optimizer
      steps since the last log and over processes. They go into `state.log_history` and to the callbacks after
      this one; LNSRTrainer puts it first, so that reporting integrations see them too.
    - Saves the noise sampler's state into every checkpoint folder (`lnsr_noise_rank{r}.pt`, one per process;
      none with `save_only_model=True`) and restores it when training resumes, from `resume_from` or else
      `output_dir/checkpoint-{step}`, so a resumed run draws the noise an uninterrupted one would.
    - Tells the method the gradient-accumulation steps (`refresh_every` counts optimizer steps) and calls its
      `before_optimizer_step` (CWGNC's clip) after the Trainer's own clip, before `optimizer.step()`.
    """

    def __init__(self, resume_from: str | None = None):
        self.resume_from = resume_from
        self._logged_step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        handle = handle_of(model)
        if handle is None:
            return
        handle.gradient_accumulation_steps = args.gradient_accumulation_steps
        handle.take_sums()
        self._logged_step = state.global_step
        if state.global_step > 0 and handle.noise is not None:
            folder = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            path = os.path.join(folder, NOISE_STATE_NAME.format(rank=args.process_index))
            if os.path.isfile(path):
                handle.load_state_dict(torch.load(path, weights_only=True))
            else:
                logger.warning(f"LNSR: no sampler state {path}; the resumed run draws noise from a fresh sampler "
                               "(give LNSRCallback(resume_from=checkpoint_folder))")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        handle = handle_of(model)
        if handle is not None:
            handle.before_optimizer_step()

    def on_save(self, args, state, control, model=None, **kwargs):
        handle = handle_of(model)
        if handle is None or handle.noise is None or args.save_only_model:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(handle.state_dict(), os.path.join(folder, NOISE_STATE_NAME.format(rank=args.process_index)))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        handle = handle_of(model)
        if handle is None or logs is None or "loss" not in logs:
            return
        steps, self._logged_step = state.global_step - self._logged_step, state.global_step
        sums: dict[str, torch.Tensor] = {}
        for (name, scaled_for_ga), value in handle.take_sums().items():
            # As Trainer.training_step scales each micro-batch's loss: by 1/accumulation unless the loss was
            # already normalised over the accumulated batch (num_items_in_batch), then by the processes that
            # average_tokens_across_devices counts.
            factor = 1 / args.gradient_accumulation_steps
            if scaled_for_ga:
                factor = _world_size() if args.average_tokens_across_devices else 1
            sums[name] = sums.get(name, 0) + value * factor
        if steps <= 0 or not sums:
            return
        names = sorted(sums)
        total = torch.stack([sums[n] for n in names])
        if _world_size() > 1:   # every process logs, so the reduction is collective
            dist.all_reduce(total)
            total = total / _world_size()
        means = {n: v / steps for n, v in zip(names, total.tolist())}
        logs.update(means)
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1].update(means)


class LNSRTrainer(Trainer):
    """`transformers.Trainer` that applies a method to its model and adds `LNSRCallback` (first, so that reporting
    integrations log the method's values).

    lnsr: an `LNSRConfig`; or method: a name from `lnsr_fast.methods.METHODS` with `method_args` its
    hyperparameters (`lnsr_fast.methods.defaults(name)`). A noise `seed` left unset is `TrainingArguments.seed`.
    Neither (or method="ft"): plain fine-tuning, `Trainer` unchanged. The method follows `model_init`. After
    training, `lnsr_fast.remove(trainer.model)` gives the plain model back (Mixout's layers too).

    On top of `LNSRCallback`: FreeLB's own training step (K backward passes per batch, scaled for accumulation as
    `Trainer.training_step` scales a loss); with `label_smoothing_factor` or `compute_loss_func`, which take the
    labels away from the model, the penalty the model still returns is added to the Trainer's task loss; the
    sampler state is restored from exactly the folder `train(resume_from_checkpoint=...)` names.

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
        # Before Trainer.__init__, which builds the model with model_init (call_model_init applies the method).
        self.method_config: MethodConfig | None = lnsr if method is None else method_config(method, **(method_args or {}))
        self._seed_given = method_args is not None and "seed" in method_args
        self.lnsr_callback = LNSRCallback()
        super().__init__(*args, **kwargs)
        self.callback_handler.callbacks.insert(0, self.lnsr_callback)
        if self.label_smoother is not None:
            self.label_smoother = with_penalty(self.label_smoother)
        if self.compute_loss_func is not None:
            self.compute_loss_func = with_penalty(self.compute_loss_func)
        if self.model is not None and self.model_init is None:
            self._apply(self.model)

    def _apply(self, model: nn.Module) -> None:
        config = self.method_config
        if config is None or type(config).method is Method:   # plain fine-tuning: nothing to put in the model
            return
        if getattr(config, "seed", 0) is None:
            config = dataclasses.replace(config, seed=self.args.seed)
        if handle_of(model) is not None:
            raise ValueError("the model already has a method applied; give it to LNSRTrainer without lnsr=/method=, "
                             "or lnsr_fast.remove(model) first")
        apply(model, config)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._apply(model)
        return model

    @property
    def handle(self) -> Handle | None:
        """The Handle of the method applied to the model, or None."""
        return None if self.model is None else handle_of(self.model)

    @property
    def method(self):
        """The method applied to the model (its noise sampler is `.noise`), or None."""
        return None if self.handle is None else self.handle.method

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; the sampler state is restored from the checkpoint folder it resumes from."""
        self.lnsr_callback.resume_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss`. Label smoothing and `compute_loss_func` take the labels away from the model,
        whose loss is then the penalty alone: they add it (`with_penalty`)."""
        handle = handle_of(model)
        if handle is not None:
            handle.labels_outside = self.label_smoother is not None or self.compute_loss_func is not None
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step`, or the method's own step (FreeLB: several backward passes) with the loss
        scaled as `Trainer.training_step` scales it."""
        handle = handle_of(model)
        if handle is None or not handle.method.own_step:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError(f"method {handle.method.name!r} computes its objective from the model's own loss; "
                             "label_smoothing_factor and compute_loss_func do not apply to it")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1 / self.current_gradient_accumulation_steps
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        with self.compute_loss_context_manager():
            loss = handle.training_step(inputs, lambda l: self.accelerator.backward(l * scale), model)
        return loss * scale
