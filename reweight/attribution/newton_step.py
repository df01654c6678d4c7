r"""``newton_step``: one Newton step of each leave-one-out problem from :math:`W^*`, in closed form for all ``n``.

Removing sample ``i`` (:math:`\alpha_i \to 0`, :math:`c_i = \alpha_i/n`) leaves the gradient
:math:`\nabla F_{-i}(W^*) = -c_i\,g_ih_i^\top` at the optimum and the exact leave-one-out Hessian
:math:`H_{-i} = H - c_i\,(S_i\otimes h_i)(I_K\otimes h_i)^\top`, :math:`S_i = \operatorname{diag}(p_i) - p_ip_i^\top`.
One Newton step moves the head by

.. math::

    \delta_i = H_{-i}^{-1}c_i\,g_ih_i^\top = Y_i\,q_i, \qquad
    q_i = c_ig_i + c_i^2\,S_i(I - c_iT_iS_i)^{-1}T_ig_i ,

(Woodbury; :math:`Y_i = H^{-1}(I_K\otimes h_i)`, :math:`T_i = (I_K\otimes h_i)^\top H^{-1}(I_K\otimes h_i)` the
``K x K`` leverage of sample ``i``), and the target loss changes by, to second order in :math:`\delta_i`,

.. math::

    \hat\Delta_i = \nabla L^\top\delta_i + \tfrac12\,\delta_i^\top\nabla^2L\,\delta_i
      = q_i^\top V h_i + \tfrac12\,q_i^\top T^{(2)}_i q_i ,\qquad V = H^{-1}\nabla_W L,\quad
      T^{(2)}_{i,kl} = h_i^\top (H^{-1}\nabla^2 L\,H^{-1})_{kl} h_i .

``order=1`` keeps the first term only; with :math:`q_i = c_ig_i` it would be the influence function
(:math:`\hat\Delta_i = \frac{\alpha_i}n g_i^\top Vh_i`), so the difference is exactly the leave-one-out correction of
the Hessian (the sample's own curvature, which first-order influence keeps). For one query :math:`x` the
second-order term uses the logit change :math:`\delta z_i(x) = \operatorname{mat}(\delta_i)h_x = R_i(x)q_i`,
:math:`R_i(x)_{kl} = h_x^\top(H^{-1})_{kl}h_i`: :math:`\hat\Delta_i(x) = g_x^\top\delta z + \frac12\delta z^\top S_x\delta z`.

Cost: one explicit :math:`H^{-1}` (float32 by default), all ``n`` leverages :math:`T_i` by one symmetric Khatri--Rao
GEMM (:func:`reweight.precond.block_quadforms`, ``n·D^2K^2/4``), ``n`` ``K x K`` solves; the mean-loss target adds
:math:`N = H^{-1}\nabla^2L\,H^{-1}` (two ``(KD)^3`` GEMMs) and a second Khatri--Rao GEMM. Exact for the Newton step
(up to the factor's precision); an approximation of :math:`\Delta_i` to the extent one Newton step and a quadratic
model of the target are.

References:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017 (the Newton-step view of
    leave-one-out); Koh, Ang, Teo & Liang, "On the accuracy of influence functions for measuring group effects",
    NeurIPS 2019 (second-order corrections); Pregibon, "Logistic regression diagnostics", Ann. Stat. 1981 (the
    one-step leave-one-out approximation with the sample's leverage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict

import torch

from ..errors import ConfigError
from ..head import HeadHessian, mean_ce_grad
from ..precond import block_quadforms
from ..validate import check_choice, check_int
from .base import ATTRIBUTION, AttributionMethod, AttributionProblem, query_residuals
from .loo import inverse_hessian

__all__ = ["NewtonStep", "newton_step_directions"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def newton_step_directions(problem: AttributionProblem, Hinv: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    r"""The Woodbury coefficients :math:`q_i` ``(n, K)`` of the Newton steps :math:`\delta_i = Y_iq_i` (module
    docstring), in ``Hinv``'s dtype. ``Hinv`` ``(K·D, K·D)`` is :math:`H^{-1}` at the optimum, ``P`` ``(n, K)`` the
    probabilities there."""
    K = problem.K
    dt = Hinv.dtype
    X = problem.inner.X
    T = block_quadforms(Hinv, X, K)  # (n, K, K) leverages
    p = P.to(dt)
    G = (p - torch.nn.functional.one_hot(problem.inner.y, K).to(dt))
    c = (problem.alpha / problem.n).to(dt)
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    cap = torch.eye(K, dtype=dt, device=p.device) - c[:, None, None] * (T @ S)
    TG = torch.einsum("nkl,nl->nk", T, G)
    corr = torch.einsum("nkl,nl->nk", S, torch.linalg.solve(cap, TG.unsqueeze(2)).squeeze(2))
    return c[:, None] * G + (c * c)[:, None] * corr


@ATTRIBUTION.register("newton_step")
@dataclass
class NewtonStep(AttributionMethod):
    r"""One Newton step per left-out sample with the exact leave-one-out Hessian (module docstring).

    Args:
        order: 2 (default) adds the target's curvature :math:`\frac12\delta_i^\top\nabla^2L\,\delta_i`; 1 keeps the
            linear term :math:`\nabla L^\top\delta_i` only.
        precision: dtype of :math:`H^{-1}` and the leverages, ``float32`` (default; measured the same rank
            correlation with exact LOO as ``float64`` at half the cost, ``docs/attribution.md``) or ``float64``.
        max_dim: refuse heads with ``K·D`` above this (the explicit inverse has ``(K·D)^2`` entries).
    """

    order: int = 2
    precision: str = "float32"
    max_dim: int = 4096
    name: ClassVar[str] = "newton_step"

    def __post_init__(self) -> None:
        check_choice(self.order, "order", "newton_step", (1, 2))
        check_choice(self.precision, "precision", "newton_step", tuple(_DTYPES))
        check_int(self.max_dim, "max_dim", "newton_step", minimum=1)

    def _fit(self, problem: AttributionProblem) -> None:
        KD = problem.K * problem.D
        if KD > self.max_dim:
            raise ConfigError(f"The 'max_dim' parameter of NewtonStep must be >= K*D = {KD} (the explicit inverse "
                              f"Hessian has (K*D)^2 entries). Got {self.max_dim} instead. Use influence_cg for large heads.")
        self._Hinv, P = inverse_hessian(problem, _DTYPES[self.precision])
        self._q = newton_step_directions(problem, self._Hinv, P)  # (n, K)

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        pr = self.problem
        dt = self._Hinv.dtype
        K, D = pr.K, pr.D
        Xtr = pr.inner.X.to(dt)
        q = self._q
        if reduce == "mean":
            gL = mean_ce_grad(pr.W, X, y).to(dt)
            V = (self._Hinv @ gL.reshape(-1)).reshape(K, D)
            s = (q * (Xtr @ V.T)).sum(dim=1)
            if self.order == 2:
                Px = torch.softmax(X @ pr.W.T, dim=1)
                HL = HeadHessian.from_tensors(X, Px, torch.ones(X.shape[0], dtype=X.dtype, device=X.device), 0.0).dense(dt)
                N = self._Hinv @ HL @ self._Hinv
                T2 = block_quadforms(0.5 * (N + N.T), Xtr, K)
                s = s + 0.5 * torch.einsum("nk,nkl,nl->n", q, T2, q)
            return s.to(X.dtype)
        # one row per query: the logit change dz_i(x) = R_i(x) q_i, R_i(x)_kl = h_x^T (H^{-1})_kl h_i
        Gx = query_residuals(pr.W, X, y).to(dt)
        Px = torch.softmax(X @ pr.W.T, dim=1).to(dt)
        H4 = self._Hinv.view(K, D, K, D)
        out = []
        for x, gx, px in zip(X.to(dt), Gx, Px):
            Mx = torch.einsum("a,kalb->klb", x, H4)  # (K, K, D)
            R = (Mx.reshape(K * K, D) @ Xtr.T).reshape(K, K, -1)  # (K, K, n)
            dz = torch.einsum("kln,nl->nk", R, q)  # (n, K)
            s = dz @ gx
            if self.order == 2:
                s = s + 0.5 * ((dz * dz) @ px - (dz @ px) ** 2)
            out.append(s)
        return torch.stack(out).to(X.dtype)

    def info(self) -> Dict[str, Any]:
        return {**super().info(), "order": self.order, "precision": self.precision}
