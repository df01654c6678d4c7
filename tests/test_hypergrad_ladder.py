"""The hypergradient ladder (issue 3): every registered method against the exact one, and each
rung against an independent oracle (hand computation, autograd, finite differences)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch.testing import assert_close

from reweight.errors import ConfigError, NonFiniteError
from reweight.head import HeadObjective, add_bias, solve_head
from reweight.hypergrad import HYPERGRAD, BilevelProblem, Neumann, Unrolled, hypergradient, largest_eigenvalue, make_method
from reweight.weights import WeightModel

DT = torch.float64

# Tolerances of every registered method against ``exact`` on the fixture below, at the given options.
# (options, min cosine of dL_val/dalpha, max relative error or None when only the direction is
# comparable). A method registered without an entry here fails ``test_every_method_has_tolerance``.
# The relative errors are far below what a sign flip (err 2), a factor n (err n-1) or lambda off by
# 2x (err ~0.3 here, see test_tolerance_check_catches_scaling_errors) would give.
TOLERANCES = {
    "exact": ({}, 1 - 1e-12, 1e-10),
    "cg": ({"rtol": 1e-10, "max_iter": 200}, 1 - 1e-12, 1e-8),
    "neumann": ({"order": 400, "rtol": 1e-10}, 1 - 1e-12, 1e-8),
    "unrolled": ({"steps": 300}, 1 - 1e-12, 1e-8),
    # H ~ I/eta and H ~ I: crude rungs, direction only (measured cosine ~0.97 on this fixture;
    # 0.9 still rejects a sign flip, cosine -1, and an unrelated direction, cosine ~0).
    "one_step": ({}, 0.9, None),
    "first_order": ({}, 0.9, None),
}


def _problem(lam: float = 0.1, seed: int = 0, n: int = 40, d: int = 4, K: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = add_bias(torch.randn(n, d, generator=g, dtype=DT))
    y = torch.randint(0, K, (n,), generator=g)
    y[:K] = torch.arange(K)
    Xv = add_bias(torch.randn(25, d, generator=g, dtype=DT))
    yv = torch.randint(0, K, (25,), generator=g)
    inner = HeadObjective(X, y, K, lam)
    wm = WeightModel(y, K)
    prob = BilevelProblem(inner, Xv, yv, wm)
    s = 0.7 * torch.randn(n, generator=g, dtype=DT)  # a fixed non-uniform s
    alpha = wm.alpha(s)
    W = solve_head(inner, alpha, grad_tol=1e-13, max_iter=100).W
    return prob, s, alpha, W


@pytest.fixture(scope="module")
def fx():
    prob, s, alpha, W = _problem()
    exact = hypergradient(make_method("exact"), prob, s, W, name="exact")
    return prob, s, alpha, W, exact


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _within(got: torch.Tensor, ref: torch.Tensor, min_cos: float, max_rel):
    return _cos(got, ref) >= min_cos and (max_rel is None or _rel(got, ref) <= max_rel)


# --------------------------------------------------------------------------------------------
# completeness: every registered method against exact
# --------------------------------------------------------------------------------------------


def test_every_method_has_tolerance():
    missing = sorted(set(HYPERGRAD.names()) - set(TOLERANCES))
    assert not missing, f"registered hypergradient methods without a tolerance entry: {missing}"
    assert sorted(TOLERANCES) == HYPERGRAD.names()


@pytest.mark.parametrize("name", HYPERGRAD.names())
def test_method_matches_exact(fx, name):
    prob, s, alpha, W, exact = fx
    if name not in TOLERANCES:
        pytest.fail(f"no tolerance entry for registered method {name!r}")
    options, min_cos, max_rel = TOLERANCES[name]
    res = hypergradient(make_method(name, options), prob, s, W, name=name)
    assert res.converged, f"{name} did not converge at its test budget"
    assert _cos(res.grad_alpha, exact.grad_alpha) >= min_cos
    if max_rel is not None:
        assert _rel(res.grad_alpha, exact.grad_alpha) <= max_rel
        assert_close(res.grad_s, exact.grad_s, rtol=10 * max_rel, atol=10 * max_rel * float(exact.grad_s.abs().max()))
    assert res.seconds >= 0 and res.method == name


# Every preconditioner option of ``cg`` (reweight.precond) must meet the cg tolerance above; an option added to
# PRECONDITIONERS without an entry here fails test_every_cg_preconditioner_is_covered.
CG_PRECONDS = ("auto", "dense", "kfac", "none", "block_jacobi")


def test_every_cg_preconditioner_is_covered():
    from reweight.precond import PRECONDITIONERS

    assert set(CG_PRECONDS) == {"auto", *PRECONDITIONERS}


@pytest.mark.parametrize("precond", CG_PRECONDS)
def test_cg_with_every_preconditioner_matches_exact(fx, precond):
    prob, s, alpha, W, exact = fx
    options, min_cos, max_rel = TOLERANCES["cg"]
    res = hypergradient(make_method("cg", {**options, "precond": precond}), prob, s, W, name="cg")
    assert res.converged and res.extra["precond"] in CG_PRECONDS and res.extra["precond_seconds"] >= 0
    assert precond == "auto" or res.extra["precond"] == precond
    assert _within(res.grad_alpha, exact.grad_alpha, min_cos, max_rel)


def test_tolerance_check_catches_scaling_errors(fx):
    """The tolerances above would fail for a sign flip, a factor n, a factor 2, or lambda off by 2x."""
    prob, s, alpha, W, exact = fx
    ref = exact.grad_alpha
    n = prob.inner.n
    for name in ("cg", "neumann", "unrolled"):
        _, min_cos, max_rel = TOLERANCES[name]
        assert _within(ref, ref, min_cos, max_rel)
        for wrong in (-ref, n * ref, ref / n, 2 * ref):
            assert not _within(wrong, ref, min_cos, max_rel)
    # lambda scaled by 2 (same data and alpha, inner re-solved): the exact hypergradient moves far.
    inner2 = HeadObjective(prob.inner.X, prob.inner.y, prob.inner.K, 2 * prob.inner.lam)
    prob2 = BilevelProblem(inner2, prob.X_val, prob.y_val, prob.weights)
    W2 = solve_head(inner2, alpha, grad_tol=1e-13).W
    wrong = hypergradient(make_method("exact"), prob2, s, W2).grad_alpha
    assert _rel(wrong, ref) > 0.05
    assert not _within(wrong, ref, *TOLERANCES["neumann"][1:])
    # and the direction-only rungs reject a sign flip
    for name in ("one_step", "first_order"):
        assert not _within(-ref, ref, *TOLERANCES[name][1:])


# --------------------------------------------------------------------------------------------
# Neumann
# --------------------------------------------------------------------------------------------


def test_neumann_improves_with_order(fx):
    prob, s, alpha, W, exact = fx
    v_star = exact.v
    errs, cosines = [], []
    for order in (1, 2, 4, 8, 16, 32, 64):
        r = hypergradient(Neumann(order=order, rtol=1e-300), prob, s, W)  # no early stop
        errs.append(_rel(r.v, v_star))
        cosines.append(_cos(r.grad_alpha, exact.grad_alpha))
        assert r.hvps == order + 1 + 20  # series (order + 1) + power iterations (20)
    # the error H^{-1}(I - eta H)^{K+1} b contracts in norm with every term
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-8 and errs[0] > 1e-2
    assert cosines[-1] >= 0.99 and cosines[-1] > cosines[0]


def test_neumann_residual_is_reported_and_nonconvergence_recorded(fx):
    prob, s, alpha, W, exact = fx
    r = Neumann(order=2, rtol=1e-10).val_alpha_grad(prob, W, alpha)
    H = prob.inner.hessian(W, alpha)
    b = prob.val_grad(W)
    true_rel = float((H.matvec(r.v) - b).norm() / b.norm())
    assert r.rel_residual == pytest.approx(true_rel, rel=1e-8)
    assert not r.converged
    r2 = Neumann(order=1000, rtol=1e-8).val_alpha_grad(prob, W, alpha)
    assert r2.converged and r2.rel_residual <= 1e-8 and r2.extra["terms"] < 1000  # stopped early


def test_neumann_default_eta_from_power_iteration(fx):
    prob, s, alpha, W, exact = fx
    H = prob.inner.hessian(W, alpha)
    lam_max = float(torch.linalg.eigvalsh(H.dense()).max())
    est = largest_eigenvalue(H.matvec, tuple(W.shape), DT, iters=100)
    assert est == pytest.approx(lam_max, rel=1e-3)
    assert est <= lam_max * (1 + 1e-10)  # a Rayleigh quotient never exceeds lambda_max
    r = Neumann(order=5).val_alpha_grad(prob, W, alpha)
    assert 0 < r.extra["eta"] < 2 / lam_max  # inside the convergence region


def test_neumann_diverging_step(fx):
    prob, s, alpha, W, exact = fx
    H = prob.inner.hessian(W, alpha)
    lam_max = float(torch.linalg.eigvalsh(H.dense()).max())
    r = Neumann(order=5, eta=3.0 / lam_max).val_alpha_grad(prob, W, alpha)
    assert not r.converged and r.rel_residual > 1  # recorded, not silent
    with pytest.raises(NonFiniteError, match="'neumann' produced a non-finite dL_val/dalpha"):
        hypergradient(Neumann(order=2000, eta=1e6), prob, s, W, name="neumann")


def test_non_finite_method_output_raises(fx):
    from reweight.hypergrad import ValAlphaGrad

    class Broken:
        def val_alpha_grad(self, problem, W, alpha, v0=None):
            g = torch.zeros_like(alpha)
            g[3] = float("inf")
            return ValAlphaGrad(g)

    prob, s, alpha, W, exact = fx
    with pytest.raises(NonFiniteError, match="'broken' produced a non-finite"):
        hypergradient(Broken(), prob, s, W, name="broken")


# --------------------------------------------------------------------------------------------
# unrolled (higher)
# --------------------------------------------------------------------------------------------


def test_unrolled_improves_with_steps(fx):
    prob, s, alpha, W, exact = fx
    errs = []
    for T in (1, 3, 10, 30, 300):
        r = hypergradient(Unrolled(steps=T), prob, s, W)
        assert r.inner_steps == T and r.converged
        errs.append(_rel(r.grad_alpha, exact.grad_alpha))
    # strictly better with every budget until the floating-point floor
    assert all(b < a or b < 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-2 and errs[-1] < 1e-8
    assert _cos(r.grad_alpha, exact.grad_alpha) >= 0.99


def test_unrolled_equals_neumann_from_the_optimum(fx):
    """From W*, differentiating T GD steps (higher, autograd) equals the Neumann series of order T-1
    with the same step (HVP recursion): two independent implementations of one formula."""
    prob, s, alpha, W, exact = fx
    H = prob.inner.hessian(W, alpha)
    eta = 0.5 / float(torch.linalg.eigvalsh(H.dense()).max())
    for T in (1, 4, 15):
        u = Unrolled(steps=T, lr=eta).val_alpha_grad(prob, W, alpha)
        nm = Neumann(order=max(T - 1, 1), eta=eta, rtol=1e-300).val_alpha_grad(prob, W, alpha) if T > 1 else None
        if T == 1:  # order 0: v = eta * grad L_val
            ref = make_method("one_step", {"lr": eta}).val_alpha_grad(prob, W, alpha).grad_alpha
        else:
            ref = nm.grad_alpha
        assert_close(u.grad_alpha, ref, rtol=1e-8, atol=1e-12)


def test_unrolled_truncation(fx):
    """From the optimum, W does not move, so backprop through the last k of T steps equals T = k."""
    prob, s, alpha, W, exact = fx
    a = Unrolled(steps=60, truncate=15, lr=0.5).val_alpha_grad(prob, W, alpha)
    b = Unrolled(steps=15, lr=0.5).val_alpha_grad(prob, W, alpha)
    assert a.inner_steps == 60 and a.extra["truncate"] == 15
    assert_close(a.grad_alpha, b.grad_alpha, rtol=1e-8, atol=1e-12)
    full = Unrolled(steps=60, lr=0.5).val_alpha_grad(prob, W, alpha)
    assert _rel(full.grad_alpha, exact.grad_alpha) < _rel(a.grad_alpha, exact.grad_alpha)


def test_unrolled_from_a_non_optimal_start_matches_autograd(fx):
    """Away from the optimum, compare higher's unrolled gradient with plain autograd through the
    same T closed-form GD steps."""
    prob, s, alpha, W, exact = fx
    W0 = W + 0.3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    lr, T = 0.7, 6
    a = alpha.clone().requires_grad_(True)
    Wt = W0.clone()
    X, Y, n, lam = prob.inner.X, prob.inner.Y, prob.inner.n, prob.inner.lam
    for _ in range(T):  # closed-form gradient of F, written out here
        G = torch.softmax(X @ Wt.T, dim=1) - Y
        Wt = Wt - lr * ((a[:, None] * G).T @ X / n + lam * Wt)
    (ref,) = torch.autograd.grad(prob.val_loss(Wt), a)
    got = Unrolled(steps=T, lr=lr).val_alpha_grad(prob, W0, alpha)
    assert_close(got.grad_alpha, ref, rtol=1e-9, atol=1e-13)


def test_unrolled_diverging_step_is_recorded(fx):
    prob, s, alpha, W, exact = fx
    W0 = W + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = Unrolled(steps=30, lr=1e3).val_alpha_grad(prob, W0, alpha)
    assert not r.converged


def test_unrolled_releases_higher_contexts(fx):
    """higher's patched modules must not survive a call (no reference cycles kept alive)."""
    import higher.patch

    prob, s, alpha, W, exact = fx
    m = Unrolled(steps=3, lr=0.5)
    m.val_alpha_grad(prob, W, alpha)  # import and warm up
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                m.val_alpha_grad(prob, W, alpha)
            alive = sum(1 for o in gc.get_objects() if isinstance(o, higher.patch._MonkeyPatchBase))
        finally:
            gc.enable()
    assert alive == 0


# --------------------------------------------------------------------------------------------
# one_step and first_order against independent hand computations
# --------------------------------------------------------------------------------------------


def _hand_inner_loss(prob, W, a):
    X, y, n, lam = prob.inner.X, prob.inner.y, prob.inner.n, prob.inner.lam
    total = 0.0
    for i in range(n):  # a plain per-sample loop, no shared code with the library
        logits = X[i] @ W.T
        total = total + a[i] * (torch.logsumexp(logits, 0) - logits[y[i]])
    return total / n + 0.5 * lam * (W * W).sum()


def _hand_val_loss(prob, W):
    logits = prob.X_val @ W.T
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(prob.y_val)), prob.y_val]).mean()


@pytest.mark.parametrize("at_optimum", [True, False])
def test_one_step_against_hand_autograd(fx, at_optimum):
    prob, s, alpha, W, exact = fx
    W0 = W if at_optimum else W + 0.2 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    eta = 0.8
    a = alpha.clone().requires_grad_(True)
    Wr = W0.clone().requires_grad_(True)
    (gW,) = torch.autograd.grad(_hand_inner_loss(prob, Wr, a), Wr, create_graph=True)
    (ref,) = torch.autograd.grad(_hand_val_loss(prob, W0 - eta * gW), a)
    got = make_method("one_step", {"lr": eta}).val_alpha_grad(prob, W0, alpha)
    assert_close(got.grad_alpha, ref, rtol=1e-10, atol=1e-14)
    assert got.inner_steps == 1 and got.hvps == 0


def test_first_order_against_hand_dot_products(fx):
    prob, s, alpha, W, exact = fx
    Wr = W.clone().requires_grad_(True)
    (gv,) = torch.autograd.grad(_hand_val_loss(prob, Wr), Wr)
    n = prob.inner.n
    ref = torch.empty(n, dtype=DT)
    for i in range(n):
        onehot = torch.zeros(n, dtype=DT)
        onehot[i] = 1.0
        (gi,) = torch.autograd.grad(_hand_inner_loss(prob, Wr, onehot) - 0.5 * prob.inner.lam * (Wr * Wr).sum(), Wr)
        ref[i] = -(gv * gi).sum()  # gi already carries the 1/n
    got = make_method("first_order").val_alpha_grad(prob, W, alpha)
    assert_close(got.grad_alpha, ref, rtol=1e-10, atol=1e-15)
    assert got.hvps == 0 and got.inner_steps == 0


def test_one_step_default_lr_is_neumann_order_zero(fx):
    prob, s, alpha, W, exact = fx
    r = make_method("one_step").val_alpha_grad(prob, W, alpha)
    eta = r.extra["lr"]
    # at the optimum W' = W*, so one_step = eta * (first_order)
    fo = make_method("first_order").val_alpha_grad(prob, W, alpha)
    assert_close(r.grad_alpha, eta * fo.grad_alpha, rtol=1e-8, atol=1e-14)


# --------------------------------------------------------------------------------------------
# chain rule: central finite differences of J(s)
# --------------------------------------------------------------------------------------------


def test_exact_hypergradient_finite_differences():
    prob, s, alpha, W = _problem(seed=4, n=24, d=3)
    wm = WeightModel(prob.weights.labels, prob.inner.K, beta_entropy=0.3, beta_ess=0.5, ess_floor=0.9)
    prob = BilevelProblem(prob.inner, prob.X_val, prob.y_val, wm)
    W = solve_head(prob.inner, wm.alpha(s), grad_tol=1e-13).W
    res = hypergradient(make_method("exact"), prob, s, W)

    def J(sv):
        a = wm.alpha(sv)
        Wv = solve_head(prob.inner, a, W0=W, grad_tol=1e-13).W
        return float(prob.val_loss(Wv) + wm.penalty(a))

    h = 1e-5
    for i in (0, 5, 17):
        e = torch.zeros_like(s)
        e[i] = h
        fd = (J(s + e) - J(s - e)) / (2 * h)
        assert fd == pytest.approx(float(res.grad_s[i]), rel=1e-5, abs=1e-9)


def test_one_step_chain_finite_differences(fx):
    """one_step is the exact gradient of s -> L_val(W - eta grad F(W, alpha(s))) (+ penalty = 0)."""
    prob, s, alpha, W, exact = fx
    eta = 0.8
    res = hypergradient(make_method("one_step", {"lr": eta}), prob, s, W)

    def J(sv):
        return float(prob.val_loss(W - eta * prob.inner.grad(W, prob.weights.alpha(sv))))

    h = 1e-6
    for i in (0, 7, 33):
        e = torch.zeros_like(s)
        e[i] = h
        fd = (J(s + e) - J(s - e)) / (2 * h)
        assert fd == pytest.approx(float(res.grad_s[i]), rel=1e-5, abs=1e-11)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_unknown_method_lists_registered():
    with pytest.raises(ConfigError, match="Registered: cg, exact, first_order, neumann, one_step, unrolled"):
        make_method("lissa")


def test_unknown_option_lists_valid():
    with pytest.raises(ConfigError, match="Valid options: order, eta, power_iters, rtol, tol"):
        make_method("neumann", {"iters": 3})


@pytest.mark.parametrize("name, options, match", [
    ("neumann", {"order": 0}, "'order' parameter of neumann must be an int >= 1. Got 0"),
    ("neumann", {"order": -3}, "'order' parameter of neumann must be an int >= 1. Got -3"),
    ("neumann", {"order": 2.5}, "'order' parameter of neumann must be an int >= 1. Got 2.5"),
    ("neumann", {"eta": 0.0}, "'eta' parameter of neumann must be a finite number > 0 or null. Got 0.0"),
    ("neumann", {"eta": -1.0}, "'eta' parameter of neumann must be a finite number > 0"),
    ("neumann", {"power_iters": 0}, "'power_iters' parameter of neumann must be an int >= 1"),
    ("neumann", {"rtol": 0.0}, "'rtol' parameter of neumann must be a finite number > 0"),
    ("neumann", {"rtol": None}, "'rtol' parameter of neumann must be a finite number > 0. Got None"),
    ("unrolled", {"steps": 0}, "'steps' parameter of unrolled must be an int >= 1. Got 0"),
    ("unrolled", {"steps": -1}, "'steps' parameter of unrolled must be an int >= 1"),
    ("unrolled", {"steps": 5, "truncate": 0}, "'truncate' parameter of unrolled must be an int >= 1"),
    ("unrolled", {"steps": 5, "truncate": 6}, r"'truncate' parameter of unrolled must be <= steps \(5\)"),
    ("unrolled", {"lr": 0.0}, "'lr' parameter of unrolled must be a finite number > 0"),
    ("unrolled", {"lr": float("nan")}, "'lr' parameter of unrolled must be a finite number > 0"),
    ("unrolled", {"power_iters": 0}, "'power_iters' parameter of unrolled must be an int >= 1"),
    ("one_step", {"lr": -0.1}, "'lr' parameter of one_step must be a finite number > 0"),
    ("one_step", {"power_iters": 0}, "'power_iters' parameter of one_step must be an int >= 1"),
    ("cg", {"max_iter": 0}, "'max_iter' parameter of cg must be an int >= 1"),
])
def test_budget_validation(name, options, match):
    with pytest.raises(ConfigError, match=match):
        make_method(name, options)


def test_largest_eigenvalue_validation():
    with pytest.raises(ConfigError, match="'iters' parameter of largest_eigenvalue must be an int >= 1. Got 0"):
        largest_eigenvalue(lambda u: u, (2, 2), DT, iters=0)


def test_accuracy_study_covers_every_registered_method():
    """experiments/hypergrad_accuracy sweeps every rung (exact is its reference)."""
    from experiments.hypergrad_accuracy import HypergradAccuracyConfig, sweep

    pts = sweep(HypergradAccuracyConfig())
    assert {m for m, *_ in pts} | {"exact"} == set(HYPERGRAD.names())
    for m, _, options, budget in pts:
        make_method(m, options)  # every point is a valid configuration
    with pytest.raises(ConfigError, match="'cg_iters' parameter must hold budgets >= 1"):
        HypergradAccuracyConfig(cg_iters=[0])
