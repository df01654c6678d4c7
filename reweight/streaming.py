r"""Streaming head computations: the same numbers as :mod:`reweight.head`, one chunk of rows at a time.

The head problem of DESIGN section 2 touches the ``(n, D)`` features only through sums over
samples, so every quantity is a sum of per-chunk terms with the global ``n`` in the ``1/n``:

.. math::

    \nabla_W F = \frac1n\sum_{\text{chunks } c} (\alpha_c\circ G_c)^\top X_c + \lambda W, \qquad
    H U = \frac1n\sum_c M_c^\top X_c + \lambda U, \qquad
    \frac{\partial L_{val}}{\partial\alpha_i} = -\frac1n g_i^\top V h_i .

:class:`ChunkedFeatures` presents an in-memory tensor or a :class:`~reweight.store.FeatureStore`
(memory-mapped shards) as chunks, optionally appending the bias column and casting to the compute
dtype/device chunk by chunk. :class:`StreamingObjective` mirrors
:class:`~reweight.head.HeadObjective` (``loss``, ``grad``, ``hessian``, ``residuals``,
``sample_losses``, ``probs``) and :class:`StreamingHessian` subclasses
:class:`~reweight.head.HeadHessian`, so the inverse-HVP kernel :meth:`HeadHessian.solve`, the Newton
solver :func:`~reweight.head.solve_head` and the hypergradient methods of :mod:`reweight.hypergrad`
run on a streaming objective unchanged. Only one chunk of features is held at a time; ``(n, K)``
probabilities are cached by the Hessian (``K`` is usually much smaller than ``D``; pass
``cache_probs=False`` to recompute them per product instead, one extra ``n·D·K`` product).

References:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch

from .data import check_features, check_labels
from .errors import ConfigError, DataError
from .head import HeadHessian, HeadObjective, mean_ce_grad
from .hypergrad import ValAlphaGrad
from .store import FeatureStore, check_chunk_rows

__all__ = [
    "ChunkedFeatures",
    "ChunkedRows",
    "StreamingHessian",
    "StreamingObjective",
    "alpha_grad_from_v",
    "auto_threads",
    "influence_on_val_loss",
    "num_threads",
    "val_alpha_grad",
]


def auto_threads(flops_per_product: float, flops_per_thread: float = 5e7, max_threads: Optional[int] = None) -> int:
    """A sensible intra-op thread count for products of ``flops_per_product`` FLOPs.

    Waking a thread pool costs tens of microseconds, and far more on a shared, oversubscribed
    machine where a worker thread may be descheduled: a CG on a small head (``4 n D K`` of about
    1e7 FLOPs per HVP) ran 5-70x faster on 1 thread than on 2 on the 2-core development machine
    (``docs/scale.md``). One thread per ``flops_per_thread`` FLOPs, at least 1, at most
    ``max_threads`` (default ``os.cpu_count()``).
    """
    cap = max_threads or os.cpu_count() or 1
    return int(max(1, min(cap, flops_per_product // flops_per_thread)))


@contextmanager
def num_threads(k: int):
    """Context manager: ``torch.set_num_threads(k)`` inside, the previous count restored after."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"The 'k' parameter of num_threads must be an int >= 1. Got {k!r} instead.")
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield k
    finally:
        torch.set_num_threads(old)


class ChunkedFeatures:
    r"""An ``(n, D)`` feature matrix seen as row chunks.

    Args:
        source: an ``(n, d)`` tensor or a :class:`~reweight.store.FeatureStore`.
        chunk_rows: rows per chunk, >= 1.
        dtype: compute dtype of the chunks (default: the source's).
        device: compute device of the chunks (default CPU).
        bias: append a constant-1 column, so ``D = d + 1`` (see :func:`reweight.head.add_bias`).

    Raises:
        ConfigError: for ``chunk_rows < 1``.
        DataError: for a source that is not 2-D.
    """

    def __init__(self, source: torch.Tensor | FeatureStore, chunk_rows: int = 65536,
                 dtype: Optional[torch.dtype] = None, device: Optional[str | torch.device] = None, bias: bool = False):
        self.chunk_rows = check_chunk_rows(chunk_rows, "ChunkedFeatures")
        if len(tuple(source.shape)) != 2:
            raise DataError(f"Expected features of shape (n, d), but got shape {tuple(source.shape)}.")
        self.source, self.bias = source, bool(bias)
        self.dtype = dtype or source.dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        n, d = source.shape
        self.shape = (int(n), int(d) + int(self.bias))

    @property
    def n(self) -> int:
        return self.shape[0]

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(lo, hi, X[lo:hi])`` in compute dtype/device (bias column appended if asked)."""
        if isinstance(self.source, FeatureStore):
            raw = self.source.chunks(self.chunk_rows)
        else:
            raw = ((lo, min(self.n, lo + self.chunk_rows), self.source[lo:lo + self.chunk_rows])
                   for lo in range(0, self.n, self.chunk_rows))
        for lo, hi, x in raw:
            x = x.to(device=self.device, dtype=self.dtype)
            if self.bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            yield lo, hi, x

    def __matmul__(self, B: torch.Tensor) -> torch.Tensor:
        """``X @ B`` for ``B`` ``(D, m)``, assembled chunk by chunk: ``(n, m)``."""
        return torch.cat([x @ B for _, _, x in self])

    def tmatmul(self, G: torch.Tensor) -> torch.Tensor:
        r""":math:`G^\top X` for ``G`` ``(n, m)``: ``(m, D)``, accumulated over chunks."""
        out = None
        for lo, hi, x in self:
            out = G[lo:hi].T @ x if out is None else out.addmm_(G[lo:hi].T, x)
        return out

    def check_finite(self) -> None:
        """One pass raising :class:`DataError` on NaN/Inf (names global row indices)."""
        for lo, _, x in self:
            bad = ~torch.isfinite(x).all(dim=1)
            if bool(bad.any()):
                rows = (torch.nonzero(bad).flatten()[:10] + lo).tolist()
                raise DataError(f"training features contain NaN/Inf; first offending rows: {rows}.")


class ChunkedRows:
    """Row-wise quantities of the head over chunked features ``self.X`` (yielding ``(lo, hi, x)``) and
    labels ``self.y`` -- shared by :class:`StreamingObjective` and the distributed objective (whose
    rows are the rank's local ones)."""

    def probs(self, W: torch.Tensor) -> torch.Tensor:
        """``(rows, K)`` softmax probabilities, chunk by chunk."""
        return torch.cat([torch.softmax(x @ W.T, dim=1) for _, _, x in self.X])

    def residuals(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`G = P - Y`, ``(rows, K)``."""
        G = self.probs(W)
        G[torch.arange(G.shape[0], device=G.device), self.y] -= 1
        return G

    def sample_losses(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`\ell_i`, ``(rows,)``."""
        return torch.cat([torch.nn.functional.cross_entropy(x @ W.T, self.y[lo:hi], reduction="none")
                          for lo, hi, x in self.X])


class StreamingObjective(ChunkedRows):
    r"""The inner objective :math:`F(W,\alpha)` of :class:`~reweight.head.HeadObjective`, streamed.

    Same methods and results as the in-memory objective; ``X`` is a :class:`ChunkedFeatures`.

    Args:
        X: :class:`ChunkedFeatures` ``(n, D)`` (or an ``(n, D)`` tensor, wrapped with ``chunk_rows``).
        y: ``(n,)`` int64 labels in ``0..K-1`` (held in memory).
        num_classes: ``K``.
        lam: :math:`\lambda > 0`.
        chunk_rows: chunk size when ``X`` is a tensor.
        check_finite: scan the features once for NaN/Inf.

    Raises:
        DataError: for bad labels or a length mismatch (and NaN/Inf with ``check_finite``).
        ConfigError: for ``lam <= 0`` or ``chunk_rows < 1``.
    """

    def __init__(self, X: ChunkedFeatures | torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
                 chunk_rows: int = 65536, check_finite: bool = False):
        if not isinstance(X, ChunkedFeatures):
            X = ChunkedFeatures(X, chunk_rows)
        check_labels(y, num_classes, "training labels", n=X.n, require_all_classes=False)
        if not lam > 0:
            raise ConfigError(f"The 'lam' parameter must be > 0 (strict L2 makes the inner problem strongly convex). Got {lam!r} instead.")
        if check_finite:
            X.check_finite()
        self.X, self.y, self.K, self.lam = X, torch.as_tensor(y).to(X.device), int(num_classes), float(lam)

    n = property(lambda self: self.X.n)
    shape = property(lambda self: (self.K, self.X.shape[1]))
    check_alpha = HeadObjective.check_alpha

    def loss(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`F(W,\alpha)`."""
        return (alpha * self.sample_losses(W)).sum() / self.n + 0.5 * self.lam * (W * W).sum()

    def grad(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W F = \frac1n\sum_c(\alpha_c\circ G_c)^\top X_c + \lambda W` (one pass)."""
        out = None
        for lo, hi, x in self.X:
            G = torch.softmax(x @ W.T, dim=1)
            G[torch.arange(hi - lo, device=G.device), self.y[lo:hi]] -= 1
            G.mul_(alpha[lo:hi, None])
            out = G.T @ x if out is None else out.addmm_(G.T, x)
        return out.div_(self.n).add_(W, alpha=self.lam)

    optimality = grad

    def hessian(self, W: torch.Tensor, alpha: torch.Tensor, cache_probs: bool = True) -> "StreamingHessian":
        """The :class:`StreamingHessian` at ``W``."""
        return StreamingHessian(self, W, alpha, cache_probs=cache_probs)


class StreamingHessian(HeadHessian):
    r"""The head Hessian :math:`H = \nabla^2_W F` as a streamed operator (a :class:`HeadHessian`).

    :math:`H U = \sum_c H_c U + \lambda U` where :math:`H_c` is the chunk's
    :class:`~reweight.head.HeadHessian` with ``lam = 0`` and the global ``n`` (this is what the
    explicit ``n`` of :class:`HeadHessian` is for). :meth:`solve` (dense or CG) is inherited.

    Args:
        obj: the :class:`StreamingObjective`.
        W: ``(K, D)`` point of the Hessian.
        alpha: ``(n,)`` weights.
        cache_probs: keep the ``(n, K)`` probabilities between products (default) instead of
            recomputing them from the features each time.
    """

    def __init__(self, obj: StreamingObjective, W: torch.Tensor, alpha: torch.Tensor, cache_probs: bool = True):
        self.obj, self.W, self.alpha, self.lam = obj, W, alpha, obj.lam
        self.X, self.P = obj.X, None
        self.n, self.K, self.D = obj.n, obj.K, obj.X.shape[1]
        self.cache_probs = bool(cache_probs)
        self._ops: Optional[List[HeadHessian]] = None
        self.hvps = 0

    def _chunk_ops(self) -> Iterator[HeadHessian]:
        if self._ops is not None:
            for (lo, hi, x), op in zip(self.X, self._ops):
                op.X = x  # the chunk is re-read; probabilities and alpha*P stay cached
                yield op
                op.X = None
            return
        ops = []
        for lo, hi, x in self.X:
            op = HeadHessian(x, torch.softmax(x @ self.W.T, dim=1), self.alpha[lo:hi], 0.0, n=self.n)
            yield op
            op.X = None
            ops.append(op)
        if self.cache_probs:
            self._ops = ops

    def matvec(self, U: torch.Tensor) -> torch.Tensor:
        r""":math:`H U` for ``U`` ``(K, D)`` or ``(B, K, D)``, one pass over the chunks."""
        out = None
        for op in self._chunk_ops():
            hu = op.matvec(U)
            out = hu if out is None else out.add_(hu)
        out = out.add_(U, alpha=self.lam)
        self.hvps += U.shape[0] if U.ndim == 3 else 1
        return out

    __call__ = matvec

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``(K·D, K·D)`` Hessian, summed over chunks in float64 (small problems and tests only)."""
        out, f64 = None, torch.float64
        for lo, hi, x in self.X:
            P = torch.softmax(x @ self.W.T, dim=1)
            h = HeadHessian(x.to(f64), P.to(f64), self.alpha[lo:hi].to(f64), 0.0, n=self.n).dense()
            out = h if out is None else out.add_(h)
        out = out + self.lam * torch.eye(self.K * self.D, dtype=out.dtype, device=out.device)
        return out.to(dtype or self.X.dtype)


def alpha_grad_from_v(obj: HeadObjective | StreamingObjective, W: torch.Tensor, v: torch.Tensor,
                      P: Optional[torch.Tensor] = None) -> torch.Tensor:
    r""":math:`\partial L_{val}/\partial\alpha_i = -\frac1n g_i^\top V h_i`, ``(n,)``, in one pass.

    With the probabilities ``P`` ``(n, K)`` at ``W`` already known (e.g. from the Hessian used to
    find ``V``) only :math:`X V^\top` is computed; otherwise each chunk is multiplied once by the
    stacked ``[W; V]`` (``2K`` columns), giving both the logits (hence :math:`g_i`) and
    :math:`V h_i` from one product. Equal to :func:`reweight.hypergrad.alpha_grad_from_v`.
    """
    K = W.shape[0]
    if P is not None:
        G = P.clone()
        G[torch.arange(obj.n, device=G.device), obj.y] -= 1
        return -(G * (obj.X @ v.T)).sum(dim=1) / obj.n
    Wv = torch.cat([W, v]).T  # (D, 2K)
    chunks = obj.X if isinstance(obj.X, ChunkedFeatures) else [(0, obj.n, obj.X)]
    out = []
    for lo, hi, x in chunks:
        Z = x @ Wv
        G = torch.softmax(Z[:, :K], dim=1)
        G[torch.arange(hi - lo, device=G.device), obj.y[lo:hi]] -= 1
        out.append(-(G * Z[:, K:]).sum(dim=1))
    return torch.cat(out) / obj.n


def val_alpha_grad(obj: HeadObjective | StreamingObjective, X_val: torch.Tensor, y_val: torch.Tensor, W: torch.Tensor,
                   alpha: torch.Tensor, method: str = "cg", tol: float = 1e-6, max_iter: int = 500,
                   v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
    r"""Implicit-function hypergradient :math:`\partial L_{val}/\partial\alpha` (in memory or streamed).

    .. math::

        H V = \nabla_W L_{val}(W), \qquad \frac{\partial L_{val}}{\partial\alpha_i} = -\frac1n g_i^\top V h_i.

    Args:
        obj: :class:`~reweight.head.HeadObjective` or :class:`StreamingObjective`.
        X_val: ``(m, D)`` validation features (in memory; same columns as the training features).
        y_val: ``(m,)`` validation labels.
        W: ``(K, D)`` inner optimum.
        alpha: ``(n,)`` weights.
        method: ``cg`` or ``dense`` solve of :math:`HV = \nabla L_{val}` (:meth:`HeadHessian.solve`).
        tol, max_iter, v0: CG relative-residual tolerance, budget and warm start.

    Raises:
        DataError: for validation features of the wrong width or bad labels.
    """
    check_features(X_val, "validation features", dim=obj.shape[1])
    check_labels(y_val, obj.K, "validation labels", n=X_val.shape[0], require_all_classes=False)
    obj.check_alpha(alpha)
    H = obj.hessian(W, alpha)
    sol = H.solve(mean_ce_grad(W, X_val, y_val.to(X_val.device)), method=method, tol=tol, max_iter=max_iter, x0=v0)
    P = H.P if isinstance(H.P, torch.Tensor) else None  # in memory: reuse the Hessian's softmax(X W^T)
    return ValAlphaGrad(alpha_grad_from_v(obj, W, sol.x, P=P), v=sol.x, hvps=sol.hvps, rel_residual=sol.rel_residual,
                        converged=sol.converged)


def influence_on_val_loss(obj: HeadObjective | StreamingObjective, X_val: torch.Tensor, y_val: torch.Tensor,
                          W: torch.Tensor, alpha: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, ValAlphaGrad]:
    r"""First-order leave-one-out effect of every training sample on the validation loss.

    .. math::

        \hat\Delta_i = -\alpha_i \frac{\partial L_{val}}{\partial \alpha_i}
        = \frac{\alpha_i}{n}\, g_i^\top H^{-1}\nabla_W L_{val}\, h_i
        \;\approx\; L_{val}(W^*_{-i}) - L_{val}(W^*),

    on the DESIGN sign convention (positive: removing ``i`` would raise the validation loss, the
    sample helps). This is :math:`-\alpha_i I_{up}/n` of Koh & Liang (ICML 2017) summed over the
    validation set. Keyword arguments go to :func:`val_alpha_grad`.

    Returns:
        ``(n,)`` scores and the :class:`~reweight.hypergrad.ValAlphaGrad` they came from.
    """
    vag = val_alpha_grad(obj, X_val, y_val, W, alpha, **kwargs)
    return -alpha * vag.grad_alpha, vag
