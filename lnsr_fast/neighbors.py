"""Neighbour tables for in-manifold noise: the k nearest vocabulary rows of every vocabulary row.

Built once (and on `refresh_every`), so that each training step only gathers rows (docs/design.md §2).
Both builders are exact: an fp32 search proposes a few extra candidates, whose distances are then
recomputed in float64 and sorted (ties broken by index), so the torch and faiss tables agree.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict

import torch

from .checks import check_choice, is_int

logger = logging.getLogger(__name__)

KNN_BACKENDS = ("auto", "torch", "faiss")
# Extra candidates searched in fp32 so that rounding cannot push a true neighbour out of the top k.
_CANDIDATE_MARGIN = 8
# Tables built in this process, by the embedding's content: a run that fine-tunes the same pretrained
# model several times (seeds, methods) searches once. Small: one entry is V·k int32.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 4


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def check_embedding_matrix(weight: torch.Tensor, name: str = "embedding") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be an nn.Embedding or a [vocab, dim] tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a [vocab, dim] matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {weight.dtype}")
    bad = ~torch.isfinite(weight).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN/Inf values in {int(bad.sum())} rows (first: {rows}); "
                         "cannot build a neighbour table")


def fingerprint(weight: torch.Tensor) -> str:
    """A digest of `weight` computed on its device: every row projected in float64 on two fixed random
    directions, then hashed: a [V, d] × [d, 2] product where the matrix lives instead of a copy to the
    CPU and a hash of all its bytes (for 50,265 × 1024 on 2 CPU cores: 148 ms against 208 ms; on a GPU
    the copy and the hash alone would exceed the whole table build, 86 ms on an H100). Two matrices share
    a digest only if every row differs orthogonally to both directions; a one-ulp change of one fp32
    entry moves its row's projection by millions of float64 ulps."""
    directions = torch.randn(weight.shape[1], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions = directions.to(weight.device)
    projections = torch.cat([rows.double() @ directions for rows in weight.split(8192)])
    return hashlib.sha1(projections.cpu().numpy().tobytes()).hexdigest()


def build_neighbor_table(weight: torch.Tensor, k: int, backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """The k nearest (Euclidean) rows of every row of `weight`, as an int32 tensor [V, k] on weight's device.

    A row's own index and exact duplicates of it are excluded; neighbours are sorted by distance, ties
    by index. backend: "torch" (chunked matmul + top-k on the weight's device), "faiss" (IndexFlatL2
    on the CPU; needs `pip install lnsr_fast[faiss]`) or "auto" (faiss when installed and the weight
    is on the CPU, else torch). Tables are remembered per embedding content, so building the same
    one again in the same process costs one hash of the matrix.
    """
    check_embedding_matrix(weight)
    if not is_int(k):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    check_choice("knn_backend", backend, KNN_BACKENDS)
    if backend == "faiss" and not faiss_available():
        raise ValueError("knn_backend='faiss' but faiss is not installed (pip install 'lnsr_fast[faiss]')")
    if backend == "auto":
        backend = "faiss" if weight.device.type == "cpu" and faiss_available() else "torch"
    vocab = weight.shape[0]
    if not 1 <= k < vocab:
        raise ValueError(f"k must satisfy 1 <= k < vocabulary size ({vocab}), got {k}")

    # float64 stays float64 (rows that differ only below fp32 precision are not duplicates); others fp32.
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    # The builder and chunking are part of the key although the tables agree: each stays its own
    # computation, so comparing them (tests, benchmarks) never compares a table with itself.
    key = (fingerprint(w), tuple(w.shape), w.dtype, k, backend, chunk_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].to(weight.device, copy=True)
    logger.info("building the %d-nearest-neighbour table of %d x %d embeddings (%s)...", k, vocab, w.shape[1], backend)
    start = time.perf_counter()
    # Exact duplicates are not neighbours: search among distinct rows, then map back.
    uniq, inverse = torch.unique(w, dim=0, return_inverse=True)
    n_uniq = uniq.shape[0]
    if k >= n_uniq:
        raise ValueError(f"k={k} but the embedding has only {n_uniq} distinct rows; k must be < {n_uniq}")
    m = min(k + _CANDIDATE_MARGIN, n_uniq - 1)
    # The fp32 search uses ‖a‖² − 2a·b + ‖b‖²: centre the rows first (distances do not change), or a
    # common offset much larger than the spread cancels every digit of the distances.
    centred = (uniq.double() - uniq.double().mean(0)).to(uniq.dtype)
    cand = _faiss_candidates(centred, m) if backend == "faiss" else _torch_candidates(centred, m, chunk_size)
    # Each distinct row stands for its lowest original index (torch.unique sorts rows lexicographically,
    # so ties must be broken by this original index, not by the position in `uniq`).
    first = torch.full((n_uniq,), vocab, dtype=torch.long, device=w.device)
    first.scatter_reduce_(0, inverse, torch.arange(vocab, device=w.device), reduce="amin")
    table_uniq = _exact_top_k(uniq, cand.to(w.device), k, first)
    table = first[table_uniq][inverse].to(torch.int32)
    _CACHE[key] = table.clone()
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    logger.info("neighbour table %d x %d (%s, %d distinct rows) built in %.2f s", vocab, k, backend, n_uniq,
                time.perf_counter() - start)
    return table


def _torch_candidates(uniq: torch.Tensor, m: int, chunk_size: int | None) -> torch.Tensor:
    n = uniq.shape[0]
    if chunk_size is None:  # keep one [chunk, n] fp32 distance block near 256 MB
        chunk_size = max(1, min(n, (64 * 2**20) // n))
    sq = uniq.pow(2).sum(1)
    out = torch.empty(n, m, dtype=torch.long, device=uniq.device)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        dist = sq[s:e, None] - 2 * uniq[s:e] @ uniq.T + sq[None, :]
        dist[torch.arange(e - s, device=uniq.device), torch.arange(s, e, device=uniq.device)] = math.inf
        out[s:e] = dist.topk(m, dim=1, largest=False).indices
    return out


def _faiss_candidates(uniq: torch.Tensor, m: int) -> torch.Tensor:
    import faiss

    data = uniq.cpu().float().numpy()
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    _, idx = index.search(data, m + 1)
    idx = torch.from_numpy(idx).long()
    # Drop each row's own index wherever it landed (rows are distinct, so it is at distance 0).
    own = idx == torch.arange(idx.shape[0])[:, None]
    own[:, -1] |= ~own.any(1)
    return idx[~own].view(idx.shape[0], m)


def _exact_top_k(uniq: torch.Tensor, cand: torch.Tensor, k: int, key: torch.Tensor) -> torch.Tensor:
    """Re-rank candidate neighbours by float64 distance, ties by `key` (original index); keep the first k.

    A row whose k-th distance equals its farthest candidate's may have tied rows that the search did
    not propose (many equidistant rows): it is re-ranked against every row.
    """
    n = uniq.shape[0]
    out = torch.empty(cand.shape[0], k, dtype=torch.long, device=cand.device)
    step = max(1, (32 * 2**20) // (cand.shape[1] * uniq.shape[1] * 8))
    for s in range(0, cand.shape[0], step):
        c = cand[s:s + step]
        d = (uniq[c].double() - uniq[s:s + step, None].double()).pow(2).sum(-1)
        out[s:s + step], d_sorted = _rank(c, d, key, k)
        if c.shape[1] < n - 1:
            for i in (s + (d_sorted[:, k - 1] == d_sorted[:, -1]).nonzero().flatten()).tolist():
                others = torch.cat([torch.arange(i, device=c.device), torch.arange(i + 1, n, device=c.device)])
                d_all = (uniq[others].double() - uniq[i].double()).pow(2).sum(-1)
                out[i] = _rank(others[None], d_all[None], key, k)[0][0]
    return out


def _rank(c: torch.Tensor, d: torch.Tensor, key: torch.Tensor, k: int):
    """Sort candidates c [n, m] by distance d [n, m], ties by key[c]; the first k and the sorted distances."""
    order = key[c].argsort(dim=1)
    c, d = c.gather(1, order), d.gather(1, order)
    d_sorted, pos = d.sort(dim=1, stable=True)  # stable: equal distances keep the key order
    return c.gather(1, pos[:, :k]), d_sorted
