"""LNSR in the training loops people use (docs/design.md §1): a plain `transformers.Trainer` (with LNSRCallback for
the logs and the checkpointed sampler), a Trainer subclass with its own compute_loss, LNSRTrainer, accelerate,
TRL's SFTTrainer, PEFT, mixed precision, gradient accumulation, DDP and FSDP2 on gloo, torch.compile.

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
import torch.nn.functional as F
from transformers import (BertConfig, BertForSequenceClassification, BertLMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments)

import lnsr_fast as lf
from lnsr_fast import LNSRCallback, LNSRConfig, LNSRTrainer
from families import TokenwiseNoise
from lnsr_fast.trainer import NOISE_STATE_NAME

VOCAB, LENGTH = 128, 10
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def bert_config(dropout: float = 0.1, **kwargs) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, num_labels=2,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **kwargs)


def classifier(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(dropout))


def causal_lm(seed: int = 0, dropout: float = 0.0) -> BertLMHeadModel:
    torch.manual_seed(seed)
    return BertLMHeadModel(bert_config(dropout, is_decoder=True))


def dataset(n: int = 16, padded: bool = True, seed: int = 0, lm: bool = False) -> list[dict]:
    """Rows of LENGTH tokens; with `padded`, each row has 4..LENGTH real tokens and 0-padding after them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        real = int(torch.randint(4, LENGTH + 1, (1,), generator=g)) if padded else LENGTH
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:real] = torch.randint(1, VOCAB, (real,), generator=g)
        mask = (torch.arange(LENGTH) < real).long()
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100) if lm else torch.tensor(i % 2)})
    return rows


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                    max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kwargs})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


# ---- any Trainer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["gaussian", "in_manifold"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_plain_trainer_trains_with_lnsr_in_each_precision(tmp_path, noise, precision):
    """A few steps of `transformers.Trainer` on a model LNSR is applied to: finite losses, task_loss + penalty =
    loss in the logs (LNSRCallback), every weight moves, the model really ran in the asked-for precision.

    accelerate enables fp16 autocast only on accelerators: `fp16=True` on the CPU trains in fp32, with no
    GradScaler. The fp16 case therefore also wraps training in `torch.autocast("cpu", float16)`."""
    model = classifier()
    before = params(model)
    handle = lf.apply(model, LNSRConfig(noise=noise))
    flags = {"bf16": {"bf16": True}, "fp16": {"fp16": True}, "fp32": {}}[precision]
    trainer = Trainer(model=model, args=training_args(tmp_path, **flags), train_dataset=dataset(),
                      callbacks=[LNSRCallback()])
    dtypes = set()
    model.bert.encoder.layer[1].intermediate.dense.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    with torch.autocast("cpu", dtype=torch.float16) if precision == "fp16" else torch.autocast("cpu", enabled=False):
        trainer.train()
    assert dtypes == {{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    logs = train_logs(trainer)
    assert len(logs) == 3
    for e in logs:
        assert math.isfinite(e["loss"]) and 0 < e["lnsr_penalty"] < math.inf
        assert e["task_loss"] + e["lnsr_penalty"] == pytest.approx(e["loss"], rel=1e-4)
    assert not [k for k, v in params(model).items() if torch.equal(v, before[k])]
    assert handle.noise.step == 3


def test_a_trainer_subclass_with_its_own_loss_trains_with_lnsr(tmp_path):
    """A subclass that computes a class-weighted loss from the logits itself (the model gets no labels, so its
    outputs.loss is the penalty alone) and adds the penalty, as the warning says."""
    class WeightedLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 3.0]))
            if outputs.loss is not None:
                loss = loss + outputs.loss
            return (loss, outputs) if return_outputs else loss

    finals = {}
    for weight in (0.0, 1.0):
        model = classifier(dropout=0.0)
        handle = lf.apply(model, LNSRConfig(noise="gaussian", weight=weight))
        with pytest.warns(UserWarning, match="without labels"):
            WeightedLoss(model=model, args=training_args(tmp_path / str(weight)), train_dataset=dataset()).train()
        assert handle.last["lnsr_penalty"] > 0 or weight == 0
        finals[weight] = flat(model)
    assert (finals[1.0] - finals[0.0]).abs().max() > 1e-5   # the penalty changed the training


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_task_loss_is_what_plain_trainer_computes(tmp_path, label_smoothing):
    """At the first step (same weights, same batch, dropout off), LNSR's task_loss is plain Trainer's loss,
    including its gradient-accumulation scaling and label smoothing (which LNSRTrainer handles: it takes the
    labels away from the model), and the penalty comes on top."""
    kwargs = dict(max_steps=1, gradient_accumulation_steps=2, label_smoothing_factor=label_smoothing)
    plain = Trainer(model=classifier(dropout=0.0), args=training_args(tmp_path / "ft", **kwargs),
                    train_dataset=dataset())
    plain.train()
    lnsr = LNSRTrainer(model=classifier(dropout=0.0), args=training_args(tmp_path / "lnsr", **kwargs),
                       train_dataset=dataset(), lnsr=LNSRConfig(noise="gaussian"))
    lnsr.train()
    (ft_log,), (lnsr_log,) = train_logs(plain), train_logs(lnsr)
    assert lnsr_log["lnsr_penalty"] > 0
    assert lnsr_log["loss"] == pytest.approx(ft_log["loss"] + lnsr_log["lnsr_penalty"], rel=1e-5)
    if not label_smoothing:
        assert lnsr_log["task_loss"] == pytest.approx(ft_log["loss"], rel=1e-5)


def test_accelerate_and_a_hand_written_loop(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)   # the Trainers before set up another state
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = classifier()
    handle = lf.apply(model, LNSRConfig(noise="in_manifold", k=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset(8), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = flat(model)
    model.train()
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        assert handle.last["lnsr_penalty"] > 0 and loss.dtype == torch.float32
    assert (flat(model) - before).abs().max() > 0 and handle.noise.step == 2
    lf.remove(model)   # accelerate wrapped the forward after apply: it stays, and LNSR is off
    model.train()
    n = handle.noise.step
    model(**next(iter(loader)))
    assert handle.noise.step == n
    AcceleratorState._reset_state(reset_partial_state=True)


# ---- gradient accumulation and ranks: λ keeps its ratio to the task loss -----------------------------------

def sgd_update(tmp_path, model_fn, rows, batch, accumulation, weight, accepts_loss_kwargs=None, method="lnsr"):
    """The parameter update of one SGD step (lr 0.5) of LNSRTrainer with LNSR (deterministic noise) or L2-SP of
    strength `weight` (0: the task loss alone)."""
    model = model_fn()
    before = flat(model)
    args = training_args(tmp_path / f"{method}-{batch}-{accumulation}-{weight}", optim="sgd", learning_rate=0.5,
                         max_steps=1, max_grad_norm=0.0, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation)
    kwargs = ({"lnsr": LNSRConfig(noise=TokenwiseNoise(), weight=weight)} if method == "lnsr" else
              {"method": "l2sp", "method_args": {"alpha": weight, "beta": weight}})
    trainer = LNSRTrainer(model=model, args=args, train_dataset=rows, **kwargs)
    if accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    return flat(model) - before


def ratio_of(task_a: torch.Tensor, task_b: torch.Tensor) -> float:
    """c with task_a ≈ c · task_b (checked)."""
    c = float(task_a @ task_b / (task_b @ task_b))
    torch.testing.assert_close(task_a, c * task_b, rtol=1e-3, atol=1e-6)
    return c


@pytest.mark.parametrize("method", ["lnsr", "l2sp"])
@pytest.mark.parametrize("model_fn,lm,accepts,c", [
    (classifier, False, True, 2.0),    # BERT classification ignores num_items_in_batch: HF's task update doubles
    (classifier, False, False, 1.0),   # the Trainer divides by the accumulation steps itself
    (causal_lm, True, True, 1.0),      # a causal LM divides by num_items_in_batch
], ids=["classifier", "classifier-no-loss-kwargs", "causal-lm"])
def test_the_penalty_keeps_its_ratio_to_the_task_loss_under_accumulation(tmp_path, method, model_fn, lm, accepts, c):
    """One SGD step on 8 rows, as 1 × 8 and as 2 × 4: the task update scales by c (1, or 2 where the Trainer
    sums the micro-batch means of a model that ignores num_items_in_batch) and the penalty's update by the same
    c, so λ means the same thing however the batch is split. Same-length rows, a token-wise noise and dropout
    off make both see the same penalty."""
    rows = dataset(8, padded=False, lm=lm)
    make = (lambda: model_fn(dropout=0.0))
    updates = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        task = sgd_update(tmp_path, make, rows, batch, accumulation, 0.0, accepts, method)
        updates[batch] = task, sgd_update(tmp_path, make, rows, batch, accumulation, 0.5, accepts, method) - task
    (task_8, penalty_8), (task_4, penalty_4) = updates[8], updates[4]
    assert penalty_8.norm() > 1e-4, "the penalty changed nothing: the test would not see a wrong scale"
    assert ratio_of(task_4, task_8) == pytest.approx(c, rel=1e-3)
    torch.testing.assert_close(penalty_4, c * penalty_8, rtol=1e-3, atol=1e-6)


def test_gradient_accumulation_matches_one_large_batch_causal_lm(tmp_path):
    """A causal LM (its loss normalised by `num_items_in_batch`): 2 × batch 4 and 1 × batch 8 train to the
    same weights in 3 SGD steps, task loss and penalty together (token-wise noise, dropout off)."""
    rows = dataset(16, padded=False, lm=True)
    finals = []
    for batch, accumulation in ((4, 2), (8, 1)):
        model = causal_lm()
        args = training_args(tmp_path / f"b{batch}", optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        noise = TokenwiseNoise()
        trainer = LNSRTrainer(model=model, args=args, train_dataset=rows, lnsr=LNSRConfig(noise=noise))
        trainer.train()
        assert noise.step == 3 * accumulation
        assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))
        finals.append(flat(model))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


# ---- LNSRTrainer, PEFT, TRL, checkpoints ---------------------------------------------------------------

def test_peft_lora_trains_only_adapters_and_head(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(classifier(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                              r=4, lora_alpha=8))
    before = params(model)
    trainer = LNSRTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(),
                          lnsr=LNSRConfig(noise="in_manifold"))
    assert trainer.handle.kind == "sequence_classification"
    trainer.train()
    assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))
    changed = {k for k, v in params(model).items() if not torch.equal(v, before[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("lora_" in k or "modules_to_save" in k for k in changed), changed
    assert any("lora_B" in k for k in changed) and any("modules_to_save" in k for k in changed)


def test_trl_sft_trainer_trains_with_lnsr(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1},
                                                                                    unk_token="[UNK]")),
                                        pad_token="[PAD]", unk_token="[UNK]", eos_token="[UNK]")
    from transformers.loss.loss_utils import ForCausalLMLoss

    def causal_lm_loss(outputs, labels, num_items_in_batch=None):
        return ForCausalLMLoss(outputs.logits, labels, VOCAB, num_items_in_batch=num_items_in_batch)

    rows = datasets.Dataset.from_list([{"input_ids": r["input_ids"][:int(r["attention_mask"].sum())].tolist()}
                                       for r in dataset(16)])
    finals = {}
    for weight in (0.0, 1.0):
        model = causal_lm()
        handle = lf.apply(model, LNSRConfig(noise="in_manifold", k=4, weight=weight))
        handle.labels_outside = True   # SFTTrainer computes the task loss from the logits itself
        args = trl.SFTConfig(output_dir=str(tmp_path / str(weight)), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                 compute_loss_func=lf.with_penalty(causal_lm_loss), callbacks=[LNSRCallback()])
        trainer.train()
        logs = train_logs(trainer)
        assert len(logs) == 2 and handle.noise.step == 4
        assert all(e["lnsr_penalty"] > 0 for e in logs) or weight == 0
        finals[weight] = flat(model)
    assert (finals[1.0] - finals[0.0]).abs().max() > 1e-5   # the penalty reached the gradients


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("noise", ["gaussian", "in_manifold"])
@pytest.mark.parametrize("trainer_kind", ["LNSRTrainer", "Trainer"])
def test_resume_from_checkpoint_draws_the_same_noise(tmp_path, noise, trainer_kind):
    """5 steps straight vs 2 steps, checkpoint, and 3 more in a fresh trainer and a differently initialised
    model: identical weights and sampler state. Dropout on (the Trainer restores the RNG that draws the paired
    masks); 2 micro-batches per step, so the resume lands mid-epoch; the neighbour table is rebuilt every 2
    optimizer steps, so its state matters too. LNSRTrainer resumes from another folder; a plain Trainer with
    LNSRCallback finds the sampler state in its own output folder."""
    cfg = LNSRConfig(noise=noise, refresh_every=2 if noise == "in_manifold" else None, seed=0)
    kwargs = dict(max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3,
                  save_strategy="steps", save_steps=2)

    def make(seed, folder, **extra):
        model = classifier(seed)
        if trainer_kind == "LNSRTrainer":
            return LNSRTrainer(model=model, args=training_args(folder, **kwargs), train_dataset=dataset(12),
                               lnsr=cfg, **extra)
        lf.apply(model, cfg)
        return Trainer(model=model, args=training_args(folder, **kwargs), train_dataset=dataset(12),
                       callbacks=[LNSRCallback(), *extra.get("callbacks", [])])

    straight = make(0, tmp_path / "straight")
    straight.train()
    interrupted = make(0, tmp_path / "first", callbacks=[_StopAt(2)])
    interrupted.train()
    checkpoint = tmp_path / "first" / "checkpoint-2"
    assert (checkpoint / NOISE_STATE_NAME.format(rank=0)).is_file()
    assert lf.handle_of(interrupted.model).noise.step == 4
    resumed = make(1, tmp_path / ("resumed" if trainer_kind == "LNSRTrainer" else "first"))
    resumed.train(resume_from_checkpoint=str(checkpoint))

    final, expected = params(resumed.model), params(straight.model)
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    a, b = lf.handle_of(straight.model).state_dict(), lf.handle_of(resumed.model).state_dict()
    assert a["step"] == b["step"] == 10 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    steps = {e["step"]: e for e in train_logs(straight)}   # the resumed run's logs continue the straight run's
    for e in train_logs(resumed):
        assert e["lnsr_penalty"] == pytest.approx(steps[e["step"]]["lnsr_penalty"], rel=1e-5)


def test_without_a_method_lnsr_trainer_is_plain_trainer(tmp_path):
    """lnsr=None is plain fine-tuning: the same weights as transformers.Trainer from the same seed, dropout on."""
    plain_model, ft_model = classifier(0), classifier(0)
    Trainer(model=plain_model, args=training_args(tmp_path / "plain", gradient_accumulation_steps=2),
            train_dataset=dataset()).train()
    ft = LNSRTrainer(model=ft_model, args=training_args(tmp_path / "ft", gradient_accumulation_steps=2),
                     train_dataset=dataset(), lnsr=None)
    ft.train()
    assert ft.handle is None and "forward" not in vars(ft_model)
    for (k, a), b in zip(plain_model.named_parameters(), ft_model.parameters()):
        assert torch.equal(a, b), k


def test_model_init_gets_its_own_method(tmp_path):
    """With `model_init` the Trainer builds a new model in train(); the method is applied to it, with a fresh
    sampler."""
    trainer = LNSRTrainer(model_init=lambda: classifier(0), args=training_args(tmp_path), train_dataset=dataset(),
                          lnsr=LNSRConfig(noise="in_manifold"))
    first = trainer.handle
    trainer.train()
    assert trainer.handle is not first and trainer.handle.model is trainer.model
    assert trainer.handle.noise.step == 3 and first.noise.step == 0
    assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))


def test_evaluation_uses_the_plain_loss(tmp_path):
    """evaluate() runs the model in eval mode: no noise drawn, the same eval_loss as plain Trainer."""
    eval_rows = dataset(8, seed=1)
    args = training_args(tmp_path, per_device_eval_batch_size=4)
    lnsr = LNSRTrainer(model=classifier(0), args=args, lnsr=LNSRConfig(noise="gaussian"))
    plain = Trainer(model=classifier(0), args=args)
    assert lnsr.evaluate(eval_rows)["eval_loss"] == pytest.approx(plain.evaluate(eval_rows)["eval_loss"], rel=1e-6)
    assert lnsr.handle.noise.step == 0


def test_lnsr_trainer_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="lnsr must be an LNSRConfig"):
        LNSRTrainer(model=classifier(), args=training_args(tmp_path), lnsr={"noise": "gaussian"})
    model = classifier()
    lf.apply(model)
    with pytest.raises(ValueError, match="already has a method applied"):
        LNSRTrainer(model=model, args=training_args(tmp_path), lnsr=LNSRConfig())


# ---- torch.compile ------------------------------------------------------------------------------------

def test_torch_compile_under_the_trainer_makes_the_plain_models_graphs(tmp_path):
    """20 steps of a compiled model with dropout 0.1 under the Trainer: LNSR (either noise) makes as many graphs
    and graph breaks as the plain model, and never recompiles more than it (no recompile limit)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    results = {}
    for name, cfg in (("plain", None), ("gaussian", LNSRConfig(noise="gaussian")),
                      ("in_manifold", LNSRConfig(noise="in_manifold", k=4))):
        dynamo.reset()
        counters.clear()
        args = training_args(tmp_path / name, max_steps=20, logging_steps=5, torch_compile=True,
                             torch_compile_backend="aot_eager")
        trainer = LNSRTrainer(model=classifier(), args=args, train_dataset=dataset(80), lnsr=cfg)
        trainer.train()
        results[name] = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()),
                         sum(counters["recompiles"].values()) if "recompiles" in counters else 0)
        if cfg is not None:
            assert all(e["lnsr_penalty"] > 0 for e in train_logs(trainer))
    assert results["gaussian"][:2] == results["in_manifold"][:2] == results["plain"][:2], results


# ---- DDP and FSDP2 on gloo -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, outdir, *args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / script), str(outdir), *args]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after 300 s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_ddp_ranks_draw_different_noise_stay_in_sync_and_keep_the_ratio(tmp_path):
    """torchrun, 2 CPU processes, gloo: each rank draws its own noise, gradients are all-reduced (identical
    weights on both ranks), the logged task_loss / lnsr_penalty are reduced across ranks, each rank saves its
    sampler state in the checkpoint, resuming from it reproduces the uninterrupted run, and 2 ranks × 4 rows
    move the penalty and the task loss in the same ratio as 1 × 8."""
    torchrun("ddp_worker.py", tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # Different noise on the two ranks: in training (where their batches differ too) and for one input that
    # both ranks gave their sampler in the same state.
    assert r0["eps"].abs().sum() > 0 and r1["eps"].abs().sum() > 0
    assert r0["eps"].shape == r1["eps"].shape and not torch.allclose(r0["eps"], r1["eps"])
    assert r0["probe"].abs().sum() > 0 and not torch.allclose(r0["probe"], r1["probe"])
    for k, v in r0["state"].items():   # one model: the all-reduce kept the ranks identical
        assert torch.equal(v, r1["state"][k]), k
    logs0, logs1 = ([e for e in r["logs"] if "loss" in e] for r in (r0, r1))
    assert len(logs0) == 2 and all(e["lnsr_penalty"] > 0 for e in logs0)
    for a, b in zip(logs0, logs1):
        assert (a["task_loss"], a["lnsr_penalty"]) == (b["task_loss"], b["lnsr_penalty"])
    for r in (0, 1):   # one sampler file per rank; resuming from step 2 reproduces steps 3–4 exactly
        assert (tmp_path / "run" / "checkpoint-2" / NOISE_STATE_NAME.format(rank=r)).is_file()
    for state in (r0, r1):
        assert state["noise_state"]["step"] == state["resumed_noise_state"]["step"] == 4
        for k, v in state["state"].items():
            torch.testing.assert_close(state["resumed_state"][k], v, rtol=0, atol=1e-6)
    # 2 ranks × 4: BERT classification ignores num_items_in_batch, so HF's task update is ranks × the 1 × 8 one
    # (average_tokens_across_devices); the penalty's scales with it.
    import ddp_worker
    rows = ddp_worker.dataset(8, padded=False)
    task_8 = sgd_update(tmp_path, lambda: ddp_worker.tiny_model(0, dropout=0.0), rows, 8, 1, 0.0)
    penalty_8 = sgd_update(tmp_path, lambda: ddp_worker.tiny_model(0, dropout=0.0), rows, 8, 1, 0.5) - task_8
    c = ratio_of(r0["task_update"], task_8)
    assert c == pytest.approx(2.0, rel=1e-3)
    torch.testing.assert_close(r0["penalty_update"], c * penalty_8, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("noise", ["tokenwise", "in_manifold"])
def test_fsdp2_fully_shard_on_two_gloo_ranks(tmp_path, noise):
    """FSDP2 `fully_shard` of every layer and the root, after `apply`, 2 CPU ranks × 4 rows, 2 SGD steps: the
    model embeds through its sharded embedding (in-manifold noise gathers from the unsharded weight), and with a
    token-wise noise and dropout off the weights are those of 1 × 8 rows in one process."""
    torchrun("fsdp_worker.py", tmp_path, noise)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    assert len(sharded["penalties"]) == 2 and all(p > 0 for p in sharded["penalties"])
    if noise == "tokenwise":
        import fsdp_worker
        for k, v in fsdp_worker.train(noise, world_size=1).state_dict().items():
            torch.testing.assert_close(sharded["state"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    else:
        assert all(torch.isfinite(v).all() for v in sharded["state"].values())


def test_a_pass_around_the_regularised_forward_is_reported(tmp_path):
    """Code that runs the model's backbone directly (TRL's fused LM head does) bypasses the method: one warning."""
    model = classifier()
    lf.apply(model, LNSRConfig(noise="gaussian"))
    batch = dataset(4)[0]
    with pytest.warns(UserWarning, match="outside its regularised forward"):
        model.bert(input_ids=batch["input_ids"][None], attention_mask=batch["attention_mask"][None])
