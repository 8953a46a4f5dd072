"""`apply(model, config)` puts a fine-tuning method (LNSR, or a peer method of `lnsr_fast.methods`) inside the
model's own forward; `remove(model)` takes it out (docs/design.md §1).

`apply` replaces the model's `forward` with one that, in training mode with gradients on, hands the call's
arguments to the method, which runs the model's own forward (once on a doubled batch, or several times) and
returns the model's outputs with the regularised loss. A forward hook on the word-embedding module adds the
method's perturbation to the word embeddings of the pass in progress, so the model still embeds `input_ids`
itself (its padding-aware pooling, position rules and sharding stay its own); hooks on the transformer layers
record their outputs when a method asks (`Recorder`). In eval mode, without gradients and after `remove`, the
model runs exactly as before.

The pass in progress is per thread (`_local`), as is the dropout pairing (pairing.py): other threads are not
affected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import threading
import warnings
from typing import Callable, ClassVar

import torch
from torch import nn

from . import heads
from .pairing import (PairingMode, UnpairableRandomness, checkpoint_wrappers, pair_checkpointing, rng_state,
                      set_rng_state, unpair_checkpointing)

_local = threading.local()
# Batch entries with no batch dimension in front, whatever their size.
_NOT_BATCHED = frozenset({"cache_position", "num_items_in_batch", "logits_to_keep"})


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, (nn.parallel.DistributedDataParallel,
                                                                       nn.DataParallel)) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def word_embeddings(model: nn.Module) -> nn.Module:
    """The module that embeds `input_ids`: the model's input embedding, or its encoder's for an encoder–decoder
    model (T5 and BART embed through modules of their own that share the weight)."""
    base = heads.base_model(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False) and callable(getattr(base, "get_encoder", None)):
        encoder = base.get_encoder()
        embedding = encoder.get_input_embeddings() if callable(getattr(encoder, "get_input_embeddings", None)) else None
        if isinstance(embedding, nn.Module):
            return embedding
    return model.get_input_embeddings()


def handle_of(model: nn.Module) -> "Handle | None":
    """The Handle `apply` installed on `model` (or on the model inside its DDP / torch.compile wrappers), or None."""
    return unwrap(model).__dict__.get("_lnsr_handle")


@dataclasses.dataclass
class _Pass:
    handle: "Handle"
    perturb: Callable | None       # (input_ids or None, word embeddings) -> perturbed word embeddings
    states: list | None = None     # the recorded hidden states (a Recorder appends), None when not recording
    embedded: bool = False         # the word embeddings of this pass were seen (later calls: e.g. a decoder's)


def _current_pass(handle: "Handle") -> _Pass | None:
    stack = getattr(_local, "passes", None)
    return stack[-1] if stack and stack[-1].handle is handle else None


@contextlib.contextmanager
def _pushed(p: _Pass):
    _local.passes = [*getattr(_local, "passes", ()), p]
    try:
        yield p
    finally:
        _local.passes = _local.passes[:-1]


def _embedding_hook(handle: "Handle", module, args, output):
    p = _current_pass(handle)
    if p is None and handle.model.training and torch.is_grad_enabled():
        handle.warn_once(f"lnsr_fast: {type(handle.model).__name__}'s word embeddings ran in training outside its "
                         "regularised forward (something called its backbone or embedding directly, e.g. TRL's "
                         "fused LM head): there is no noise and no penalty in that computation")
    if p is None or p.embedded:
        return None
    p.embedded = True
    if p.perturb is None:
        return None
    with torch._C.DisableTorchFunction():   # the perturbation's own draws are not the model's randomness
        return p.perturb(args[0] if args else None, output)


class Recorder:
    """Forward hooks on a stack's transformer layers that record, in the pass in progress, hidden state 0 (the
    first layer's input) and every layer's output, as `hidden_states` counts them (docs/design.md §2)."""

    def __init__(self, handle: "Handle", layers: list[nn.Module]):
        self._hooks = []
        for layer in layers:
            self._hooks.append(layer.register_forward_pre_hook(functools.partial(self._input, handle), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(functools.partial(self._output, handle)))

    @staticmethod
    def _input(handle, module, args, kwargs):
        p = _current_pass(handle)
        if p is not None and p.states is not None and not p.states:
            p.states.append(args[0] if args else kwargs["hidden_states"])

    @staticmethod
    def _output(handle, module, args, output):
        p = _current_pass(handle)
        if p is not None and p.states is not None:
            p.states.append(output[0] if isinstance(output, tuple) else output)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class Method:
    """A way to fine-tune, run inside the model's forward by `apply`: plain fine-tuning here. Subclasses (one per
    file in `lnsr_fast.methods`, and LNSR in lnsr.py) override `forward(call)` to run the model's own forward
    through `call` and return `call.finish(outputs, penalty, ...)`; a few change the model (`remove` undoes it),
    the gradients before the optimizer step (`before_optimizer_step`), or run several backward passes per batch
    (`own_step`: `training_step`, which needs LNSRTrainer or `handle.training_step`)."""

    name = "ft"
    names = ("task_loss", "penalty")   # the task loss's and the penalty's names in `handle.last` and the logs
    noise = None
    own_step = False

    def __init__(self, model: nn.Module, config):
        self.model, self.config = model, config

    def attach(self, handle: "Handle") -> None:
        """Install what the method needs on the model beside its forward (LNSR: its layer recorder)."""

    def forward(self, call: "Call"):
        return call.plain()

    def training_step(self, model: nn.Module, batch: dict, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """One micro-batch through `model` (the model or a wrapper of it), back-propagated once."""
        loss = model(**batch).loss
        backward(loss)
        return loss.detach()

    def set_accumulation(self, steps: int) -> None:
        """The micro-batches per optimizer step (settings counted in optimizer steps follow it); nothing by default."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        """After the last backward of an optimizer step, before `optimizer.step()`; nothing by default."""

    def remove(self) -> None:
        """Undo what the method changed on the model; nothing by default."""


def hyperparameter(text: str, default=None):
    """A method config's field: its default and its help text (the CLI's help reads it)."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class MethodConfig:
    """The hyperparameters of a method (every default in one field, validated in `__post_init__`); `build(model)`
    makes the `Method`. Subclasses set `method`."""

    method: ClassVar[type[Method]] = Method

    def build(self, model: nn.Module) -> Method:
        return self.method(model, self)


class Handle:
    """What `apply` installed on a model: the method (`method`; its noise sampler is `noise`), the values of the
    last regularised forward (`last`: detached 0-dim tensors, e.g. {"task_loss": ..., "lnsr_penalty": ...}),
    and `remove()`. `gradient_accumulation_steps` (set by LNSRCallback) turns the method's per-optimizer-step
    settings (e.g. `refresh_every`) into forward passes. `state_dict()` / `load_state_dict()` carry the noise
    sampler's state for checkpoints."""

    def __init__(self, model: nn.Module, method: Method):
        self.model, self.method = model, method
        self.last: dict[str, torch.Tensor] = {}
        self.kind = heads.head_kind(model)
        self.config = getattr(heads.base_model(model), "config", None)
        self.active = True
        self._accumulation = 1
        self._inner = model.forward
        self._previous = model.__dict__.get("forward")   # an instance-level forward someone installed before
        self._signature = inspect.signature(self._inner)
        params = self._signature.parameters
        self._var_keyword = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
        self._params = set(params)
        self._honours_num_items: bool | None = None   # whether the model's loss divides by num_items_in_batch
        self.unpairable = False   # a doubled pass drew randomness that cannot be paired: two passes from then on
        # The training loop takes the labels from the model and adds the model's loss (then the penalty alone) to a
        # task loss it normalises over the accumulated batch itself (see `with_penalty`).
        self.labels_outside = False
        self._warned: set[str] = set()
        # Sums of the recorded values since LNSRCallback last read them, by (name, loss_is_scaled_for_ga); only
        # replaced, never resized, so that torch.compile guards stay the same from step to step.
        self._sums: dict[tuple[str, bool], torch.Tensor] = {}
        self._hooks = [word_embeddings(model).register_forward_hook(functools.partial(_embedding_hook, self))]
        method.attach(self)

        @functools.wraps(self._inner)
        def forward(*args, **kwargs):
            return self._forward(args, kwargs)

        forward.__lnsr_handle__ = self
        model.forward = forward
        model._lnsr_handle = self

    @property
    def noise(self):
        """The method's noise sampler (LNSR, noise-only ablations), else None."""
        return self.method.noise

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._accumulation

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int) -> None:
        self._accumulation = steps
        self.method.set_accumulation(steps)

    def accepts(self, name: str) -> bool:
        """Whether the model's forward takes the argument `name`."""
        return name in self._params or self._var_keyword is not None

    def _forward(self, args: tuple, kwargs: dict):
        if not (self.active and self.model.training and torch.is_grad_enabled()) or _current_pass(self) is not None:
            return self._inner(*args, **kwargs)
        inputs = kwargs
        if args:   # bound to names (the Trainer passes keywords only, which torch.compile traces without this)
            bound = self._signature.bind(*args, **kwargs).arguments
            inputs = {**{k: v for k, v in bound.items() if k != self._var_keyword}, **bound.get(self._var_keyword, {})}
        if inputs.get("input_ids") is None and inputs.get("inputs_embeds") is None:
            return self._inner(*args, **kwargs)
        return self.method.forward(Call(self, inputs))

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)

    def remove(self) -> nn.Module:
        """Take the method out: the model's forward, its layers (Mixout) and checkpoint functions are its own
        again. Returns the model. Idempotent."""
        if not self.active:
            return self.model
        self.active = False
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.method.remove()
        unpair_checkpointing(self.model)
        installed = self.model.__dict__.get("forward")
        if getattr(installed, "__lnsr_handle__", None) is self:
            if self._previous is None:
                del self.model.forward
            else:
                self.model.forward = self._previous
        # else someone wrapped our forward afterwards (e.g. accelerate's autocast): it stays, inactive.
        if self.model.__dict__.get("_lnsr_handle") is self:
            del self.model._lnsr_handle
        return self.model

    def state_dict(self) -> dict:
        """The noise sampler's state ({} without one), for a checkpoint."""
        return {} if self.noise is None else self.noise.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.noise is not None:
            self.noise.load_state_dict(state)

    def training_step(self, batch: dict, backward: Callable[[torch.Tensor], None], model: nn.Module | None = None):
        """One micro-batch: the forward, `backward(loss)` (once, or once per ascent step for FreeLB); returns the
        detached loss. `model`: the wrapper to call (e.g. DDP), default the model itself."""
        return self.method.training_step(model if model is not None else self.model, batch, backward)

    def before_optimizer_step(self) -> None:
        """Call after the last backward of an optimizer step, before `optimizer.step()` (CWGNC clips here)."""
        self.method.before_optimizer_step(self.model)

    def record(self, values: dict[str, torch.Tensor], loss_is_scaled_for_ga: bool) -> None:
        self.last = {k: v.detach() for k, v in values.items()}
        for name, value in self.last.items():
            key = (name, loss_is_scaled_for_ga)
            self._sums[key] = value.float() if key not in self._sums else self._sums[key] + value.float()

    def take_sums(self) -> dict[tuple[str, bool], torch.Tensor]:
        """{(name, loss_is_scaled_for_ga): the sum of its values over the regularised forwards since the last
        call}; the sums restart from 0."""
        sums = dict(self._sums)
        self._sums = {key: torch.zeros_like(value) for key, value in sums.items()}
        return sums

    def __repr__(self) -> str:
        return f"Handle({type(self.method).__name__} on {type(self.model).__name__}, active={self.active})"


@dataclasses.dataclass
class Copies:
    """The clean and the noisy copy of a batch, run by `Call.clean_and_noisy`: one doubled pass (`noisy` None;
    rows [0, half) of `out` and `states` clean, the last `pairs` rows the noisy copies of rows [0, pairs)) or two
    passes (every row has its noisy copy)."""

    out: object
    states: list | None
    noisy: object | None
    noisy_states: list | None
    mode: PairingMode | None
    half: int | None
    pairs: int


class Call:
    """One regularised forward call: the inputs by name, and the ways a method runs the model's own forward."""

    def __init__(self, handle: Handle, inputs: dict):
        self.handle, self.inputs = handle, inputs
        self.input_ids = inputs.get("input_ids")
        source = self.input_ids if self.input_ids is not None else inputs["inputs_embeds"]
        if not isinstance(source, torch.Tensor) or source.dim() < 2:
            raise ValueError(f"input_ids / inputs_embeds must be a batch of sequences, got "
                             f"{getattr(source, 'shape', type(source).__name__)}")
        if source.shape[0] == 0:
            raise ValueError(f"the batch is empty (inputs of shape {tuple(source.shape)})")
        self.rows, self.device = source.shape[0], source.device
        self.mask = inputs.get("attention_mask")
        self.labels = heads.label_entries(inputs)
        self.explicit = False   # the doubled pass left the labels out: `finish` computes the task loss

    # ---- running the model ------------------------------------------------------------------------------

    def plain(self):
        """The model's own forward on the call's inputs, as they are."""
        with _pushed(_Pass(self.handle, None)):
            return self.handle._inner(**self.inputs)

    def run(self, inputs: dict, perturb: Callable | None = None, mode: PairingMode | None = None,
            record: bool = False):
        """The model's own forward on `inputs` (return_dict, use_cache off), with `perturb` applied to the pass's
        word embeddings, under `mode` (dropout pairing / watching) if given. Returns (outputs, the recorded hidden
        states or None)."""
        handle = self.handle
        inputs = dict(inputs)
        if handle.accepts("return_dict"):
            inputs["return_dict"] = True
        if handle.accepts("use_cache") and inputs.get("use_cache") is None:
            inputs["use_cache"] = False
        p = _Pass(handle, perturb, [] if record else None)
        if inputs.get("inputs_embeds") is not None:   # the model does not embed: perturb what it was given
            if perturb is not None:
                inputs["inputs_embeds"] = perturb(None, inputs["inputs_embeds"])
            p.embedded = True
        if mode is not None and mode.pair:
            pair_checkpointing(handle.model)
        with _pushed(p), (mode if mode is not None else contextlib.nullcontext()):
            out = handle._inner(**inputs)
        if not p.embedded:
            raise TypeError(f"{type(handle.model).__name__} never called its word embedding "
                            f"({type(word_embeddings(handle.model)).__name__}) during the forward, so the "
                            "perturbation could not be added")
        return out, p.states

    def watcher(self, half: int | None, pair: bool, pairs: int | None = None) -> PairingMode | None:
        """The mode a pass runs under: pairing dropout of rows [0, pairs) with the `pairs` rows after the first
        `half`, and watching whether the model's loss uses `num_items_in_batch` until that is known; None when
        neither is needed."""
        n = self.inputs.get("num_items_in_batch")
        watch = n if isinstance(n, torch.Tensor) and self.handle._honours_num_items is None else None
        if not (pair or watch is not None):
            return None
        return PairingMode(half or self.rows, pair=pair, watch=watch, noisy=pairs)

    def model_inputs(self) -> dict | None:
        """The inputs without the loss targets; an encoder–decoder LM's decoder inputs derived from its labels
        first, as the model would (None if it has no way to). For a pass whose loss the caller does not want."""
        inputs = {k: v for k, v in self.inputs.items() if k not in self.labels}
        if self.handle.kind == "seq2seq_lm" and "labels" in self.labels and inputs.get("decoder_input_ids") is None \
                and inputs.get("decoder_inputs_embeds") is None:
            prepare = getattr(heads.base_model(self.handle.model), "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                return None
            inputs["decoder_input_ids"] = prepare(labels=self.labels["labels"])
        return inputs

    def doubled(self, pairs: int) -> tuple[dict, bool] | None:
        """The inputs of one pass over the clean batch and a noisy copy of its first `pairs` rows (rows + pairs
        rows): every batched entry's first `pairs` rows repeated, their labels set to what the model's loss
        ignores; and whether the labels were left out because the model's loss cannot skip rows (`finish` then
        computes it). None when the labels cannot be split this way."""
        noisy = heads.noisy_labels(self.handle.kind, self.handle.config, self.labels)
        inputs = self.model_inputs()
        if noisy is None or inputs is None:
            return None
        doubled = {k: torch.cat([v, v[:pairs]]) if self._batched(k, v) else v for k, v in inputs.items()}
        doubled.update({k: torch.cat([self.labels[k], v[:pairs]]) for k, v in noisy.items()})
        return doubled, bool(self.labels) and not noisy

    def _batched(self, key: str, value) -> bool:
        return (isinstance(value, torch.Tensor) and key not in _NOT_BATCHED and value.dim() > 0
                and value.shape[0] == self.rows)

    def clean_and_noisy(self, draw: Callable, pair: bool, concat: bool = True, record: bool = False,
                        fraction: float = 1.0, detach_noisy: bool = False) -> Copies:
        """Run the clean copy of the batch and a noisy copy (`draw(input_ids, x, attention_mask)` added to its word
        embeddings, detached first when `detach_noisy`), with their dropout masks paired when `pair`, recording the
        hidden states when `record`: one doubled pass, in which only the first ⌈fraction·rows⌉ rows get a noisy
        copy, or two passes (every row has one) where `concat` is off or the labels or the model's randomness
        forbid one pass (with one warning)."""
        handle, model = self.handle, type(self.handle.model).__name__
        if concat and not (pair and handle.unpairable):
            pairs = min(self.rows, math.ceil(fraction * self.rows))
            planned = self.doubled(pairs)
            if planned is None:
                handle.warn_once(f"lnsr_fast: running two passes instead of one doubled pass: the task loss of {model} "
                                 f"for {sorted(self.labels)} is computed by the model, which would see both copies")
            else:
                mode = self.watcher(self.rows, pair, pairs)
                try:
                    out, states = self.run(planned[0], self.noisy_half(draw, pairs, detach_noisy), mode, record)
                except UnpairableRandomness as e:
                    handle.unpairable = True
                    handle.warn_once(f"lnsr_fast: running two passes instead of one doubled pass: {model}'s dropout "
                                     f"masks cannot be shared between the copies ({e})")
                else:
                    self.explicit = planned[1]
                    return Copies(out, states, None, None, mode, self.rows, pairs)
        if fraction < 1:
            handle.warn_once(f"lnsr_fast: fraction={fraction:g} applies to the doubled pass; in two passes every row "
                             "gets its noisy copy")
        state = rng_state(self.device) if pair else None
        mode = self.watcher(None, pair=False)
        out, states = self.run(self.inputs, None, mode, record)
        if state is not None:   # the noisy pass draws the clean pass's dropout masks
            set_rng_state(state, self.device)
        inputs = self.model_inputs()
        if inputs is None:
            raise TypeError(f"{model} derives its decoder inputs from the labels but has no "
                            "prepare_decoder_input_ids_from_labels; pass decoder_input_ids")
        noisy, noisy_states = self.run(inputs, self.everywhere(draw, detach_noisy), record=record)
        return Copies(out, states, noisy, noisy_states, mode, None, self.rows)

    def noisy_half(self, draw: Callable, pairs: int | None = None, detach: bool = False) -> Callable:
        """A perturbation of a doubled pass: the rows after the first `rows` (the copies of rows [0, pairs)) get
        `draw(input_ids, x, attention_mask)`, added to their embeddings detached when `detach`."""
        b = self.rows
        mask = self.mask if self.mask is None or pairs in (None, b) else self.mask[:pairs]

        def perturb(input_ids, x):
            eps = draw(None if input_ids is None else input_ids[b:], x[b:].detach(), mask)
            return torch.cat([x[:b], (x[b:].detach() if detach else x[b:]) + eps.to(x.dtype)])
        return perturb

    def everywhere(self, draw: Callable, detach: bool = False) -> Callable:
        """A perturbation of every row: x + draw(input_ids, x, attention_mask), x detached when `detach`."""
        mask = self.mask
        return lambda input_ids, x: (x.detach() if detach else x) + draw(input_ids, x.detach(), mask).to(x.dtype)

    # ---- the outputs ------------------------------------------------------------------------------------

    def finish(self, out, penalty: torch.Tensor | None, names: tuple[str, str], half: int | None = None,
               mode: PairingMode | None = None, pairs: int | None = None):
        """The outputs the caller gets: the clean rows of `out` (the first `half` rows of a doubled pass whose last
        `pairs` rows, default `half`, are noisy copies), with loss = task loss + penalty (the penalty alone without
        labels); records both in `handle.last`.

        Where the Trainer passes `num_items_in_batch` and the model's loss divides by it (the loss is then a share
        of the whole accumulated batch's), the penalty is weighted by this batch's share of those items too, so
        that λ keeps its ratio to the task loss under gradient accumulation and across ranks."""
        handle = self.handle
        if mode is not None and mode.watch is not None and self.labels and not self.explicit:
            handle._honours_num_items = mode.watched
        clean = _rows(out, half, half + (half if pairs is None else pairs)) if half is not None else out
        task = clean.get("loss")
        if self.explicit:
            task = heads.explicit_loss(handle.config, clean["logits"], self.labels["labels"])
        values = {} if task is None else {names[0]: task}
        if penalty is not None:
            n = self.inputs.get("num_items_in_batch")
            if n is not None and handle._honours_num_items and task is not None:
                penalty = penalty * (heads.item_count(handle.kind, handle.config, self.inputs) / n)
            elif n is not None and handle.labels_outside:   # this batch's share, as the micro-batches are equal
                penalty = penalty / handle.gradient_accumulation_steps
            values[names[1]] = penalty
        loss = task if penalty is None else penalty if task is None else task + penalty
        if task is None and penalty is not None and not handle.labels_outside:
            handle.warn_once(f"lnsr_fast: {type(handle.model).__name__} was called in training without labels, so "
                             f"its outputs.loss is the {names[1]} alone: add it to the loss you compute")
        handle.record(values, "num_items_in_batch" in self.inputs)
        fields = {k: v for k, v in clean.items() if k != "loss"}
        if "loss" in _field_names(clean):
            result = type(clean)(loss=loss, **fields)
        else:   # a model without a head: the loss goes after its own fields
            result = type(clean)(**fields)
            if loss is not None:
                result["loss"] = loss
        return result if self.inputs.get("return_dict", True) is not False else result.to_tuple()


def _field_names(output) -> set[str]:
    return {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()


def _rows(value, half: int, total: int):
    """The first `half` rows of every batched tensor (`total` rows) of an output, recursively."""
    if isinstance(value, torch.Tensor):
        return value[:half] if value.dim() and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(_rows(v, half, total) for v in value)
    if isinstance(value, dict):   # a ModelOutput
        return type(value)(**{k: _rows(v, half, total) for k, v in value.items()})
    return value


def with_penalty(task_loss: Callable) -> Callable:
    """`task_loss(outputs, labels, ...)` plus `outputs.loss`, which is the penalty alone when the model was given no
    labels (and None outside training): for a training loop that takes the labels away from the model and computes
    the task loss itself, such as the Trainer's label smoothing, its `compute_loss_func`, or TRL's. Set
    `handle.labels_outside = True` for such a loop (LNSRTrainer does), which normalises the task loss by
    `num_items_in_batch` over the accumulated batch: the penalty then takes the share of one micro-batch.

    >>> trainer = SFTTrainer(..., compute_loss_func=lnsr_fast.with_penalty(my_loss))
    """
    def loss(outputs, labels, *args, **kwargs):
        penalty = outputs.get("loss") if hasattr(outputs, "get") else None
        value = task_loss(outputs, labels, *args, **kwargs)
        return value if penalty is None else value + penalty
    return loss


def apply(model: nn.Module, config=None, **overrides) -> Handle:
    """Put a method inside `model`'s own forward and return its Handle.

    config: an `LNSRConfig` (default: `LNSRConfig()`, in-manifold LNSR) or the config of a method of
    `lnsr_fast.methods`; keyword overrides replace its fields (`apply(model, weight=0.1)`). In training mode
    with gradients, `model(**batch)` then returns the clean batch's outputs with `loss` = the model's own task
    loss + the method's penalty; `handle.last` holds both, detached. In eval mode and under `torch.no_grad()` the
    model is the plain model. `remove(model)` (or `handle.remove()`) takes the method out.

    λ (`weight`) is per chosen layer, in the units of `reduction`: with the default "sum", λ times the mean over
    real tokens of ‖h(x+ε) − h(x)‖²; the paper's λ_p is λ = λ_p·T̄ (T̄ real tokens per sequence) read literally,
    λ_p / d read as an element-wise mean, and `reduction="sequence"` takes λ_p as it is (LNSRConfig has the
    table). The penalty's share of the loss in `handle.last` is the candidate for what carries over between models.

    Apply it to the model you train (a PEFT model, not the model inside it), before wrapping it in DDP, FSDP
    or torch.compile. ValueError if a method is already applied.

    >>> handle = lnsr_fast.apply(model, lnsr_fast.LNSRConfig(noise="in_manifold", weight=0.01))
    >>> model(**batch).loss.backward()          # task loss + LNSR penalty
    >>> handle.last                             # {"task_loss": ..., "lnsr_penalty": ...}
    """
    from .lnsr import LNSRConfig

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    if unwrap(model) is not model:
        raise TypeError(f"apply LNSR to the model before wrapping it in {type(model).__name__}")
    if handle_of(model) is not None:
        raise ValueError(f"a method is already applied to this {type(model).__name__}: {handle_of(model)!r}; call "
                         "lnsr_fast.remove(model) first")
    if not callable(getattr(model, "get_input_embeddings", None)) or not isinstance(model.get_input_embeddings(),
                                                                                    nn.Module):
        raise TypeError(f"model must have get_input_embeddings() returning its word-embedding module (a Hugging Face "
                        f"model), got {type(model).__name__}")
    config = LNSRConfig() if config is None else config
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be an LNSRConfig or a method config of lnsr_fast.methods, got "
                        f"{type(config).__name__}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    wrapped = checkpoint_wrappers(model)
    if wrapped:
        raise ValueError(f"modules {wrapped[:3]} are wrapped by torch.distributed's checkpoint_wrapper, whose "
                         "recomputation LNSR cannot pair; use the model's own gradient_checkpointing_enable()")
    return Handle(model, config.build(model))


def remove(model: nn.Module) -> nn.Module:
    """Take the method `apply` installed out of `model` (also through DDP / torch.compile wrappers); returns the
    model. A model without one is returned unchanged."""
    handle = handle_of(model)
    return unwrap(model) if handle is None else handle.remove()
