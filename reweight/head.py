r"""The L2-regularised linear softmax head, its curvature, and its inner solver.

Notation (DESIGN section 2): features ``X`` ``(n, D)`` (a constant-1 column appended when a bias is
wanted, see :func:`add_bias`), labels ``y`` ``(n,)``, weights ``alpha`` ``(n,)``, head ``W``
``(K, D)``, :math:`P = \operatorname{softmax}(X W^\top)`, :math:`G = P - Y` (one-hot ``Y``).

.. math::

    F(W, \alpha) = \frac1n \sum_i \alpha_i\, \ell(W h_i, y_i) + \frac\lambda2 \|W\|^2, \qquad
    \nabla_W F = \frac1n (\alpha \circ G)^\top X + \lambda W.

Hessian-vector product (vectorised, two ``n·D·K`` matrix products, never a loop over samples):

.. math::

    Z = X U^\top,\quad M_i = \alpha_i\,(P_i \circ Z_i - P_i \langle P_i, Z_i\rangle),\quad
    H U = \frac1n M^\top X + \lambda U.

The bias is a constant feature regularised with ``W``, which keeps ``H`` positive definite (the
plain softmax bias has a null direction along the all-ones vector). ``vec(W)`` is row-major:
index ``k * D + a``. ``alpha`` enters as a plain tensor: the head knows nothing of how it was
parameterised.

The inner solver is Newton's method with an Armijo back-tracking line search (Nocedal & Wright,
*Numerical Optimization*, 2006, ch. 3 and 7): the Newton system is solved exactly (dense Cholesky)
for small ``K·D`` and by conjugate gradients on the HVP otherwise (truncated Newton with forcing
term :math:`\eta_k = \min(0.5, \sqrt{\|\nabla F\|})`). Because ``F`` is strongly convex the
iteration converges globally and quadratically near the optimum, so warm starts from the previous
outer step cut iterations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch

from .data import check_features, check_labels
from .errors import ConfigError, DataError
from .linalg import CGResult, conjugate_gradient

__all__ = [
    "HeadHessian",
    "HeadObjective",
    "HeadSolution",
    "IHVPResult",
    "accuracy",
    "add_bias",
    "mean_ce",
    "mean_ce_grad",
    "solve_head",
]

log = logging.getLogger(__name__)

DENSE_MAX = 400  # K*D at or below which Newton systems are solved by dense Cholesky


def add_bias(h: torch.Tensor) -> torch.Tensor:
    """Append a constant-1 column: ``(n, d) -> (n, d + 1)``."""
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)


def _onehot(y: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, K).to(dtype)


def mean_ce(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Unweighted mean cross-entropy :math:`\frac1m\sum_j \ell(W x_j, y_j)` (e.g. the validation loss)."""
    return torch.nn.functional.cross_entropy(X @ W.T, y)


def mean_ce_grad(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_W \frac1m\sum_j \ell(W x_j, y_j) = \frac1m (P - Y)^\top X`, shape ``(K, D)``."""
    P = torch.softmax(X @ W.T, dim=1)
    G = P - _onehot(y, W.shape[0], P.dtype)
    return G.T @ X / X.shape[0]


def accuracy(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    return float(((X @ W.T).argmax(dim=1) == y).to(torch.float64).mean())


@dataclass
class IHVPResult:
    """Solution of :math:`H V = B` with its cost: HVPs used, relative residual, convergence."""

    x: torch.Tensor
    hvps: int
    rel_residual: float
    converged: bool
    method: str


class HeadHessian:
    r"""The Hessian :math:`H = \nabla^2_W F` at ``W`` as an operator.

    Args:
        X: ``(n, D)`` features.
        P: ``(n, K)`` softmax probabilities at ``W``.
        alpha: ``(n,)`` sample weights.
        lam: :math:`\lambda`.
        n: the ``n`` of the ``1/n`` (defaults to ``X.shape[0]``; a streaming/sharded caller passes
            the global count).
    """

    def __init__(self, X: torch.Tensor, P: torch.Tensor, alpha: torch.Tensor, lam: float, n: Optional[int] = None):
        self.X, self.P, self.alpha, self.lam = X, P, alpha, float(lam)
        self.n = int(n if n is not None else X.shape[0])
        self.K, self.D = P.shape[1], X.shape[1]
        self.hvps = 0

    def _weighted_probs(self) -> torch.Tensor:
        r""":math:`\alpha_i P_{ik}`, ``(n, K)``, computed once and reused by every HVP of this operator."""
        key = (id(self.P), self.P._version, id(self.alpha), self.alpha._version)
        if getattr(self, "_aP_key", None) != key:
            self._aP = self.alpha[:, None] * self.P
            self._aP_key = key
        return self._aP

    def matvec(self, U: torch.Tensor) -> torch.Tensor:
        r""":math:`H U` for ``U`` ``(K, D)`` or a batch ``(B, K, D)`` (one product per batch element).

        Two ``n·D·(B·K)`` matrix products plus three in-place elementwise passes over ``(n, B·K)``:
        :math:`Z = X U^\top`, :math:`s_i = \langle P_i, Z_i\rangle` (``vecdot``), :math:`M = (\alpha\circ P)\circ(Z - s)`,
        :math:`HU = M^\top X / n + \lambda U`. Rows are processed in blocks of about ``2**24`` entries
        of ``Z`` so temporaries stay bounded for large ``n`` (the result does not depend on the block).
        """
        batched = U.ndim == 3
        Ub = U if batched else U.unsqueeze(0)
        B, K, D = Ub.shape[0], self.K, self.D
        Ut = Ub.reshape(B * K, D).T
        aP = self._weighted_probs()
        n_rows = self.X.shape[0]
        block = max(4096, (1 << 24) // max(1, B * K))
        out = None
        for lo in range(0, n_rows, block):
            hi = min(n_rows, lo + block)
            Xb = self.X[lo:hi]
            Z = Xb @ Ut  # (b, B*K)
            Z3 = Z.view(hi - lo, B, K)
            s = torch.linalg.vecdot(Z3, self.P[lo:hi].unsqueeze(1), dim=2).unsqueeze(2)  # no (b, B, K) temporary
            Z3.sub_(s).mul_(aP[lo:hi].unsqueeze(1))
            out = Z.T @ Xb if out is None else out.addmm_(Z.T, Xb)
        if out is None:  # no local rows (an empty shard)
            out = torch.zeros(B * K, D, dtype=Ub.dtype, device=Ub.device)
        HU = out.reshape(B, K, D).div_(self.n).add_(Ub, alpha=self.lam)
        self.hvps += B
        return HU if batched else HU[0]

    __call__ = matvec

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        r"""The dense ``(K·D, K·D)`` Hessian (small problems and tests only).

        :math:`H_{(k,a),(l,b)} = \frac1n\sum_i \alpha_i (P_{ik}\delta_{kl} - P_{ik}P_{il}) X_{ia}X_{ib} + \lambda\delta`.
        """
        # assembled in float64: the difference of the two terms cancels badly in float32
        X, P, a = self.X.to(torch.float64), self.P.to(torch.float64), self.alpha.to(torch.float64)
        K, D, n = self.K, self.D, self.n
        aP = a[:, None] * P
        diag_blocks = torch.einsum("ik,ia,ib->kab", aP, X, X) / n  # (K, D, D)
        B1 = (aP[:, :, None] * X[:, None, :]).reshape(-1, K * D)
        B2 = (P[:, :, None] * X[:, None, :]).reshape(-1, K * D)
        H = -(B1.T @ B2) / n
        H = H + torch.block_diag(*diag_blocks)
        H = 0.5 * (H + H.T)
        return (H + self.lam * torch.eye(K * D, dtype=X.dtype, device=X.device)).to(dtype or self.X.dtype)

    def cholesky(self) -> torch.Tensor:
        """The float64 Cholesky factor of :meth:`dense`, computed once per operator and cached.

        Factorised in float64: ill-conditioned float32 Hessians (large alpha, small lambda) are still
        positive definite but defeat a float32 Cholesky; the dense path is for small ``K·D`` anyway.

        Raises:
            FloatingPointError: if the Hessian is not positive definite.
        """
        if getattr(self, "_chol", None) is None:
            H = self.dense(torch.float64)
            L, info = torch.linalg.cholesky_ex(H)
            if int(info) != 0:
                raise FloatingPointError("The head Hessian is not positive definite (check lam > 0 and alpha >= 0).")
            self._H64, self._chol = H, L
        return self._chol

    def solve(self, B: torch.Tensor, method: Literal["dense", "cg", "auto"] = "auto", tol: float = 1e-8,
              max_iter: int = 1000, x0: Optional[torch.Tensor] = None) -> IHVPResult:
        r"""The inverse-Hessian-vector product :math:`H^{-1} B` -- the kernel shared by hypergradients
        and influence functions.

        ``B`` is ``(K, D)``, or a batch ``(Q, K, D)`` for ``dense``. ``dense`` uses the cached Cholesky
        factor (:meth:`cholesky`; repeated solves on one operator factorise once), ``cg`` conjugate
        gradients to relative residual ``tol``. ``rel_residual`` is the largest over the batch."""
        if method == "auto":
            method = "dense" if self.K * self.D <= DENSE_MAX else "cg"
        if method == "dense":
            L = self.cholesky()
            b = B.reshape(-1, self.K * self.D).T.to(torch.float64)  # (KD, Q)
            x = torch.cholesky_solve(b, L)
            r = torch.linalg.vector_norm(self._H64 @ x - b, dim=0) / torch.linalg.vector_norm(b, dim=0).clamp_min(1e-300)
            return IHVPResult(x=x.T.reshape(B.shape).to(B.dtype), hvps=0, rel_residual=float(r.max()),
                              converged=True, method="dense")
        if method == "cg":
            start = self.hvps
            res: CGResult = conjugate_gradient(self.matvec, B, x0=x0, tol=tol, max_iter=max_iter)
            return IHVPResult(x=res.x, hvps=self.hvps - start, rel_residual=res.rel_residual,
                              converged=res.converged, method="cg")
        raise ConfigError(f"The 'method' parameter of HeadHessian.solve must be one of 'auto', 'cg', 'dense'. Got {method!r} instead.")


class HeadObjective:
    r"""The inner objective :math:`F(W,\alpha)` for fixed features, labels and :math:`\lambda`.

    Args:
        X: ``(n, D)`` floating features (include the bias column yourself, see :func:`add_bias`).
        y: ``(n,)`` int64 labels in ``0..K-1``.
        num_classes: ``K``.
        lam: :math:`\lambda > 0`.

    Raises:
        DataError: for NaN/Inf features, bad labels or a length mismatch.
        ConfigError: for ``lam <= 0``.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float):
        check_features(X, "training features")
        check_labels(y, num_classes, "training labels", n=X.shape[0], require_all_classes=False)
        if not lam > 0:
            raise ConfigError(f"The 'lam' parameter must be > 0 (strict L2 makes the inner problem strongly convex). Got {lam!r} instead.")
        self.X, self.y, self.K, self.lam = X, y.to(X.device), int(num_classes), float(lam)
        self.Y = _onehot(self.y, self.K, X.dtype)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.K, self.X.shape[1])

    def check_alpha(self, alpha: torch.Tensor) -> None:
        if alpha.shape != (self.n,):
            raise DataError(f"Expected alpha of shape ({self.n},), but got {tuple(alpha.shape)}.")
        if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()):
            raise DataError("alpha must be finite and >= 0.")

    def probs(self, W: torch.Tensor) -> torch.Tensor:
        """``(n, K)`` softmax probabilities."""
        return torch.softmax(self.X @ W.T, dim=1)

    def residuals(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`G = P - Y`, ``(n, K)``: row ``i`` is :math:`\partial\ell_i/\partial(W h_i)`."""
        return self.probs(W) - self.Y

    def sample_losses(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`\ell_i = \ell(W h_i, y_i)`, ``(n,)`` (stable log-sum-exp)."""
        return torch.nn.functional.cross_entropy(self.X @ W.T, self.y, reduction="none")

    def loss(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`F(W,\alpha)`."""
        return (alpha * self.sample_losses(W)).sum() / self.n + 0.5 * self.lam * (W * W).sum()

    def grad(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W F = \frac1n(\alpha\circ G)^\top X + \lambda W` -- the stationarity condition
        the solver drives to zero and implicit differentiation consumes."""
        G = torch.softmax(self.X @ W.T, dim=1)  # (n, K), overwritten in place by alpha * (P - Y)
        G[torch.arange(G.shape[0], device=G.device), self.y] -= 1
        G.mul_(alpha[:, None])
        return (G.T @ self.X).div_(self.n).add_(W, alpha=self.lam)

    optimality = grad

    def hessian(self, W: torch.Tensor, alpha: torch.Tensor) -> HeadHessian:
        """The :class:`HeadHessian` operator at ``W``."""
        return HeadHessian(self.X, self.probs(W), alpha, self.lam, self.n)


@dataclass
class HeadSolution:
    """Result of :func:`solve_head`: the optimum and the cost of reaching it."""

    W: torch.Tensor
    iters: int
    hvps: int
    grad_norm: float
    converged: bool
    seconds: float


def solve_head(obj: HeadObjective, alpha: torch.Tensor, W0: Optional[torch.Tensor] = None, tol: float = 1e-6,
               max_iter: int = 100, newton_system: Literal["auto", "dense", "cg"] = "auto") -> HeadSolution:
    r"""Minimise :math:`F(\cdot,\alpha)` by damped Newton until :math:`\|\nabla_W F\| \le \mathrm{tol}`.

    Args:
        obj: the objective.
        alpha: ``(n,)`` non-negative weights.
        W0: warm start ``(K, D)`` (default zeros).
        tol: gradient-norm tolerance (absolute, Frobenius norm).
        max_iter: maximum Newton iterations.
        newton_system: ``dense`` (Cholesky), ``cg`` (truncated Newton) or ``auto`` (dense iff ``K·D <= 400``).

    Returns:
        :class:`HeadSolution`. ``converged`` is False when ``max_iter`` was reached or the line search
        stalled at the floating-point floor above ``tol``; a warning is logged in that case.
    """
    obj.check_alpha(alpha)
    t0 = time.perf_counter()
    W = torch.zeros(obj.shape, dtype=obj.X.dtype, device=obj.X.device) if W0 is None else W0.detach().clone()
    if W.shape != obj.shape:
        raise DataError(f"Expected a warm start of shape {obj.shape}, but got {tuple(W.shape)}.")
    system = newton_system if newton_system != "auto" else ("dense" if obj.shape[0] * obj.shape[1] <= DENSE_MAX else "cg")
    eps = torch.finfo(W.dtype).eps
    hvps, it, converged = 0, 0, False
    f = obj.loss(W, alpha)
    g = obj.grad(W, alpha)
    gn = float(torch.linalg.vector_norm(g))
    while True:
        if gn <= tol:
            converged = True
            break
        if it >= max_iter:
            break
        H = obj.hessian(W, alpha)
        forcing = min(0.5, gn ** 0.5)
        try:
            sol = H.solve(-g, method=system, tol=forcing, max_iter=200)
        except FloatingPointError:  # indefinite at this precision (float32, extreme alpha/lambda): truncated Newton
            sol = H.solve(-g, method="cg", tol=forcing, max_iter=200)
        hvps += sol.hvps
        p = sol.x
        slope = float((g * p).sum())
        if slope >= 0:  # not a descent direction (CG breakdown): fall back to steepest descent
            p, slope = -g, -gn * gn
        step, accepted = 1.0, False
        for _ in range(40):
            W_new = W + step * p
            f_new = obj.loss(W_new, alpha)
            if float(f_new) <= float(f) + 1e-4 * step * slope:
                accepted = True
                break
            if abs(slope) * step <= 10 * eps * max(1.0, abs(float(f))):
                # the predicted decrease is below rounding noise: accept if the gradient shrinks
                g_try = obj.grad(W_new, alpha)
                if float(torch.linalg.vector_norm(g_try)) < gn:
                    accepted = True
                break
            step *= 0.5
        it += 1
        if not accepted:
            break
        W, f = W_new, f_new
        g = obj.grad(W, alpha)
        gn = float(torch.linalg.vector_norm(g))
    if not converged:
        log.warning("Head solver stopped at ||grad F|| = %.3g > tol = %.3g after %d iterations.", gn, tol, it)
    return HeadSolution(W=W, iters=it, hvps=hvps, grad_norm=gn, converged=converged, seconds=time.perf_counter() - t0)
