"""SMART's smoothness-inducing adversarial regulariser (`smart`): a perturbation of the embedding layer's output
found by K projected ascent steps on the divergence of the outputs, and that divergence added to the task loss.

Source: Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models
through Principled Regularized Optimization" (ACL 2020); reference code: github.com/namisan/mt-dnn
(mt_dnn/perturbation.py, SmartPerturbation, and mt_dnn/loss.py). Defaults are that code's: K = 1 ascent
step (adv_k), initial noise σ·N(0, 1) with σ = 1e-5 (its `noise_var`), step size η = 1e-3, ε = 1e-6 in the
normalisation, ∞-norm per token, weight 1 (adv_alpha). As there, each ascent step sets
δ ← (δ + η·g) / (‖δ + η·g‖_∞ + ε) per token, so that δ has ∞-norm ≈ 1 per token after the first step;
the term added is the symmetric KL of the clean and perturbed logits with each direction's target
detached (SymKlCriterion), in fp32; a regression head takes the MSE instead.

Where δ goes: as in mt-dnn, on the output of the model's embedding layer (`embed_encode`, which returns
`self.bert.embeddings(input_ids, token_type_ids)`: word + position + token-type embeddings after their
LayerNorm and dropout), i.e. what the first transformer layer receives. A unit-∞-norm δ is then of the size
of the normalised embeddings: on all-MiniLM-L6-v2 (4 sentences, these defaults) ‖δ‖/‖x‖ ≈ 0.7 per token,
against ≈ 5.5 on the raw word embeddings, where the penalty came out 44× larger. The layer is the backbone's
`embeddings` module (BERT, RoBERTa, XLM-R, ALBERT, ELECTRA, DeBERTa, DistilBERT, MPNet, ModernBERT; for
ALBERT and ELECTRA before their projection to the hidden width, as mt-dnn's `embeddings` call), or an
encoder–decoder encoder's `layernorm_embedding` (BART, mBART: its normalised embeddings, the same place).
Models with neither (decoders such as GPT-2, Llama, Qwen2, Mistral, Gemma; T5) feed their first layer the
word embeddings themselves, plus positions that commute with adding δ (GPT-2) or times a constant (Gemma's
√d), with no normalisation between: there δ goes on the word embeddings, the closest place they expose.

Ours: the ascent divergence is the plain KL(p_clean ‖ p_adv) (mt-dnn's later code uses a numerically
"stable" variant of it); a non-finite ascent gradient is set to 0 (mt-dnn skips the term); padding gets no
noise; each pass embeds the ids itself (mt-dnn embeds once and reuses the output, dropout mask included);
mt-dnn since 2021 (commit 1f43b6e) passes embed + δ to the model as `inputs_embeds`, so that position and
token-type embeddings and the LayerNorm are applied a second time: we follow its 2020 code, whose
`embed_forward` (mt_dnn/matcher.py) ran the transformer layers on embed + δ. The paper's Bregman
proximal-point optimiser (not in mt-dnn's adversarial training either) is not included.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from .. import heads
from ..checks import check_choice, check_int, check_real
from ..regularize import Call, Method, MethodConfig, hyperparameter
from .base import is_regression, kl_divergence, mse, real_tokens, symmetric_kl

NORMS = ("inf", "l2")


def embedding_layer(model: nn.Module) -> nn.Module | None:
    """The module whose output the first transformer layer receives: the backbone's `embeddings` (BERT-style
    encoders) or an encoder–decoder encoder's `layernorm_embedding` (BART); None where the word embeddings
    are that input (decoders, T5)."""
    base = heads.base_model(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False) and callable(getattr(base, "get_encoder", None)):
        stack = base.get_encoder()
    else:
        stack = getattr(base, "base_model", base)
    for name in ("embeddings", "layernorm_embedding"):
        module = getattr(stack, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


class SMART(Method):
    """task loss + weight · D_s(f(x), f(x + δ_adv)); logs `task_loss` and `penalty`. The ascent and the
    perturbed passes run inside the model's forward, after the clean one."""

    name = "smart"

    def __init__(self, model: nn.Module, config: "SMARTConfig"):
        super().__init__(model, config)
        self.regression = is_regression(model)
        self.layer = embedding_layer(model)   # None: δ goes on the word embeddings, through `Call.run`
        self._local = threading.local()        # `perturb`: what this thread's pass in progress adds, until applied
        self._hook = None

    def attach(self, handle) -> None:
        if self.layer is not None:
            self._hook = self.layer.register_forward_hook(self._perturb_output)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _perturb_output(self, module, args, output):
        perturb = getattr(self._local, "perturb", None)
        if perturb is None:   # not inside one of this thread's SMART passes, or already applied in it
            return None
        self._local.perturb = None
        return perturb(output)

    def run(self, call: Call, inputs: dict, perturb, mode=None):
        """The outputs of the model's own forward on `inputs` with the embedding layer's output x replaced by
        `perturb(x)`."""
        if self.layer is None:
            return call.run(inputs, lambda input_ids, x: perturb(x), mode)[0]
        self._local.perturb = perturb
        try:
            out = call.run(inputs, mode=mode)[0]
            if self._local.perturb is not None:
                raise TypeError(f"{type(self.model).__name__} never called its embedding layer "
                                f"({type(self.layer).__name__}) during the forward, so SMART could not perturb it")
        finally:
            self._local.perturb = None
        return out

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """The regulariser D_s: symmetric KL of the logits (targets detached), or MSE for a regression head."""
        if self.regression:
            return mse(perturbed, clean)
        return symmetric_kl(clean, perturbed, attention_mask, detach_targets=True)

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        size = v.abs().amax(-1, keepdim=True) if self.config.norm == "inf" else v.norm(dim=-1, keepdim=True)
        return v / (size + self.config.epsilon)

    def adversarial_noise(self, call: Call, x: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
        """δ after `steps` ascent steps from σ·N(0, 1), detached (only δ's gradient is taken, so no parameter
        gradient is accumulated)."""
        config, target, inputs = self.config, clean_logits.detach(), call.model_inputs()
        real = real_tokens(call.mask, x)
        delta = torch.randn_like(x) * config.noise_var * real
        for _ in range(config.steps):
            delta.requires_grad_(True)
            logits = self.run(call, inputs, lambda emb: emb.detach() + delta)["logits"]
            ascent = mse(logits, target) if self.regression else kl_divergence(target, logits, call.mask)
            with torch.autocast(x.device.type, enabled=False):   # autocast covers forward passes only
                (grad,) = torch.autograd.grad(ascent, delta)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            delta = self._project(delta.detach() + config.step_size * grad) * real
        return delta.detach()

    def forward(self, call: Call):
        seen = {}

        def keep(x):
            seen["x"] = x.detach()
            return x

        mode = call.watcher(None, pair=False)
        clean = self.run(call, call.inputs, keep, mode)
        delta = self.adversarial_noise(call, seen["x"], clean["logits"])
        perturbed = self.run(call, call.model_inputs(), lambda x: x + delta)["logits"]
        penalty = self.config.weight * self.divergence(clean["logits"], perturbed, call.mask)
        return call.finish(clean, penalty, self.names, mode=mode)


@dataclass
class SMARTConfig(MethodConfig):
    """`smart`: adversarial smoothness term on the embedding layer's output."""

    method = SMART
    weight: float = hyperparameter("weight of the smoothness term (mt-dnn's adv_alpha)", 1.0)
    steps: int = hyperparameter("ascent steps K (adv_k)", 1)
    step_size: float = hyperparameter("ascent step size η", 1e-3)
    noise_var: float = hyperparameter("σ of the initial noise", 1e-5)
    epsilon: float = hyperparameter("added to the norm in the projection", 1e-6)
    norm: str = hyperparameter("per-token norm of the projection: 'inf' (mt-dnn's default) or 'l2'", "inf")

    def __post_init__(self):
        self.weight = check_real("SMARTConfig.weight", self.weight)
        self.steps = check_int("SMARTConfig.steps", self.steps, 1)
        self.step_size = check_real("SMARTConfig.step_size", self.step_size, open_minimum=True)
        self.noise_var = check_real("SMARTConfig.noise_var", self.noise_var, open_minimum=True)
        self.epsilon = check_real("SMARTConfig.epsilon", self.epsilon, open_minimum=True)
        check_choice("SMARTConfig.norm", self.norm, NORMS)
