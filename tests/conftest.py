"""Shared fixtures: small float64 problems with known structure."""

from __future__ import annotations

import pytest
import torch

from reweight.head import HeadObjective, add_bias
from reweight.hypergrad import BilevelProblem
from reweight.weights import WeightModel

# Test problems are tiny: intra-op threads only add spin-wait overhead (and on a shared, loaded
# 2-core machine that overhead is 100x the work). One thread keeps the suite fast and deterministic.
torch.set_num_threads(1)


def make_problem(n=60, m=40, d=4, K=3, lam=0.05, seed=0, dtype=torch.float64, beta_entropy=0.3, beta_ess=2.0,
                 ess_floor=0.95, class_mass="count"):
    """A small strongly convex bilevel problem with both penalties active (floor 0.95 > typical ESS ratio)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(K, d, generator=g, dtype=dtype) * 1.5
    y = torch.arange(n) % K
    X = add_bias(centers[y] + torch.randn(n, d, generator=g, dtype=dtype))
    yv = torch.arange(m) % K
    Xv = add_bias(centers[yv] + torch.randn(m, d, generator=g, dtype=dtype))
    wm = WeightModel(y, K, class_mass=class_mass, beta_entropy=beta_entropy, beta_ess=beta_ess, ess_floor=ess_floor)
    return BilevelProblem(HeadObjective(X, y, K, lam), Xv, yv, wm)


@pytest.fixture
def problem():
    return make_problem()
