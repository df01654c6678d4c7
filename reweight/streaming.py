r"""Streaming head computations: the head objective on features read one chunk of rows at a time.

The head's formulas are written once, in :mod:`reweight.head`; :class:`~reweight.head.HeadObjective`
runs them chunk by chunk over any row source (:mod:`reweight.rows`) with the global ``n`` in the ``1/n``:

.. math::

    \nabla_W F = \frac1n\sum_{\text{chunks } c} (\alpha_c\circ G_c)^\top X_c + \lambda W, \qquad
    H U = \frac1n\sum_c M_c^\top X_c + \lambda U, \qquad
    \frac{\partial L_{val}}{\partial\alpha_i} = -\frac1n g_i^\top V h_i .

This module keeps the names of the streaming API (:class:`StreamingObjective`, :class:`StreamingHessian`,
:func:`val_alpha_grad`, :func:`influence_on_val_loss`) as thin spellings of the one objective and the
hypergradient registry, and the thread-count helpers.

Example (a memory-mapped store, never loaded whole)::

    X = ChunkedFeatures(store, chunk_rows=65536, bias=True)
    obj = HeadObjective(X, store.labels, num_classes=K, lam=1e-2)       # == StreamingObjective(...)

References:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Tuple

import torch

from .head import HeadHessian, HeadObjective
from .hypergrad import BilevelProblem, ValAlphaGrad, make_method
from .rows import ChunkedFeatures, RowSource
from .validate import check_features, check_int, check_labels

__all__ = [
    "ChunkedFeatures",
    "StreamingHessian",
    "StreamingObjective",
    "auto_threads",
    "influence_on_val_loss",
    "num_threads",
    "val_alpha_grad",
]

#: The streamed Hessian is the head's Hessian over a chunked row source.
StreamingHessian = HeadHessian


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
def num_threads(k: int) -> Iterator[int]:
    """Context manager: ``torch.set_num_threads(k)`` inside, the previous count restored after."""
    check_int(k, "k", "num_threads", minimum=1)
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield k
    finally:
        torch.set_num_threads(old)


class StreamingObjective(HeadObjective):
    r""":class:`~reweight.head.HeadObjective` over chunked rows (the historical spelling).

    Args:
        X: a :class:`~reweight.rows.ChunkedFeatures` / row source, or an ``(n, D)`` tensor (read in
            chunks of ``chunk_rows``).
        y: ``(n,)`` int64 labels in ``0..K-1`` (held in memory).
        num_classes: ``K``.
        lam: :math:`\lambda > 0`.
        chunk_rows: chunk size when ``X`` is a tensor.
        check_finite: scan the features once for NaN/Inf.
    """

    def __init__(self, X: Any, y: torch.Tensor, num_classes: int, lam: float, chunk_rows: int = 65536,
                 check_finite: bool = False):
        if not isinstance(X, RowSource):
            X = ChunkedFeatures(X, chunk_rows)
        super().__init__(X, y, num_classes, lam, check_finite=check_finite)


def val_alpha_grad(obj: HeadObjective, X_val: torch.Tensor, y_val: torch.Tensor, W: torch.Tensor,
                   alpha: torch.Tensor, method: str = "cg", rtol: float = 1e-6, max_iter: int = 500,
                   v0: Optional[torch.Tensor] = None, tol: Optional[float] = None,
                   precond: str = "auto") -> ValAlphaGrad:
    r"""Implicit-function hypergradient :math:`\partial L_{val}/\partial\alpha` (in memory or streamed),
    through the hypergradient registry (``cg`` or ``dense`` = the ``exact`` method).

    .. math::

        H V = \nabla_W L_{val}(W), \qquad \frac{\partial L_{val}}{\partial\alpha_i} = -\frac1n g_i^\top V h_i.

    Args:
        obj: the inner objective (any row source).
        X_val: ``(m, D)`` validation features (in memory; same columns as the training features).
        y_val: ``(m,)`` validation labels.
        W: ``(K, D)`` inner optimum.
        alpha: ``(n,)`` weights.
        method: ``cg`` or ``dense``.
        rtol, max_iter, v0: CG relative-residual tolerance (``tol`` is its deprecated name), budget and
            warm start.
        precond: the preconditioner of ``cg`` (:meth:`reweight.head.HeadHessian.solve`: ``auto``, ``dense``,
            ``kfac``, ``block_jacobi``, ``none``); reported in ``extra["precond"]``.

    Raises:
        DataError: for validation features of the wrong width or bad labels.
    """
    check_features(X_val, "validation features", dim=obj.shape[1])
    check_labels(y_val, obj.K, "validation labels", n=X_val.shape[0], require_all_classes=False)
    obj.check_alpha(alpha)
    opts = {"rtol": tol if tol is not None else rtol, "max_iter": max_iter, "precond": precond} if method == "cg" else {}
    hg = make_method("exact" if method == "dense" else method, opts)
    problem = BilevelProblem(obj, X_val, y_val, weights=None, all_classes=False)
    return hg.val_alpha_grad(problem, W, alpha, v0=v0)


def influence_on_val_loss(obj: HeadObjective, X_val: torch.Tensor, y_val: torch.Tensor,
                          W: torch.Tensor, alpha: torch.Tensor, **kwargs: Any) -> Tuple[torch.Tensor, ValAlphaGrad]:
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

