r"""Nearest-neighbour candidates at scale: pre-select training samples by feature similarity.

Exact attribution scores (representer points, influence) cost one pass over all ``n`` training
samples per query. For large ``n`` a nearest-neighbour index first picks the top-``M`` training
samples most similar to the query, and the exact score is computed on those candidates only.

Similarities (``metric``): ``ip`` :math:`h_i^\top h_x` (the representer kernel
:math:`k(i, x)` of Yeh et al., NeurIPS 2018), ``cosine``, or ``l2`` (negative squared distance,
so larger is always more similar).

Backends: FAISS (Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs", IEEE Trans.
Big Data 2019) when the optional ``faiss-cpu`` package is installed -- ``flat`` (exact) or ``ivf``
(inverted lists, approximate, ``nprobe`` of ``nlist`` lists searched) -- and a pure-torch chunked
brute force otherwise (exact; it streams over a :class:`~reweight.store.FeatureStore` too).
:func:`recall_at_k` measures an approximate result against the brute force.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch

from .errors import ConfigError, DataError
from .head import representer_values, softmax_residuals
from .store import FeatureStore, check_chunk_rows

__all__ = [
    "NeighborResult",
    "brute_force_knn",
    "faiss_available",
    "knn",
    "preselect_and_score",
    "recall_at_k",
    "representer_scores",
    "representer_top",
]

log = logging.getLogger(__name__)

Metric = Literal["ip", "cosine", "l2"]


@dataclass
class NeighborResult:
    """``scores`` and ``indices`` ``(q, k)``, most similar first, and the backend that produced them."""

    scores: torch.Tensor
    indices: torch.Tensor
    backend: str


def faiss_available() -> bool:
    """True when the optional ``faiss`` module imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _chunks(base, chunk_rows: int):
    if isinstance(base, FeatureStore):
        yield from base.chunks(chunk_rows)
    else:
        for lo in range(0, base.shape[0], chunk_rows):
            yield lo, min(base.shape[0], lo + chunk_rows), base[lo:lo + chunk_rows]


def _check(queries: torch.Tensor, base, k: int, metric: str) -> None:
    if metric not in ("ip", "cosine", "l2"):
        raise ConfigError(f"The 'metric' parameter of knn must be one of 'cosine', 'ip', 'l2'. Got {metric!r} instead.")
    if queries.ndim != 2 or len(tuple(base.shape)) != 2 or queries.shape[1] != base.shape[1]:
        raise DataError(f"Expected queries (q, d) and base (n, d) with the same d, but got {tuple(queries.shape)} "
                        f"and {tuple(base.shape)}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= base.shape[0]:
        raise ConfigError(f"The 'k' parameter of knn must be an int in 1..{base.shape[0]} (the base size). Got {k!r} instead.")


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    x = x.to(torch.float32) if x.dtype not in (torch.float32, torch.float64) else x
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def brute_force_knn(queries: torch.Tensor, base: torch.Tensor | FeatureStore, k: int, metric: Metric = "ip",
                    chunk_rows: int = 65536) -> NeighborResult:
    r"""Exact top-``k`` by similarity, streaming over ``base`` in chunks (running top-``k`` merge).

    Args:
        queries: ``(q, d)``.
        base: ``(n, d)`` tensor or :class:`~reweight.store.FeatureStore`.
        k: neighbours per query, ``1 <= k <= n``.
        metric: ``ip``, ``cosine`` or ``l2`` (similarity ``-||h_i - h_x||^2``).
        chunk_rows: rows of ``base`` per chunk.
    """
    _check(queries, base, k, metric)
    chunk_rows = check_chunk_rows(chunk_rows, "brute_force_knn")
    q = _prep(queries, metric)
    best_s = best_i = None
    for lo, hi, x in _chunks(base, chunk_rows):
        x = _prep(x.to(device=q.device, dtype=q.dtype), metric)
        s = q @ x.T
        if metric == "l2":
            s = 2 * s - (x * x).sum(1)[None, :] - (q * q).sum(1)[:, None]
        idx = torch.arange(lo, hi, device=s.device).expand(q.shape[0], -1)
        if best_s is not None:
            s, idx = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        kk = min(k, s.shape[1])
        best_s, pos = torch.topk(s, kk, dim=1)
        best_i = torch.gather(idx, 1, pos)
    return NeighborResult(best_s, best_i, "torch")


def _faiss_knn(queries, base, k, metric, index_type, nlist, nprobe, chunk_rows, seed) -> NeighborResult:
    import faiss

    d = queries.shape[1]
    n = base.shape[0]
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def arr(x):
        return np.ascontiguousarray(_prep(torch.as_tensor(x), metric).to(torch.float32).cpu().numpy())

    if index_type == "flat":
        index = faiss.IndexFlat(d, mt)
    else:
        nl = int(nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1)))
        index = faiss.IndexIVFFlat(faiss.IndexFlat(d, mt), d, nl, mt)
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, max(39 * nl, 10000)), replace=False))
        if isinstance(base, FeatureStore):
            train = np.concatenate([base.shard(i).numpy()[np.asarray(take[(take >= base.offsets[i]) & (take < base.offsets[i + 1])]
                                                                      - base.offsets[i])] for i in range(base.num_shards)])
        else:
            train = torch.as_tensor(base)[torch.as_tensor(take)].numpy()
        index.train(arr(torch.as_tensor(train)))
        index.nprobe = int(nprobe)
    for _, _, x in _chunks(base, chunk_rows):
        index.add(arr(x))
    dist, idx = index.search(arr(queries), k)
    scores = torch.from_numpy(dist)
    if metric == "l2":
        scores = -scores  # FAISS returns squared distances; similarities are their negatives
    return NeighborResult(scores, torch.from_numpy(idx).to(torch.int64), f"faiss-{index_type}")


def knn(queries: torch.Tensor, base: torch.Tensor | FeatureStore, k: int, metric: Metric = "ip",
        backend: Literal["auto", "faiss", "torch"] = "auto", index: Literal["flat", "ivf"] = "flat",
        nlist: Optional[int] = None, nprobe: int = 16, chunk_rows: int = 65536, seed: int = 0) -> NeighborResult:
    """Top-``k`` most similar base rows per query with FAISS when installed, else torch brute force.

    Args:
        queries, base, k, metric, chunk_rows: as in :func:`brute_force_knn`.
        backend: ``faiss`` (error if not installed), ``torch`` (exact brute force) or ``auto``
            (FAISS if installed, else torch; logged).
        index: FAISS index type: ``flat`` (exact) or ``ivf`` (approximate; ``nlist`` lists, default
            about ``4 sqrt(n)``; ``nprobe`` lists searched per query).
        seed: seed of the IVF training sample.

    Raises:
        ConfigError: for an unknown metric/backend/index, ``k`` out of range, ``chunk_rows < 1``, or
            ``backend='faiss'`` without the ``faiss-cpu`` package.
        DataError: for queries and base of different widths.
    """
    _check(queries, base, k, metric)
    chunk_rows = check_chunk_rows(chunk_rows, "knn")
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"The 'backend' parameter of knn must be one of 'auto', 'faiss', 'torch'. Got {backend!r} instead.")
    if index not in ("flat", "ivf"):
        raise ConfigError(f"The 'index' parameter of knn must be one of 'flat', 'ivf'. Got {index!r} instead.")
    if backend == "faiss" and not faiss_available():
        raise ConfigError("The 'backend' parameter of knn is 'faiss' but faiss is not installed. "
                          "Install the optional extra (pip install faiss-cpu) or use backend='torch'.")
    if backend == "torch" or (backend == "auto" and not faiss_available()):
        if backend == "auto":
            log.info("faiss is not installed: exact torch brute-force neighbours.")
        return brute_force_knn(queries, base, k, metric, chunk_rows)
    return _faiss_knn(queries, base, k, metric, index, nlist, nprobe, chunk_rows, seed)


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of ``|found_q ∩ exact_q| / k`` for ``(q, k)`` index arrays."""
    if found.shape != exact.shape:
        raise DataError(f"Expected index arrays of the same shape, but got {tuple(found.shape)} and {tuple(exact.shape)}.")
    k = exact.shape[1]
    hits = [len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)]
    return float(np.mean(hits) / k)


def representer_scores(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, lam: float, n: int,
                       x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    r"""Exact representer contributions :math:`r_{i,c}\,k(i,x)` of rows ``X`` to logit ``c`` of queries.

    .. math::

        r_i = -\frac{\alpha_i g_i}{\lambda n}, \qquad \text{score}(i, x) = r_{i,c}\, h_i^\top h_x

    (Yeh et al., "Representer point selection for explaining deep neural networks", NeurIPS 2018).
    Positive = supports the prediction of class ``c``.

    Args:
        W: ``(K, D)`` inner optimum. X: ``(m, D)`` candidate training rows; y, alpha: their labels and weights.
        lam, n: :math:`\lambda` and the global training-set size. x: ``(q, D)`` queries. cls: ``(q,)`` classes explained.

    Returns:
        ``(q, m)`` scores.
    """
    R = representer_values(softmax_residuals(W, X, y), alpha, lam, n)  # (m, K)
    return (x @ X.T) * R[:, cls].T


def preselect_and_score(queries: torch.Tensor, base: torch.Tensor | FeatureStore, M: int,
                        score_fn: Callable[[int, torch.Tensor], torch.Tensor], top: int, metric: Metric = "ip",
                        **knn_kwargs) -> NeighborResult:
    """Pre-select the ``M`` most similar base rows per query, score them exactly, keep the ``top`` best.

    Args:
        queries: ``(q, d)`` similarity-space queries (e.g. features without the bias column).
        base: ``(n, d)`` training rows in the same space.
        M: candidates per query (``top <= M <= n``).
        score_fn: ``(query_index, candidate_indices (M,)) -> (M,)`` exact scores (larger = more important).
        top: results per query.
        metric, knn_kwargs: passed to :func:`knn`.

    Returns:
        :class:`NeighborResult` of exact scores and indices, best first (``backend`` names the
        candidate search).
    """
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= M:
        raise ConfigError(f"The 'top' parameter of preselect_and_score must be an int in 1..M={M}. Got {top!r} instead.")
    cand = knn(queries, base, M, metric=metric, **knn_kwargs)
    out_s, out_i = [], []
    for qi in range(queries.shape[0]):
        idx = cand.indices[qi]
        idx = idx[idx >= 0]  # FAISS pads with -1 when an IVF probe finds fewer than M rows
        s = score_fn(qi, idx)
        kk = min(top, s.shape[0])
        v, p = torch.topk(s, kk)
        out_s.append(torch.nn.functional.pad(v, (0, top - kk), value=float("-inf")))
        out_i.append(torch.nn.functional.pad(idx[p], (0, top - kk), value=-1))
    return NeighborResult(torch.stack(out_s), torch.stack(out_i), cand.backend)


def representer_top(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, lam: float,
                    x: torch.Tensor, cls: torch.Tensor, top: int, M: Optional[int] = None,
                    **knn_kwargs) -> NeighborResult:
    r"""Top-``top`` representer supporters of logit ``cls`` for each query, by maximum inner-product search.

    The score :math:`r_{i,c}\,h_i^\top h_x = (r_{i,c} h_i)^\top h_x` is an inner product with the
    scaled rows :math:`u_i = r_{i,c} h_i`, so a nearest-neighbour index over :math:`u` (metric
    ``ip``) finds the supporters directly: exact with the torch brute force or FAISS ``flat``,
    approximate with FAISS ``ivf``. With ``M`` the index returns ``M`` candidates whose exact scores
    are recomputed and the ``top`` best kept (useful with an approximate index). Pre-selecting by
    plain feature similarity :math:`h_i^\top h_x` instead misses supporters whose weight
    :math:`|r_{i,c}|` is large (hard or mislabelled samples), see ``docs/scale.md``.

    Args:
        W: ``(K, D)`` optimum; X: ``(n, D)`` training rows; y, alpha: labels and weights ``(n,)``;
        lam: :math:`\lambda`; x: ``(q, D)`` queries; cls: ``(q,)`` explained classes; top: results per query;
        M: candidates per query (default ``top``); knn_kwargs: passed to :func:`knn` (backend, index, nprobe, ...).

    Returns:
        :class:`NeighborResult` with exact scores ``(q, top)`` and training indices.
    """
    n = X.shape[0]
    M = top if M is None else M
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= M <= n:
        raise ConfigError(f"The 'top' parameter of representer_top must be an int with 1 <= top <= M <= n = {n}. "
                          f"Got top={top!r}, M={M!r} instead.")
    R = representer_values(softmax_residuals(W, X, y), alpha, lam, n)  # (n, K) representer values r_i
    out_s = torch.empty(x.shape[0], top, dtype=x.dtype, device=x.device)
    out_i = torch.empty(x.shape[0], top, dtype=torch.int64, device=x.device)
    backend = "torch"
    for c in torch.unique(cls).tolist():
        rows = torch.nonzero(cls == c).flatten()
        U = R[:, c:c + 1] * X  # (n, D) scaled rows of class c's expansion
        cand = knn(x[rows], U, M, metric="ip", **knn_kwargs)
        backend = cand.backend
        idx = cand.indices.to(x.device).clamp_min(0)
        exact = ((U[idx] * x[rows][:, None, :]).sum(-1))  # (q_c, M) exact scores of the candidates
        v, p = torch.topk(exact, top, dim=1)
        out_s[rows], out_i[rows] = v, torch.gather(idx, 1, p)
    return NeighborResult(out_s, out_i, backend)
