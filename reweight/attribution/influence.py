r"""Influence functions on the L2 head (Koh & Liang 2017): exact, CG and curvature-approximated.

Upweighting training sample ``i`` by :math:`\epsilon` in :math:`F` moves the optimum by
:math:`-H^{-1}\nabla\ell_i\,\epsilon/n` (our ``1/n`` convention), so the influence on the loss of a
target ``x`` is :math:`\mathcal I_{up}(i,x) = -\nabla\ell_x^\top H^{-1}\nabla\ell_i` and removing
sample ``i`` (weight :math:`\alpha_i\to 0`) changes the target loss by, to first order,

.. math::

    \hat\Delta_i(x) = -\frac{\alpha_i}{n}\,\mathcal I_{up}(i,x)
    = \frac{\alpha_i}{n}\,g_i^\top V_x h_i, \qquad V_x = H^{-1}\nabla_W\ell_x,\quad \nabla_W\ell_i = g_ih_i^\top,

positive when ``i`` helps (DESIGN's sign convention). Methods differ only in how they apply
:math:`H^{-1}`:

* ``influence_exact``: dense Cholesky of :meth:`reweight.head.HeadHessian.dense`, factored once and
  reused for every target (the same solve as ``HeadHessian.solve(method="dense")``, batched);
* ``influence_cg``: :meth:`reweight.head.HeadHessian.solve` with ``method="cg"`` (the shared
  inverse-HVP kernel, preconditioned by :mod:`reweight.precond`), one solve per target;
* ``influence_diag_ggn`` / ``influence_kfac``: BackPACK curvature approximations
  (:mod:`reweight.attribution.curvature`) for heads too large for a dense factorisation.

With the mean validation loss as target, ``influence_exact`` equals :math:`-\alpha_i\,\partial
L_{val}/\partial\alpha_i` of :class:`reweight.hypergrad.Exact` (tested).

Reference:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017,
    https://arxiv.org/abs/1703.04730.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

import torch

from ..errors import ConfigError
from ..precond import PRECONDITIONERS
from ..validate import check_choice, check_int, check_number, renamed_field
from .base import ATTRIBUTION, AttributionMethod, AttributionProblem, loss_change_from_v, target_gradients

__all__ = ["InfluenceCG", "InfluenceDiagGGN", "InfluenceExact", "InfluenceKFAC"]


class _Influence(AttributionMethod):
    """Shared scoring: ``V = H^{-1} grad l_x`` (subclass ``_solve``), then :func:`loss_change_from_v`."""

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        B = target_gradients(self.problem.W, X, y, reduce)  # (Q, K, D)
        V = self._solve(B)
        out = loss_change_from_v(self.problem, V)
        return out[0] if reduce == "mean" else out

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@ATTRIBUTION.register("influence_exact")
@dataclass
class InfluenceExact(_Influence):
    r"""Exact influence: :math:`V = H^{-1}B` by a dense Cholesky factorisation of :math:`H` (small ``K·D``).

    Args:
        max_dim: refuse heads with ``K·D`` above this (the dense Hessian has ``(K·D)^2`` entries).
    """

    max_dim: int = 4096
    name: ClassVar[str] = "influence_exact"

    def _fit(self, problem: AttributionProblem) -> None:
        KD = problem.K * problem.D
        if KD > self.max_dim:
            raise ConfigError(f"The 'max_dim' parameter of InfluenceExact must be >= K*D = {KD} (the head's size; "
                              f"the dense Hessian has (K*D)^2 entries). Got {self.max_dim} instead. "
                              f"Use influence_cg for large heads.")
        self._H = problem.inner.hessian(problem.W, problem.alpha)
        self._H.cholesky()  # factorise once at fit time; every target reuses it

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        return self._H.solve(B, method="dense").x


@ATTRIBUTION.register("influence_cg")
@dataclass
class InfluenceCG(_Influence):
    r"""Influence with :math:`V = H^{-1}B` by conjugate gradients (:meth:`reweight.head.HeadHessian.solve`).

    Args:
        rtol: relative residual :math:`\|HV-B\|/\|B\|` at which CG stops (``tol`` is its deprecated name).
        max_iter: HVP budget per target.
        precond: preconditioner of the solves (``auto``, ``dense``, ``kfac``, ``block_jacobi``, ``none``; see
            :mod:`reweight.precond`), built once at the first solve and shared by every target.

    ``info()`` reports the HVPs of all solves, the largest relative residual, the preconditioner and its build seconds.
    """

    rtol: float = 1e-8
    max_iter: int = 1000
    precond: str = "auto"
    tol: Optional[float] = None
    name: ClassVar[str] = "influence_cg"

    def __post_init__(self) -> None:
        renamed_field(self, "tol", "rtol", "influence_cg")
        check_number(self.rtol, "rtol", "influence_cg", low=0.0, low_open=True)
        check_int(self.max_iter, "max_iter", "influence_cg", minimum=1)
        check_choice(self.precond, "precond", "influence_cg", ("auto",) + PRECONDITIONERS)

    def _fit(self, problem: AttributionProblem) -> None:
        self._H = problem.inner.hessian(problem.W, problem.alpha)
        self.hvps, self.max_rel_residual = 0, 0.0
        self.precond_name, self.precond_seconds = "none", 0.0

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        out = []
        for b in B:
            res = self._H.solve(b, method="cg", rtol=self.rtol, max_iter=self.max_iter, precond=self.precond)
            self.hvps += res.hvps
            self.max_rel_residual = max(self.max_rel_residual, res.rel_residual)
            self.precond_name = res.precond
            self.precond_seconds += res.precond_seconds
            out.append(res.x)
        return torch.stack(out)

    def info(self) -> Dict[str, Any]:
        return {**super().info(), "hvps": getattr(self, "hvps", 0),
                "max_rel_residual": getattr(self, "max_rel_residual", float("nan")),
                "precond": getattr(self, "precond_name", "none"), "precond_seconds": getattr(self, "precond_seconds", 0.0)}


@ATTRIBUTION.register("influence_diag_ggn")
@dataclass
class InfluenceDiagGGN(_Influence):
    r"""Influence with :math:`H \approx \operatorname{diag}(H)` (BackPACK ``BatchDiagGGNExact``, weighted by :math:`\alpha`).

    An approximation: it ignores every coupling between classes and feature dimensions, so expect
    a rank correlation well below the exact method's on correlated features.
    """

    name: ClassVar[str] = "influence_diag_ggn"

    def _fit(self, problem: AttributionProblem) -> None:
        from .curvature import diag_ggn

        self._d = diag_ggn(problem.inner.X, problem.inner.y, problem.W, problem.alpha, problem.lam, problem.n)

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        return B / self._d


@ATTRIBUTION.register("influence_kfac")
@dataclass
class InfluenceKFAC(_Influence):
    r"""Influence with :math:`H \approx G\otimes A + \lambda I` (BackPACK ``KFLR``; uniform :math:`\alpha`)."""

    name: ClassVar[str] = "influence_kfac"

    def _fit(self, problem: AttributionProblem) -> None:
        from .curvature import kfac

        self._C = kfac(problem.inner.X, problem.inner.y, problem.W, problem.alpha, problem.lam)

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        return self._C.solve(B)
