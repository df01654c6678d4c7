"""The L2 softmax head: loss/gradient/HVP/Hessian against autograd, solver tolerance and warm starts."""

import pytest
import torch

from reweight.errors import ConfigError, DataError
from reweight.head import HeadObjective, add_bias, solve_head
from reweight.linalg import conjugate_gradient
from tests.conftest import make_problem


def _obj_alpha(seed=0):
    p = make_problem(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    alpha = torch.rand(p.inner.n, generator=g, dtype=torch.float64) * 2
    return p.inner, alpha


def test_grad_hvp_dense_hessian_match_autograd():
    obj, a = _obj_alpha()
    K, D = obj.shape
    W = torch.randn(K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Wr = W.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(obj.loss(Wr, a), Wr)
    torch.testing.assert_close(obj.grad(W, a), g, rtol=1e-12, atol=1e-12)
    Hauto = torch.autograd.functional.hessian(lambda w: obj.loss(w.reshape(K, D), a), W.reshape(-1))
    H = obj.hessian(W, a)
    torch.testing.assert_close(H.dense(), Hauto, rtol=1e-10, atol=1e-12)
    U = torch.randn(3, K, D, dtype=torch.float64)
    batched = H.matvec(U)
    for b in range(3):
        torch.testing.assert_close(batched[b].reshape(-1), Hauto @ U[b].reshape(-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(H.matvec(U[b]), batched[b], rtol=1e-12, atol=1e-14)


def test_lambda_and_one_over_n_scaling_of_loss():
    obj, a = _obj_alpha()
    W = torch.randn(obj.shape, dtype=torch.float64)
    manual = (a * torch.nn.functional.cross_entropy(obj.X @ W.T, obj.y, reduction="none")).mean() + 0.5 * obj.lam * (W ** 2).sum()
    torch.testing.assert_close(obj.loss(W, a), manual)


@pytest.mark.parametrize("system", ["dense", "cg"])
def test_solver_reaches_tolerance_and_optimality(system):
    obj, a = _obj_alpha()
    sol = solve_head(obj, a, grad_tol=1e-11, newton_system=system)
    assert sol.converged and sol.grad_norm <= 1e-11
    torch.testing.assert_close(obj.grad(sol.W, a), torch.zeros_like(sol.W), atol=1e-11, rtol=0)


def test_float32_solver_reaches_its_tolerance():
    obj, a = _obj_alpha()
    obj32 = HeadObjective(obj.X.float(), obj.y, obj.K, obj.lam)
    sol = solve_head(obj32, a.float(), grad_tol=1e-5)
    assert sol.converged and sol.grad_norm <= 1e-5


def test_warm_start_cuts_iterations():
    obj, a = _obj_alpha()
    cold = solve_head(obj, a, grad_tol=1e-10)
    a2 = a * (1 + 0.05 * torch.randn_like(a)).clamp_min(0)  # a nearby outer step
    cold2 = solve_head(obj, a2, grad_tol=1e-10)
    warm2 = solve_head(obj, a2, W0=cold.W, grad_tol=1e-10)
    assert warm2.converged and warm2.iters < cold2.iters
    torch.testing.assert_close(warm2.W, cold2.W, rtol=1e-8, atol=1e-9)


def test_weight_zero_equals_dropping_and_weight_two_equals_duplicating():
    obj, a = _obj_alpha()
    a = a.clone()
    a[5] = 0.0
    full = solve_head(obj, a, grad_tol=1e-12).W
    keep = torch.arange(obj.n) != 5
    # F is normalised by n: dropping a row changes n, so compare with weights rescaled by (n-1)/n
    sub = HeadObjective(obj.X[keep], obj.y[keep], obj.K, obj.lam)
    dropped = solve_head(sub, a[keep] * (obj.n - 1) / obj.n, grad_tol=1e-12).W
    torch.testing.assert_close(full, dropped, rtol=1e-9, atol=1e-10)
    a[7] = 2.0
    dup_X = torch.cat([obj.X, obj.X[7:8]])
    dup_y = torch.cat([obj.y, obj.y[7:8]])
    a_dup = torch.cat([a, a[7:8] * 0 + 1.0])
    a_dup[7] = 1.0
    dup = solve_head(HeadObjective(dup_X, dup_y, obj.K, obj.lam), a_dup * (obj.n + 1) / obj.n, grad_tol=1e-12).W
    torch.testing.assert_close(solve_head(obj, a, grad_tol=1e-12).W, dup, rtol=1e-9, atol=1e-10)


def test_cg_matches_dense_solve_and_improves_with_budget():
    obj, a = _obj_alpha()
    W = solve_head(obj, a, grad_tol=1e-10).W
    H = obj.hessian(W, a)
    b = torch.randn(obj.shape, dtype=torch.float64)
    exact = H.solve(b, method="dense").x
    errs = [float((H.solve(b, method="cg", rtol=1e-30, max_iter=k).x - exact).norm()) for k in (2, 5, 10, 40)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-8 * float(exact.norm())
    res = conjugate_gradient(H.matvec, b, rtol=1e-3, max_iter=1)
    assert not res.converged and res.iters == 1


def test_bad_inputs_raise_before_work():
    X = add_bias(torch.randn(10, 3, dtype=torch.float64))
    y = torch.arange(10) % 2
    with pytest.raises(ConfigError, match="'lam' parameter of HeadObjective must be a finite number > 0"):
        HeadObjective(X, y, 2, 0.0)
    with pytest.raises(ConfigError, match="'lam' parameter of HeadObjective must be a finite number > 0"):
        HeadObjective(X, y, 2, -1.0)
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    Xn[7, 0] = float("inf")
    with pytest.raises(DataError, match=r"first offending rows: \[3, 7\]"):
        HeadObjective(Xn, y, 2, 0.1)
    with pytest.raises(DataError, match="out of range"):
        HeadObjective(X, torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 1, 0]), 2, 0.1)
    with pytest.raises(DataError, match="Length mismatch"):
        HeadObjective(X, y[:9], 2, 0.1)
    with pytest.raises(DataError, match="integer"):
        HeadObjective(X, y.double(), 2, 0.1)
    obj = HeadObjective(X, y, 2, 0.1)
    with pytest.raises(DataError, match="alpha must be finite and >= 0"):
        solve_head(obj, -torch.ones(10, dtype=torch.float64))
    with pytest.raises(DataError, match="warm start of shape"):
        solve_head(obj, torch.ones(10, dtype=torch.float64), W0=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="'rtol' parameter of conjugate_gradient"):
        conjugate_gradient(lambda v: v, torch.ones(2), rtol=0)


def test_grad_batch_equals_one_gradient_per_head():
    obj, a = _obj_alpha()
    g = torch.Generator().manual_seed(4)
    W = torch.randn(5, *obj.shape, dtype=torch.float64, generator=g)
    A = a[:, None] * torch.rand(obj.n, 5, dtype=torch.float64, generator=g)
    A[3, 1] = 0.0
    got = obj.grad_batch(W, A)
    for b in range(5):
        torch.testing.assert_close(got[b], obj.grad(W[b], A[:, b]), rtol=1e-12, atol=1e-14)
