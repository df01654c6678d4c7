"""Implicit hypergradient of the full outer objective vs central finite differences (float64)."""

import pytest
import torch

from reweight.errors import ConfigError, NonFiniteError
from reweight.head import HeadObjective, solve_head
from reweight.hypergrad import HYPERGRAD, ConjugateGradient, Exact, alpha_grad_from_v, hypergradient, make_method
from tests.conftest import make_problem


def _J(problem, s):
    a = problem.weights.alpha(s)
    W = solve_head(problem.inner, a, grad_tol=1e-13).W
    return float(problem.val_loss(W) + problem.weights.penalty(a))


def _fd(problem, s, eps=1e-5):
    E = torch.eye(s.numel(), dtype=s.dtype)
    return torch.tensor([(_J(problem, s + eps * e) - _J(problem, s - eps * e)) / (2 * eps) for e in E], dtype=s.dtype)


@pytest.mark.parametrize("class_mass", ["count", "balanced"])
def test_exact_hypergradient_matches_finite_differences(class_mass):
    problem = make_problem(n=45, class_mass=class_mass)
    s = torch.randn(problem.inner.n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # both penalties must be active for the test to cover them
    a = problem.weights.alpha(s)
    assert float(problem.weights.entropy_penalty(a)) > 1e-3 and float(problem.weights.ess_penalty_value(a)) > 1e-4
    W = solve_head(problem.inner, a, grad_tol=1e-13).W
    hg = hypergradient(Exact(), problem, s, W)
    fd = _fd(problem, s)
    rel = float((hg.grad_s - fd).norm() / fd.norm())
    assert rel <= 1e-5, rel


def test_finite_difference_test_detects_wrong_sign_and_wrong_n():
    """The check above must be able to fail: a flipped sign or a missing 1/n breaks it by far."""
    problem = make_problem(n=45, beta_entropy=0.0, beta_ess=0.0)
    s = torch.randn(problem.inner.n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a = problem.weights.alpha(s)
    W = solve_head(problem.inner, a, grad_tol=1e-13).W
    v = problem.inner.hessian(W, a).solve(problem.val_grad(W), method="dense").x
    ga = alpha_grad_from_v(problem.inner, W, v)
    s_ = s.clone().requires_grad_(True)
    fd = _fd(problem, s)
    for wrong in (-ga, ga * problem.inner.n):
        (gs,) = torch.autograd.grad((problem.weights.alpha(s_) * wrong).sum(), s_)
        assert float((gs - fd).norm() / fd.norm()) > 0.5


def test_alpha_gradient_matches_finite_differences_in_alpha():
    problem = make_problem(n=30, beta_entropy=0.0, beta_ess=0.0)
    a = torch.rand(problem.inner.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    W = solve_head(problem.inner, a, grad_tol=1e-13).W
    ga = Exact().val_alpha_grad(problem, W, a).grad_alpha

    def L(al):
        return float(problem.val_loss(solve_head(problem.inner, al, grad_tol=1e-13).W))

    eps = 1e-6
    fd = torch.tensor([(L(a + eps * e) - L(a - eps * e)) / (2 * eps) for e in torch.eye(a.numel(), dtype=a.dtype)],
                      dtype=torch.float64)
    torch.testing.assert_close(ga, fd, rtol=1e-5, atol=1e-9)


def test_cg_matches_exact_at_tight_tolerance():
    problem = make_problem(n=80)
    s = torch.randn(problem.inner.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W = solve_head(problem.inner, problem.weights.alpha(s), grad_tol=1e-13).W
    ex = hypergradient(Exact(), problem, s, W)
    cg = hypergradient(ConjugateGradient(rtol=1e-10), problem, s, W)
    cos = float(torch.nn.functional.cosine_similarity(ex.grad_s, cg.grad_s, dim=0))
    assert cos >= 0.9999 and cg.converged and cg.hvps > 0
    # warm start from the exact V needs (almost) no iterations
    warm = hypergradient(ConjugateGradient(rtol=1e-10), problem, s, W, v0=ex.v)
    assert warm.hvps <= 2


def test_permuting_samples_permutes_the_hypergradient():
    problem = make_problem(n=30)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    s = torch.randn(30, dtype=torch.float64)
    W = solve_head(problem.inner, problem.weights.alpha(s), grad_tol=1e-13).W
    g = hypergradient(Exact(), problem, s, W).grad_s
    p2 = make_problem(n=30)
    p2.inner = HeadObjective(p2.inner.X[perm], p2.inner.y[perm], p2.inner.K, p2.inner.lam)
    p2.weights = type(problem.weights)(p2.inner.y, 3, beta_entropy=0.3, beta_ess=2.0, ess_floor=0.95)
    W2 = solve_head(p2.inner, p2.weights.alpha(s[perm]), grad_tol=1e-13).W
    torch.testing.assert_close(hypergradient(Exact(), p2, s[perm], W2).grad_s, g[perm], rtol=1e-8, atol=1e-12)


def test_registry_and_options_errors():
    assert {"exact", "cg"} <= set(HYPERGRAD.names())
    with pytest.raises(ConfigError, match="Registered: .*cg.*exact"):
        make_method("bogus")
    with pytest.raises(ConfigError, match="Valid options: rtol, max_iter, warm_start, precond, tol"):
        make_method("cg", {"tolerance": 1})
    with pytest.raises(ConfigError, match="'max_iter' parameter of cg must be an int >= 1"):
        make_method("cg", {"max_iter": 0})
    with pytest.raises(ConfigError, match="The 'precond' parameter of cg must be one of 'auto', 'dense', 'kfac', 'none', "
                                          "'block_jacobi'. Got 'jacobi' instead."):
        make_method("cg", {"precond": "jacobi"})
    with pytest.raises(ValueError, match="already registered"):
        HYPERGRAD.register("cg")(object)


def test_non_finite_hypergradient_is_an_error():
    problem = make_problem(n=30)
    s = torch.zeros(30, dtype=torch.float64)
    W = solve_head(problem.inner, problem.weights.alpha(s), grad_tol=1e-12).W

    class Broken:
        def val_alpha_grad(self, problem, W, alpha, v0=None):
            from reweight.hypergrad import ValAlphaGrad
            return ValAlphaGrad(torch.full_like(alpha, float("nan")))

    with pytest.raises(NonFiniteError, match="'broken' produced a non-finite dL_val/dalpha"):
        hypergradient(Broken(), problem, s, W, name="broken")
