r"""The shared protocol of attribution methods: one problem, ``fit`` then ``scores``, one sign.

Every method answers the same question on the same scale (DESIGN section 2): for a training sample
``i`` and a target (one query's loss, or the mean validation loss),

.. math::

    \Delta_i = L(W^*_{-i}) - L(W^*),

where :math:`W^*_{-i}` is the optimum of
:math:`F(W,\alpha) = \frac1n\sum_j \alpha_j \ell(W h_j, y_j) + \frac\lambda2\|W\|^2` with
:math:`\alpha_i = 0` and every other weight unchanged. **Positive means removing ``i`` would raise
the loss: ``i`` helps.** ``scores`` returns an estimate of :math:`\Delta_i` (or something with its
sign and ordering, e.g. TracIn's or TRAK's units) for every training sample.

A method is a small class registered in :data:`ATTRIBUTION`:

.. code-block:: python

    method = ATTRIBUTION.get("influence_cg")(rtol=1e-8)
    method.fit(problem)                       # problem: AttributionProblem at the optimum W*
    S = method.scores(X_query, y_query)       # (Q, n): one row per query
    s_val = method.scores(X_val, y_val, reduce="mean")   # (n,): target = mean loss over the rows

References:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017 (the
    leave-one-out target and the sign of :math:`\mathcal I_{up}`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import torch

from ..errors import ConfigError, DataError
from ..head import HeadObjective, softmax_residuals, solve_head
from ..registry import Registry
from ..validate import check_features, check_indices, check_labels, check_lam, check_top_k, renamed_option

__all__ = [
    "ATTRIBUTION",
    "AttributionMethod",
    "AttributionProblem",
    "bilinear_scores",
    "check_indices",
    "check_lam",
    "check_queries",
    "check_top_k",
    "loss_change_from_v",
    "make_attribution",
    "query_residuals",
    "target_gradients",
]

log = logging.getLogger(__name__)

ATTRIBUTION: Registry = Registry("attribution method")


def check_queries(X: torch.Tensor, y: torch.Tensor, D: int, K: int, where: str) -> None:
    """Raise :class:`DataError` unless ``X`` is finite ``(Q, D)`` (bias column included) and ``y`` labels ``(Q,)``."""
    t = torch.as_tensor(X)
    if t.ndim == 2 and t.shape[1] != D:
        raise DataError(f"The 'X_query' parameter of {where} must have {D} columns (the training feature "
                        f"dimension, bias column included). Got {t.shape[1]} instead.")
    check_features(t, "query features", dim=D)
    check_labels(y, K, "query labels", n=t.shape[0], require_all_classes=False)


def query_residuals(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`g_x = p_x - e_{y_x}` for every query row, ``(Q, K)`` (:func:`reweight.head.softmax_residuals`)."""
    return softmax_residuals(W, X, y)


@dataclass
class AttributionProblem:
    r"""A trained L2 head: the inner objective, the weights it was trained with and its optimum.

    Args:
        inner: :class:`~reweight.head.HeadObjective` (features ``(n, D)`` with the bias column, labels, ``K``, ``lam``).
        alpha: ``(n,)`` sample weights :math:`\alpha` of the training run.
        W: ``(K, D)`` the optimum :math:`W^*(\alpha)` (see :meth:`from_data`).
        grad_norm: :math:`\|\nabla_W F(W^*)\|` at ``W`` (identities such as the representer theorem
            hold up to this residual).
    """

    inner: HeadObjective
    alpha: torch.Tensor
    W: torch.Tensor
    grad_norm: float = float("nan")

    @classmethod
    def from_data(cls, X: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
                  alpha: Optional[torch.Tensor] = None, grad_tol: Optional[float] = None, max_iter: int = 200,
                  W0: Optional[torch.Tensor] = None, tol: Optional[float] = None) -> "AttributionProblem":
        r"""Fit :math:`W^* = \arg\min_W F(W,\alpha)` by Newton (:func:`~reweight.head.solve_head`).

        Args:
            X: ``(n, D)`` training features (append the bias column yourself, :func:`~reweight.head.add_bias`).
            y: ``(n,)`` labels.
            num_classes: ``K``.
            lam: :math:`\lambda > 0`.
            alpha: ``(n,)`` weights (default ones).
            grad_tol: gradient-norm tolerance of the solve (default ``1e-10``: with float64, LOO ground
                truth; ``tol`` is its deprecated name).

        Raises:
            ConfigError: if ``lam`` is not > 0.
            DataError: for malformed features, labels or weights.
        """
        lam = check_lam(lam, "AttributionProblem.from_data")
        inner = HeadObjective(X, y, num_classes, lam)
        a = torch.ones(inner.n, dtype=X.dtype, device=X.device) if alpha is None else alpha.to(X.dtype)
        grad_tol = renamed_option(grad_tol, tol, "tol", "grad_tol", "AttributionProblem.from_data", 1e-10)
        sol = solve_head(inner, a, W0=W0, grad_tol=grad_tol, max_iter=max_iter)
        return cls(inner=inner, alpha=a, W=sol.W, grad_norm=sol.grad_norm)

    def __post_init__(self) -> None:
        self.inner.check_alpha(self.alpha)
        if self.W.shape != self.inner.shape:
            raise DataError(f"Expected W of shape {self.inner.shape}, but got {tuple(self.W.shape)}.")
        if self.grad_norm != self.grad_norm:  # NaN: compute it
            self.grad_norm = float(torch.linalg.vector_norm(self.inner.grad(self.W, self.alpha)))

    @property
    def n(self) -> int:
        return self.inner.n

    @property
    def K(self) -> int:
        return self.inner.K

    @property
    def D(self) -> int:
        return self.inner.shape[1]

    @property
    def lam(self) -> float:
        return self.inner.lam

    def residuals(self) -> torch.Tensor:
        r""":math:`G = P - Y` of the training rows at :math:`W^*`, ``(n, K)``."""
        return self.inner.residuals(self.W)


class AttributionMethod:
    r"""Base class: ``fit(problem)`` then ``scores(X, y, reduce)``; subclasses implement ``_fit`` and ``_scores``.

    ``scores`` returns estimates of :math:`\Delta_i` (positive = sample ``i`` helps the target):
    ``reduce="none"`` gives ``(Q, n)`` (target: each query's loss), ``reduce="mean"`` gives ``(n,)``
    (target: the mean loss over the rows, e.g. :math:`L_{val}`). Every method here is linear in the
    target's gradient, so ``mean`` equals the row mean of ``none`` -- only cheaper.

    Attributes:
        name: the registered name.
        fit_seconds: wall time of the last :meth:`fit`.
        last_score_seconds: wall time of the last :meth:`scores`.
    """

    name: str = "base"

    def fit(self, problem: AttributionProblem) -> "AttributionMethod":
        """Precompute what the scores need (factorisations, checkpoints, projections); returns ``self``."""
        if not isinstance(problem, AttributionProblem):
            raise ConfigError(f"The 'problem' parameter of {type(self).__name__}.fit must be an AttributionProblem. "
                              f"Got {type(problem).__name__} instead.")
        t0 = time.perf_counter()
        self.problem = problem
        self._fit(problem)
        self.fit_seconds = time.perf_counter() - t0
        return self

    def scores(self, X: torch.Tensor, y: torch.Tensor, reduce: Literal["none", "mean"] = "none") -> torch.Tensor:
        """Scores of every training sample for each query row (``none``, ``(Q, n)``) or their mean (``(n,)``).

        Raises:
            RuntimeError: if called before :meth:`fit`.
            DataError: if the query features have another width than the training features
                (bias column included), contain NaN/Inf, or the labels are out of range.
            ConfigError: for an unknown ``reduce``.
        """
        if not hasattr(self, "problem"):
            raise RuntimeError(f"{type(self).__name__} must be fitted before scores(); call fit(problem) first.")
        if reduce not in ("none", "mean"):
            raise ConfigError(f"The 'reduce' parameter of {type(self).__name__}.scores must be 'none' or 'mean'. "
                              f"Got {reduce!r} instead.")
        pr = self.problem
        check_queries(X, y, pr.D, pr.K, f"{type(self).__name__}.scores")
        X = X.to(pr.inner.X.device, pr.inner.X.dtype)
        y = torch.as_tensor(y).to(pr.inner.X.device)
        t0 = time.perf_counter()
        out = self._scores(X, y, reduce)
        self.last_score_seconds = time.perf_counter() - t0
        return out

    # -- subclass hooks -----------------------------------------------------------------------
    def _fit(self, problem: AttributionProblem) -> None:  # pragma: no cover - trivial default
        pass

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        raise NotImplementedError

    def info(self) -> Dict[str, Any]:
        """Cost and diagnostics of the last fit/score (for tables)."""
        return {"fit_seconds": getattr(self, "fit_seconds", float("nan")),
                "score_seconds": getattr(self, "last_score_seconds", float("nan"))}


def make_attribution(name: str, options: Optional[Dict[str, Any]] = None) -> AttributionMethod:
    """Instantiate the registered attribution method ``name`` with keyword ``options``.

    Raises:
        ConfigError: for an unknown name (lists the registered ones) or an unknown option (lists the valid ones).
    """
    return ATTRIBUTION.create(name, options)


def target_gradients(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
    r"""Gradients of the target losses: :math:`\nabla_W \ell_x = g_x h_x^\top`, ``(Q, K, D)``
    (``reduce="none"``) or their mean ``(1, K, D)`` (``reduce="mean"``)."""
    G = query_residuals(W, X, y)
    if reduce == "mean":
        return (G.T @ X / X.shape[0]).unsqueeze(0)
    return G[:, :, None] * X[:, None, :]


def loss_change_from_v(problem: AttributionProblem, V: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{\alpha_i}{n} g_i^\top V_q h_i` for every query ``q`` and training sample ``i``, ``(Q, n)``.

    With :math:`V_q = H^{-1}\nabla\ell_{x_q}` this is the first-order leave-one-out change
    :math:`-\alpha_i\,\mathcal I_{up}(i, x_q)/n \approx \Delta_i(x_q)`; it equals
    :math:`-\alpha_i\,\partial L/\partial\alpha_i` of :func:`reweight.hypergrad.alpha_grad_from_v`.

    Args:
        problem: the trained head.
        V: ``(Q, K, D)`` (or ``(K, D)``) inverse-curvature-times-target-gradient.
    """
    return bilinear_scores(problem.inner.X, problem.residuals(), V) * (problem.alpha / problem.n)[None, :]


def bilinear_scores(X: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r""":math:`\langle g_i h_i^\top, V_q\rangle = g_i^\top V_q h_i` for all ``q``, ``i``: ``(Q, n)``.

    Args:
        X: ``(n, D)`` training features; G: ``(n, K)`` residuals; V: ``(Q, K, D)`` or ``(K, D)``.
    """
    Vb = V if V.ndim == 3 else V.unsqueeze(0)
    Q, K, D = Vb.shape
    Z = X @ Vb.reshape(Q * K, D).T  # (n, Q*K)
    return (Z.reshape(-1, Q, K) * G[:, None, :]).sum(dim=2).T
