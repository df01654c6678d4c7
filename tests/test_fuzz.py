"""Property-based fuzzing of the head solver and penalties over random shapes and extreme values."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reweight.head import HeadObjective, add_bias, solve_head
from reweight.weights import WeightModel


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(4, 40), d=st.integers(1, 6), K=st.integers(2, 5),
    log_lam=st.floats(-4, 1), log_scale=st.floats(-3, 3), seed=st.integers(0, 2**16),
    zero_frac=st.floats(0, 0.9), big=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_solver_converges_honestly(n, d, K, log_lam, log_scale, seed, zero_frac, big, dtype):
    g = torch.Generator().manual_seed(seed)
    X = add_bias(torch.randn(n, d, generator=g, dtype=torch.float64) * 10 ** log_scale).to(dtype)
    y = torch.randint(0, K, (n,), generator=g)
    alpha = torch.rand(n, generator=g, dtype=torch.float64) * (1e3 if big else 2)
    alpha[torch.rand(n, generator=g) < zero_frac] = 0
    obj = HeadObjective(X, y, K, 10 ** log_lam)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    # scale the tolerance with the size of the gradient at 0 (relative accuracy is what float32 can promise)
    g0 = float(torch.linalg.vector_norm(obj.grad(torch.zeros(obj.shape, dtype=dtype), alpha.to(dtype))))
    sol = solve_head(obj, alpha.to(dtype), grad_tol=tol * max(1.0, g0), max_iter=200)
    assert torch.isfinite(sol.W).all()
    gn = float(torch.linalg.vector_norm(obj.grad(sol.W, alpha.to(dtype))))
    if sol.converged:
        assert gn <= tol * max(1.0, g0) * 1.0001
    else:  # only float32 may stall, and then only at its rounding floor
        assert dtype == torch.float32 and gn <= 1e-2 * max(1.0, g0)
    assert float(obj.loss(sol.W, alpha.to(dtype))) <= float(obj.loss(torch.zeros_like(sol.W), alpha.to(dtype))) + 1e-6


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), K=st.integers(1, 4), seed=st.integers(0, 2**16), log_scale=st.floats(-2, 3),
       floor=st.floats(0, 1), form=st.sampled_from(["hinge", "log"]))
def test_penalties_finite_nonnegative_and_zero_at_uniform(n, K, seed, log_scale, floor, form):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    K = int(y.max()) + 1
    wm = WeightModel(y, K, beta_entropy=1.0, beta_ess=1.0, ess_floor=floor, ess_penalty=form)
    s = (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** log_scale).requires_grad_(True)
    a = wm.alpha(s)
    pen = wm.penalty(a)
    (grad,) = torch.autograd.grad(pen, s)
    assert torch.isfinite(pen) and float(pen.detach()) >= -1e-12 and torch.isfinite(grad).all()
    uniform = wm.penalty(torch.ones(n, dtype=torch.float64))
    assert abs(float(uniform)) <= 1e-12
