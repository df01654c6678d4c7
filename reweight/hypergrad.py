r"""Hypergradients :math:`\partial J/\partial s` of the outer objective, behind one registry.

Outer objective (DESIGN section 2):

.. math::

    J(s) = L_{val}(W^*(\alpha(s))) + \beta_H R_H(\alpha(s)) + \beta_E R_{ESS}(\alpha(s)).

By the implicit function theorem, with :math:`H = \nabla^2_W F(W^*, \alpha)` and
:math:`V = H^{-1}\nabla_W L_{val}(W^*)`,

.. math::

    \frac{\partial L_{val}}{\partial \alpha_i} = -\frac1n\, g_i^\top V h_i, \qquad g_i = p_i - e_{y_i},

all ``n`` of them in one matrix product once ``V`` is known; the chain through the class
normalisation and softplus, and the penalties, are added by autograd in :func:`hypergradient`.
Methods differ only in how they approximate :math:`\partial L_{val}/\partial\alpha`; each is a
small dataclass registered in :data:`HYPERGRAD` and returns its cost with the gradient.

References:
    Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Protocol

import torch

from .data import check_features, check_labels
from .errors import ConfigError, NonFiniteError
from .head import HeadObjective, mean_ce, mean_ce_grad
from .registry import Registry
from .weights import WeightModel

__all__ = [
    "HYPERGRAD",
    "BilevelProblem",
    "ConjugateGradient",
    "Exact",
    "HypergradMethod",
    "HypergradResult",
    "ValAlphaGrad",
    "alpha_grad_from_v",
    "hypergradient",
    "make_method",
]

HYPERGRAD: Registry = Registry("hypergradient method")


@dataclass
class BilevelProblem:
    r"""Everything the outer problem needs: the inner objective, the clean validation split, weights.

    Args:
        inner: :class:`~reweight.head.HeadObjective` on the training features.
        X_val: ``(m, D)`` validation features (same columns as the training features).
        y_val: ``(m,)`` validation labels.
        weights: :class:`~reweight.weights.WeightModel` of the training set.
    """

    inner: HeadObjective
    X_val: torch.Tensor
    y_val: torch.Tensor
    weights: WeightModel

    def __post_init__(self) -> None:
        check_features(self.X_val, "validation features", dim=self.inner.X.shape[1])
        check_labels(self.y_val, self.inner.K, "validation labels", n=self.X_val.shape[0])
        if self.weights.n != self.inner.n:
            raise ConfigError(f"Weight model has {self.weights.n} samples but the training set has {self.inner.n}.")
        self.y_val = self.y_val.to(self.X_val.device)

    def val_loss(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`L_{val}(W)`: mean validation cross-entropy (no L2 term)."""
        return mean_ce(W, self.X_val, self.y_val)

    def val_grad(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W L_{val}(W)`, ``(K, D)``."""
        return mean_ce_grad(W, self.X_val, self.y_val)


@dataclass
class ValAlphaGrad:
    r"""A method's estimate of :math:`\partial L_{val}/\partial\alpha` and its cost."""

    grad_alpha: torch.Tensor
    v: Optional[torch.Tensor] = None
    hvps: int = 0
    inner_steps: int = 0
    rel_residual: float = float("nan")
    converged: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HypergradResult:
    r"""Result of :func:`hypergradient`.

    Attributes:
        grad_s: ``(n,)`` :math:`\partial J/\partial s` (validation part + penalties, through the chain).
        grad_alpha: ``(n,)`` the method's :math:`\partial L_{val}/\partial\alpha`.
        v: :math:`H^{-1}\nabla_W L_{val}` when the method forms it (reusable by influence functions).
        val_loss, penalty, objective: :math:`L_{val}(W)`, :math:`\beta_H R_H + \beta_E R_E`, their sum.
        hvps, inner_steps, seconds, rel_residual, converged: cost and diagnostics.
    """

    grad_s: torch.Tensor
    grad_alpha: torch.Tensor
    v: Optional[torch.Tensor]
    val_loss: float
    penalty: float
    objective: float
    hvps: int
    inner_steps: int
    seconds: float
    rel_residual: float
    converged: bool
    method: str
    extra: Dict[str, Any] = field(default_factory=dict)


class HypergradMethod(Protocol):
    """What a registered method implements."""

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad: ...


def alpha_grad_from_v(inner: HeadObjective, W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial L_{val}/\partial\alpha_i = -\frac1n g_i^\top V h_i` for all ``i`` at once, ``(n,)``.

    Args:
        inner: the inner objective (features ``h_i`` and labels).
        W: ``(K, D)`` head at which the residuals :math:`g_i` are taken (the inner optimum).
        v: ``(K, D)`` :math:`V = H^{-1}\nabla_W L_{val}` (or an approximation of it).
    """
    G = inner.residuals(W)  # (n, K)
    return -((G * (inner.X @ v.T)).sum(dim=1)) / inner.n


@HYPERGRAD.register("exact")
@dataclass(frozen=True)
class Exact:
    """Implicit differentiation with a dense Cholesky solve of :math:`H V = \\nabla L_{val}` (small ``K·D``)."""

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        H = problem.inner.hessian(W, alpha)
        sol = H.solve(problem.val_grad(W), method="dense")
        return ValAlphaGrad(alpha_grad_from_v(problem.inner, W, sol.x), v=sol.x, rel_residual=sol.rel_residual)


@HYPERGRAD.register("cg")
@dataclass(frozen=True)
class ConjugateGradient:
    """Implicit differentiation with CG on the vectorised HVP, warm-started from the previous ``V``.

    Args:
        tol: relative residual :math:`\\|HV - \\nabla L_{val}\\| / \\|\\nabla L_{val}\\|` to stop at.
        max_iter: HVP budget.
        warm_start: start CG from the previous outer step's ``V``.
    """

    tol: float = 1e-6
    max_iter: int = 500
    warm_start: bool = True

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise ConfigError(f"The 'tol' parameter of cg must be > 0. Got {self.tol!r} instead.")
        if self.max_iter < 1:
            raise ConfigError(f"The 'max_iter' parameter of cg must be >= 1. Got {self.max_iter!r} instead.")

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        H = problem.inner.hessian(W, alpha)
        sol = H.solve(problem.val_grad(W), method="cg", tol=self.tol, max_iter=self.max_iter,
                      x0=v0 if self.warm_start else None)
        return ValAlphaGrad(alpha_grad_from_v(problem.inner, W, sol.x), v=sol.x, hvps=sol.hvps,
                            rel_residual=sol.rel_residual, converged=sol.converged)


def make_method(name: str, options: Optional[Mapping[str, Any]] = None) -> HypergradMethod:
    """Instantiate the registered method ``name`` with ``options``.

    Raises:
        ConfigError: for an unknown name (lists the registered ones) or unknown option (lists valid ones).
    """
    cls = HYPERGRAD.get(name)
    options = dict(options or {})
    if dataclasses.is_dataclass(cls):
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise ConfigError(f"Unknown option {unknown[0]!r} for hypergradient method {name!r}. "
                              f"Valid options: {', '.join(valid) or '(none)'}.")
    return cls(**options)


def hypergradient(method: HypergradMethod, problem: BilevelProblem, s: torch.Tensor, W: torch.Tensor,
                  v0: Optional[torch.Tensor] = None, name: str = "") -> HypergradResult:
    r""":math:`\partial J/\partial s` at ``s`` with the inner solution ``W`` (solve it first).

    The method supplies :math:`\partial L_{val}/\partial\alpha`; this function adds the chain
    :math:`\partial\alpha/\partial s` (class normalisation, softplus) and the penalties by autograd:
    :math:`\partial J/\partial s = (\partial\alpha/\partial s)^\top(\partial L_{val}/\partial\alpha
    + \partial R/\partial\alpha)`.

    Raises:
        NonFiniteError: if the result is NaN/Inf (names the method and the quantity).
    """
    t0 = time.perf_counter()
    s_ = s.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        alpha = problem.weights.alpha(s_)
        vag = method.val_alpha_grad(problem, W, alpha.detach(), v0=v0)
        pen = problem.weights.penalty(alpha)
        total = (alpha * vag.grad_alpha.detach()).sum() + pen
        (grad_s,) = torch.autograd.grad(total, s_)
    val_loss = float(problem.val_loss(W))
    label = name or type(method).__name__
    for what, t in (("dL_val/dalpha", vag.grad_alpha), ("dJ/ds", grad_s)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"Hypergradient method {label!r} produced a non-finite {what}.")
    return HypergradResult(
        grad_s=grad_s.detach(), grad_alpha=vag.grad_alpha.detach(), v=vag.v, val_loss=val_loss,
        penalty=float(pen.detach()), objective=val_loss + float(pen.detach()), hvps=vag.hvps, inner_steps=vag.inner_steps,
        seconds=time.perf_counter() - t0, rel_residual=vag.rel_residual, converged=vag.converged,
        method=label, extra=vag.extra,
    )
