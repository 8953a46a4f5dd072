"""pytest-benchmark timings of the LNSR step's parts at CPU sizes (`make bench-quick`): the noise
samplers, the stability penalty forward + backward, and a tiny-BERT training step of every method.
The cases are the quick ones of bench_noise.py, bench_stability.py and bench_step.py. Not part of
`make test` (pyproject's testpaths is tests/)."""
import pytest
import torch

import lnsr_fast as lf
from bench_noise import QUICK_SIZES as NOISE_SIZES, noise_variants
from bench_stability import QUICK_SIZES as STABILITY_SIZES, forward_backward, stability_inputs, stability_variants
from bench_step import QUICK_SIZES as STEP_SIZES, make_batch, make_step, method_cases
from common import kernel_backends
from render import SPECS, label

DEVICE = torch.device("cpu")
BACKENDS = kernel_backends(DEVICE)
K = 10


def _noise_variants():
    (vocab, dim), = NOISE_SIZES.values()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, dim, generator=gen)
    ids = torch.randint(0, vocab, (512,), generator=gen)
    return noise_variants(weight, lf.build_neighbor_table(weight, K, backend="torch"), ids, weight[ids], K, BACKENDS)


NOISE = _noise_variants()
STABILITY_INPUTS = stability_inputs(*next(iter(STABILITY_SIZES.values())), batch=4, seq=24, dtype=torch.float32,
                                    device=DEVICE)
STABILITY = stability_variants(BACKENDS)


def _step_cases():
    from lnsr_fast.methods import METHODS
    return method_cases(list(METHODS))


@pytest.mark.parametrize("variant", list(NOISE))
def test_noise(benchmark, variant):
    benchmark(NOISE[variant])


@pytest.mark.parametrize("variant", list(STABILITY))
def test_stability_forward_backward(benchmark, variant):
    benchmark(forward_backward, STABILITY[variant], *STABILITY_INPUTS)


@pytest.mark.parametrize("case", _step_cases(), ids=lambda c: label(c, SPECS["step"]["rows"]).replace(" ", "-"))
def test_training_step(benchmark, case):
    from transformers import BertConfig

    config = BertConfig(**next(iter(STEP_SIZES.values())))
    step, method = make_step(config, case, make_batch(config, 4, 16, DEVICE), DEVICE, amp=False)
    try:
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    finally:
        method.remove()
