"""Neighbour tables (lnsr_fast/neighbors.py) against an independent brute-force exact kNN."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lnsr_fast import neighbors
from lnsr_fast.neighbors import build_neighbor_table, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]


@pytest.fixture(autouse=True)
def _no_table_cache():
    """Every test builds its tables (the module may remember tables by content)."""
    cache = getattr(neighbors, "_CACHE", None)
    if cache is not None:
        cache.clear()
    yield
    if cache is not None:
        cache.clear()


def brute_force_knn(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Exact kNN in float64 by full pairwise distances, written independently of the library.

    Row i itself and every exact duplicate of row i are excluded; a group of identical rows is
    represented by its lowest index; neighbours are sorted by distance, ties by index.
    """
    w = weight.detach().double()
    v = w.shape[0]
    d2 = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)  # [V, V], no ‖a‖²−2ab+‖b‖² shortcut
    same = (w[:, None, :] == w[None, :, :]).all(-1)  # same[i, j]: rows i and j identical
    idx = torch.arange(v)
    lowest_twin = torch.where(same, idx[None, :], v).min(dim=1).values  # lowest index identical to row j
    representative = lowest_twin == idx
    invalid = same | ~representative[None, :]
    d2 = d2.masked_fill(invalid, math.inf)
    order = torch.sort(d2, dim=1, stable=True).indices  # stable over j ascending: ties by index
    out = order[:, :k]
    assert torch.isfinite(d2.gather(1, out)).all(), "oracle asked for more neighbours than distinct rows"
    return out


def random_vocab(v=257, d=33, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("k", [1, 5, 16])
def test_torch_table_equals_brute_force(k):
    w = random_vocab()
    table = build_neighbor_table(w, k, backend="torch")
    assert torch.equal(table.long(), brute_force_knn(w, k))


@needs_faiss
@pytest.mark.parametrize("k", [1, 5, 16])
def test_faiss_and_torch_tables_identical(k):
    w = random_vocab(seed=1)
    t_torch = build_neighbor_table(w, k, backend="torch")
    t_faiss = build_neighbor_table(w, k, backend="faiss")
    assert torch.equal(t_torch, t_faiss)
    assert torch.equal(build_neighbor_table(w, k, backend="auto"), t_torch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_offset_still_exact(backend):
    # Rows = a big shared vector + a small spread: the fp32 ‖a‖²−2ab+‖b‖² search loses every digit of
    # the distances unless the builder centres the rows first.
    g = torch.Generator().manual_seed(2)
    w = (100.0 + 1e-2 * torch.randn(257, 33, generator=g, dtype=torch.float64)).float()
    assert torch.equal(build_neighbor_table(w, 5, backend=backend).long(), brute_force_knn(w, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_duplicates_excluded(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 7, generator=g)
    pick = torch.randint(0, 40, (101,), generator=g)
    pick[:40] = torch.arange(40)  # every base row appears at least once, many more than once
    w = base[pick]
    k = 6
    table = build_neighbor_table(w, k, backend=backend).long()
    assert torch.equal(table, brute_force_knn(w, k))
    for i in range(w.shape[0]):
        row = table[i]
        assert i not in row.tolist()
        assert not (w[row] == w[i]).all(-1).any(), f"row {i} lists a duplicate of itself"
        assert len(set(row.tolist())) == k
        # Among identical rows only the lowest index is ever listed.
        for j in row.tolist():
            assert (pick[:j] != pick[j]).all(), f"row {i} lists {j}, which has a lower-index twin"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_broken_by_original_index(backend):
    # Integer rows: float64 squared distances are exact integers, so ties are real ties. torch.unique
    # sorts rows lexicographically, which must not leak into the tie order.
    w = torch.tensor([[0., 0.], [5., 5.], [1., 0.], [-1., 0.], [0., 1.], [0., -1.]])
    table = build_neighbor_table(w, 4, backend=backend).long()
    assert table[0].tolist() == [2, 3, 4, 5]
    assert table[1].tolist() == [2, 4, 0, 3]
    assert torch.equal(table, brute_force_knn(w, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_ties_than_candidates(backend):
    # One-hot rows: every pair is at the same distance, far more ties than the search's candidates.
    w = torch.eye(40)
    table = build_neighbor_table(w, 3, backend=backend).long()
    assert torch.equal(table, brute_force_knn(w, 3))
    assert table[0].tolist() == [1, 2, 3] and table[1].tolist() == [0, 2, 3]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v=st.integers(4, 40), d=st.integers(1, 5), levels=st.integers(2, 4), k=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_integer_grid_matches_brute_force(v, d, levels, k, seed):
    """Small integer vocabularies: many duplicates and exact ties, both backends, against the oracle."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, levels, (v, d), generator=g).float()
    n_distinct = torch.unique(w, dim=0).shape[0]
    if not k < n_distinct:
        with pytest.raises(ValueError, match="distinct" if k < v else "vocabulary"):
            build_neighbor_table(w, k, backend="torch")
        return
    expected = brute_force_knn(w, k)
    assert torch.equal(build_neighbor_table(w, k, backend="torch").long(), expected)
    if faiss_available():
        assert torch.equal(build_neighbor_table(w, k, backend="faiss").long(), expected)


# ----------------------------------------------------------------------------------------------- output

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_output_dtype_shape_device(dtype):
    w = random_vocab(v=65, d=9, dtype=dtype)
    table = build_neighbor_table(w, 4, backend="torch")
    assert table.dtype == torch.int32
    assert table.shape == (65, 4)
    assert table.device == w.device
    assert table.min() >= 0 and table.max() < 65
    assert torch.equal(table.long(), brute_force_knn(w, 4))


def test_parameter_with_grad_is_accepted_and_table_has_no_grad():
    w = torch.nn.Parameter(random_vocab(v=50, d=8))
    table = build_neighbor_table(w, 3, backend="torch")
    assert not table.requires_grad
    assert torch.equal(table.long(), brute_force_knn(w, 3))


def test_float64_rows_differing_below_fp32_precision_are_not_duplicates():
    w = random_vocab(v=20, d=4, dtype=torch.float64)
    w[1] = w[0] + 1e-12  # identical after rounding to fp32, distinct in float64
    table = build_neighbor_table(w, 2, backend="torch").long()
    assert table[0, 0] == 1 and table[1, 0] == 0
    assert torch.equal(table, brute_force_knn(w, 2))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunk_size_does_not_change_the_table(chunk_size):
    w = random_vocab(v=131, d=17, seed=4)
    expected = brute_force_knn(w, 5)
    assert torch.equal(build_neighbor_table(w, 5, backend="torch", chunk_size=chunk_size).long(), expected)


def test_small_chunks_really_run_many_chunks(monkeypatch):
    # Guard for the test above: a chunk size of 7 must cut the search into ceil(V/7) matmuls.
    calls = []
    real_topk = torch.Tensor.topk

    def counting_topk(self, *a, **kw):
        calls.append(self.shape[0])
        return real_topk(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "topk", counting_topk)
    w = random_vocab(v=50, d=5, seed=5)
    build_neighbor_table(w, 3, backend="torch", chunk_size=7)
    assert len(calls) == math.ceil(50 / 7) and max(calls) <= 7


def test_k_equal_to_distinct_minus_one_is_allowed():
    w = torch.tensor([[0.], [1.], [1.], [3.]])  # 3 distinct rows
    table = build_neighbor_table(w, 2, backend="torch").long()
    assert torch.equal(table, brute_force_knn(w, 2))
    assert table.tolist() == [[1, 3], [0, 3], [0, 3], [1, 0]]


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one(k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        build_neighbor_table(random_vocab(v=10, d=3), k, backend="torch")


@pytest.mark.parametrize("k", [10, 11])
def test_k_not_below_vocab(k):
    with pytest.raises(ValueError, match=r"\bk\b.*vocabulary"):
        build_neighbor_table(random_vocab(v=10, d=3), k, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_not_below_distinct_rows(backend):
    w = torch.tensor([[0., 0.], [1., 1.], [1., 1.], [0., 0.], [2., 0.]])  # 3 distinct rows, V=5
    with pytest.raises(ValueError, match=r"k=3.*distinct"):
        build_neighbor_table(w, 3, backend=backend)
    with pytest.raises(ValueError, match=r"k=4.*distinct"):
        build_neighbor_table(w, 4, backend=backend)


@pytest.mark.parametrize("k", [2.0, "2", True, None])
def test_k_not_int(k):
    with pytest.raises(TypeError, match=r"\bk\b"):
        build_neighbor_table(random_vocab(v=10, d=3), k, backend="torch")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embedding(bad):
    w = random_vocab(v=10, d=3)
    w[4, 1] = bad
    with pytest.raises(ValueError, match="embedding.*NaN/Inf"):
        build_neighbor_table(w, 2, backend="torch")


def test_unknown_backend():
    with pytest.raises(ValueError, match="knn_backend.*'annoy'"):
        build_neighbor_table(random_vocab(v=10, d=3), 2, backend="annoy")


def test_faiss_backend_without_faiss(monkeypatch):
    monkeypatch.setattr(neighbors, "faiss_available", lambda: False)
    with pytest.raises(ValueError, match="faiss"):
        build_neighbor_table(random_vocab(v=10, d=3), 2, backend="faiss")
    # auto falls back to torch
    w = random_vocab(v=10, d=3)
    assert torch.equal(build_neighbor_table(w, 2, backend="auto").long(), brute_force_knn(w, 2))


@pytest.mark.parametrize("w, exc, match", [
    ([[0.0, 1.0]], TypeError, "embedding"),
    (torch.zeros(5), ValueError, r"embedding.*\[vocab, dim\]"),
    (torch.zeros(2, 3, 4), ValueError, r"embedding.*\[vocab, dim\]"),
    (torch.arange(12).view(4, 3), TypeError, "embedding.*floating"),
])
def test_bad_matrix(w, exc, match):
    with pytest.raises(exc, match=match):
        build_neighbor_table(w, 1, backend="torch")


# ------------------------------------------------------------------------------------------ the table cache

def _builds(caplog, weight, k=3):
    """(table, whether build_neighbor_table built it rather than reusing a cached one)."""
    caplog.clear()
    with caplog.at_level("INFO", logger="lnsr_fast.neighbors"):
        table = build_neighbor_table(weight, k, backend="torch")
    return table, any("building the" in r.getMessage() for r in caplog.records)


def test_same_weights_reuse_the_table_and_any_change_rebuilds_it(caplog):
    w = torch.randn(50, 8)
    table, built = _builds(caplog, w)
    assert built
    again, built = _builds(caplog, w.clone())
    assert not built and torch.equal(again, table)
    again[0, 0] = -1  # the caller's copy, not the cache's
    assert torch.equal(_builds(caplog, w)[0], table)
    nudged = w.clone()
    nudged[17, 3] = torch.nextafter(nudged[17, 3], torch.tensor(math.inf))  # one ulp of one entry
    assert _builds(caplog, nudged)[1]
    swapped = w[torch.tensor([1, 0, *range(2, 50)])]  # the same rows in another order
    assert _builds(caplog, swapped)[1]


def test_fingerprint_is_stable_and_sees_the_smallest_change():
    w = torch.randn(300, 24, dtype=torch.bfloat16).float()
    assert neighbors.fingerprint(w) == neighbors.fingerprint(w.clone())
    for i, j in [(0, 0), (150, 11), (299, 23)]:
        nudged = w.clone()
        nudged[i, j] = torch.nextafter(nudged[i, j], torch.tensor(-math.inf))
        assert neighbors.fingerprint(nudged) != neighbors.fingerprint(w)
