r"""The hypergradient methods' first-order leave-one-out prediction as attribution methods.

A method of :data:`reweight.hypergrad.HYPERGRAD` returns :math:`\partial L/\partial\alpha_i` for a
target loss :math:`L`; setting :math:`\alpha_i \to 0` changes :math:`L` by, to first order,

.. math::

    \hat\Delta_i = -\alpha_i\,\frac{\partial L}{\partial\alpha_i}
    = \frac{\alpha_i}{n}\,g_i^\top H^{-1}\nabla_W L\,h_i,

the same quantity as the influence functions of :mod:`reweight.attribution.influence` computed
through the bilevel code path (so the two are tested against each other). Per-query targets use a
one-row "validation set".

Reference:
    Koh & Liang, ICML 2017; Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

import torch

from ..hypergrad import BilevelProblem, make_method
from ..weights import WeightModel
from .base import ATTRIBUTION, AttributionMethod, AttributionProblem

__all__ = ["HypergradCG", "HypergradExact", "HypergradFirstOrder"]


@dataclass
class HypergradFirstOrder(AttributionMethod):
    r""":math:`-\alpha_i\,\partial L/\partial\alpha_i` from the hypergradient method ``method``.

    Args:
        method: a registered hypergradient method name (``exact``, ``cg``, ...).
        options: its keyword options.
    """

    method: str = "exact"
    options: Dict[str, Any] = field(default_factory=dict)
    name: ClassVar[str] = "hypergrad"

    def _fit(self, problem: AttributionProblem) -> None:
        self._method = make_method(self.method, self.options)
        self._weights = WeightModel(problem.inner.y, problem.K)

    def _one(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pr = self.problem
        tp = BilevelProblem(pr.inner, X, y, self._weights, all_classes=False)
        vag = self._method.val_alpha_grad(tp, pr.W, pr.alpha)
        return -pr.alpha * vag.grad_alpha

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        if reduce == "mean":
            return self._one(X, y)
        return torch.stack([self._one(X[q:q + 1], y[q:q + 1]) for q in range(X.shape[0])])


@ATTRIBUTION.register("hypergrad_exact")
@dataclass
class HypergradExact(HypergradFirstOrder):
    """First-order LOO prediction from the ``exact`` hypergradient (dense implicit differentiation)."""

    method: str = "exact"
    name: ClassVar[str] = "hypergrad_exact"


@ATTRIBUTION.register("hypergrad_cg")
@dataclass
class HypergradCG(HypergradFirstOrder):
    """First-order LOO prediction from the ``cg`` hypergradient (CG implicit differentiation)."""

    method: str = "cg"
    options: Dict[str, Any] = field(default_factory=lambda: {"rtol": 1e-8, "max_iter": 1000})
    name: ClassVar[str] = "hypergrad_cg"
