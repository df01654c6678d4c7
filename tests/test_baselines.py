"""Reweighting baselines: uniform, class-balanced (Cui et al. 2019), L2RW (Ren et al. 2018), MWN (Shu et al. 2019)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from reweight.baselines import BASELINES, class_balanced_weights, make_baseline
from reweight.bilevel import weight_auroc
from reweight.errors import ConfigError, NonFiniteError
from reweight.head import HeadObjective, add_bias, solve_head
from reweight.hypergrad import BilevelProblem
from reweight.weights import WeightModel

DT = torch.float64


def _noisy_problem(n=240, d=6, K=3, rate=0.3, seed=0, dtype=DT):
    """Gaussian clusters; ``rate`` of the training labels flipped to another class; clean validation."""
    g = torch.Generator().manual_seed(seed)
    means = 2.5 * torch.randn(K, d, generator=g, dtype=dtype)

    def draw(m):
        y = torch.arange(m) % K
        return add_bias(means[y] + torch.randn(m, d, generator=g, dtype=dtype)), y

    X, y_clean = draw(n)
    Xv, yv = draw(60)
    Xm, ym = draw(45)  # held-out meta-val part of the trusted set
    flip = torch.randperm(n, generator=g)[: int(rate * n)]
    y = y_clean.clone()
    y[flip] = (y[flip] + 1 + torch.randint(0, K - 1, (flip.numel(),), generator=g)) % K
    corrupted = y != y_clean
    inner = HeadObjective(X, y, K, 0.05)
    return BilevelProblem(inner, Xv, yv, WeightModel(y, K), X_meta_val=Xm, y_meta_val=ym), corrupted


@pytest.fixture(scope="module")
def noisy():
    return _noisy_problem()


FAST = {"uniform": {}, "class_balanced": {}, "l2rw": {"epochs": 8, "batch_size": 40, "lr": 0.01},
        "mwn": {"epochs": 8, "batch_size": 40, "lr": 0.01}, "clean_only": {}, "train_plus_clean": {},
        "loss_filter": {}, "knn_clean": {}}
#: baselines whose head is not the L2 head of their training-set weights (they train on the trusted set too)
TRUSTED_HEAD = ("clean_only", "train_plus_clean")


def test_fast_options_cover_registry():
    assert sorted(FAST) == BASELINES.names()


@pytest.mark.parametrize("name", BASELINES.names())
def test_contract(noisy, name):
    """Weights finite, >= 0, summing to n; the reported head is the exact L2 head of those weights."""
    prob, corrupted = noisy
    r = make_baseline(name, {**FAST[name], "head_grad_tol": 1e-10}).fit(prob, seed=0)
    n = prob.inner.n
    assert r.name == name and r.alpha.shape == (n,) and bool(torch.isfinite(r.alpha).all())
    assert bool((r.alpha >= 0).all())
    if name == "clean_only":  # no training sample is used
        assert float(r.alpha.sum()) == 0.0
    elif name in ("loss_filter", "knn_clean"):  # kept samples weigh 1, dropped ones 0 (same lambda as uniform)
        assert set(r.alpha.unique().tolist()) <= {0.0, 1.0}
    else:
        assert float(r.alpha.sum()) == pytest.approx(n, rel=1e-10)
    if name not in TRUSTED_HEAD:
        assert float(prob.inner.grad(r.W, r.alpha).norm()) <= 1e-10
    assert r.seconds >= 0
    if name in ("l2rw", "mwn"):
        assert r.W_sgd is not None and len(r.history) == FAST[name]["epochs"]


@pytest.mark.parametrize("name", ["l2rw", "mwn"])
def test_meta_baselines_flag_noise_better_than_chance(noisy, name):
    prob, corrupted = noisy
    r = make_baseline(name, FAST[name]).fit(prob, seed=0)
    assert weight_auroc(r.alpha, corrupted) > 0.75


@pytest.mark.parametrize("name", ["l2rw", "mwn"])
def test_deterministic_per_seed(noisy, name):
    prob, _ = noisy
    a = make_baseline(name, FAST[name]).fit(prob, seed=3)
    b = make_baseline(name, FAST[name]).fit(prob, seed=3)
    c = make_baseline(name, FAST[name]).fit(prob, seed=4)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.W_sgd, b.W_sgd)
    assert not torch.equal(a.alpha, c.alpha)


def test_class_balanced_hand_computation():
    labels = torch.tensor([0, 0, 0, 1])
    w = class_balanced_weights(labels, 2, beta=0.5)
    e0, e1 = (1 - 0.5**3) / 0.5, (1 - 0.5**1) / 0.5  # effective numbers 1.75 and 1
    raw = torch.tensor([1 / e0, 1 / e0, 1 / e0, 1 / e1], dtype=DT)
    assert_close(w, raw * 4 / raw.sum(), rtol=1e-12, atol=0)
    assert_close(class_balanced_weights(labels, 2, beta=0.0), torch.ones(4, dtype=DT), rtol=0, atol=1e-15)
    # beta -> 1: inverse class frequency (per-class mass equal)
    w = class_balanced_weights(labels, 2, beta=1 - 1e-9)
    assert float(w[:3].sum()) == pytest.approx(float(w[3]), rel=1e-6)


def test_l2rw_one_step_against_autograd(noisy):
    """One full-batch L2RW step from W = 0 against an independent autograd computation of the
    look-ahead meta-gradient d L_val(W - eta grad[sum_i eps_i l_i + lam/2 ||W||^2]) / d eps at eps = 0."""
    prob, _ = noisy
    X, y, n, lam, K = prob.inner.X, prob.inner.y, prob.inner.n, prob.inner.lam, prob.inner.K
    eta = 0.3
    r = make_baseline("l2rw", {"epochs": 1, "batch_size": n, "lr": eta, "momentum": 0.0}).fit(prob, seed=0)
    W0 = torch.zeros(K, X.shape[1], dtype=DT, requires_grad=True)
    eps = torch.zeros(n, dtype=DT, requires_grad=True)
    losses = torch.nn.functional.cross_entropy(X @ W0.T, y, reduction="none")
    (gW,) = torch.autograd.grad((eps * losses).sum() + 0.5 * lam * (W0 * W0).sum(), W0, create_graph=True)
    W1 = W0 - eta * gW
    (ge,) = torch.autograd.grad(torch.nn.functional.cross_entropy(prob.X_val @ W1.T, prob.y_val), eps)
    w = (-ge).clamp_min(0)
    w = w / w.sum()
    assert_close(r.alpha, n * w, rtol=1e-10, atol=1e-12)
    # the actual SGD step with those weights: W1 = 0 - eta * (sum_i w_i grad l_i + lam * 0)
    (gl,) = torch.autograd.grad((w.detach() * torch.nn.functional.cross_entropy(X @ W0.T, y, reduction="none")).sum(), W0)
    assert_close(r.W_sgd, -eta * gl, rtol=1e-10, atol=1e-12)


def test_mwn_first_meta_step_against_finite_differences(noisy):
    """MWN's meta-gradient is autograd through the closed-form pseudo-update; check it by central
    finite differences of theta -> L_val(W - eta grad[(1/B) sum V(l_i; theta) l_i + lam/2||W||^2])."""
    from reweight.baselines import _WeightNet

    prob, _ = noisy
    X, y, lam = prob.inner.X, prob.inner.y, prob.inner.lam
    torch.manual_seed(0)
    net = _WeightNet(5).to(DT)
    W = 0.1 * torch.randn(prob.inner.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    eta = 0.5
    losses = torch.nn.functional.cross_entropy(X @ W.T, y, reduction="none")
    G = torch.softmax(X @ W.T, 1) - torch.nn.functional.one_hot(y, prob.inner.K).to(DT)

    def meta(params_override=None):
        v = net(losses)
        W_hat = W - eta * ((v[:, None] * G).T @ X / X.shape[0] + lam * W)
        return torch.nn.functional.cross_entropy(prob.X_val @ W_hat.T, prob.y_val)

    net.zero_grad()
    meta().backward()
    p = net.fc1.weight
    h = 1e-6
    for j in (0, 3):
        with torch.no_grad():
            p[j, 0] += h
            up = float(meta())
            p[j, 0] -= 2 * h
            down = float(meta())
            p[j, 0] += h
        assert (up - down) / (2 * h) == pytest.approx(float(p.grad[j, 0]), rel=1e-5, abs=1e-10)


def test_uniform_is_the_plain_l2_head(noisy):
    prob, _ = noisy
    r = make_baseline("uniform", {"head_grad_tol": 1e-10}).fit(prob)
    ref = solve_head(prob.inner, torch.ones(prob.inner.n, dtype=DT), grad_tol=1e-10).W
    assert_close(r.W, ref, rtol=1e-8, atol=1e-10)


def test_float32_runs():
    prob, corrupted = _noisy_problem(dtype=torch.float32)
    for name in BASELINES.names():
        r = make_baseline(name, FAST[name]).fit(prob, seed=0)
        assert r.alpha.dtype == torch.float32 and bool(torch.isfinite(r.W).all())


def test_diverging_sgd_raises(noisy):
    prob, _ = noisy
    with pytest.raises(NonFiniteError, match="lower its 'lr'"):
        make_baseline("l2rw", {"epochs": 3, "lr": 1e200, "momentum": 0.0}).fit(prob)


def test_unknown_baseline_and_option():
    with pytest.raises(ConfigError, match="Registered: class_balanced, clean_only, knn_clean, l2rw, loss_filter, mwn"):
        make_baseline("focal")
    with pytest.raises(ConfigError, match="Unknown option 'steps' for reweighting baseline 'l2rw'. Valid options: epochs"):
        make_baseline("l2rw", {"steps": 3})


@pytest.mark.parametrize("name, options, match", [
    ("l2rw", {"epochs": 0}, "'epochs' parameter of l2rw must be an int >= 1. Got 0"),
    ("mwn", {"epochs": 1.5}, "'epochs' parameter of mwn must be an int >= 1. Got 1.5"),
    ("l2rw", {"batch_size": 0}, "'batch_size' parameter of l2rw must be an int >= 1"),
    ("mwn", {"lr": -0.1}, "'lr' parameter of mwn must be a finite number > 0. Got -0.1"),
    ("l2rw", {"momentum": 1.0}, r"'momentum' parameter of l2rw must be a finite number in \[0, 1\). Got 1.0"),
    ("mwn", {"hidden": 0}, "'hidden' parameter of mwn must be an int >= 1"),
    ("mwn", {"meta_lr": 0.0}, "'meta_lr' parameter of mwn must be a finite number > 0"),
    ("mwn", {"meta_weight_decay": -1.0}, "'meta_weight_decay' parameter of mwn must be a finite number >= 0"),
    ("class_balanced", {"beta": 1.0}, r"'beta' parameter of class_balanced must be a finite number in \[0, 1\). Got 1.0"),
])
def test_option_validation(name, options, match):
    with pytest.raises(ConfigError, match=match):
        make_baseline(name, options)


def test_class_balanced_weights_validation():
    with pytest.raises(ConfigError, match=r"'beta' parameter of class_balanced_weights must be a finite number in \[0, 1\)"):
        class_balanced_weights(torch.tensor([0, 1]), 2, beta=-0.1)


# --------------------------------------------------------------------------------------------
# the noise-grid driver's pure parts (tables and config validation; the runs themselves are
# exercised by `python -m experiments.noise_grid --quick`)
# --------------------------------------------------------------------------------------------


def _fake_rows():
    rows = []
    for seed, (cg, l2) in enumerate([(0.90, 0.89), (0.91, 0.92), (0.95, 0.93)]):
        for method, acc in (("bilevel_cg", cg), ("l2rw", l2)):
            rows.append({"setting": "sym40", "method": method, "seed": seed, "test_acc": acc,
                         "auroc": 0.9 if method == "l2rw" else None, "ess_ratio_min": 0.5, "seconds": 1.0})
    return rows


def test_noise_grid_aggregate_and_paired():
    from experiments.noise_grid import aggregate, markdown, paired

    rows = _fake_rows()
    t = aggregate(rows)
    cg = t[t.method == "bilevel_cg"].iloc[0]
    assert cg.seeds == 3 and cg.test_acc_mean == pytest.approx(0.92)
    assert cg.test_acc_std == pytest.approx(float(torch.tensor([0.90, 0.91, 0.95], dtype=DT).std()))  # ddof 1
    assert cg.auroc_mean != cg.auroc_mean  # NaN where there is no AUROC
    p = paired(rows, methods=("bilevel_cg",), against=("l2rw",)).iloc[0]
    assert p.diff_mean == pytest.approx((0.01 - 0.01 + 0.02) / 3) and p.seeds_not_worse == 2
    assert p.diff_min == pytest.approx(-0.01) and p.diff_max == pytest.approx(0.02)
    md = markdown(t, paired(rows))
    assert "| sym40 | bilevel_cg | 3 | 0.920 ± 0.026 | n/a |" in md and "2/3" in md


def test_noise_grid_config_validation():
    from experiments.noise_grid import NoiseGridConfig
    from reweight.config import from_dict

    with pytest.raises(ConfigError, match="'settings' parameter must hold names from sym20"):
        from_dict(NoiseGridConfig, {"settings": ["sym30"]})
    with pytest.raises(ConfigError, match="'methods' parameter must hold names from oracle"):
        from_dict(NoiseGridConfig, {"methods": ["focal"]})
    with pytest.raises(ConfigError, match="Unknown config key 'seed'"):
        from_dict(NoiseGridConfig, {"seed": 1})


def test_clean_only_is_the_trusted_head_with_cross_validated_lambda(noisy):
    prob, corrupted = noisy
    r = make_baseline("clean_only", {"head_grad_tol": 1e-10}).fit(prob, seed=0)
    Xt, yt = prob.trusted()
    lam = r.extra["lam_selected"]
    assert lam in [row["lam"] for row in r.extra["cv"]] and r.extra["n_trusted"] == Xt.shape[0] == 105
    assert min(r.extra["cv"], key=lambda row: row["cv_loss"])["lam"] == lam
    ref = solve_head(HeadObjective(Xt, yt, prob.inner.K, lam), torch.ones(105, dtype=DT), grad_tol=1e-12).W
    assert_close(r.W, ref, rtol=1e-7, atol=1e-8)
    assert_close(r.score, torch.softmax(prob.inner.X @ r.W.T, 1).gather(1, prob.inner.y[:, None])[:, 0])
    assert weight_auroc(r.score, corrupted) > 0.9  # the clean head recognises flipped labels


def test_train_plus_clean_trains_on_the_union(noisy):
    prob, _ = noisy
    r = make_baseline("train_plus_clean", {"head_grad_tol": 1e-10}).fit(prob)
    Xt, yt = prob.trusted()
    union = HeadObjective(torch.cat([prob.inner.X, Xt]), torch.cat([prob.inner.y, yt]), prob.inner.K, prob.inner.lam)
    assert float(union.grad(r.W, torch.ones(union.n, dtype=DT)).norm()) <= 1e-10


@pytest.mark.parametrize("name,knob", [("loss_filter", "fraction_selected"), ("knn_clean", "k_selected")])
def test_filters_select_their_knob_on_meta_val(noisy, name, knob):
    prob, corrupted = noisy
    r = make_baseline(name, {"head_grad_tol": 1e-10}).fit(prob)
    table = r.extra["candidates"]
    assert r.extra[knob] == min(table, key=lambda row: (row["meta_val_loss"], -row["meta_val_acc"]))["knob"][0]
    assert weight_auroc(r.score, corrupted) > 0.85 and weight_auroc(r.alpha, corrupted) > 0.8
    if name == "loss_filter":
        assert r.extra[knob] > 0  # 30% noise: dropping some high-loss samples wins on meta-val
        assert int((r.alpha == 0).sum()) == round(r.extra[knob] * prob.inner.n)


def test_filters_without_meta_val_keep_their_default(noisy):
    prob, _ = noisy
    bare = BilevelProblem(prob.inner, prob.X_val, prob.y_val, prob.weights)
    assert make_baseline("loss_filter").fit(bare).extra["fraction_selected"] == 0.0
