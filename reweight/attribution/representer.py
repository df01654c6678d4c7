r"""Representer points of the L2 head (Yeh et al. 2018): an exact decomposition of every logit.

At the optimum of :math:`F(W,\alpha) = \frac1n\sum_i\alpha_i\ell(Wh_i,y_i) + \frac\lambda2\|W\|^2`,
stationarity :math:`\nabla_W F = 0` gives :math:`\lambda W^* = -\frac1n\sum_i\alpha_i g_i h_i^\top`, so

.. math::

    W^* h_x = \sum_i r_i\, k(i, x), \qquad r_i = -\frac{\alpha_i\, g_i}{\lambda n} \in \mathbb R^K,
    \qquad k(i, x) = h_i^\top h_x,

with :math:`g_i = p_i - e_{y_i}` and the bias column part of :math:`h`. The identity is exact at
the optimum (its error is bounded by :math:`\|\nabla_W F\|\,\|h_x\|/\lambda`). The contribution of
training sample ``i`` to logit ``c`` of ``x`` is :math:`r_{ic} k(i,x)`: the ``k`` largest are the
*supporting* samples, the ``k`` most negative the *inhibiting* ones.

Reference:
    Yeh, Kim, Yen & Ravikumar, "Representer point selection for explaining deep neural networks",
    NeurIPS 2018, https://arxiv.org/abs/1811.09720.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..errors import DataError
from ..head import representer_values
from ..validate import check_top_k
from .base import (
    ATTRIBUTION,
    AttributionMethod,
    AttributionProblem,
    check_queries,
    loss_change_from_v,
    target_gradients,
)

__all__ = [
    "Representer",
    "RepresenterExplanation",
    "explain",
    "representer_contributions",
    "representer_logits",
    "representer_values",
]


def representer_contributions(problem: AttributionProblem, X_query: torch.Tensor,
                              y_query: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Contributions :math:`r_{ic}\,k(i, x_q)` of every training sample to every logit, ``(Q, n, K)``.

    Summing over ``i`` gives the logits :math:`W^* h_{x_q}` (exactly, at the optimum).

    Raises:
        DataError: if ``X_query`` has another width than the training features (bias included).
    """
    _check_x(problem, X_query, y_query, "representer_contributions")
    R = representer_values(problem.residuals(), problem.alpha, problem.lam, problem.n)  # (n, K)
    Kx = X_query.to(problem.inner.X.dtype) @ problem.inner.X.T  # (Q, n)
    return Kx[:, :, None] * R[None, :, :]


def representer_logits(problem: AttributionProblem, X_query: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_i r_i\,k(i, x_q)`, ``(Q, K)``: the logits rebuilt from the representer values."""
    _check_x(problem, X_query, None, "representer_logits")
    R = representer_values(problem.residuals(), problem.alpha, problem.lam, problem.n)
    return (X_query.to(problem.inner.X.dtype) @ problem.inner.X.T) @ R


def _check_x(problem: AttributionProblem, X: torch.Tensor, y: Optional[torch.Tensor], where: str) -> None:
    y_ = torch.zeros(torch.as_tensor(X).shape[0], dtype=torch.int64) if y is None else y
    if torch.as_tensor(X).ndim != 2:
        raise DataError(f"The 'X_query' parameter of {where} must be a 2-D (Q, D) tensor. "
                        f"Got shape {tuple(torch.as_tensor(X).shape)} instead.")
    check_queries(X, y_, problem.D, problem.K, where)


@dataclass
class RepresenterExplanation:
    """Top-``k`` supporting and inhibiting training samples of each query, for one logit per query.

    Attributes:
        cls: ``(Q,)`` explained class per query (default: the predicted one).
        logits: ``(Q, K)`` the head's logits :math:`W^* h_x`.
        support_idx, support_val: ``(Q, k)`` training rows with the largest contributions
            :math:`r_{i,c}k(i,x)` to logit ``cls`` and those contributions (descending).
        inhibit_idx, inhibit_val: ``(Q, k)`` the most negative contributions (ascending).
    """

    cls: torch.Tensor
    logits: torch.Tensor
    support_idx: torch.Tensor
    support_val: torch.Tensor
    inhibit_idx: torch.Tensor
    inhibit_val: torch.Tensor


def explain(problem: AttributionProblem, X_query: torch.Tensor, k: int = 5,
            cls: Optional[torch.Tensor] = None) -> RepresenterExplanation:
    r"""The ``k`` supporting (largest :math:`r_{ic}k(i,x)`) and inhibiting (most negative) samples per query.

    Args:
        problem: the trained head (at its optimum).
        X_query: ``(Q, D)`` query features (bias column included).
        k: how many of each, ``1 <= k <= n``.
        cls: ``(Q,)`` class whose logit is explained (default: the predicted class).

    Raises:
        ConfigError: if ``k`` is not in ``1..n``.
        DataError: if ``X_query`` has the wrong width.
    """
    k = check_top_k(k, problem.n, "explain")
    _check_x(problem, X_query, cls, "explain")
    X_query = X_query.to(problem.inner.X.dtype)
    logits = X_query @ problem.W.T
    c = logits.argmax(dim=1) if cls is None else torch.as_tensor(cls).to(torch.int64)
    R = representer_values(problem.residuals(), problem.alpha, problem.lam, problem.n)  # (n, K)
    contrib = (X_query @ problem.inner.X.T) * R[:, c].T  # (Q, n)
    sv, si = torch.topk(contrib, k, dim=1, largest=True)
    iv, ii = torch.topk(contrib, k, dim=1, largest=False)
    return RepresenterExplanation(cls=c, logits=logits, support_idx=si, support_val=sv, inhibit_idx=ii, inhibit_val=iv)


@ATTRIBUTION.register("representer")
@dataclass
class Representer(AttributionMethod):
    r"""Representer-point attribution on the loss scale.

    Deleting sample ``i`` from the representer expansion (without refitting) moves the logits of
    ``x`` by :math:`-r_i k(i,x)`; to first order the loss of ``x`` then changes by

    .. math::

        \hat\Delta_i(x) = -g_x^\top r_i\,k(i,x) = \frac{\alpha_i}{\lambda n}\,(g_x^\top g_i)\,(h_x^\top h_i),

    which is the influence function with the Hessian replaced by :math:`\lambda I` (no refit of the
    other samples). Positive = ``i`` helps ``x``.
    """

    name: ClassVar[str] = "representer"

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        pr = self.problem
        V = target_gradients(pr.W, X, y, reduce) / pr.lam
        out = loss_change_from_v(pr, V)
        return out[0] if reduce == "mean" else out
