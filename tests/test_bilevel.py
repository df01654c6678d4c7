"""The outer loop: it lowers the outer objective, logs diagnostics, and stops cleanly on non-finite values."""

import pytest
import torch

from reweight.bilevel import run_bilevel, weight_auroc
from reweight.config import RunConfig
from reweight.errors import NonFiniteError
from reweight.head import mean_ce, mean_ce_grad
from reweight.hypergrad import ConjugateGradient, Exact
from reweight.runs import RunDir
from tests.conftest import make_problem


def test_outer_loop_lowers_objective_and_logs():
    problem = make_problem(n=90, seed=3, beta_entropy=0.0, beta_ess=0.1, ess_floor=0.3)
    out = run_bilevel(problem, ConjugateGradient(rtol=1e-10), 25, 0.2, grad_tol=1e-12,
                      evals={"val": (problem.X_val, problem.y_val)})
    first, last = out.metrics[0], out.metrics[-1]
    assert last["objective"] < first["objective"]
    assert all(r["inner_converged"] and r["hypergrad_converged"] for r in out.metrics)
    assert len(last["ess_ratio"]) == 3 and 0 < last["ess_ratio_min"] <= 1
    assert out.metrics[1]["inner_iters"] <= out.metrics[0]["inner_iters"]  # warm start


def test_exact_and_cg_outer_trajectories_agree():
    p1, p2 = make_problem(n=60, seed=5), make_problem(n=60, seed=5)
    a = run_bilevel(p1, Exact(), 8, 0.1, grad_tol=1e-12)
    b = run_bilevel(p2, ConjugateGradient(rtol=1e-12), 8, 0.1, grad_tol=1e-12)
    torch.testing.assert_close(a.s, b.s, rtol=1e-6, atol=1e-8)


def test_non_finite_hypergradient_stops_with_step_and_keeps_checkpoint(tmp_path):
    problem = make_problem(n=45)
    calls = {"n": 0}

    class NaNAtStep3:
        def val_alpha_grad(self, problem, W, alpha, v0=None):
            calls["n"] += 1
            ga = Exact().val_alpha_grad(problem, W, alpha)
            if calls["n"] == 4:
                ga.grad_alpha = ga.grad_alpha * float("nan")
            return ga

    run = RunDir(tmp_path / "r", RunConfig())
    with pytest.raises(NonFiniteError, match=r"Outer step 3: Hypergradient method 'nanny' produced a non-finite dL_val/dalpha"):
        run_bilevel(problem, NaNAtStep3(), 10, 0.1, checkpoint_every=1, run=run, method_name="nanny")
    ck = run.load_latest_checkpoint()
    assert ck["step"] == 3 and torch.isfinite(ck["s"]).all()


def test_extreme_logits_stay_finite_in_float32():
    X = torch.tensor([[1e4, 1.0], [-1e4, 1.0]])
    W = torch.tensor([[10.0, 0.0], [-10.0, 0.0]])
    y = torch.tensor([1, 0])
    assert torch.isfinite(mean_ce(W, X, y)) and float(mean_ce(W, X, y)) > 1e4
    assert torch.isfinite(mean_ce_grad(W, X, y)).all()


def test_weight_auroc():
    alpha = torch.tensor([0.1, 0.2, 0.9, 0.8])
    assert weight_auroc(alpha, torch.tensor([True, True, False, False])) == 1.0
    assert weight_auroc(alpha, torch.tensor([False, False, True, True])) == 0.0
    assert weight_auroc(alpha, torch.zeros(4, dtype=torch.bool)) != weight_auroc(alpha, torch.zeros(4, dtype=torch.bool))
