"""Per-sample gradients three ways (closed form, torch.func, BackPACK) and memory-light inner products."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from reweight.errors import ConfigError, DataError
from reweight.head import HeadObjective, add_bias
from reweight.persample import PER_SAMPLE_METHODS, per_sample_grads, per_sample_inner_products, residuals

DT = torch.float64


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    n, d, K = 37, 5, 4
    X = add_bias(torch.randn(n, d, generator=g, dtype=DT))
    y = torch.randint(0, K, (n,), generator=g)
    W = torch.randn(K, d + 1, generator=g, dtype=DT)
    return W, X, y


def _autograd_loop(W, X, y):
    """The obviously-correct twin: one autograd call per sample."""
    out = []
    for i in range(X.shape[0]):
        Wr = W.clone().requires_grad_(True)
        logits = Wr @ X[i]
        loss = torch.logsumexp(logits, 0) - logits[y[i]]
        (gi,) = torch.autograd.grad(loss, Wr)
        out.append(gi)
    return torch.stack(out)


@pytest.mark.parametrize("method", PER_SAMPLE_METHODS)
def test_routes_agree_with_autograd_loop(data, method):
    W, X, y = data
    ref = _autograd_loop(W, X, y)
    got = per_sample_grads(W, X, y, method=method)
    assert got.shape == (X.shape[0], W.shape[0], X.shape[1]) and got.dtype == DT
    assert_close(got, ref, rtol=0, atol=1e-6)  # the bar
    assert_close(got, ref, rtol=1e-10, atol=1e-13)  # what float64 actually delivers


def test_routes_agree_with_each_other(data):
    W, X, y = data
    c = per_sample_grads(W, X, y, "closed")
    assert_close(per_sample_grads(W, X, y, "func"), c, rtol=0, atol=1e-6)
    assert_close(per_sample_grads(W, X, y, "backpack"), c, rtol=0, atol=1e-6)


def test_sum_of_weighted_sample_grads_is_grad_F(data):
    """(1/n) sum_i alpha_i grad l_i + lambda W == grad_W F (ties the per-sample scale to the head)."""
    W, X, y = data
    alpha = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT) * 2
    obj = HeadObjective(X, y, W.shape[0], 0.3)
    G = per_sample_grads(W, X, y)
    assert_close((alpha[:, None, None] * G).sum(0) / X.shape[0] + 0.3 * W, obj.grad(W, alpha), rtol=1e-12, atol=1e-14)


def test_inner_products_match_materialised(data):
    W, X, y = data
    A = torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = (per_sample_grads(W, X, y) * A).sum(dim=(1, 2))
    assert_close(per_sample_inner_products(A, W, X, y), ref, rtol=1e-12, atol=1e-14)
    for chunk in (1, 5, 36, 1000):  # independent of the chunk size
        assert_close(per_sample_inner_products(A, W, X, y, chunk_size=chunk), ref, rtol=1e-12, atol=1e-14)


def test_inner_products_batched(data):
    W, X, y = data
    A = torch.randn((3, *W.shape), generator=torch.Generator().manual_seed(3), dtype=DT)
    got = per_sample_inner_products(A, W, X, y, chunk_size=8)
    assert got.shape == (X.shape[0], 3)
    for b in range(3):
        assert_close(got[:, b], per_sample_inner_products(A[b], W, X, y), rtol=1e-12, atol=1e-14)


def test_residuals_rows_sum_to_zero(data):
    W, X, y = data
    G = residuals(W, X, y)
    assert_close(G.sum(1), torch.zeros(X.shape[0], dtype=DT), rtol=0, atol=1e-14)
    assert bool((G[torch.arange(len(y)), y] <= 0).all())


def test_unknown_method():
    W, X, y = torch.zeros(2, 3, dtype=DT), torch.zeros(4, 3, dtype=DT), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="'method' parameter of per_sample_grads must be one of 'backpack', "
                                          "'closed', 'func'. Got 'jax' instead."):
        per_sample_grads(W, X, y, method="jax")


def test_bad_shapes_and_values(data):
    W, X, y = data
    with pytest.raises(DataError, match="'W' parameter of per_sample_grads must have D = 6 columns"):
        per_sample_grads(W[:, :3], X, y)
    with pytest.raises(DataError, match="'W' parameter of per_sample_grads must be a \\(K, D\\) tensor"):
        per_sample_grads(W[0], X, y)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(DataError, match="'W' parameter of per_sample_grads must be finite"):
        per_sample_grads(Wn, X, y)
    Xn = X.clone()
    Xn[2, 1] = float("inf")
    with pytest.raises(DataError, match="NaN/Inf"):
        per_sample_grads(W, Xn, y)
    with pytest.raises(DataError, match="Length mismatch"):
        per_sample_grads(W, X, y[:-1])
    with pytest.raises(DataError, match="'A' parameter of per_sample_inner_products must have shape \\(4, 6\\)"):
        per_sample_inner_products(W[:, :2], W, X, y)
    with pytest.raises(ConfigError, match="'chunk_size' parameter of per_sample_inner_products must be an int >= 1"):
        per_sample_inner_products(W, W, X, y, chunk_size=0)
