"""Worker for tests/test_trainer.py::test_ddp_ranks_draw_different_noise_stay_in_sync_and_keep_the_ratio (run under
torchrun, gloo, CPU).

usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUTDIR

Each process trains a tiny BERT classifier with LNSRTrainer for 4 steps (checkpoint at step 2), then resumes a
fresh model from that checkpoint in a second trainer; then, for the batching test, one SGD step on its 4 of 8
rows with a token-wise noise at weight 0 and 0.5. It saves to OUTDIR/rank{r}.pt: the noise its first step
added (read off the word embeddings of the doubled pass), what its sampler draws for one fixed input shared by
the ranks, the final weights of both runs, the log history, the sampler state and the two SGD updates.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from families import TokenwiseNoise  # noqa: E402
from lnsr_fast import LNSRConfig, LNSRTrainer  # noqa: E402
from lnsr_fast.regularize import word_embeddings  # noqa: E402

STEPS, SAVE_AT = 4, 2


def tiny_model(seed: int, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def dataset(n: int = 32, length: int = 10, padded: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        real = int(torch.randint(4, length + 1, (1,), generator=g)) if padded else length
        ids = torch.zeros(length, dtype=torch.long)
        ids[:real] = torch.randint(1, 128, (real,), generator=g)
        mask = (torch.arange(length) < real).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 2)})
    return rows


def args(output_dir: Path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(output_dir), use_cpu=True, ddp_backend="gloo", report_to=[],
                    per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3, logging_steps=2,
                    save_strategy="steps", save_steps=SAVE_AT, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kwargs})


def make_trainer(model, output_dir: Path) -> LNSRTrainer:
    return LNSRTrainer(model=model, args=args(output_dir), train_dataset=dataset(),
                       lnsr=LNSRConfig(noise="in_manifold"))


def sgd_update(outdir: Path, weight: float) -> torch.Tensor:
    """As tests/test_trainer.py::sgd_update: one SGD step on this rank's 4 of 8 unpadded rows."""
    model = tiny_model(0, dropout=0.0)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    LNSRTrainer(model=model, args=args(outdir / f"sgd-{weight}", optim="sgd", learning_rate=0.5, max_steps=1,
                                       max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no"),
                train_dataset=dataset(8, padded=False), lnsr=LNSRConfig(noise=TokenwiseNoise(), weight=weight)).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def main(outdir: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_model(0)
    trainer = make_trainer(model, outdir / "run")
    rank = trainer.args.process_index
    first = {}

    def record(module, args, output):   # registered after apply: the doubled pass's perturbed word embeddings
        if "eps" not in first and output.shape[0] == 8:
            first["eps"] = (output[4:] - output[:4]).detach().clone()

    # What the sampler would draw first for one fixed input, the same on every rank.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 6), generator=g)
    probe = copy.deepcopy(trainer.handle.noise)(ids, model.get_input_embeddings()(ids).detach(), torch.ones_like(ids))

    hook = word_embeddings(model).register_forward_hook(record)
    trainer.train()
    hook.remove()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    noise_state = trainer.handle.noise.state_dict()

    resumed_model = tiny_model(1)   # other initial weights: the checkpoint must supply them
    resumed = make_trainer(resumed_model, outdir / "resumed")
    resumed.train(resume_from_checkpoint=str(outdir / "run" / f"checkpoint-{SAVE_AT}"))

    task_update = sgd_update(outdir, 0.0)
    torch.save({
        "world_size": trainer.args.world_size,
        "eps": first["eps"],
        "probe": probe,
        "state": final,
        "resumed_state": {k: v.detach().clone() for k, v in resumed_model.state_dict().items()},
        "logs": trainer.state.log_history,
        "noise_state": noise_state,
        "resumed_noise_state": resumed.handle.noise.state_dict(),
        "task_update": task_update,
        "penalty_update": sgd_update(outdir, 0.5) - task_update,
    }, outdir / f"rank{rank}.pt")


def end_rank() -> None:
    """The end of a torchrun worker whose results are saved (this one and fsdp_worker.py): close the gloo group
    while every rank lives, then skip the interpreter's teardown. Left to the teardown, a rank aborted after its
    work was done ("terminate called without an active exception"), once in CI for each worker: this one before
    it closed the group, fsdp_worker.py after."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
    end_rank()
