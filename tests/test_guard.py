"""The outer optimisers that keep magnitudes (EG, NGD, SGD), the meta-val guard and cross-fitting, the summary contract."""

import dataclasses
import math

import pytest
import torch

from reweight.bilevel import run_bilevel
from reweight.config import RunConfig
from reweight.errors import ConfigError
from reweight.guard import BETAS, geometric_combine, heldout_losses, select_step
from reweight.head import HeadObjective, solve_head
from reweight.hypergrad import BilevelProblem, hypergradient, make_method
from reweight.weights import WeightModel, normalized_log_weights

from .conftest import make_problem


def _with_param(problem, parameterization):
    w = problem.weights
    wm = WeightModel(w.labels, w.num_classes, class_mass=w.class_mass, beta_entropy=w.beta_entropy,
                     beta_ess=w.beta_ess, ess_floor=w.ess_floor, parameterization=parameterization)
    return BilevelProblem(problem.inner, problem.X_val, problem.y_val, wm)


# ---- weights ------------------------------------------------------------------------------------
def test_normalized_log_weights_class_mass_and_shift_invariance():
    labels = torch.tensor([0, 0, 1, 1, 1])
    masses = torch.tensor([2.0, 3.0], dtype=torch.float64)
    u = torch.tensor([0.0, math.log(3.0), 1.0, 1.0, 1.0], dtype=torch.float64)
    a = normalized_log_weights(u, labels, masses)
    assert torch.allclose(a, torch.tensor([0.5, 1.5, 1.0, 1.0, 1.0], dtype=torch.float64))
    shifted = u + torch.tensor([5.0, 5.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    assert torch.allclose(normalized_log_weights(shifted, labels, masses), a)


def test_exp_parameterization_starts_uniform(problem):
    p = _with_param(problem, "exp")
    a = p.weights.alpha(p.weights.initial(torch.float64))
    assert torch.allclose(a, torch.ones_like(a))  # class_mass="count": uniform weights are 1
    with pytest.raises(ConfigError, match="parameterization"):
        WeightModel(problem.weights.labels, 3, parameterization="softmax")


# ---- optimisers ---------------------------------------------------------------------------------
def _first_step(problem, optimizer, lr=0.3):
    method = make_method("exact", {})
    out = run_bilevel(problem, method, 1, lr, grad_tol=1e-12, max_iter=200, optimizer=optimizer)
    s0 = problem.weights.initial(torch.float64)
    W = solve_head(problem.inner, problem.weights.alpha(s0), grad_tol=1e-12, max_iter=200).W
    hg = hypergradient(method, problem, s0.clone(), W)
    return out, hg, s0


def test_eg_step_is_mirror_descent_on_alpha(problem):
    p = _with_param(problem, "exp")
    out, hg, s0 = _first_step(p, "eg")
    g = hg.grad_alpha_total
    labels = p.weights.labels
    mu = torch.zeros(3, dtype=g.dtype).index_add(0, labels, g) / torch.bincount(labels, minlength=3)
    gc = g - mu[labels]
    expected_s = s0 - 0.3 * gc / gc.pow(2).mean().sqrt()
    assert torch.allclose(out.s, expected_s, atol=1e-10)
    # log alpha moved against the centred gradient: multiplicative update within each class
    alpha = p.weights.alpha(expected_s)
    ratio = alpha / torch.ones_like(alpha)
    for c in range(3):
        i = labels == c
        ref = torch.exp(-0.3 * gc[i] / gc.pow(2).mean().sqrt())
        assert torch.allclose(ratio[i], ref / ref.mean(), atol=1e-10)  # count masses: mean weight 1 per class


def test_grad_alpha_total_matches_finite_differences(problem):
    """dJ/dalpha (validation loss at W*(alpha) + penalties) against central differences in alpha."""
    p = _with_param(problem, "exp")
    method = make_method("exact", {})
    s = torch.randn(p.inner.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.3
    alpha = p.weights.alpha(s)
    hg = hypergradient(method, p, s.clone(), solve_head(p.inner, alpha, grad_tol=1e-13, max_iter=500).W)

    def J(a):
        W = solve_head(p.inner, a, grad_tol=1e-13, max_iter=500).W
        return float(p.val_loss(W)) + float(p.weights.penalty(a))

    for i in (0, 7, 31):
        e = torch.zeros_like(alpha)
        e[i] = 1e-5
        fd = (J(alpha + e) - J(alpha - e)) / 2e-5
        assert fd == pytest.approx(float(hg.grad_alpha_total[i]), rel=1e-4, abs=1e-8)


def test_ngd_and_sgd_steps(problem):
    out, hg, s0 = _first_step(problem, "ngd")
    g = hg.grad_s
    assert torch.allclose(out.s, s0 - 0.3 * g / g.pow(2).mean().sqrt(), atol=1e-10)
    out, hg, s0 = _first_step(problem, "sgd")
    assert torch.allclose(out.s, s0 - 0.3 * hg.grad_s, atol=1e-10)


def test_eg_needs_exp_parameterization_and_unknown_optimizer_refused(problem):
    with pytest.raises(ConfigError, match="parameterization='exp'"):
        run_bilevel(problem, make_method("exact", {}), 1, 0.1, optimizer="eg")
    with pytest.raises(ConfigError, match="optimizer"):
        run_bilevel(problem, make_method("exact", {}), 1, 0.1, optimizer="lbfgs")


def test_record_path_keeps_every_step(problem):
    out = run_bilevel(problem, make_method("exact", {}), 3, 0.1, grad_tol=1e-10, record_path=True)
    assert out.path_alpha.shape == (4, problem.inner.n) and out.path_W.shape[0] == 4
    assert torch.allclose(out.path_alpha[0], torch.ones(problem.inner.n, dtype=torch.float64))
    assert torch.allclose(out.path_alpha[-1], out.alpha)


# ---- guard --------------------------------------------------------------------------------------
def test_select_step_hand_computed():
    L = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.6, 0.4, 0.5], [0.9, 0.9, 0.9, 0.9]])
    c = select_step(L, z=1.0)
    d = torch.tensor([0.5, 0.4, 0.6, 0.5], dtype=torch.float64)
    assert c.step == 1 and not c.fell_back
    assert c.gain == pytest.approx(0.5) and c.se == pytest.approx(float(d.std() / 2))
    # a gain inside the noise: back to uniform weights
    L2 = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.2, 1.7, 0.3, 1.6]])  # mean gain 0.05, se ~ 0.43
    c2 = select_step(L2, z=1.0)
    assert c2.step == 0 and c2.fell_back and c2.best_step == 1
    assert select_step(L2, z=0.0).step == 1  # z = 0 keeps any improvement
    assert select_step(L[[0, 0]], z=1.0).step == 0  # nothing better than uniform


def test_heldout_losses_plain_and_tempered():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    Ws = torch.randn(2, 3, 4, generator=g)
    plain = heldout_losses(Ws, X, y, "loss")
    for t in range(2):
        assert torch.allclose(plain[t], torch.nn.functional.cross_entropy(X @ Ws[t].T, y, reduction="none"))
    tl = heldout_losses(Ws, X, y, "tloss")
    assert (tl.mean(1) <= plain.mean(1) + 1e-6).all()  # beta = 1 is on the grid
    assert torch.isclose(BETAS, torch.tensor(1.0)).any()
    # definition: the per-head temperature on the grid that minimises the mean loss
    grid = torch.stack([heldout_losses(b * Ws, X, y, "loss").mean(1) for b in BETAS])  # (betas, heads)
    assert torch.allclose(tl.mean(1), grid.min(0).values, atol=1e-6)
    with pytest.raises(ConfigError):
        heldout_losses(Ws, X, y, "acc")


def test_geometric_combine():
    labels = torch.tensor([0, 0, 1, 1])
    masses = torch.tensor([2.0, 2.0], dtype=torch.float64)
    a = torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(geometric_combine([a, a], labels, masses), a)
    u = torch.ones(4, dtype=torch.float64)
    c = geometric_combine([a, u], labels, masses)
    r = torch.sqrt(torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.allclose(c[:2], 2 * r / r.sum()) and torch.allclose(c[2:], u[2:])


# ---- learn_weights with the guard ----------------------------------------------------------------
def _cfg(**guard):
    cfg = RunConfig()
    return dataclasses.replace(cfg, outer=dataclasses.replace(cfg.outer, steps=4, lr=0.3),
                               head=dataclasses.replace(cfg.head, lam=0.05, grad_tol=1e-10, dtype="float64"),
                               hypergrad=dataclasses.replace(cfg.hypergrad, method="exact", options={}),
                               guard=dataclasses.replace(cfg.guard, **guard))


def _guarded_problem(cfg):
    from reweight.pipeline import bilevel_problem

    p = make_problem(n=60, m=40)
    mv = torch.arange(40) % 2 == 1
    X, Xv = p.inner.X[:, :-1], p.X_val[:, :-1]
    return bilevel_problem(cfg, X.float(), p.inner.y, Xv.float(), p.y_val, 3, meta_val=mv)


def test_crossfit_guard_that_falls_back_gives_train_plus_clean():
    """z huge: the guard keeps step 0 (uniform weights); with trusted samples in the head the result is exactly
    the head on train + trusted at weight 1 (the train_plus_clean baseline)."""
    from reweight.pipeline import learn_weights

    cfg = _cfg(mode="crossfit", z=1e9, trusted_in_inner=True)
    p = _guarded_problem(cfg)
    out = learn_weights(cfg, p)
    assert out.guard["step"] == 0 and out.guard["fell_back"] in (True, False) and out.guard["mode"] == "crossfit"
    assert torch.allclose(out.alpha, torch.ones_like(out.alpha))
    Xt, yt = p.trusted()
    obj = HeadObjective(torch.cat([p.inner.X, Xt]), torch.cat([p.inner.y, yt]), 3, p.inner.lam)
    ref = solve_head(obj, torch.ones(obj.n, dtype=p.inner.X.dtype), grad_tol=1e-10).W
    assert torch.allclose(out.W, ref, atol=1e-5)
    assert len(out.guard["heldout_loss"]) == 5
    assert out.score is not None and not torch.allclose(out.score, out.alpha)  # step 1's ranking for detection


def test_select_guard_keeps_a_helpful_step_and_off_uses_whole_trusted_set():
    from reweight.pipeline import learn_weights

    cfg = _cfg(mode="select", z=0.0, trusted_in_inner=False)
    p = _guarded_problem(cfg)
    out = learn_weights(cfg, p)
    t = out.guard["step"]
    assert 0 <= t <= 4 and out.guard["heldout_loss"][t] == min(out.guard["heldout_loss"])
    off = learn_weights(_cfg(mode="off", trusted_in_inner=False), p)
    assert off.guard == {"mode": "off", "step": 4}
    with pytest.raises(ConfigError, match="meta-val"):
        no_mv = BilevelProblem(p.inner, p.X_val, p.y_val, p.weights)
        learn_weights(cfg, no_mv)


def test_guard_config_validation():
    from reweight.config import load_config

    with pytest.raises(ConfigError):
        load_config(None, ["guard.mode=sometimes"])
    with pytest.raises(ConfigError):
        load_config(None, ["guard.z=-1"])
    with pytest.raises(ConfigError):
        load_config(None, ["outer.optimizer=rmsprop"])


def test_preflight_refuses_guard_without_meta_val_and_unknown_names():
    from reweight.config import load_config
    from reweight.pipeline import preflight

    with pytest.raises(ConfigError, match="meta_val_fraction"):
        preflight(load_config(None, ["data.meta_val_fraction=0.0"]), run_dir=False)
    with pytest.raises(ConfigError, match="knn_clen"):
        preflight(load_config(None, ["compare.baselines=[knn_clen]"]), run_dir=False)
    with pytest.raises(ConfigError, match="influence_xx"):
        preflight(load_config(None, ["compare.attribution=[influence_xx]"]), run_dir=False)



def test_yaml_off_reads_as_the_off_mode(tmp_path):
    """YAML 1.1 parses `off` as False: guard.mode=off (command line and files) must still mean the 'off' mode."""
    from reweight.config import load_config

    assert load_config(None, ["guard.mode=off"]).guard.mode == "off"
    f = tmp_path / "c.yaml"
    f.write_text("guard: {mode: off}\n")
    assert load_config(str(f)).guard.mode == "off"
    with pytest.raises(ConfigError, match="guard.mode"):
        load_config(None, ["guard.mode=on"])  # no 'on' mode: an error, not a silent choice
