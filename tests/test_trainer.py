"""LNSRTrainer / LNSRConfig: the Hugging Face Trainer integration (DESIGN.md §1, §3).

Tiny random-init BERT (vocab 128, hidden 32, 2 layers) on a few synthetic rows; every run is a few steps.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertLMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments)

import lnsr_fast as lf
from lnsr_fast import GaussianNoise, InManifoldNoise, LNSRConfig, LNSRTrainer
from lnsr_fast.trainer import NOISE_STATE_NAME

VOCAB, LENGTH = 128, 10
REPO = Path(__file__).resolve().parents[1]


def bert_config(dropout: float = 0.1, **kwargs) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, num_labels=2,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **kwargs)


def classifier(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(dropout))


def dataset(n: int = 16, padded: bool = True, seed: int = 0) -> list[dict]:
    """Rows of LENGTH tokens; with `padded`, each row has 4..LENGTH real tokens and 0-padding after them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        real = int(torch.randint(4, LENGTH + 1, (1,), generator=g)) if padded else LENGTH
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:real] = torch.randint(1, VOCAB, (real,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(LENGTH) < real).long(),
                     "labels": torch.tensor(i % 2)})
    return rows


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                    max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kwargs})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


class TokenwiseNoise:
    """A deterministic sampler: ε_t depends on x_t only (0.1·x_t with its features rolled by one).

    The real samplers draw per call from a generator seeded by (seed, rank, call count), so 2 calls on
    [4, T, d] and 1 call on [8, T, d] draw different noise; this one gives both settings the same ε.
    """

    def __init__(self):
        self.step = 0

    def __call__(self, input_ids, inputs_embeds, attention_mask=None):
        self.step += 1
        return 0.1 * inputs_embeds.detach().roll(1, dims=-1)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


# ---- LNSRConfig ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, field", [
    ({"noise": "uniform"}, ValueError, "noise"),
    ({"ratio": 0.0}, ValueError, "ratio"),
    ({"ratio": float("nan")}, ValueError, "ratio"),
    ({"ratio": "0.1"}, TypeError, "ratio"),
    ({"k": 0}, ValueError, "k"),
    ({"k": 2.5}, TypeError, "k"),
    ({"weight": -1.0}, ValueError, "weight"),
    ({"weight": []}, ValueError, "weight"),
    ({"weight": "1"}, TypeError, "weight"),
    ({"weight": [1.0, float("inf")]}, ValueError, "weight"),
    ({"layers": []}, ValueError, "layers"),
    ({"layers": [1.5]}, TypeError, "layers"),
    ({"weight": [1.0, 0.5], "layers": [1]}, ValueError, "weight"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"mode": "parallel"}, ValueError, "mode"),
    ({"dropout": "off"}, ValueError, "dropout"),
    ({"seed": 1.0}, TypeError, "seed"),
    ({"refresh_every": 0}, ValueError, "refresh_every"),
    ({"refresh_every": True}, TypeError, "refresh_every"),
    ({"noise": "gaussian", "refresh_every": 10}, ValueError, "refresh_every"),
    ({"knn_backend": "annoy"}, ValueError, "knn_backend"),
])
def test_config_rejects_bad_fields(kwargs, error, field):
    with pytest.raises(error, match=rf"LNSRConfig\.{field}\b"):
        LNSRConfig(**kwargs)


def test_trainer_rejects_a_non_config(tmp_path):
    with pytest.raises(TypeError, match="lnsr must be an LNSRConfig"):
        LNSRTrainer(model=classifier(), args=training_args(tmp_path), lnsr={"noise": "gaussian"})


def test_config_build_defaults_and_conversions():
    model = classifier()
    lnsr = LNSRConfig(noise="gaussian").build(model, seed=7)
    assert isinstance(lnsr.noise, GaussianNoise) and lnsr.model is model
    assert (lnsr.noise.ratio, lnsr.noise.seed) == (0.05, 7)
    lnsr = LNSRConfig(k=4, seed=3, refresh_every=5, weight=[0.2, 0.8], layers=[1, 2], reduction="mean",
                      mode="two_pass", dropout="independent").build(model, seed=7, gradient_accumulation_steps=4)
    assert isinstance(lnsr.noise, InManifoldNoise)
    assert (lnsr.noise.ratio, lnsr.noise.seed, lnsr.noise.k) == (0.1, 3, 4)
    assert lnsr.noise.refresh_every == 20   # 5 optimizer steps × 4 micro-batches
    assert (lnsr.weight, lnsr.layers, lnsr.reduction, lnsr.mode, lnsr.dropout) == (
        [0.2, 0.8], [1, 2], "mean", "two_pass", "independent")
    assert LNSRConfig(ratio=0.3).build(model, seed=0).noise.ratio == 0.3
    with pytest.raises(ValueError, match="layers"):   # checked against the model's depth
        LNSRConfig(layers=[5]).build(model, seed=0)


# ---- training -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["gaussian", "in_manifold"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_in_each_precision(tmp_path, noise, precision):
    """A few steps: finite losses, every weight moves, the model really ran in the asked-for precision.

    accelerate (1.15) enables fp16 autocast only on accelerators: `fp16=True` on CPU trains in fp32, with
    no GradScaler. The fp16 case therefore also wraps training in `torch.autocast("cpu", float16)`.
    """
    model = classifier()
    before = params(model)
    flags = {"bf16": {"bf16": True}, "fp16": {"fp16": True}, "fp32": {}}[precision]
    trainer = LNSRTrainer(model=model, args=training_args(tmp_path, **flags), train_dataset=dataset(),
                          lnsr=LNSRConfig(noise=noise))
    dtypes = set()
    model.bert.encoder.layer[1].intermediate.dense.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    if precision == "fp16":
        with torch.autocast("cpu", dtype=torch.float16):
            trainer.train()
    else:
        trainer.train()
    assert dtypes == {{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    logs = train_logs(trainer)
    assert len(logs) == 3
    for e in logs:
        assert math.isfinite(e["loss"]) and math.isfinite(e["task_loss"])
        assert 0 < e["lnsr_penalty"] < math.inf
    unchanged = [k for k, v in params(model).items() if torch.equal(v, before[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    assert trainer.lnsr.noise.step == 3


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_logs_task_loss_and_penalty_on_the_loss_scale(tmp_path, accepts_loss_kwargs):
    """task_loss + lnsr_penalty = loss for each log (averaged over 2 optimizer steps of 2 micro-batches),
    whether or not the Trainer divides the loss by the accumulation steps itself (it does when the model
    takes no loss kwargs); the sampler is called once per micro-batch; plain fine-tuning logs neither."""
    trainer = LNSRTrainer(model=classifier(), train_dataset=dataset(),
                          args=training_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, logging_steps=2),
                          lnsr=LNSRConfig(noise="gaussian"))
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [2, 4]
    for e in logs:
        assert e["lnsr_penalty"] > 0
        assert e["task_loss"] + e["lnsr_penalty"] == pytest.approx(e["loss"], rel=1e-5)
    assert trainer.lnsr.noise.step == 8
    ft = LNSRTrainer(model=classifier(), args=training_args(tmp_path / "ft"), train_dataset=dataset())
    ft.train()
    assert ft.lnsr is None
    assert train_logs(ft) and not any("task_loss" in e or "lnsr_penalty" in e for e in ft.state.log_history)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_task_loss_is_what_plain_trainer_computes(tmp_path, label_smoothing):
    """At the first step (same weights, same batch, dropout off), LNSR's task_loss is plain Trainer's loss,
    including its gradient-accumulation scaling and label smoothing, and the penalty comes on top."""
    kwargs = dict(max_steps=1, gradient_accumulation_steps=2, label_smoothing_factor=label_smoothing)
    plain = Trainer(model=classifier(dropout=0.0), args=training_args(tmp_path / "ft", **kwargs),
                    train_dataset=dataset())
    plain.train()
    lnsr = LNSRTrainer(model=classifier(dropout=0.0), args=training_args(tmp_path / "lnsr", **kwargs),
                       train_dataset=dataset(), lnsr=LNSRConfig(noise="gaussian"))
    lnsr.train()
    (ft_log,), (lnsr_log,) = train_logs(plain), train_logs(lnsr)
    assert lnsr_log["task_loss"] == pytest.approx(ft_log["loss"], rel=1e-5)
    assert lnsr_log["loss"] == pytest.approx(ft_log["loss"] + lnsr_log["lnsr_penalty"], rel=1e-5)


def _one_sgd_step(tmp_path, name, lnsr, batch, accumulation, accepts_loss_kwargs):
    model = classifier(dropout=0.0)
    args = training_args(tmp_path / name, optim="sgd", learning_rate=0.5, max_steps=1, max_grad_norm=0.0,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    trainer = LNSRTrainer(model=model, args=args, train_dataset=dataset(8, padded=False), lnsr=lnsr)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    if lnsr is not None:
        trainer.lnsr.noise = TokenwiseNoise()
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_gradient_accumulation_keeps_the_penalty_scale(tmp_path, accepts_loss_kwargs):
    """2 micro-batches of 4 and 1 batch of 8 give the penalty the same gradient.

    BERT classification accepts **kwargs, so the installed Trainer counts `num_items_in_batch` and does not
    divide the task loss by the accumulation steps, although the model's loss is a per-micro-batch mean:
    plain Trainer's task gradient is 2× larger with 2 × 4. With `model_accepts_loss_kwargs = False` the
    Trainer divides the loss itself. LNSRTrainer keeps the task loss as the Trainer makes it and scales
    the penalty so that it comes out the same in both cases. With one SGD step the update is linear in the loss, so
    the penalty's own update, (LNSR − FT), must agree between the settings. Same-length rows (equal token
    counts per micro-batch) and a token-wise deterministic sampler make both settings see the same penalty.
    """
    cfg, flag = LNSRConfig(noise="gaussian"), accepts_loss_kwargs
    ga = _one_sgd_step(tmp_path, "ga-lnsr", cfg, 4, 2, flag) - _one_sgd_step(tmp_path, "ga-ft", None, 4, 2, flag)
    full = _one_sgd_step(tmp_path, "full-lnsr", cfg, 8, 1, flag) - _one_sgd_step(tmp_path, "full-ft", None, 8, 1, flag)
    assert full.norm() > 1e-4, "the penalty changed nothing: the test would not see a wrong scale"
    torch.testing.assert_close(ga, full, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_one_large_batch_causal_lm(tmp_path):
    """A causal LM (its loss normalised by `num_items_in_batch`): 2 × batch 4 and 1 × batch 8 train to the
    same weights in 3 SGD steps, task loss and penalty together (token-wise noise, dropout off)."""
    rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": r["input_ids"].clone()}
            for r in dataset(16, padded=False)]
    finals = []
    for batch, accumulation in ((4, 2), (8, 1)):
        torch.manual_seed(0)
        model = BertLMHeadModel(bert_config(0.0, is_decoder=True))
        args = training_args(tmp_path / f"b{batch}", optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer = LNSRTrainer(model=model, args=args, train_dataset=rows, lnsr=LNSRConfig(noise="gaussian"))
        assert trainer.lnsr.head == "causal_lm" and trainer.model_accepts_loss_kwargs
        trainer.lnsr.noise = TokenwiseNoise()
        trainer.train()
        assert trainer.lnsr.noise.step == 3 * accumulation
        assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


def test_peft_lora_trains_only_adapters_and_head(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(classifier(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                              r=4, lora_alpha=8))
    before = params(model)
    trainer = LNSRTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(),
                          lnsr=LNSRConfig(noise="in_manifold"))
    assert trainer.lnsr.head == "sequence_classification"
    trainer.train()
    assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))
    changed = {k for k, v in params(model).items() if not torch.equal(v, before[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("lora_" in k or "modules_to_save" in k for k in changed), changed
    assert any("lora_B" in k for k in changed) and any("modules_to_save" in k for k in changed)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("noise", ["gaussian", "in_manifold"])
def test_resume_from_checkpoint_draws_the_same_noise(tmp_path, noise):
    """5 steps straight vs 2 steps, checkpoint, and 3 more in a fresh trainer and a differently initialised
    model: identical weights and sampler state. Dropout on (the Trainer restores the RNG that seeds the
    paired masks); 2 micro-batches per step, so the resume lands mid-epoch; the neighbour table is rebuilt
    every 2 optimizer steps, so its state matters too."""
    cfg = LNSRConfig(noise=noise, refresh_every=2 if noise == "in_manifold" else None)
    kwargs = dict(max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3,
                  save_strategy="steps", save_steps=2)

    straight = LNSRTrainer(model=classifier(0), args=training_args(tmp_path / "straight", **kwargs),
                           train_dataset=dataset(12), lnsr=cfg)
    straight.train()

    interrupted = LNSRTrainer(model=classifier(0), args=training_args(tmp_path / "resumed", **kwargs),
                              train_dataset=dataset(12), lnsr=cfg, callbacks=[_StopAt(2)])
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / NOISE_STATE_NAME.format(rank=0)).is_file()
    assert interrupted.lnsr.noise.step == 4

    resumed = LNSRTrainer(model=classifier(1), args=training_args(tmp_path / "resumed", **kwargs),
                          train_dataset=dataset(12), lnsr=cfg)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    final, expected = params(resumed.model), params(straight.model)
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    a, b = straight.lnsr.noise.state_dict(), resumed.lnsr.noise.state_dict()
    assert a["step"] == b["step"] == 10
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    # The resumed run's logs continue the straight run's.
    steps = {e["step"]: e for e in train_logs(straight)}
    for e in train_logs(resumed):
        assert e["lnsr_penalty"] == pytest.approx(steps[e["step"]]["lnsr_penalty"], rel=1e-5)


def test_without_lnsr_matches_plain_trainer(tmp_path):
    """lnsr=None is plain fine-tuning: the same weights as transformers.Trainer from the same seed, dropout on."""
    plain_model, ft_model = classifier(0), classifier(0)
    Trainer(model=plain_model, args=training_args(tmp_path / "plain", gradient_accumulation_steps=2),
            train_dataset=dataset()).train()
    ft = LNSRTrainer(model=ft_model, args=training_args(tmp_path / "ft", gradient_accumulation_steps=2),
                     train_dataset=dataset(), lnsr=None)
    ft.train()
    before = params(classifier(0))
    assert any(not torch.equal(v, before[k]) for k, v in params(ft_model).items())
    for (k, a), b in zip(plain_model.named_parameters(), ft_model.parameters()):
        assert torch.equal(a, b), k


def test_model_init_gets_its_own_sampler(tmp_path):
    """With `model_init` the Trainer builds a new model in train(); the LNSR follows it with a fresh sampler."""
    trainer = LNSRTrainer(model_init=lambda: classifier(0), args=training_args(tmp_path), train_dataset=dataset(),
                          lnsr=LNSRConfig(noise="in_manifold"))
    first = trainer.lnsr
    trainer.train()
    assert trainer.lnsr is not first and trainer.lnsr.model is trainer.model
    assert trainer.lnsr.noise.step == 3 and first.noise.step == 0
    assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))


def test_evaluation_uses_the_plain_loss(tmp_path):
    """evaluate() runs the model in eval mode: no noise drawn, the same eval_loss as plain Trainer."""
    eval_rows = dataset(8, seed=1)
    args = training_args(tmp_path, per_device_eval_batch_size=4)
    lnsr = LNSRTrainer(model=classifier(0), args=args, lnsr=LNSRConfig(noise="gaussian"))
    plain = Trainer(model=classifier(0), args=args)
    got, want = lnsr.evaluate(eval_rows)["eval_loss"], plain.evaluate(eval_rows)["eval_loss"]
    assert got == pytest.approx(want, rel=1e-6)
    assert lnsr.lnsr.noise.step == 0


# ---- DDP ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_draw_different_noise_and_stay_in_sync(tmp_path):
    """torchrun, 2 CPU processes, gloo: each rank draws its own noise, gradients are all-reduced (identical
    weights on both ranks), the logged task_loss / lnsr_penalty are reduced across ranks, each rank saves
    its sampler state in the checkpoint, and resuming from it reproduces the uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "ddp_worker.py"), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after 240 s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # Different noise on the two ranks: in training (where their batches differ too) and for one input that
    # both ranks gave their sampler in the same state.
    assert r0["eps"].abs().sum() > 0 and r1["eps"].abs().sum() > 0
    assert r0["eps"].shape == r1["eps"].shape and not torch.allclose(r0["eps"], r1["eps"])
    assert r0["probe"].abs().sum() > 0 and not torch.allclose(r0["probe"], r1["probe"])
    # One model: the all-reduce kept the ranks identical, and they did train.
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    initial = _initial_state()
    assert any(not torch.equal(v, initial[k]) for k, v in r0["state"].items())
    # Logged values are reduced across ranks: the same on both.
    logs0 = [e for e in r0["logs"] if "loss" in e]
    logs1 = [e for e in r1["logs"] if "loss" in e]
    assert len(logs0) == 2 and all(e["lnsr_penalty"] > 0 for e in logs0)
    for a, b in zip(logs0, logs1):
        assert (a["task_loss"], a["lnsr_penalty"]) == (b["task_loss"], b["lnsr_penalty"])
    # One sampler file per rank; resuming from step 2 reproduces steps 3–4 exactly.
    for r in (0, 1):
        assert (tmp_path / "run" / "checkpoint-2" / NOISE_STATE_NAME.format(rank=r)).is_file()
    for state in (r0, r1):
        assert state["noise_state"]["step"] == state["resumed_noise_state"]["step"] == 4
        for k, v in state["state"].items():
            torch.testing.assert_close(state["resumed_state"][k], v, rtol=0, atol=1e-6)


def _initial_state() -> dict:
    """The weights the worker starts from (its model, built from the same seed)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ddp_worker", REPO / "tests" / "ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker.tiny_model(0).state_dict()
