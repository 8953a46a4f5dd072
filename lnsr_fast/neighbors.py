"""Neighbour tables for in-manifold noise: the k nearest vocabulary rows of every vocabulary row.

Built once (and on `refresh_every`), so that each training step only gathers rows (DESIGN.md §2).
Both builders are exact: an fp32 search proposes a few extra candidates, whose distances are then
recomputed in float64 and sorted (ties broken by index), so the torch and faiss tables agree.
"""
from __future__ import annotations

import logging
import math
import time

import torch

logger = logging.getLogger(__name__)

KNN_BACKENDS = ("auto", "torch", "faiss")
# Extra candidates searched in fp32 so that rounding cannot push a true neighbour out of the top k.
_CANDIDATE_MARGIN = 8


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


def build_neighbor_table(weight: torch.Tensor, k: int, backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """The k nearest (Euclidean) rows of every row of `weight`, as an int32 tensor [V, k] on weight's device.

    A row's own index and exact duplicates of it are excluded; neighbours are sorted by distance, ties
    by index. backend: "torch" (chunked matmul + top-k on the weight's device), "faiss" (IndexFlatL2
    on the CPU; needs `pip install lnsr_fast[faiss]`) or "auto" (faiss when installed and the weight
    is on the CPU, else torch).
    """
    check_embedding_matrix(weight)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if backend not in KNN_BACKENDS:
        raise ValueError(f"knn_backend must be one of {KNN_BACKENDS}, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("knn_backend='faiss' but faiss is not installed (pip install 'lnsr_fast[faiss]')")
    if backend == "auto":
        backend = "faiss" if weight.device.type == "cpu" and faiss_available() else "torch"
    vocab = weight.shape[0]
    if not 1 <= k < vocab:
        raise ValueError(f"k must satisfy 1 <= k < vocabulary size ({vocab}), got {k}")

    start = time.perf_counter()
    w = weight.detach().float()
    # Exact duplicates are not neighbours: search among distinct rows, then map back.
    uniq, inverse = torch.unique(w, dim=0, return_inverse=True)
    n_uniq = uniq.shape[0]
    if k >= n_uniq:
        raise ValueError(f"k={k} but the embedding has only {n_uniq} distinct rows; k must be < {n_uniq}")
    m = min(k + _CANDIDATE_MARGIN, n_uniq - 1)
    cand = _faiss_candidates(uniq, m) if backend == "faiss" else _torch_candidates(uniq, m, chunk_size)
    table_uniq = _exact_top_k(uniq, cand.to(w.device), k)
    # Each distinct row stands for its lowest original index.
    first = torch.full((n_uniq,), vocab, dtype=torch.long, device=w.device)
    first.scatter_reduce_(0, inverse, torch.arange(vocab, device=w.device), reduce="amin")
    table = first[table_uniq][inverse].to(torch.int32)
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

    data = uniq.cpu().numpy()
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    _, idx = index.search(data, m + 1)
    idx = torch.from_numpy(idx).long()
    # Drop each row's own index wherever it landed (rows are distinct, so it is at distance 0).
    own = idx == torch.arange(idx.shape[0])[:, None]
    own[:, -1] |= ~own.any(1)
    return idx[~own].view(idx.shape[0], m)


def _exact_top_k(uniq: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """Re-rank candidate neighbours by float64 distance, ties by index; keep the first k."""
    out = torch.empty(cand.shape[0], k, dtype=torch.long, device=cand.device)
    step = max(1, (32 * 2**20) // (cand.shape[1] * uniq.shape[1] * 8))
    for s in range(0, cand.shape[0], step):
        c = cand[s:s + step]
        d = (uniq[c].double() - uniq[s:s + step, None].double()).pow(2).sum(-1)
        c_sorted, order = c.sort(dim=1)  # a stable sort by distance after this gives index tie-breaking
        d = d.gather(1, order)
        pos = d.sort(dim=1, stable=True).indices[:, :k]
        out[s:s + step] = c_sorted.gather(1, pos)
    return out
