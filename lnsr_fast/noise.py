"""Noise samplers: ε for the noisy half of the LNSR pass (docs/design.md §1–§2).

Both samplers are called as `noise(input_ids, inputs_embeds, attention_mask=None)` and return ε with
the shape, dtype and device of `inputs_embeds`: ‖ε_t‖ = ratio·‖x_t‖ for every real token, 0 at padding.
ε is a sample: it is computed from detached embeddings and carries no gradient.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn

from .checks import check_choice, check_int, check_real, is_int, is_real
from .kernels import BACKENDS, check_supported, ops, reference, resolve_backend
from .neighbors import KNN_BACKENDS, build_neighbor_table, check_embedding_matrix

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 over the values: a well-spread 63-bit generator seed from (seed, rank, step)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


# The largest noise ratio a sampler accepts: ε ten times the embedding itself is beyond any use of LNSR
# (the paper: 0.05 and 0.1), while ratios near fp32's range turn ε into inf.
MAX_RATIO = 10.0


def check_ratio(ratio, name: str = "ratio") -> float:
    """`ratio` as a float in (0, MAX_RATIO]; TypeError/ValueError naming `name` otherwise."""
    if not is_real(ratio):
        raise TypeError(f"{name} must be a float, got {type(ratio).__name__}")
    return check_real(name, ratio, 0.0, MAX_RATIO, open_minimum=True)


# The ids tensor last found in range: (weak reference, its version counter, vocab_size).
_CHECKED_IDS: tuple | None = None


def _out_of_range(input_ids: torch.Tensor, vocab_size: int) -> bool:
    return bool(input_ids.numel()) and bool(((input_ids < 0) | (input_ids >= vocab_size)).any())


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless every id is in [0, vocab_size).

    It costs a host sync, so it is done once per tensor: LNSR (or a method) checks the batch's ids before
    embedding them, and the sampler it then calls with the same, unmodified tensor does not check again.
    """
    global _CHECKED_IDS
    if _CHECKED_IDS is not None and _CHECKED_IDS[0]() is input_ids and _CHECKED_IDS[1:] == (input_ids._version, vocab_size):
        return
    if _out_of_range(input_ids, vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    _CHECKED_IDS = (weakref.ref(input_ids), input_ids._version, vocab_size)


def check_noise_inputs(input_ids, inputs_embeds, attention_mask, vocab_size: int | None = None):
    """Validate the sampler's arguments; returns the boolean mask of real tokens (or None)."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a tensor, got {type(inputs_embeds).__name__}")
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
    if inputs_embeds.dim() < 2:
        raise ValueError(f"inputs_embeds must be [..., dim] with at least 2 dims, got shape {tuple(inputs_embeds.shape)}")
    tokens_shape = inputs_embeds.shape[:-1]
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.shape != tokens_shape:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)} but inputs_embeds has "
                             f"{tuple(inputs_embeds.shape)}; expected input_ids of shape {tuple(tokens_shape)}")
        if input_ids.device != inputs_embeds.device:
            raise ValueError(f"input_ids is on {input_ids.device} but inputs_embeds on {inputs_embeds.device}")
        if vocab_size is not None:
            check_token_ids(input_ids, vocab_size)
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != tokens_shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but inputs_embeds has "
                         f"{tuple(inputs_embeds.shape)}; expected {tuple(tokens_shape)}")
    if attention_mask.device != inputs_embeds.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but inputs_embeds on {inputs_embeds.device}")
    return attention_mask != 0


class _NoiseSampler:
    """Seed, step counter and per-device generators shared by the samplers.

    Each call draws with a seed derived from (seed, rank, step): a run is reproducible on the same
    backend, DDP ranks draw different noise, and restoring `step` resumes the exact sequence.
    backend: "auto" | "cuda" | "triton" | "torch", resolved per call for the device of the inputs
    (see lnsr_fast.kernels). settings: a subclass's other settings, refused like ratio and seed when they
    are tensors (the class called in place of an instance).
    """

    def __init__(self, ratio: float, seed: int, backend: str, *settings):
        if any(isinstance(v, torch.Tensor) for v in (ratio, seed, *settings)):
            # `LNSR(model, GaussianNoise)` calls the class with (input_ids, inputs_embeds, mask)
            raise TypeError(f"{type(self).__name__} was given tensors as its settings: the class itself was "
                            "passed where a noise sampler is expected; pass an instance such as "
                            "GaussianNoise(ratio=0.05, seed=0) or InManifoldNoise(embedding, k=10, ratio=0.1, seed=0)")
        self.ratio = check_ratio(ratio)
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        check_choice("backend", backend, BACKENDS)
        self.seed, self.backend = seed, backend
        self.step = 0

    def _next_seed(self) -> int:
        """This call's seed (63 bits, for the backends' generators); advances `step`."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = _mix(self.seed, rank, self.step)
        self.step += 1
        return seed

    def sample(self, input_ids, inputs_embeds, attention_mask=None) -> torch.Tensor:
        """The same draw as calling the sampler, without the range check of `input_ids` (a host sync): for ids
        the model's own embedding lookup has just checked, as in the LNSR step."""
        return self(input_ids, inputs_embeds, attention_mask)

    def state_dict(self) -> dict:
        """What resumes the draws: the settings (seed, ratio) and the step."""
        return {"seed": self.seed, "step": self.step, "ratio": self.ratio}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a `state_dict()`: only into a sampler of the same kind built with the same settings
        (seed, ratio; in-manifold also k), since restoring other settings over the configured ones would
        draw noise that neither configuration describes. Every entry is checked first (types, bounds; the
        neighbour table's dtype, shape and ids against the embedding), so a bad state changes nothing:
        TypeError/ValueError naming the entry, with both values where a setting differs."""
        self._check_state(state)
        self.step = state["step"]

    def _check_state(self, state) -> None:
        name = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{name}.load_state_dict expects the dict of a state_dict(), got {type(state).__name__}")
        expected = set(self.state_dict())
        if set(state) != expected:
            kind = "an InManifoldNoise" if "table" in state else "a GaussianNoise"
            raise ValueError(f"state has the entries {sorted(state)}, {name} expects {sorted(expected)}: "
                             f"is it the state of {kind} sampler?")
        if not is_int(state["seed"]):
            raise TypeError(f"state['seed'] must be an int, got {state['seed']!r}")
        check_int("state['step']", state["step"], 0)
        check_ratio(state["ratio"], "state['ratio']")
        for setting in ("seed", "ratio", "k"):
            if setting in state and state[setting] != getattr(self, setting):
                raise ValueError(f"state['{setting}'] is {state[setting]!r} but this {name} was built with "
                                 f"{setting}={getattr(self, setting)!r}; build it with the state's settings to resume")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, seed={self.seed}, step={self.step}, backend={self.backend!r})"


class GaussianNoise(_NoiseSampler):
    """Standard LNSR noise: Gaussian ε rescaled per token to ‖ε_t‖ = ratio·‖x_t‖, ratio in (0, MAX_RATIO].

    >>> noise = GaussianNoise(ratio=0.05, seed=0)
    >>> eps = noise(input_ids, inputs_embeds, attention_mask)   # input_ids may be None here
    """

    def __init__(self, ratio: float = 0.05, seed: int = 0, backend: str = "auto"):
        super().__init__(ratio, seed, backend)

    @torch.no_grad()
    def __call__(self, input_ids, inputs_embeds, attention_mask=None) -> torch.Tensor:
        real = check_noise_inputs(input_ids, inputs_embeds, attention_mask)
        x = inputs_embeds.detach()
        backend = resolve_backend(self.backend, x.device, x.dtype, op="gaussian_noise", d=x.shape[-1])
        seed = self._next_seed()
        eps = ops.gaussian_noise(x.reshape(-1, x.shape[-1]), None if real is None else real.reshape(-1),
                                 self.ratio, seed, backend)
        return eps.view_as(x)


def embedding_scale(embedding) -> float:
    """The scalar s with embedding(ids) = s·weight[ids]: 1 for nn.Embedding, e.g. √d for the scaled
    word embeddings of BART or Gemma. The kernels gather neighbour rows from the weight matrix, so
    they need s to put them on the scale of x; a forward that is not a scaled lookup is refused."""
    if not isinstance(embedding, nn.Module):
        return 1.0
    weight = embedding.weight
    ids = torch.arange(min(weight.shape[0], 64), device=weight.device)
    refused = TypeError(f"embedding {type(embedding).__name__}'s forward is not a (scaled) row lookup of its "
                        "weight; InManifoldNoise gathers neighbours from the weight matrix")
    try:
        with torch.no_grad():
            out, rows = embedding(ids).double(), weight[ids].double()
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise refused from e
    norm = rows.pow(2).sum()
    scale = float((out * rows).sum() / norm) if norm > 0 else 1.0
    if out.shape != rows.shape or not torch.allclose(out, scale * rows, rtol=1e-2, atol=1e-6 * float(out.abs().max())):
        raise refused
    return scale


def _check_embedding(weight) -> None:
    # Before the matrix's values are read: a meta tensor has none, and an empty one has no neighbours.
    if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
        raise ValueError("embedding is on the meta device (a model created without its weights): load the "
                         "weights before building InManifoldNoise")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and 0 in weight.shape:
        raise ValueError(f"embedding has shape {tuple(weight.shape)}: neighbours need at least one row and one "
                         "feature")
    check_embedding_matrix(weight)


class InManifoldNoise(_NoiseSampler):
    """In-manifold LNSR noise: an isotropic Gaussian inside the span of each token's k nearest
    vocabulary embeddings (differences to the token, orthonormalised by modified Gram–Schmidt in fp32),
    rescaled per token to ‖ε_t‖ = ratio·‖x_t‖. ratio and backend: as for GaussianNoise.

    embedding: the model's input-embedding module (or its [vocab, dim] weight) with real values (not on
    the meta device) and at least one row and one feature; the neighbour table is
    built from it at construction and rebuilt every `refresh_every` calls (None: never, since
    embeddings move little at fine-tuning learning rates). A token whose neighbour differences span
    nothing (e.g. tied rows) falls back to Gaussian noise; `fallback_count` counts them.

    >>> noise = InManifoldNoise(model.get_input_embeddings(), k=10, ratio=0.1, seed=0)
    >>> eps = noise(input_ids, inputs_embeds, attention_mask)
    """

    def __init__(self, embedding, k: int = 10, ratio: float = 0.1, seed: int = 0, refresh_every: int | None = None,
                 knn_backend: str = "auto", rank_tol: float = reference.DEFAULT_RANK_TOL, backend: str = "auto"):
        super().__init__(ratio, seed, backend, k)
        if isinstance(embedding, nn.Module) and not isinstance(getattr(embedding, "weight", None), torch.Tensor):
            raise TypeError(f"embedding must be an nn.Embedding or a [vocab, dim] tensor, got {type(embedding).__name__}")
        self._weight_of = (lambda: embedding.weight) if isinstance(embedding, nn.Module) else (lambda: embedding)
        _check_embedding(self._weight_of())
        self.embed_scale = embedding_scale(embedding)
        if refresh_every is not None and (not is_int(refresh_every) or refresh_every < 1):
            raise ValueError(f"refresh_every must be None or a positive int, got {refresh_every!r}")
        check_choice("knn_backend", knn_backend, KNN_BACKENDS)
        check_supported("in_manifold_noise", backend, self._weight_of().device, d=self._weight_of().shape[1], k=k)
        if not 0 <= rank_tol < 1:
            raise ValueError(f"rank_tol must be in [0, 1), got {rank_tol}")
        self.k, self.refresh_every, self.knn_backend, self.rank_tol = k, refresh_every, knn_backend, rank_tol
        self.table = build_neighbor_table(self._weight_of(), k, knn_backend)
        self._table_step = 0
        self.fallback_count = torch.zeros((), dtype=torch.long, device=self.table.device)

    def refresh(self) -> None:
        """Rebuild the neighbour table from the embedding's current weights."""
        self.table = build_neighbor_table(self._weight_of(), self.k, self.knn_backend)
        self._table_step = self.step

    def __call__(self, input_ids, inputs_embeds, attention_mask=None) -> torch.Tensor:
        return self._draw(input_ids, inputs_embeds, attention_mask, check_ids=True)

    def sample(self, input_ids, inputs_embeds, attention_mask=None) -> torch.Tensor:
        return self._draw(input_ids, inputs_embeds, attention_mask, check_ids=False)

    @torch.no_grad()
    def _draw(self, input_ids, inputs_embeds, attention_mask, check_ids: bool) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("input_ids is required by InManifoldNoise (neighbours are looked up by token id)")
        weight = self._weight_of()
        real = check_noise_inputs(input_ids, inputs_embeds, attention_mask,
                                  vocab_size=weight.shape[0] if check_ids else None)
        if weight.shape[1] != inputs_embeds.shape[-1]:
            raise ValueError(f"inputs_embeds has width {inputs_embeds.shape[-1]} but the embedding matrix has {weight.shape[1]}")
        if weight.device != inputs_embeds.device:
            raise ValueError(f"inputs_embeds is on {inputs_embeds.device} but the embedding matrix on {weight.device}")
        if self.table.shape[0] != weight.shape[0]:   # the kernels index the table with ids < weight.shape[0]
            raise ValueError(f"the neighbour table has {self.table.shape[0]} rows but the embedding now has "
                             f"{weight.shape[0]} (the vocabulary was resized): call refresh()")
        if self.refresh_every is not None and self.step - self._table_step >= self.refresh_every:
            self.refresh()
        x = inputs_embeds.detach().reshape(-1, inputs_embeds.shape[-1])
        backend = resolve_backend(self.backend, x.device, x.dtype, op="in_manifold_noise", d=x.shape[-1],
                                  k=self.table.shape[1])
        self.table = self.table.to(x.device)
        eps, fell_back = ops.in_manifold_noise(
            x, input_ids.reshape(-1).long(), self.table, weight.detach(), None if real is None else real.reshape(-1),
            self.ratio, self.rank_tol, self._next_seed(), self.embed_scale, backend)
        self.fallback_count = self.fallback_count.to(x.device) + fell_back.sum()
        return eps.view_as(inputs_embeds)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "k": self.k, "table": self.table.cpu(), "table_step": self._table_step,
                "fallback_count": int(self.fallback_count)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.table = state["table"].to(self._weight_of().device, torch.int32)
        self._table_step = state["table_step"]
        self.fallback_count = torch.tensor(state["fallback_count"], device=self.table.device)

    def _check_state(self, state) -> None:
        super()._check_state(state)
        table, vocab = state["table"], self._weight_of().shape[0]
        if not isinstance(table, torch.Tensor) or table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"state['table'] must be an int32 or int64 tensor, got "
                            f"{getattr(table, 'dtype', type(table).__name__)}")
        if tuple(table.shape) != (vocab, self.k):
            raise ValueError(f"state['table'] has shape {tuple(table.shape)}, expected ({vocab}, {self.k}) for this "
                             f"embedding and k")
        if table.numel() and not 0 <= int(table.min()) <= int(table.max()) < vocab:
            # the kernels gather embedding rows through it: an id outside [0, vocab) reads outside the weight
            raise ValueError(f"state['table'] holds ids in [{int(table.min())}, {int(table.max())}], expected ids "
                             f"in [0, {vocab})")
        check_int("state['table_step']", state["table_step"], 0)
        if state["table_step"] > state["step"]:
            raise ValueError(f"state['table_step'] {state['table_step']} is after state['step'] {state['step']}")
        check_int("state['fallback_count']", state["fallback_count"], 0)
