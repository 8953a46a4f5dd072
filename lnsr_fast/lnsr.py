"""LNSR on a Hugging Face model: the clean and the noisy pass, the task loss and the penalty (DESIGN.md §1).

In `concat` mode (default) both passes run as one batch of 2B rows: one forward, one backward. In
`two_pass` mode the model runs twice; that mode also serves models whose randomness cannot be paired
or whose head loss `heads.py` does not know.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import nn

from .checks import check_choice, is_int
from . import heads
from .dropout import UnpairableRandomness, paired_dropout, rng_state, set_rng_state
from .kernels import BACKENDS
from .noise import check_token_ids
from .stability import REDUCTIONS, layerwise_stability, resolve_weights

MODES = ("concat", "two_pass")
DROPOUT_MODES = ("shared", "independent")

# λ per layer with reduction "sum", chosen on validation data in docs/reproduction/ (MiniLM, tweets and BBC
# News): 0.02 in three of four grids; there λ = 0.1 at ratio 0.1 already cut train accuracy by 20–30 points.
DEFAULT_WEIGHT = 0.02


def _forward_parameters(model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def position_ids_from_input_ids(model):
    """The model's own rule for position ids from input_ids, where its embeddings have one; else None.

    RoBERTa-style embeddings (RoBERTa, XLM-R, CamemBERT, ...) number real tokens from padding_idx + 1 and
    give padding padding_idx when they see input_ids, but count every position when they see
    inputs_embeds; LNSR passes inputs_embeds, so it passes the positions the model would have used.
    """
    for module in model.modules():
        make = getattr(module, "create_position_ids_from_input_ids", None)
        padding_idx = getattr(module, "padding_idx", None)
        if callable(make) and isinstance(padding_idx, int):
            return lambda input_ids: make(input_ids, padding_idx)
    return None


def split_inputs(model, batch: dict, position_ids=None) -> tuple:
    """(input_ids, given inputs_embeds or None, the other model inputs) of a batch, for a pass on word
    embeddings: input_ids are checked when they are to be embedded, and `position_ids`
    (position_ids_from_input_ids) adds the positions a RoBERTa-style model derives from input_ids,
    since it counts every position when it sees inputs_embeds instead."""
    batch = dict(batch)
    input_ids, given = batch.pop("input_ids", None), batch.pop("inputs_embeds", None)
    if given is None:
        if input_ids is None:
            raise ValueError("the batch needs input_ids or inputs_embeds")
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            raise TypeError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        check_token_ids(input_ids, model.get_input_embeddings().weight.shape[0])
    if input_ids is not None and position_ids is not None and batch.get("position_ids") is None:
        batch["position_ids"] = position_ids(input_ids)
    return input_ids, given, batch


def num_hidden_layers(model) -> int | None:
    """L, so that hidden_states has L+1 entries (the embedding output first); None when unknown."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


class LNSR:
    """Layerwise Noise Stability Regularization around a model that accepts `inputs_embeds`.

    `outputs, reg = lnsr(**batch)` embeds `input_ids` with the model's input embedding, draws ε with
    `noise`, runs the clean and the noisy input, and returns the clean half's outputs (with the
    model's own task loss in `outputs.loss` when the batch has labels) and the penalty
    Σ_r λ_r‖h_r(x+ε) − h_r(x)‖² over the chosen layers. Train on `outputs.loss + reg`.

    weight: λ for every layer (default DEFAULT_WEIGHT = 0.02, see docs/reproduction), or one per chosen
    layer. layers: indices into `hidden_states` (0 = embedding output); default 1..L, every transformer layer. mode: "concat" (one 2B pass) or
    "two_pass". dropout: "shared" gives both halves the same dropout masks, so that the penalty
    measures the noise and not dropout mismatch (DESIGN.md §2); "independent" keeps separate masks.
    backend: the penalty's backend, "auto" | "cuda" | "triton" | "torch" (see lnsr_fast.kernels); the
    noise's is the sampler's own. Every other batch entry (token_type_ids, position_ids, ...) is passed
    to the model.

    >>> lnsr = LNSR(model, GaussianNoise(ratio=0.05, seed=0), weight=0.02)
    >>> outputs, reg = lnsr(**batch)
    >>> (outputs.loss + reg).backward()
    """

    def __init__(self, model: nn.Module, noise, weight=DEFAULT_WEIGHT, layers=None, mode: str = "concat",
                 dropout: str = "shared", reduction: str = "sum", detach_clean: bool = False, backend: str = "auto"):
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise TypeError(f"model must have get_input_embeddings() (a Hugging Face model), got {type(model).__name__}")
        params = _forward_parameters(model)
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "inputs_embeds" not in params:
            raise TypeError(f"model {type(model).__name__}.forward takes no `inputs_embeds`; LNSR perturbs the "
                            "input embeddings and needs it")
        if "output_hidden_states" not in params and not takes_kwargs:
            raise TypeError(f"model {type(model).__name__}.forward takes no `output_hidden_states`; LNSR needs "
                            "every layer's hidden states")
        if not callable(noise):
            raise TypeError(f"noise must be a sampler such as GaussianNoise or InManifoldNoise, got {type(noise).__name__}")
        check_choice("mode", mode, MODES)
        check_choice("dropout", dropout, DROPOUT_MODES)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, BACKENDS)
        if layers is not None:
            layers = list(layers)
            if not layers or not all(is_int(r) for r in layers):
                raise ValueError(f"layers must be a non-empty sequence of ints, got {layers!r}")
        self.model, self.noise, self.mode, self.dropout = model, noise, mode, dropout
        self.reduction, self.detach_clean, self.weight, self.layers = reduction, detach_clean, weight, layers
        self.backend = backend
        self.head = heads.head_kind(model)
        self._passes_use_cache = "use_cache" in params
        self._position_ids = position_ids_from_input_ids(model) if "position_ids" in params else None
        self._warned: set[str] = set()
        self._unpairable = False  # set once a concat pass drew randomness that could not be paired
        n = num_hidden_layers(model)
        if n is not None:
            self._check_layers(n + 1)
        elif not isinstance(weight, (int, float)):
            resolve_weights(weight, len(layers) if layers is not None else len(weight), "weight")

    def _check_layers(self, n_states: int) -> tuple[list[int], list[float]]:
        layers = self.layers if self.layers is not None else list(range(1, n_states))
        bad = [r for r in layers if not -n_states <= r < n_states]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_states} hidden states (0 = embeddings)")
        return layers, resolve_weights(self.weight, len(layers), "weight")

    def _fall_back(self, reason: str) -> None:
        if reason not in self._warned:
            warnings.warn(f"LNSR: running in two_pass mode instead of concat: {reason}", stacklevel=3)
            self._warned.add(reason)

    def __call__(self, **batch):
        return self.compute(batch)

    def compute(self, batch: dict, model: nn.Module | None = None):
        """`lnsr(**batch)`, optionally through another callable wrapping the same model (e.g. DDP)."""
        model = self.model if model is None else model
        input_ids, x, batch = split_inputs(self.model, batch, self._position_ids)
        if x is None:
            x = self.model.get_input_embeddings()(input_ids)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 0:
            raise ValueError(f"the batch is empty (inputs of shape {tuple(x.shape)}); LNSR needs at least one row")
        mask = batch.get("attention_mask")
        eps = self.noise(input_ids, x, mask)
        labels = {k: batch.pop(k) for k in heads.LABEL_KEYS if k in batch}
        num_items = batch.pop("num_items_in_batch", None)
        batch["output_hidden_states"], batch["return_dict"] = True, True
        if self._passes_use_cache:
            batch.setdefault("use_cache", False)

        shared = self.dropout == "shared" and model.training
        mode = self.mode
        # Labels this module cannot split (an unknown head, or e.g. `next_sentence_label`) would make the
        # model average its loss over both halves: such batches run in two passes.
        unknown_labels = [k for k in batch if "label" in k or k.endswith("_positions")]
        if mode == "concat" and (unknown_labels or (labels and self.head is None)):
            self._fall_back(f"the task loss of {type(self.model).__name__} for {sorted(unknown_labels or labels)} "
                            "is computed by the model, which would see both halves")
            mode = "two_pass"
        if mode == "concat" and shared and self._unpairable:
            mode = "two_pass"
        if mode == "concat":
            try:
                return self._concat(model, x, eps, batch, labels, num_items, shared)
            except UnpairableRandomness as e:
                self._unpairable = True
                self._fall_back(f"its dropout masks cannot be shared between the halves ({e})")
        return self._two_pass(model, x, eps, batch, labels, num_items, shared)

    def _penalty(self, hidden_states, half: slice | None, noisy_hidden, mask):
        if hidden_states is None:
            raise TypeError(f"{type(self.model).__name__} returned no hidden_states; LNSR needs every layer's output")
        layers, weights = self._check_layers(len(hidden_states))
        clean = [hidden_states[r] if half is None else hidden_states[r][half] for r in layers]
        noisy = [noisy_hidden[r] for r in layers]
        if self.detach_clean:
            clean = [h.detach() for h in clean]
        return layerwise_stability(clean, noisy, mask, weights, self.reduction, self.backend)

    def _concat(self, model, x, eps, batch, labels, num_items, shared):
        b = x.shape[0]
        both = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
                for k, v in batch.items()}
        with paired_dropout(b, x.device) if shared else contextlib.nullcontext():
            out = model(inputs_embeds=torch.cat([x, x + eps]), **both)
        hs = out.hidden_states
        reg = self._penalty(hs, slice(0, b), None if hs is None else [h[b:] for h in hs], batch.get("attention_mask"))
        fields = {k: _first_rows(v, b) for k, v in out.items()}
        clean = type(out)(**fields)
        if labels:
            # Rebuilt with the loss as its first field, so that outputs[0] is the loss, as HF returns it.
            clean = type(out)(**{**fields, "loss": heads.task_loss(self.head, self.model.config, clean, labels, num_items)})
        return clean, reg

    def _two_pass(self, model, x, eps, batch, labels, num_items, shared):
        state = rng_state(x.device) if shared else None
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        clean = model(inputs_embeds=x, **batch, **labels, **extra)
        if state is not None:
            set_rng_state(state, x.device)
        noisy = model(inputs_embeds=x + eps, **batch)
        hs_noisy = noisy.hidden_states
        return clean, self._penalty(clean.hidden_states, None, hs_noisy, batch.get("attention_mask"))


def _first_rows(value, b: int):
    if isinstance(value, torch.Tensor):
        return value[:b] if value.dim() and value.shape[0] == 2 * b else value
    if isinstance(value, tuple):
        return tuple(_first_rows(v, b) for v in value)
    return value
