r"""The L2-regularised linear softmax head: its objective, curvature and inner solver, written once.

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

Implicit differentiation and influence functions consume the same quantities: with
:math:`V = H^{-1} B`, :math:`\partial L/\partial\alpha_i = -\frac1n g_i^\top V h_i`
(:meth:`HeadObjective.alpha_grad_from_v`), and at the optimum the representer values
:math:`r_i = -\alpha_i g_i/(\lambda n)` rebuild the logits (:func:`representer_values`).

**One objective over row sources.** :class:`HeadObjective` takes the training rows as an in-memory
tensor, a chunked / memory-mapped store or a rank's shard (:mod:`reweight.rows`,
:class:`reweight.distributed.ShardedRows`): every formula above is a sum over samples, computed chunk
by chunk with the global ``n`` in the ``1/n`` and completed by the source's all-reduce. An in-memory
tensor is one chunk, so its products run on the whole matrix. What the hypergradient methods,
baselines and attribution methods rely on is written down in :class:`InnerObjective`.

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
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Protocol, Tuple, Union

import torch

from .errors import ConfigError, DataError
from .linalg import CGResult, conjugate_gradient
from .precond import PRECONDITIONERS, Preconditioner, assemble_hessian, build_preconditioner, choose_preconditioner
from .rows import RowSource, TensorRows, as_rows
from .validate import check_features, check_labels, check_lam

__all__ = [
    "DENSE_MAX",
    "HeadHessian",
    "HeadObjective",
    "HeadSolution",
    "IHVPResult",
    "InnerObjective",
    "accuracy",
    "add_bias",
    "batch_grad",
    "mean_ce",
    "mean_ce_grad",
    "representer_values",
    "residuals",
    "softmax_residuals",
    "solve_head",
]

log = logging.getLogger(__name__)

DENSE_MAX = 200  # K*D at or below which solve(method="auto") and Newton use the exact float64 Cholesky (measured crossover, docs/scale.md)


def add_bias(h: torch.Tensor) -> torch.Tensor:
    """Append a constant-1 column: ``(n, d) -> (n, d + 1)``."""
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)


def residuals(P: torch.Tensor, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    r""":math:`G = P - Y`: softmax probabilities minus the one-hot labels -- the one place it is computed.

    Row ``i`` is :math:`g_i = \partial\ell_i/\partial(W h_i)`, so :math:`\nabla_W\ell_i = g_i h_i^\top`.

    Args:
        P: ``(n, K)`` probabilities, or ``(n, B, K)`` for ``B`` heads at once (the label of row ``i``
            is the same for every head).
        y: ``(n,)`` int64 labels.
        inplace: overwrite ``P`` (saves an ``(n, K)`` copy when ``P`` is a temporary).
    """
    G = P if inplace else P.clone()
    G[torch.arange(G.shape[0], device=G.device), ..., y] -= 1
    return G


def softmax_residuals(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`G = \operatorname{softmax}(X W^\top) - Y`, ``(n, K)`` (see :func:`residuals`)."""
    return residuals(torch.softmax(X @ W.T, dim=1), y, inplace=True)


def mean_ce(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Unweighted mean cross-entropy :math:`\frac1m\sum_j \ell(W x_j, y_j)` (e.g. the validation loss)."""
    return torch.nn.functional.cross_entropy(X @ W.T, y)


def mean_ce_grad(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_W \frac1m\sum_j \ell(W x_j, y_j) = \frac1m (P - Y)^\top X`, shape ``(K, D)``."""
    return softmax_residuals(W, X, y).T @ X / X.shape[0]


def batch_grad(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: float,
               n: float) -> torch.Tensor:
    r"""Gradient of :math:`\frac1n\sum_{i\in b} w_i\,\ell(W h_i, y_i) + \frac\lambda2\|W\|^2` over the rows given,
    :math:`\frac1n (w\circ G)^\top X_b + \lambda W` (mini-batch SGD in TracIn and the SGD baselines).

    Differentiable in ``w`` (Meta-Weight-Net's weights carry a graph); ``G`` carries none.

    Args:
        W: ``(K, D)`` head; X: ``(b, D)`` rows; y: ``(b,)`` labels; w: ``(b,)`` weights.
        lam: :math:`\lambda`; n: the normaliser (``b`` for a mean over the batch, 1 for weights that sum to 1).
    """
    G = softmax_residuals(W.detach(), X, y)
    return (w[:, None] * G).T @ X / n + lam * W


def accuracy(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    return float(((X @ W.T).argmax(dim=1) == y).to(torch.float64).mean())


def representer_values(G: torch.Tensor, alpha: torch.Tensor, lam: float, n: Optional[int] = None) -> torch.Tensor:
    r"""Representer values :math:`r_i = -\alpha_i g_i/(\lambda n)`, ``(n, K)`` (Yeh et al., NeurIPS 2018).

    At the optimum :math:`\lambda W^* = -\frac1n\sum_i\alpha_i g_i h_i^\top`, so
    :math:`W^* h_x = \sum_i r_i\, h_i^\top h_x` exactly.

    Args:
        G: ``(n, K)`` residuals :math:`g_i = p_i - e_{y_i}` at the optimum.
        alpha: ``(n,)`` sample weights.
        lam: :math:`\lambda > 0`.
        n: the ``n`` of :math:`F`'s ``1/n`` (default ``G.shape[0]``).

    Raises:
        ConfigError: if ``lam`` is not a finite number > 0.
    """
    lam = check_lam(lam, "representer_values")
    n = int(G.shape[0] if n is None else n)
    return -(alpha[:, None] * G) / (lam * n)


@dataclass
class IHVPResult:
    """Solution of :math:`H V = B` with its cost: HVPs used, relative residual, convergence, the
    preconditioner (``none`` for a dense solve) and the seconds spent building it (0 when it was cached)."""

    x: torch.Tensor
    hvps: int
    rel_residual: float
    converged: bool
    method: str
    precond: str = "none"
    precond_seconds: float = 0.0


class InnerObjective(Protocol):
    r"""What hypergradients, baselines and attribution need from an inner objective :math:`F(W,\alpha)`.

    :class:`HeadObjective` implements it for every row source. ``n`` is the global sample count,
    ``shape`` is ``(K, D)``; per-sample outputs (``probs``, ``residuals``, ``sample_losses``) cover the
    rows this process holds, while :meth:`alpha_grad_from_v` returns all ``n`` entries.
    """

    K: int
    lam: float
    rows: RowSource
    y: torch.Tensor

    @property
    def n(self) -> int: ...

    @property
    def shape(self) -> Tuple[int, int]: ...

    def check_alpha(self, alpha: torch.Tensor) -> None: ...

    def loss(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor: ...

    def grad(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor: ...

    def hessian(self, W: torch.Tensor, alpha: torch.Tensor) -> "HeadHessian": ...

    def probs(self, W: torch.Tensor) -> torch.Tensor: ...

    def residuals(self, W: torch.Tensor) -> torch.Tensor: ...

    def sample_losses(self, W: torch.Tensor) -> torch.Tensor: ...

    def alpha_grad_from_v(self, W: torch.Tensor, V: torch.Tensor, P: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class HeadObjective:
    r"""The inner objective :math:`F(W,\alpha)` for fixed features, labels and :math:`\lambda`.

    Args:
        X: the training rows (bias column included, see :func:`add_bias`): an ``(n, D)`` floating tensor,
            a :class:`~reweight.store.FeatureStore`, or any :class:`~reweight.rows.RowSource`
            (:class:`~reweight.rows.ChunkedFeatures`, :class:`~reweight.distributed.ShardedRows`).
        y: labels of the rows this process holds, int64 in ``0..K-1``.
        num_classes: ``K``.
        lam: :math:`\lambda > 0`.
        check_finite: scan a non-tensor source once for NaN/Inf (an in-memory tensor is always checked).

    Raises:
        DataError: for NaN/Inf features, bad labels or a length mismatch.
        ConfigError: for a :math:`\lambda` that is not a finite number > 0.
    """

    def __init__(self, X: Any, y: torch.Tensor, num_classes: int, lam: float, *, check_finite: bool = False):
        if isinstance(X, torch.Tensor):
            check_features(X, "training features")
        rows = as_rows(X)
        if check_finite and not isinstance(rows, TensorRows):
            rows.check_finite()
        check_labels(y, num_classes, "training labels", n=rows.n_local, require_all_classes=False)
        self.lam = check_lam(lam, "HeadObjective")
        self.rows: RowSource = rows
        self.X: Any = rows.X if isinstance(rows, TensorRows) else rows
        self.y = torch.as_tensor(y).to(rows.device)
        self.K = int(num_classes)
        self._Y: Optional[torch.Tensor] = None

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Global number of training samples (the ``n`` of the ``1/n``)."""
        return self.rows.n

    @property
    def n_local(self) -> int:
        return self.rows.n_local

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.K, self.rows.dim)

    @property
    def Y(self) -> torch.Tensor:
        """One-hot labels ``(n_local, K)`` in the features' dtype."""
        if self._Y is None:
            self._Y = torch.nn.functional.one_hot(self.y, self.K).to(self.rows.dtype)
        return self._Y

    def local_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """This process's entries of ``alpha`` (given globally ``(n,)`` or locally)."""
        return self.rows.local(alpha)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Per-sample values of the local rows -> all ``n`` of them (identity in one process)."""
        return self.rows.gather(local)

    def check_alpha(self, alpha: torch.Tensor) -> None:
        a = self.local_alpha(alpha)  # shape errors name the accepted shapes
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise DataError("alpha must be finite and >= 0.")

    # ---- per-sample quantities (local rows) --------------------------------------------------
    def _chunks(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        return iter(self.rows)

    def probs(self, W: torch.Tensor) -> torch.Tensor:
        """``(n_local, K)`` softmax probabilities."""
        return torch.cat([torch.softmax(x @ W.T, dim=1) for _, _, x in self._chunks()])

    def residuals(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`G = P - Y`, ``(n_local, K)``: row ``i`` is :math:`\partial\ell_i/\partial(W h_i)`."""
        return residuals(self.probs(W), self.y, inplace=True)

    def sample_losses(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`\ell_i = \ell(W h_i, y_i)`, ``(n_local,)`` (stable log-sum-exp)."""
        return torch.cat([torch.nn.functional.cross_entropy(x @ W.T, self.y[lo:hi], reduction="none")
                          for lo, hi, x in self._chunks()])

    # ---- the objective and its derivatives (global sums) -------------------------------------
    def loss(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`F(W,\alpha)`."""
        s = (self.local_alpha(alpha) * self.sample_losses(W)).sum()
        if not isinstance(self.rows, TensorRows):
            s = self.rows.allreduce(s.reshape(1))[0]
        return s / self.n + 0.5 * self.lam * (W * W).sum()

    def grad(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W F = \frac1n(\alpha\circ G)^\top X + \lambda W` -- the stationarity condition
        the solver drives to zero and implicit differentiation consumes."""
        a = self.local_alpha(alpha)
        out: Optional[torch.Tensor] = None
        for lo, hi, x in self._chunks():
            G = torch.softmax(x @ W.T, dim=1)  # (rows, K), overwritten in place by alpha * (P - Y)
            residuals(G, self.y[lo:hi], inplace=True).mul_(a[lo:hi, None])
            out = G.T @ x if out is None else out.addmm_(G.T, x)
        if out is None:  # an empty shard
            out = torch.zeros_like(W)
        return self.rows.allreduce(out).div_(self.n).add_(W, alpha=self.lam)

    optimality = grad

    def grad_batch(self, W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W F(W_b, A_{:,b})` for ``B`` heads ``W`` ``(B, K, D)`` and weights ``A`` ``(n_local, B)`` at once.

        One ``n·D·(B·K)`` product per chunk (used by the batched leave-one-out solves).
        """
        B, K, D = W.shape
        out: Optional[torch.Tensor] = None
        Wt = W.reshape(B * K, D).T
        heads = torch.arange(B, device=W.device)[None, :] * K
        for lo, hi, x in self._chunks():
            Z = x @ Wt  # (rows, B*K), overwritten by A * (P - Y)
            P = Z.view(hi - lo, B, K)
            P.sub_(P.amax(dim=2, keepdim=True)).exp_()  # softmax over K in place (torch.softmax is ~4x slower on a
            a = A[lo:hi]                                 # short last axis on CPU), normalisation fused with * A
            P.mul_(a[:, :, None] / P.sum(dim=2, keepdim=True))
            flat = (torch.arange(hi - lo, device=W.device)[:, None] * (B * K) + heads + self.y[lo:hi, None]).reshape(-1)
            Z.view(-1).index_add_(0, flat, a.reshape(-1), alpha=-1.0)  # - A * Y at the labels
            out = Z.T @ x if out is None else out.addmm_(Z.T, x)
        if out is None:
            out = torch.zeros(B * K, D, dtype=W.dtype, device=W.device)
        return self.rows.allreduce(out).reshape(B, K, D).div_(self.n).add_(W, alpha=self.lam)

    def hessian(self, W: torch.Tensor, alpha: torch.Tensor, cache_probs: bool = True) -> "HeadHessian":
        """The :class:`HeadHessian` operator at ``W``."""
        return HeadHessian(self, W, alpha, cache_probs=cache_probs)

    def alpha_grad_from_v(self, W: torch.Tensor, V: torch.Tensor, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`\partial L/\partial\alpha_i = -\frac1n g_i^\top V h_i` for all ``n`` samples, ``(n,)``.

        With :math:`V = H^{-1}\nabla_W L_{val}` this is the implicit-function hypergradient
        (Pedregosa, ICML 2016); with :math:`V = H^{-1}\nabla\ell_x` it is :math:`\mathcal I_{up}(i, x)/n`
        of Koh & Liang (ICML 2017).

        Args:
            W: ``(K, D)`` head at which the residuals :math:`g_i` are taken (the inner optimum).
            V: ``(K, D)`` (or an approximation of :math:`H^{-1}B`).
            P: the local ``(n_local, K)`` probabilities at ``W`` when already known (e.g. from the
                Hessian that produced ``V``).
        """
        if isinstance(self.rows, TensorRows):
            G = self.residuals(W) if P is None else residuals(P, self.y)
            return -((G * (self.X @ V.T)).sum(dim=1)) / self.n
        out = []
        for lo, hi, x in self._chunks():
            G = softmax_residuals(W, x, self.y[lo:hi]) if P is None else residuals(P[lo:hi], self.y[lo:hi])
            out.append(-(G * (x @ V.T)).sum(dim=1))
        local = torch.cat(out) / self.n if out else torch.zeros(0, dtype=V.dtype, device=V.device)
        return self.rows.gather(local)

    def representer_values(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r"""Representer values :math:`r_i = -\alpha_i g_i/(\lambda n)` of the local rows at ``W``, ``(n_local, K)``."""
        return representer_values(self.residuals(W), self.local_alpha(alpha), self.lam, self.n)


class HeadHessian:
    r"""The Hessian :math:`H = \nabla^2_W F` at ``W`` as an operator over the objective's row source.

    Args:
        obj: the :class:`HeadObjective`.
        W: ``(K, D)`` point of the Hessian.
        alpha: ``(n,)`` (or local) sample weights.
        cache_probs: keep each chunk's ``(rows, K)`` probabilities between products (default) instead of
            recomputing them from the features at every product (one extra ``n·D·K`` product). An
            in-memory source always keeps them.
    """

    def __init__(self, obj: HeadObjective, W: torch.Tensor, alpha: torch.Tensor, cache_probs: bool = True):
        self.obj: Optional[HeadObjective] = obj
        self.rows: RowSource = obj.rows
        self.W: Optional[torch.Tensor] = W
        self.lam, self.n, self.K, self.D = obj.lam, obj.n, obj.K, obj.rows.dim
        self.alpha = obj.local_alpha(alpha)
        self.cache_probs = bool(cache_probs)
        self.hvps = 0
        self._single = isinstance(self.rows, TensorRows)
        # in memory: the probabilities now, the weighted ones at the first product (see _weighted_probs)
        self.P: Optional[torch.Tensor] = torch.softmax(obj.X @ W.T, dim=1) if self._single else None
        self._cache: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
        self._chol: Optional[torch.Tensor] = None
        self._H64: Optional[torch.Tensor] = None
        self._preconds: Dict[str, Preconditioner] = {}

    @classmethod
    def from_tensors(cls, X: torch.Tensor, P: torch.Tensor, alpha: torch.Tensor, lam: float,
                     n: Optional[int] = None) -> "HeadHessian":
        r"""The Hessian of the rows ``X`` with probabilities ``P`` given directly (``lam`` may be 0 here,
        e.g. for one chunk's term; ``n`` is the global count of the ``1/n``)."""
        self = cls.__new__(cls)
        self.obj, self.rows, self.W = None, TensorRows(X), None
        self.lam, self.n, self.K, self.D = float(lam), int(n if n is not None else X.shape[0]), P.shape[1], X.shape[1]
        self.alpha, self.cache_probs, self.hvps, self._single = alpha, True, 0, True
        self.P, self._cache, self._chol, self._H64 = P, None, None, None
        self._preconds = {}
        return self

    @property
    def X(self) -> Any:
        return self.rows.X if self._single else self.rows  # type: ignore[attr-defined]

    def _weighted_probs(self) -> torch.Tensor:
        r""":math:`\alpha_i P_{ik}`, ``(n, K)``, computed once and reused by every HVP of this operator."""
        assert self.P is not None
        key = (id(self.P), self.P._version, id(self.alpha), self.alpha._version)
        if getattr(self, "_aP_key", None) != key:
            self._aP = self.alpha[:, None] * self.P
            self._aP_key = key
        return self._aP

    def _chunk_probs(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(rows, P, alpha * P)`` per chunk (cached after the first pass when asked)."""
        if self._single:
            yield self.X, self.P, self._weighted_probs()  # type: ignore[misc]
            return
        if self._cache is not None:
            for (_, _, x), (P, aP) in zip(self.rows, self._cache):
                yield x, P, aP
            return
        cache = []
        for lo, hi, x in self.rows:
            assert self.W is not None
            P = torch.softmax(x @ self.W.T, dim=1)
            aP = self.alpha[lo:hi, None] * P
            yield x, P, aP
            cache.append((P, aP))
        if self.cache_probs:
            self._cache = cache

    def matvec(self, U: torch.Tensor) -> torch.Tensor:
        r""":math:`H U` for ``U`` ``(K, D)`` or a batch ``(B, K, D)`` (one product per batch element).

        Two ``n·D·(B·K)`` matrix products plus three in-place elementwise passes over ``(n, B·K)``:
        :math:`Z = X U^\top`, :math:`s_i = \langle P_i, Z_i\rangle` (``vecdot``), :math:`M = (\alpha\circ P)\circ(Z - s)`,
        :math:`HU = M^\top X / n + \lambda U`. Rows are processed in blocks of about ``2**24`` entries
        of ``Z`` so temporaries stay bounded for large ``n`` (the result does not depend on the block);
        a chunked or sharded source sums its chunks and all-reduces.
        """
        batched = U.ndim == 3
        Ub = U if batched else U.unsqueeze(0)
        B, K, D = Ub.shape[0], self.K, self.D
        Ut = Ub.reshape(B * K, D).T
        out: Optional[torch.Tensor] = None
        block = max(4096, (1 << 24) // max(1, B * K))
        for X, P, aP in self._chunk_probs():
            n_rows = X.shape[0]
            for lo in range(0, n_rows, block):
                hi = min(n_rows, lo + block)
                Xb = X[lo:hi]
                Z = Xb @ Ut  # (b, B*K)
                Z3 = Z.view(hi - lo, B, K)
                s = torch.linalg.vecdot(Z3, P[lo:hi].unsqueeze(1), dim=2).unsqueeze(2)  # no (b, B, K) temporary
                Z3.sub_(s).mul_(aP[lo:hi].unsqueeze(1))
                out = Z.T @ Xb if out is None else out.addmm_(Z.T, Xb)
        if out is None:  # no local rows (an empty shard)
            out = torch.zeros(B * K, D, dtype=Ub.dtype, device=Ub.device)
        out = self.rows.allreduce(out)
        HU = out.reshape(B, K, D).div_(self.n).add_(Ub, alpha=self.lam)
        self.hvps += B
        return HU if batched else HU[0]

    __call__ = matvec

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        r"""The dense ``(K·D, K·D)`` Hessian, assembled exactly in float64 by a few large GEMMs, then cast to ``dtype``
        (default: the features' dtype).

        .. math::

            H_{(k,a),(l,b)} = \frac1n\sum_i \alpha_i (P_{ik}\delta_{kl} - P_{ik}P_{il}) X_{ia}X_{ib} + \lambda\delta

        computed as :math:`\frac1n\sum_{k<l}(e_k-e_l)(e_k-e_l)^\top\otimes G_{kl} + \lambda I` with
        :math:`G_{kl} = X^\top\operatorname{diag}(\alpha p_kp_l)X` from one symmetric Khatri--Rao GEMM per row chunk
        (:func:`reweight.precond.assemble_hessian`): ``n·D(D+1)/2·K(K-1)/2`` multiply-adds, no per-sample loop,
        exactly symmetric, chunked and all-reduced over the row source.
        """
        return assemble_hessian(self, torch.float64).to(dtype or self.rows.dtype)

    def cholesky(self) -> torch.Tensor:
        """The float64 Cholesky factor of :meth:`dense`, computed once per operator and cached.

        Factorised in float64: ill-conditioned float32 Hessians (large alpha, small lambda) are still
        positive definite but defeat a float32 Cholesky; the dense path is for small ``K·D`` anyway.

        Raises:
            FloatingPointError: if the Hessian is not positive definite.
        """
        if self._chol is None:
            H = self.dense(torch.float64)
            L, info = torch.linalg.cholesky_ex(H)
            if int(info) != 0:
                raise FloatingPointError("The head Hessian is not positive definite (check lam > 0 and alpha >= 0).")
            self._H64, self._chol = H, L
        return self._chol

    def preconditioner(self, kind: Union[str, Preconditioner] = "auto", rtol: float = 1e-6) -> Preconditioner:
        """The preconditioner ``kind`` of this operator, built over the row source once and cached.

        ``auto`` resolves by :func:`reweight.precond.choose_preconditioner` from ``n``, ``K``, ``D``, ``rtol``, the dtype
        and the device; a :class:`~reweight.precond.Preconditioner` instance is returned as it is.

        Raises:
            ConfigError: for an unknown kind.
        """
        if isinstance(kind, Preconditioner):
            return kind
        if kind == "auto":
            kind = choose_preconditioner(self.n, self.K, self.D, rtol, self.rows.dtype, self.rows.device)
        if kind not in self._preconds:
            self._preconds[kind] = build_preconditioner(self, kind)
        return self._preconds[kind]

    def solve(self, B: torch.Tensor, method: Literal["dense", "cg", "auto"] = "auto", rtol: Optional[float] = None,
              max_iter: int = 1000, x0: Optional[torch.Tensor] = None, tol: Optional[float] = None,
              precond: Union[str, Preconditioner] = "auto") -> IHVPResult:
        r"""The inverse-Hessian-vector product :math:`H^{-1} B` -- the kernel shared by hypergradients
        and influence functions.

        ``B`` is ``(K, D)``, or a batch ``(Q, K, D)``. ``dense`` uses the cached float64 Cholesky factor
        (:meth:`cholesky`; repeated solves on one operator factorise once, 0 HVPs); ``cg`` runs preconditioned
        conjugate gradients (:func:`reweight.linalg.conjugate_gradient`) to relative residual ``rtol``
        (:math:`\|B - HV\|/\|B\|`; required for ``cg``: the caller's method owns the default); ``auto`` is
        ``dense`` when ``K·D <= DENSE_MAX`` and ``cg`` otherwise. ``rel_residual`` is the largest over the batch
        for ``dense``, the residual of the stacked system for ``cg``. ``tol`` is the deprecated name of ``rtol``.

        Args:
            precond: the preconditioner of ``cg``: ``auto`` (default; cost model of
                :func:`reweight.precond.choose_preconditioner`), ``dense`` (the Hessian assembled in bfloat16/float32,
                float32 Cholesky), ``kfac`` (trace-weighted K-FAC, exact damping), ``block_jacobi`` (the ``K`` class
                blocks), ``none``, or a built :class:`~reweight.precond.Preconditioner`. Built once per operator, so
                repeated solves (one per query) share it; ``precond_seconds`` reports the build (0 when cached).

        Raises:
            ConfigError: for an unknown method or preconditioner, or ``cg`` without ``rtol``.
        """
        if tol is not None:
            warnings.warn("HeadHessian.solve(tol=...) is deprecated; use rtol=... (relative residual).",
                          DeprecationWarning, stacklevel=2)
            rtol = tol if rtol is None else rtol
        if method == "auto":
            method = "dense" if self.K * self.D <= DENSE_MAX else "cg"
        if method == "dense":
            L = self.cholesky()
            assert self._H64 is not None
            b = B.reshape(-1, self.K * self.D).T.to(torch.float64)  # (KD, Q)
            x = torch.cholesky_solve(b, L)
            r = torch.linalg.vector_norm(self._H64 @ x - b, dim=0) / torch.linalg.vector_norm(b, dim=0).clamp_min(1e-300)
            return IHVPResult(x=x.T.reshape(B.shape).to(B.dtype), hvps=0, rel_residual=float(r.max()),
                              converged=True, method="dense")
        if method == "cg":
            if rtol is None:
                raise ConfigError("The 'rtol' parameter of HeadHessian.solve is required with method='cg' "
                                  "(the relative residual ||B - HV|| / ||B|| to stop at). Got None instead.")
            if not isinstance(precond, Preconditioner) and precond != "auto" and precond not in PRECONDITIONERS:
                raise ConfigError(f"The 'precond' parameter of HeadHessian.solve must be one of 'auto', "
                                  f"{', '.join(repr(k) for k in PRECONDITIONERS)}. Got {precond!r} instead.")
            before = set(map(id, self._preconds.values()))
            M = self.preconditioner(precond, rtol)
            setup = 0.0 if (isinstance(precond, Preconditioner) or id(M) in before) else M.setup_seconds
            start = self.hvps
            res: CGResult = conjugate_gradient(self.matvec, B, x0=x0, rtol=rtol, max_iter=max_iter,
                                               precond=None if M.name == "none" else M)
            return IHVPResult(x=res.x, hvps=self.hvps - start, rel_residual=res.rel_residual,
                              converged=res.converged, method="cg", precond=M.name, precond_seconds=setup)
        raise ConfigError(f"The 'method' parameter of HeadHessian.solve must be one of 'auto', 'cg', 'dense'. Got {method!r} instead.")


@dataclass
class HeadSolution:
    """Result of :func:`solve_head`: the optimum and the cost of reaching it."""

    W: torch.Tensor
    iters: int
    hvps: int
    grad_norm: float
    converged: bool
    seconds: float


def solve_head(obj: InnerObjective, alpha: torch.Tensor, W0: Optional[torch.Tensor] = None, grad_tol: float = 1e-6,
               max_iter: int = 100, newton_system: Literal["auto", "dense", "cg"] = "auto",
               tol: Optional[float] = None, precond: str = "auto") -> HeadSolution:
    r"""Minimise :math:`F(\cdot,\alpha)` by damped Newton until :math:`\|\nabla_W F\| \le \mathrm{grad\_tol}`.

    Args:
        obj: the objective.
        alpha: ``(n,)`` non-negative weights.
        W0: warm start ``(K, D)`` (default zeros).
        grad_tol: gradient-norm tolerance (absolute, Frobenius norm). ``tol`` is its deprecated name.
        max_iter: maximum Newton iterations.
        newton_system: ``dense`` (Cholesky), ``cg`` (truncated Newton) or ``auto`` (dense iff ``K·D <= DENSE_MAX``).
        precond: the preconditioner of the ``cg`` Newton systems (see :meth:`HeadHessian.solve`). The previous
            iteration's preconditioner is reused while the kind the cost model picks stays the same: a stale
            preconditioner is still symmetric positive definite, and near the optimum ``W`` barely moves, so it
            stays accurate (measured 25% faster fits on MNIST-5k and digits features, ``docs/scale.md``).

    Returns:
        :class:`HeadSolution`. ``converged`` is False when ``max_iter`` was reached or the line search
        stalled at the floating-point floor above ``grad_tol``; a warning is logged in that case.
    """
    if tol is not None:
        warnings.warn("solve_head(tol=...) is deprecated; use grad_tol=... (the gradient-norm tolerance).",
                      DeprecationWarning, stacklevel=2)
        grad_tol = tol
    obj.check_alpha(alpha)
    t0 = time.perf_counter()
    W = torch.zeros(obj.shape, dtype=obj.rows.dtype, device=obj.rows.device) if W0 is None else W0.detach().clone()
    if W.shape != obj.shape:
        raise DataError(f"Expected a warm start of shape {obj.shape}, but got {tuple(W.shape)}.")
    system = newton_system if newton_system != "auto" else ("dense" if obj.shape[0] * obj.shape[1] <= DENSE_MAX else "cg")
    eps = torch.finfo(W.dtype).eps
    hvps, it, converged = 0, 0, False
    M: Optional[Preconditioner] = None
    f = obj.loss(W, alpha)
    g = obj.grad(W, alpha)
    gn = float(torch.linalg.vector_norm(g))
    while True:
        if gn <= grad_tol:
            converged = True
            break
        if it >= max_iter:
            break
        H = obj.hessian(W, alpha)
        forcing = min(0.5, gn ** 0.5)
        kind = precond
        if precond == "auto":
            kind = choose_preconditioner(H.n, H.K, H.D, forcing, H.rows.dtype, H.rows.device)
        pc: Union[str, Preconditioner] = M if (M is not None and M.name == kind) else kind
        try:
            sol = H.solve(-g, method=system, rtol=forcing, max_iter=200, precond=pc)
        except FloatingPointError:  # indefinite at this precision (float32, extreme alpha/lambda): truncated Newton
            sol = H.solve(-g, method="cg", rtol=forcing, max_iter=200, precond=pc)
        if sol.method == "cg":
            M = H.preconditioner(pc)
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
        log.warning("Head solver stopped at ||grad F|| = %.3g > grad_tol = %.3g after %d iterations.", gn, grad_tol, it)
    return HeadSolution(W=W, iters=it, hvps=hvps, grad_norm=gn, converged=converged, seconds=time.perf_counter() - t0)
