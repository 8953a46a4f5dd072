"""Worker for tests/test_trainer.py::test_fsdp2_fully_shard_on_two_gloo_ranks (run under torchrun, gloo, CPU).

usage: python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUTDIR NOISE

Applies LNSR to a tiny BERT classifier, shards every layer and the root with FSDP2's `fully_shard`, trains 2 SGD
steps on its rank's 4 of 8 rows, and saves (rank 0) the full weights and the penalties to OUTDIR/fsdp.pt.
`train(noise, world_size=1)` is the same training on all 8 rows in one process, for the comparison.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import lnsr_fast as lf  # noqa: E402
from ddp_worker import end_rank  # noqa: E402
from families import TokenwiseNoise  # noqa: E402

ROWS, LENGTH, STEPS = 8, 10, 2


def batch(rank: int, world_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (ROWS, LENGTH), generator=g)
    mine = slice(rank * ROWS // world_size, (rank + 1) * ROWS // world_size)
    return {"input_ids": ids[mine], "attention_mask": torch.ones_like(ids[mine]),
            "labels": (torch.arange(ROWS) % 2)[mine]}


def train(noise: str, world_size: int, rank: int = 0, penalties: list | None = None):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    handle = lf.apply(model, lf.LNSRConfig(noise=TokenwiseNoise() if noise == "tokenwise" else noise, k=4, weight=1.0))
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(STEPS):
        model(**batch(rank, world_size)).loss.backward()   # FSDP2 averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        if penalties is not None:
            penalties.append(float(handle.last["lnsr_penalty"]))
    return model


def main(outdir: Path, noise: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    penalties: list[float] = []
    model = train(noise, dist.get_world_size(), dist.get_rank(), penalties)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save({"state": state, "penalties": penalties}, outdir / "fsdp.pt")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])
    end_rank()
