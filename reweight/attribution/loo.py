r"""Exact leave-one-out on a subset of training samples: the ground truth every estimator is checked against.

For each ``i`` of the subset, :math:`W^*_{-i} = \arg\min_W F(W, \alpha^{(-i)})` with
:math:`\alpha^{(-i)}_i = 0` and every other weight unchanged (no re-normalisation), solved by
Newton (:func:`reweight.head.solve_head`) to a gradient-norm tolerance, started near the full
optimum :math:`W^*`:

* ``warm_start="newton_step"`` (default): start at
  :math:`W_0 = W^* + H^{-1}\frac{\alpha_i}{n}g_ih_i^\top`, the first Newton step of the leave-one-out
  problem from :math:`W^*` taken with the full problem's Hessian (factored once for the whole
  subset; :math:`\nabla F_{-i}(W^*) = -\frac{\alpha_i}n g_ih_i^\top` since :math:`\nabla F(W^*)=0`),
  polished by simplified-Newton steps :math:`W \leftarrow W - H(W^*)^{-1}\nabla F_{-i}(W)` vectorised
  over blocks of left-out samples; ``solve_head`` then certifies convergence (usually with zero
  iterations) or finishes the job. For heads too large to factor (``K·D > 4096``) the start is one
  CG solve with the full Hessian and ``solve_head`` does the rest;
* ``"optimum"``: start at :math:`W^*`;
* ``"none"``: from zeros -- the from-scratch refit (the slow twin used by tests and the benchmark).

All three converge to the same optimum (strong convexity); only the cost differs. Ground truth:

.. math::

    \Delta_i = L_{val}(W^*_{-i}) - L_{val}(W^*), \qquad
    \Delta_i(x) = \ell(W^*_{-i}h_x, y_x) - \ell(W^*h_x, y_x), \qquad \delta z_i(x) = (W^*_{-i} - W^*)h_x.

Reference:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017 (LOO as
    the ground truth of influence estimates).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch

from ..errors import ConfigError, DataError
from ..head import solve_head
from ..validate import check_indices, check_number, renamed_option
from .base import AttributionProblem, check_queries

__all__ = ["LOOResult", "exact_loo", "retrain"]

log = logging.getLogger(__name__)

DENSE_FACTOR_MAX = 4096  # K*D up to which the full Hessian is factored densely for the Newton-step start


@dataclass
class LOOResult:
    r"""Exact leave-one-out ground truth on a subset.

    Attributes:
        subset: ``(m,)`` training rows left out (one at a time).
        delta_val: ``(m,)`` :math:`\Delta_i` on the mean validation loss (None without a validation set).
        delta_query: ``(m, Q)`` per-query loss changes (None without queries).
        delta_logits: ``(m, Q, K)`` per-query logit changes (None without queries).
        iters: ``(m,)`` Newton iterations; seconds: ``(m,)`` wall time per sample (start + solve);
        converged: ``(m,)``; grad_norm: ``(m,)`` final :math:`\|\nabla F_{-i}\|`.
        setup_seconds: one-off cost (Hessian factorisation for the ``newton_step`` start).
        warm_start: the start used.
    """

    subset: torch.Tensor
    delta_val: Optional[torch.Tensor]
    delta_query: Optional[torch.Tensor]
    delta_logits: Optional[torch.Tensor]
    iters: torch.Tensor
    seconds: torch.Tensor
    converged: torch.Tensor
    grad_norm: torch.Tensor
    setup_seconds: float
    warm_start: str

    @property
    def total_seconds(self) -> float:
        return float(self.seconds.sum()) + self.setup_seconds


def exact_loo(problem: AttributionProblem, subset, X_val: Optional[torch.Tensor] = None,
              y_val: Optional[torch.Tensor] = None, X_query: Optional[torch.Tensor] = None,
              y_query: Optional[torch.Tensor] = None, grad_tol: Optional[float] = None, max_iter: int = 100,
              warm_start: Literal["newton_step", "optimum", "none"] = "newton_step",
              newton_system: Literal["auto", "dense", "cg"] = "auto", chord_steps: int = 8,
              block_size: int = 64, progress: bool = False, tol: Optional[float] = None) -> LOOResult:
    r"""Retrain without each sample of ``subset`` (module docstring) and measure the changes.

    Args:
        problem: the trained head; ``problem.W`` must be its optimum to about ``grad_tol``.
        subset: ``(m,)`` distinct training indices in ``0..n-1``.
        X_val, y_val: ``(m_val, D)``, ``(m_val,)`` validation set for :math:`\Delta_i` (optional).
        X_query, y_query: ``(Q, D)``, ``(Q,)`` queries for per-query changes (optional).
        grad_tol: gradient-norm tolerance of every solve (default ``1e-10``: float64 with ``1e-10`` gives
            ~1e-10 accuracy in :math:`W`, far below the :math:`\Delta_i` it measures; ``tol`` is its
            deprecated name).
        max_iter: Newton iteration cap.
        warm_start: ``newton_step``, ``optimum`` or ``none`` (from scratch).
        newton_system: passed to :func:`~reweight.head.solve_head`.
        chord_steps: at most this many simplified-Newton steps
            :math:`W \leftarrow W - H(W^*)^{-1}\nabla F_{-i}(W)` with the factored full Hessian after the
            ``newton_step`` start, vectorised over blocks of ``block_size`` left-out samples (each
            step costs one gradient and one mat-vec with the inverse full Hessian; they contract by
            a factor :math:`O(\alpha_i\|g_i\|\|h_i\|^2/(\lambda n))`). ``solve_head`` then certifies
            (and if needed finishes) convergence to ``grad_tol``.

    Raises:
        DataError: for indices out of range or duplicated, or validation/query features of the
            wrong width (bias column included).
        ConfigError: for an unknown ``warm_start`` or a ``grad_tol`` that is not a finite number > 0.
    """
    from tqdm.auto import tqdm

    idx = check_indices(subset, problem.n, "exact_loo")
    if warm_start not in ("newton_step", "optimum", "none"):
        raise ConfigError(f"The 'warm_start' parameter of exact_loo must be one of 'newton_step', 'optimum', 'none'. "
                          f"Got {warm_start!r} instead.")
    grad_tol = renamed_option(grad_tol, tol, "tol", "grad_tol", "exact_loo", 1e-10)
    check_number(grad_tol, "grad_tol", "exact_loo", low=0.0, low_open=True)
    tol = grad_tol
    for Xs, ys, what in ((X_val, y_val, "validation"), (X_query, y_query, "query")):
        if (Xs is None) != (ys is None):
            raise DataError(f"exact_loo needs both {what} features and labels, or neither.")
        if Xs is not None:
            check_queries(Xs, ys, problem.D, problem.K, "exact_loo")
    inner, W_star, alpha = problem.inner, problem.W, problem.alpha
    dt, dev = inner.X.dtype, inner.X.device
    if X_val is not None:
        X_val, y_val = X_val.to(dev, dt), torch.as_tensor(y_val).to(dev)
        base_val = float(torch.nn.functional.cross_entropy(X_val @ W_star.T, y_val))
    if X_query is not None:
        X_query, y_query = X_query.to(dev, dt), torch.as_tensor(y_query).to(dev)
        base_logits = X_query @ W_star.T
        base_q = torch.nn.functional.cross_entropy(base_logits, y_query, reduction="none")

    t0 = time.perf_counter()
    Hinv, H = None, None
    if warm_start == "newton_step":
        H = inner.hessian(W_star, alpha)
        if problem.K * problem.D <= DENSE_FACTOR_MAX:
            # explicit inverse from the Cholesky factor: every later use is one (K*D)^2 mat-vec
            Hinv = torch.cholesky_inverse(H.cholesky()).to(dt)
    G = problem.residuals()
    setup = time.perf_counter() - t0

    m = idx.numel()
    d_val = torch.empty(m, dtype=dt) if X_val is not None else None
    d_q = torch.empty(m, X_query.shape[0], dtype=dt) if X_query is not None else None
    d_z = torch.empty(m, X_query.shape[0], problem.K, dtype=dt) if X_query is not None else None
    iters = torch.empty(m, dtype=torch.int64)
    secs = torch.empty(m, dtype=torch.float64)
    conv = torch.empty(m, dtype=torch.bool)
    gns = torch.empty(m, dtype=torch.float64)
    done = 0
    bar = tqdm(total=m, desc="exact LOO", disable=not progress)
    for lo in range(0, m, block_size):
        blk = idx[lo:lo + block_size]
        t1 = time.perf_counter()
        starts = start_gn = None
        if warm_start == "newton_step" and Hinv is not None:
            starts, start_gn = _batched_starts(inner, alpha, W_star, G, Hinv, blk, tol, chord_steps)
        t_start = (time.perf_counter() - t1) / blk.numel()
        for jj, i in enumerate(blk.tolist()):
            j = lo + jj
            t1 = time.perf_counter()
            a = alpha.clone()
            a[i] = 0.0
            if warm_start == "none":
                W0 = None
            elif warm_start == "optimum":
                W0 = W_star
            elif starts is not None:
                W0 = starts[jj]
            else:  # large head: the Newton step from W* by CG on the full Hessian
                b = (alpha[i] / problem.n) * G[i][:, None] * inner.X[i][None, :]  # -grad F_{-i}(W*)
                W0 = W_star + H.solve(b, method="cg", rtol=1e-6).x
            if start_gn is not None and float(start_gn[jj]) <= tol:
                # already certified: the batched polish computed this sample's exact ||grad F_{-i}||
                W_i, iters[j], conv[j], gns[j] = W0, 0, True, float(start_gn[jj])
            else:
                sol = solve_head(inner, a, W0=W0, grad_tol=tol, max_iter=max_iter, newton_system=newton_system)
                W_i, iters[j], conv[j], gns[j] = sol.W, sol.iters, sol.converged, sol.grad_norm
            secs[j] = time.perf_counter() - t1 + t_start
            if X_val is not None:
                d_val[j] = float(torch.nn.functional.cross_entropy(X_val @ W_i.T, y_val)) - base_val
            if X_query is not None:
                z = X_query @ W_i.T
                d_z[j] = (z - base_logits).cpu()
                d_q[j] = (torch.nn.functional.cross_entropy(z, y_query, reduction="none") - base_q).cpu()
        done += blk.numel()
        bar.update(blk.numel())
    bar.close()
    if not bool(conv.all()):
        log.warning("exact_loo: %d of %d leave-one-out solves did not reach grad_tol=%.3g.", int((~conv).sum()), m, tol)
    return LOOResult(subset=idx, delta_val=d_val, delta_query=d_q, delta_logits=d_z, iters=iters, seconds=secs,
                     converged=conv, grad_norm=gns, setup_seconds=setup, warm_start=warm_start)


def _batched_starts(inner, alpha: torch.Tensor, W_star: torch.Tensor, G: torch.Tensor, Hinv: torch.Tensor,
                    blk: torch.Tensor, tol: float, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Newton-step starts polished by simplified Newton for a block of left-out samples.

    Returns the starts ``(B, K, D)`` and their exact gradient norms :math:`\|\nabla F_{-i}(W)\|` ``(B,)``
    (a start at or below ``tol`` is a certified solution).

    :math:`W_0 = W^* + H^{-1}\frac{\alpha_i}{n}g_ih_i^\top`, then
    :math:`W \leftarrow W - H(W^*)^{-1}\nabla F_{-i}(W)` while the gradient norm exceeds ``tol`` and
    keeps falling (per sample), all samples of the block at once (one ``n x D x (B*K)`` product per step).
    """
    B = blk.numel()
    K, D = W_star.shape
    A = alpha[:, None].repeat(1, B)
    A[blk, torch.arange(B)] = 0.0
    rhs = (alpha[blk] / inner.n)[:, None, None] * G[blk][:, :, None] * inner.X[blk][:, None, :]
    W = W_star[None] + (rhs.reshape(B, -1) @ Hinv).reshape(B, K, D)
    g = inner.grad_batch(W, A)
    gn = torch.linalg.vector_norm(g.reshape(B, -1), dim=1)
    stalled = torch.zeros(B, dtype=torch.bool)
    for _ in range(steps):
        act = torch.nonzero((gn > tol) & ~stalled).flatten()  # only unfinished samples cost a gradient
        if act.numel() == 0:
            break
        W_new = W[act] - (g[act].reshape(act.numel(), -1) @ Hinv).reshape(-1, K, D)
        g_new = inner.grad_batch(W_new, A[:, act])
        gn_new = torch.linalg.vector_norm(g_new.reshape(act.numel(), -1), dim=1)
        better = gn_new < gn[act]
        stalled[act[~better]] = True  # no longer contracting: leave it to solve_head's Newton
        upd = act[better]
        W[upd], g[upd], gn[upd] = W_new[better], g_new[better], gn_new[better]
    return W, gn


def retrain(problem: AttributionProblem, alpha: torch.Tensor, grad_tol: float = 1e-8, max_iter: int = 100) -> torch.Tensor:
    r""":math:`\arg\min_W F(W, \alpha)` for new weights, warm-started at ``problem.W``, ``(K, D)``."""
    return solve_head(problem.inner, alpha, W0=problem.W, grad_tol=grad_tol, max_iter=max_iter).W
