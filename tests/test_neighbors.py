"""Nearest-neighbour candidates: torch brute force against argsort, FAISS against brute force,
the no-faiss fallback, recall@K, and exact representer scoring on pre-selected candidates."""

from __future__ import annotations

import builtins

import pytest
import torch

from reweight.errors import ConfigError, DataError
from reweight.head import HeadObjective, add_bias, solve_head
from reweight.neighbors import brute_force_knn, faiss_available, knn, preselect_and_score, recall_at_k, representer_scores
from reweight.store import write_store

# faiss-cpu is optional for users but part of the [dev] extra, so CI runs these tests; the skip only
# protects a user's own test run without it.
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="optional faiss-cpu not installed")


def _data(n=500, q=7, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_brute_force_equals_full_sort_and_is_chunk_independent(metric, tmp_path):
    Q, B = _data()
    if metric == "ip":
        S = Q @ B.T
    elif metric == "cosine":
        S = torch.nn.functional.normalize(Q, dim=1) @ torch.nn.functional.normalize(B, dim=1).T
    else:
        S = -torch.cdist(Q, B) ** 2
    exp_s, exp_i = torch.topk(S, 10, dim=1)
    for chunk in (7, 64, 500):
        r = brute_force_knn(Q, B, 10, metric, chunk_rows=chunk)
        torch.testing.assert_close(r.indices, exp_i)
        torch.testing.assert_close(r.scores, exp_s, rtol=1e-5, atol=1e-4)
    st = write_store(tmp_path / "s", B, shard_rows=120)
    torch.testing.assert_close(brute_force_knn(Q, st, 10, metric, chunk_rows=50).indices, exp_i)


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_faiss_flat_equals_brute_force(metric):
    Q, B = _data()
    ref = brute_force_knn(Q, B, 10, metric)
    got = knn(Q, B, 10, metric, backend="faiss", index="flat")
    assert got.backend == "faiss-flat"
    assert recall_at_k(got.indices, ref.indices) == 1.0
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-4, atol=1e-3)


@needs_faiss
def test_faiss_ivf_recall_rises_with_nprobe():
    Q, B = _data(n=4000, q=20, d=8)
    ref = brute_force_knn(Q, B, 10)
    low = recall_at_k(knn(Q, B, 10, backend="faiss", index="ivf", nlist=64, nprobe=1).indices, ref.indices)
    full = recall_at_k(knn(Q, B, 10, backend="faiss", index="ivf", nlist=64, nprobe=64).indices, ref.indices)
    assert full == 1.0  # probing every list is exhaustive
    assert low < full


def test_fallback_without_faiss(monkeypatch):
    real_import = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    Q, B = _data()
    assert not faiss_available()
    r = knn(Q, B, 5)
    assert r.backend == "torch"
    with pytest.raises(ConfigError, match="The 'backend' parameter of knn is 'faiss' but faiss is not installed"):
        knn(Q, B, 5, backend="faiss")


def test_recall_at_k():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    b = torch.tensor([[3, 2, 9], [4, 5, 6]])
    assert recall_at_k(a, b) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(DataError, match="same shape"):
        recall_at_k(a, b[:, :2])


def test_representer_identity_and_preselection():
    """Representer scores summed over all rows give W* h_x exactly (Yeh et al. 2018); with M = n the
    pre-selection returns the exact top supporters, and recall is reported against them."""
    g = torch.Generator().manual_seed(1)
    n, d, K, lam = 300, 5, 3, 0.05
    H = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    X = add_bias(H)
    alpha = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    W = solve_head(HeadObjective(X, y, K, lam), alpha, grad_tol=1e-12).W
    xq = add_bias(torch.randn(4, d, generator=g, dtype=torch.float64))
    cls = (xq @ W.T).argmax(1)
    S = representer_scores(W, X, y, alpha, lam, n, xq, cls)
    torch.testing.assert_close(S.sum(1), (xq @ W.T)[torch.arange(4), cls], rtol=1e-8, atol=1e-10)
    exact = torch.topk(S, 5, dim=1).indices

    def score(qi, idx):
        return representer_scores(W, X[idx], y[idx], alpha[idx], lam, n, xq[qi:qi + 1], cls[qi:qi + 1])[0]

    full = preselect_and_score(xq, X, n, score, top=5, backend="torch")
    assert recall_at_k(full.indices, exact) == 1.0
    part = preselect_and_score(xq, X, 60, score, top=5, backend="torch")
    assert 0.0 <= recall_at_k(part.indices, exact) <= 1.0


def test_bad_input():
    Q, B = _data()
    with pytest.raises(ConfigError, match="The 'k' parameter of knn must be an int in 1..500 \\(the base size\\). Got 0 instead."):
        knn(Q, B, 0)
    with pytest.raises(ConfigError, match="The 'metric' parameter of knn must be one of"):
        knn(Q, B, 3, metric="dot")
    with pytest.raises(DataError, match="with the same d"):
        knn(Q[:, :3], B, 3)
    with pytest.raises(ConfigError, match="The 'chunk_rows' parameter of brute_force_knn must be an int >= 1. Got 0 instead."):
        brute_force_knn(Q, B, 3, chunk_rows=0)
    with pytest.raises(ConfigError, match="The 'top' parameter of preselect_and_score must be an int in 1..M=5"):
        preselect_and_score(Q, B, 5, lambda qi, idx: idx.float(), top=6)


def test_representer_top_by_inner_product_search_is_exact():
    """MIPS over the scaled rows r_{i,c} h_i returns exactly the top supporters of the full scoring."""
    from reweight.neighbors import representer_top

    g = torch.Generator().manual_seed(2)
    n, d, K, lam = 400, 4, 3, 0.05
    X = add_bias(torch.randn(n, d, generator=g, dtype=torch.float64))
    y = torch.randint(0, K, (n,), generator=g)
    alpha = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    W = solve_head(HeadObjective(X, y, K, lam), alpha, grad_tol=1e-12).W
    xq = add_bias(torch.randn(6, d, generator=g, dtype=torch.float64))
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    S = representer_scores(W, X, y, alpha, lam, n, xq, cls)
    exp_s, exp_i = torch.topk(S, 7, dim=1)
    got = representer_top(W, X, y, alpha, lam, xq, cls, top=7, backend="torch")
    torch.testing.assert_close(got.indices, exp_i)
    torch.testing.assert_close(got.scores, exp_s, rtol=1e-10, atol=1e-14)
    got = representer_top(W, X, y, alpha, lam, xq, cls, top=7, M=30, backend="torch")
    torch.testing.assert_close(got.indices, exp_i)
    with pytest.raises(ConfigError, match="The 'top' parameter of representer_top must be an int with 1 <= top <= M <= n = 400"):
        representer_top(W, X, y, alpha, lam, xq, cls, top=8, M=5)
