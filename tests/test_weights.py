"""Class-normalised softplus weights, entropy/ESS penalties and reports against hand computations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reweight.errors import ConfigError, DataError
from reweight.weights import (
    WeightModel,
    class_masses,
    class_report,
    entropy_per_class,
    ess_per_class,
    initial_s,
    log_softplus,
    normalized_weights,
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=3, max_size=40),
    st.integers(min_value=2, max_value=4),
    st.sampled_from(["count", "balanced"]),
)
def test_class_mass_kept_for_arbitrary_s(svals, K, mode):
    n = len(svals)
    y = torch.arange(n) % K
    K = int(y.max()) + 1
    s = torch.tensor(svals, dtype=torch.float64)
    m = class_masses(y, K, mode)
    a = normalized_weights(s, y, m)
    assert torch.isfinite(a).all() and (a >= 0).all()
    sums = torch.zeros(K, dtype=torch.float64).index_add(0, y, a)
    torch.testing.assert_close(sums, m, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=-300, max_value=300, allow_nan=False), min_size=4, max_size=30))
def test_float32_extreme_s_finite_with_finite_gradient(svals):
    y = torch.arange(len(svals)) % 2
    wm = WeightModel(y, 2, beta_entropy=1.0, beta_ess=1.0)
    s = torch.tensor(svals, dtype=torch.float32, requires_grad=True)
    a = wm.alpha(s)
    assert torch.isfinite(a).all()
    (g,) = torch.autograd.grad(wm.penalty(a) + (a * torch.arange(len(svals))).sum(), s)
    assert torch.isfinite(g).all()


def test_uniform_at_initial_s_and_balanced_masses():
    y = torch.tensor([0, 0, 0, 1])
    a = normalized_weights(initial_s(4, torch.float64), y, class_masses(y, 2, "count"))
    torch.testing.assert_close(a, torch.ones(4, dtype=torch.float64))
    b = normalized_weights(initial_s(4, torch.float64), y, class_masses(y, 2, "balanced"))
    torch.testing.assert_close(b, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0], dtype=torch.float64))


def test_normalisation_hand_computed():
    y = torch.tensor([0, 0, 1])
    s = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    sp = torch.log1p(torch.exp(s))
    expected = torch.tensor([2 * sp[0] / (sp[0] + sp[1]), 2 * sp[1] / (sp[0] + sp[1]), 1.0], dtype=torch.float64)
    torch.testing.assert_close(normalized_weights(s, y, class_masses(y, 2)), expected)


def test_log_softplus_matches_naive_where_naive_is_exact():
    s = torch.linspace(-14, 30, 200, dtype=torch.float64)
    torch.testing.assert_close(log_softplus(s), torch.log(torch.log1p(torch.exp(s))))
    assert torch.isfinite(log_softplus(torch.tensor([-1e30, 1e30]))).all()


def test_ess_and_entropy_hand_computed():
    y = torch.tensor([0, 0, 0, 1, 1])
    a = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    ess = ess_per_class(a, y, 2)
    torch.testing.assert_close(ess, torch.tensor([36 / 14, 2.0], dtype=torch.float64))
    p = torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64)
    H0 = float(-(p * p.log()).sum())
    torch.testing.assert_close(entropy_per_class(a, y, 2), torch.tensor([H0, math.log(2)], dtype=torch.float64))


def test_penalties_hand_computed_and_zero_at_uniform():
    y = torch.tensor([0, 0, 0, 1, 1])
    wm = WeightModel(y, 2, beta_entropy=1.0, beta_ess=1.0, ess_floor=0.9)
    ones = torch.ones(5, dtype=torch.float64)
    assert float(wm.entropy_penalty(ones)) == pytest.approx(0.0, abs=1e-12)
    assert float(wm.ess_penalty_value(ones)) == 0.0
    a = torch.tensor([0.5, 1.0, 1.5, 1.0, 1.0], dtype=torch.float64)
    p = a[:3] / 3
    ent = (3 / 5) * (math.log(3) + float((p * p.log()).sum()))
    assert float(wm.entropy_penalty(a)) == pytest.approx(ent, rel=1e-12)
    ratio0 = (3.0 ** 2 / float((a[:3] ** 2).sum())) / 3
    assert float(wm.ess_penalty_value(a)) == pytest.approx((3 / 5) * max(0, 0.9 - ratio0) ** 2, rel=1e-12)
    wl = WeightModel(y, 2, beta_ess=1.0, ess_penalty="log")
    assert float(wl.ess_penalty_value(a)) == pytest.approx((3 / 5) * -math.log(ratio0), rel=1e-12)


def test_class_report_columns_and_values():
    y = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.5, 0.5, 1.0, 1.0])
    rows = class_report(a, y, 2, corrupted=torch.tensor([False, True, False, False]))
    assert rows[0]["ess"] == pytest.approx(4 / 2.5)
    assert rows[0]["mean_w_clean"] == 1.5 and rows[0]["mean_w_corrupted"] == 0.5
    assert rows[0]["corruption_rate"] == 0.5 and rows[1]["ess_ratio"] == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(DataError, match="out of range"):
        WeightModel(torch.tensor([0, 3]), 2)
    with pytest.raises(DataError, match="no sample"):
        WeightModel(torch.tensor([0, 0]), 2)
    wm = WeightModel(torch.tensor([0, 1]), 2)
    with pytest.raises(ConfigError, match="Expected s of shape"):
        wm.alpha(torch.zeros(3))
    with pytest.raises(ConfigError, match="class_mass"):
        class_masses(torch.tensor([0, 1]), 2, "bogus")
