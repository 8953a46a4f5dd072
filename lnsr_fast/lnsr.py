"""LNSR itself: `LNSRConfig` (every setting and default, validated) and the `LNSR` method that `apply` runs inside
the model's forward (docs/design.md §1–§2).

Source: Hua, Li, Dou, Xu and Luo, "Improving Pre-trained Language Model Fine-tuning with Noise Stability
Regularization" (IEEE TNNLS 2023, arXiv:2206.05658), standard and in-manifold noise. One concat-mode step: the
batch doubled into [clean | noisy], ε added to the noisy rows' word embeddings by the embedding hook, one pass
with the dropout masks paired across the halves, the task loss of the clean half computed by the model (the
noisy half carries the ignored label), and the penalty Σ_r λ_r D(h_r[:B], h_r[B:]) over the chosen layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from . import heads
from .checks import check_choice, is_int, is_real
from .kernels import BACKENDS
from .neighbors import KNN_BACKENDS
from .noise import GaussianNoise, InManifoldNoise
from .regularize import Call, Method, MethodConfig, Recorder, hyperparameter, word_embeddings
from .stability import REDUCTIONS, layerwise_stability, layerwise_stability_concat, resolve_weights

NOISE_KINDS = ("gaussian", "in_manifold")
MODES = ("concat", "two_pass")
DROPOUT_MODES = ("shared", "independent")
STACKS = ("encoder", "decoder")
# ‖ε_t‖/‖x_t‖ per token: standard LNSR 0.05, in-manifold 0.1 (docs/design.md §2).
DEFAULT_RATIOS = {"gaussian": 0.05, "in_manifold": 0.1}
# λ per layer with reduction "sum" at those ratios, from the validation grids of docs/reproduction
# (MiniLM, tweets and BBC News, 3 seeds a point): per noise, the largest grid point that cost the tweets no
# validation accuracy beyond the seeds' spread while it helped BBC News's. Both start the penalty at 1–4% of
# the loss there; in-manifold noise at ratio 0.1 makes a ~4× larger penalty per unit of λ ((0.1 / 0.05)²).
DEFAULT_WEIGHTS = {"gaussian": 0.03, "in_manifold": 0.01}


@dataclass
class NoiseConfig(MethodConfig):
    """The noise ε added to the word embeddings (docs/design.md §2); LNSR's and the noise-only ablations'."""

    noise: object = hyperparameter("'gaussian' (standard LNSR), 'in_manifold' (in the span of the k nearest vocabulary "
                          "embeddings), or a sampler instance called as noise(input_ids, x, attention_mask)",
                          "in_manifold")
    ratio: float | None = hyperparameter("‖ε_t‖ / ‖x_t‖ per token; None: 0.05 for gaussian, 0.1 for in_manifold")
    k: int = hyperparameter("neighbours per token (in_manifold)", 10)
    seed: int | None = hyperparameter("noise seed; None: TrainingArguments.seed under LNSRTrainer, else 0")
    refresh_every: int | None = hyperparameter("in_manifold: rebuild the neighbour table every so many optimizer steps "
                                      "(None: never; embeddings move little at fine-tuning learning rates)")
    knn_backend: str = hyperparameter("neighbour search: 'auto', 'torch' or 'faiss'", "auto")
    backend: str = hyperparameter("kernels: 'auto', 'cuda', 'triton' or 'torch'", "auto")

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.noise, type):
            raise TypeError(f"{name}.noise must be 'gaussian', 'in_manifold' or a sampler instance, got the class "
                            f"{self.noise.__name__}; create one, e.g. {self.noise.__name__}(...)")
        if isinstance(self.noise, str):
            check_choice(f"{name}.noise", self.noise, NOISE_KINDS)
        elif not callable(self.noise):
            raise TypeError(f"{name}.noise must be 'gaussian', 'in_manifold' or a sampler instance, got "
                            f"{type(self.noise).__name__}")
        check_choice(f"{name}.knn_backend", self.knn_backend, KNN_BACKENDS)
        check_choice(f"{name}.backend", self.backend, BACKENDS)
        if self.ratio is not None:
            if not is_real(self.ratio):
                raise TypeError(f"{name}.ratio must be a float or None, got {type(self.ratio).__name__}")
            if not math.isfinite(self.ratio) or self.ratio <= 0:
                raise ValueError(f"{name}.ratio must be finite and > 0, got {self.ratio}")
        if not is_int(self.k):
            raise TypeError(f"{name}.k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"{name}.k must be >= 1, got {self.k}")
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"{name}.seed must be an int or None, got {type(self.seed).__name__}")
        if self.refresh_every is not None:
            if not is_int(self.refresh_every):
                raise TypeError(f"{name}.refresh_every must be an int or None, got {type(self.refresh_every).__name__}")
            if self.refresh_every < 1:
                raise ValueError(f"{name}.refresh_every must be >= 1 optimizer steps, got {self.refresh_every}")
            if self.noise != "in_manifold":
                raise ValueError(f"{name}.refresh_every applies to in_manifold noise only, got noise={self.noise!r}")

    @property
    def noise_ratio(self) -> float | None:
        """The ratio in use: `ratio`, or the default for the noise kind (None for a sampler instance)."""
        if self.ratio is not None:
            return float(self.ratio)
        return DEFAULT_RATIOS.get(self.noise) if isinstance(self.noise, str) else None

    def accumulate(self, noise, steps: int) -> None:
        """`refresh_every` counts optimizer steps, the sampler its calls: one per micro-batch of `steps`."""
        if self.refresh_every is not None and isinstance(noise, InManifoldNoise):
            noise.refresh_every = self.refresh_every * steps

    def make_noise(self, model: nn.Module):
        """The noise sampler: the given instance, or GaussianNoise / InManifoldNoise over `model`'s word embeddings."""
        if not isinstance(self.noise, str):
            return self.noise
        seed = 0 if self.seed is None else self.seed
        if self.noise == "gaussian":
            return GaussianNoise(ratio=self.noise_ratio, seed=seed, backend=self.backend)
        return InManifoldNoise(word_embeddings(model), k=self.k, ratio=self.noise_ratio, seed=seed,
                               refresh_every=self.refresh_every, knn_backend=self.knn_backend, backend=self.backend)


@dataclass
class LNSRConfig(NoiseConfig):
    """How LNSR regularises (docs/design.md §2); `lnsr_fast.apply(model, LNSRConfig(...))` puts it in the model.

    What one unit of λ (`weight`) is depends on `reduction`. With Δ_t = h_r,t(x + ε) − h_r,t(x) the change of
    token t's output at layer r (width d) and T̄ a sequence's mean number of real tokens, each chosen layer adds
    λ times: "sum", the mean over real tokens of ‖Δ_t‖²; "mean", that divided by d; "sequence", Σ_t ‖Δ_t‖² over
    a sequence's real tokens, averaged over the sequences. The paper's penalty λ_p·‖f_r(x̃) − f_r(x)‖² (eq. 11,
    λ_p in 0.2–1.0 there) is, read literally (the squared norm of a sequence's whole layer output),
    reduction="sequence" with λ = λ_p, or "sum" with λ = λ_p·T̄; read as an element-wise mean (as many
    implementations do), it is "mean" with λ = λ_p, or "sum" with λ = λ_p / d. Neither carries over between
    models and data; the penalty's share of the loss at the start of training (from `handle.last`) lined the
    two noises up and collapsed training above the same 40% on both corpora of docs/reproduction, so
    choose λ for another model by it (README, "Choosing λ for your model"; docs/design.md §2).

    >>> LNSRConfig(noise="gaussian", weight=0.5)
    >>> LNSRConfig(noise="in_manifold", k=10, ratio=0.1, layers=[4, 5, 6])
    """

    weight: float | list | None = hyperparameter("λ for every chosen layer, or one λ per layer; None: 0.03 for gaussian, 0.01 "
                                                 "for in_manifold noise (chosen on validation in docs/reproduction)")
    layers: int | list | None = hyperparameter("indices into the hidden states (0 = embedding output, negative from the end); "
                                      "None: every transformer layer, 1..L")
    reduction: str = hyperparameter("per layer, 'sum': the mean over real tokens of ‖h_t − h̃_t‖²; 'mean': that / d; "
                                    "'sequence': the sum over a sequence's real tokens, averaged over the sequences "
                                    "(the paper's equation read literally)", "sum")
    fraction: float = hyperparameter("the share of a batch's rows that get a noisy copy in the doubled pass (its first "
                                     "⌈fraction·B⌉ rows): the penalty then estimates the same expectation from fewer "
                                     "rows, for a cheaper step (0.5 lost nothing measurable in docs/reproduction; "
                                     "1 is the paper's method)", 1.0)
    mode: str = hyperparameter("'concat': clean and noisy copy in one pass of 2B rows; 'two_pass': two passes", "concat")
    dropout: str = hyperparameter("'shared': both copies get the same dropout masks, so the penalty measures the noise; "
                         "'independent': their own masks (a consistency term as in R-Drop)", "shared")
    stack: str | None = hyperparameter("encoder–decoder models: the 'encoder' (default) or 'decoder' hidden states")
    detach_clean: bool = hyperparameter("no penalty gradient through the clean copy", False)

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("reduction", REDUCTIONS), ("mode", MODES), ("dropout", DROPOUT_MODES)):
            check_choice(f"LNSRConfig.{name}", getattr(self, name), allowed)
        if self.stack is not None:
            check_choice("LNSRConfig.stack", self.stack, STACKS)
        if self.weight is None:   # the noise kind's default; a sampler of one's own gets the Gaussian one
            in_manifold = self.noise == "in_manifold" or isinstance(self.noise, InManifoldNoise)
            self.weight = DEFAULT_WEIGHTS["in_manifold" if in_manifold else "gaussian"]
        weights = list(self.weight) if isinstance(self.weight, (list, tuple)) else [self.weight]
        if isinstance(self.weight, (list, tuple)):
            self.weight = weights
            if not weights:
                raise ValueError("LNSRConfig.weight is an empty list; give a float or one float per layer")
        if not all(is_real(w) for w in weights):
            raise TypeError(f"LNSRConfig.weight must be a float or a list of floats, got {self.weight!r}")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"LNSRConfig.weight must be finite and >= 0, got {self.weight!r}")
        if is_int(self.layers):
            self.layers = [self.layers]
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(is_int(r) for r in self.layers):
                raise TypeError(f"LNSRConfig.layers must be None, an int or a list of ints, got {self.layers!r}")
            self.layers = list(self.layers)
            if not self.layers:
                raise ValueError("LNSRConfig.layers is an empty list; give None (every layer) or at least one index")
            if isinstance(self.weight, list) and len(self.weight) != len(self.layers):
                raise ValueError(f"LNSRConfig.weight has {len(self.weight)} entries but layers has {len(self.layers)}")
        if not isinstance(self.detach_clean, bool):
            raise TypeError(f"LNSRConfig.detach_clean must be a bool, got {self.detach_clean!r}")
        if not is_real(self.fraction):
            raise TypeError(f"LNSRConfig.fraction must be a float, got {type(self.fraction).__name__}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"LNSRConfig.fraction must be in (0, 1], got {self.fraction!r}")
        if self.fraction < 1 and self.mode == "two_pass":
            raise ValueError("LNSRConfig.fraction < 1 needs mode='concat' (the noisy rows ride in the doubled pass)")

    @property
    def name(self) -> str:
        """The method's name in `lnsr_fast.methods`: "lnsr" (Gaussian noise) or "lnsr_in_manifold"."""
        return "lnsr" if self.noise == "gaussian" else "lnsr_in_manifold"


def draw(noise):
    """The draw of a sampler inside the model's forward: `noise.sample` (no host-synchronising id check; the
    model's embedding lookup has checked the ids) where it has one, else the sampler itself."""
    return getattr(noise, "sample", noise)


def _encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(heads.base_model(model), "config", None), "is_encoder_decoder", False))


def num_layers(model: nn.Module, stack: str | None = None) -> int | None:
    """L of a stack (its hidden states are 0..L), from the config; None when the config does not say. stack:
    "encoder" (the default of an encoder–decoder model) or "decoder"."""
    config = getattr(heads.base_model(model), "config", None)
    keys = (("decoder_layers", "num_decoder_layers") if stack == "decoder" else
            ("encoder_layers", "num_layers", "num_hidden_layers") if _encoder_decoder(model) else ("num_hidden_layers",))
    for key in keys:
        n = getattr(config, key, None)
        if is_int(n):
            return n
    return None


def transformer_layers(model: nn.Module, stack: str | None = None) -> list[nn.Module]:
    """The modules whose outputs are a stack's hidden states 1..L, in the order they run: the layer class a
    Hugging Face model declares for its `hidden_states` (ALBERT calls its one layer L times), else the
    nn.ModuleList of L modules. TypeError when neither is found."""
    base = heads.base_model(model)
    root = (base.get_decoder() if stack == "decoder" else base.get_encoder()) if _encoder_decoder(model) else base
    spec = next((m._can_record_outputs["hidden_states"] for m in root.modules()
                 if "hidden_states" in (getattr(m, "_can_record_outputs", None) or {})), None)
    if spec is not None:
        target = getattr(spec, "target_class", spec)   # an OutputRecorder, or the class itself
        name = spec if isinstance(spec, str) else getattr(spec, "class_name", None)
        found = [m for n, m in root.named_modules()
                 if (isinstance(target, type) and isinstance(m, target)) or (name is not None and n.endswith(name))]
        if found:
            return found
    n = num_layers(model, stack)
    lists = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) > 1:   # e.g. a list of norms beside the layers: keep the usual names
        lists = [(name, m) for name, m in lists if name.rsplit(".", 1)[-1] in ("layer", "layers", "h", "block", "blocks")]
    if len(lists) != 1:
        raise TypeError(f"cannot find the transformer layers of {type(base).__name__}: it declares no hidden-states "
                        f"layer and has {len(lists)} nn.ModuleLists of config's {n!r} layers")
    return list(lists[0][1])


class LNSR(Method):
    """Layerwise Noise Stability Regularization inside the model's forward (see the module docstring).

    The hidden states are recorded by hooks on the transformer layers (`transformer_layers`): hidden state 0 is
    the first layer's input, r ≥ 1 the output of layer r (before a final norm, which Hugging Face's last
    `hidden_states` entry includes). An encoder–decoder model's encoder layers are regularised unless
    `stack="decoder"`. Falls back to two passes, with one warning, for labels whose loss the model cannot
    compute on the clean half of a doubled batch (an unknown head) and for a model that draws randomness that
    cannot be paired; `mode="two_pass"` always runs two.
    """

    names = ("task_loss", "lnsr_penalty")

    def __init__(self, model: nn.Module, config: LNSRConfig):
        super().__init__(model, config)
        self.name = config.name
        if config.stack is not None and not _encoder_decoder(model):
            raise ValueError(f"LNSRConfig.stack={config.stack!r} applies to encoder–decoder models; "
                             f"{type(model).__name__} has one stack of hidden states")
        self.stack_layers = transformer_layers(model, config.stack)
        self.noise = config.make_noise(model)
        self._recorder = None
        self._layers_for: dict[int, tuple[list[int], list[float]]] = {}
        self.n_states = None if num_layers(model, config.stack) is None else num_layers(model, config.stack) + 1
        if self.n_states is not None:
            self.layers(self.n_states)   # the layers and weights are checked now
        elif isinstance(config.weight, list) and config.layers is None:
            raise ValueError("LNSRConfig.weight is a list but the model's number of layers is unknown; give layers too")

    def attach(self, handle) -> None:
        self._recorder = Recorder(handle, self.stack_layers)

    def remove(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()

    def set_accumulation(self, steps: int) -> None:
        self.config.accumulate(self.noise, steps)

    def layers(self, n_states: int) -> tuple[list[int], list[float]]:
        """The chosen hidden-state indices and their λ, for a stack of `n_states` hidden states."""
        if n_states not in self._layers_for:
            layers = self.config.layers if self.config.layers is not None else list(range(1, n_states))
            bad = [r for r in layers if not -n_states <= r < n_states]
            if bad:
                raise ValueError(f"layers {bad} out of range: the model has {n_states} hidden states (0 = embeddings)")
            self._layers_for[n_states] = layers, resolve_weights(self.config.weight, len(layers), "weight")
        return self._layers_for[n_states]

    def _states(self, states: list) -> list:
        if self.n_states is not None and len(states) != self.n_states:
            raise RuntimeError(f"recorded {len(states)} hidden states of {type(self.model).__name__}'s layers "
                               f"{type(self.stack_layers[0]).__name__}, expected {self.n_states} (L + 1)")
        return states

    def forward(self, call: Call):
        config = self.config
        copies = call.clean_and_noisy(draw(self.noise), pair=config.dropout == "shared",
                                      concat=config.mode == "concat", record=True, fraction=config.fraction)
        states = self._states(copies.states)
        layers, weights = self.layers(len(states))
        mask = call.inputs.get("decoder_attention_mask") if config.stack == "decoder" else call.mask
        if copies.noisy is None:   # one doubled pass: the fused penalty reads both copies in place
            if mask is not None and copies.pairs < call.rows:
                mask = mask[:copies.pairs]
            penalty = layerwise_stability_concat([states[r] for r in layers], copies.pairs, mask, weights,
                                                 config.reduction, config.backend, config.detach_clean)
        else:
            noisy = self._states(copies.noisy_states)
            chosen = [states[r].detach() if config.detach_clean else states[r] for r in layers]
            penalty = layerwise_stability(chosen, [noisy[r] for r in layers], mask, weights, config.reduction,
                                          config.backend)
        return call.finish(copies.out, penalty, self.names, copies.half, copies.mode, copies.pairs)


LNSRConfig.method = LNSR
